# The two commands a newcomer needs:
#   make demo   create .venv from the pinned files, then run stages 01-04 on the generated demo competition
#   make test   create .venv if needed, then lint and run the test suite (what CI runs)
# On a CUDA machine: `make env GPU=1` also replaces faiss-cpu by faiss-gpu (requirements-gpu.txt) so that
# stage 04 searches on the GPU; CI and CPU machines leave GPU unset.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
GPU ?=
STAMP := $(VENV)/.installed$(if $(GPU),-gpu)
# Nothing in the demo or the tests needs the internet: say so, so no library waits on a network call.
OFFLINE := HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1

.PHONY: env demo test lint clean

env: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt requirements-gpu.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
ifneq ($(GPU),)
	$(BIN)/pip uninstall --disable-pip-version-check -q -y faiss-cpu
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-gpu.txt
	$(BIN)/python -c "import faiss; print('faiss', faiss.__version__, 'GPUs:', faiss.get_num_gpus())"
endif
	touch $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(BIN)/python -m common.cli.pipeline --params params/demo.yaml --baseline

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/nbstripout --verify notebooks/*.ipynb

test: lint
	$(OFFLINE) $(BIN)/python -m pytest -q -ra

clean:
	rm -rf working/* submissions/* inputs/demo inputs/demo_tiny
