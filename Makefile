# The two commands a newcomer needs:
#   make demo   create .venv from the pinned files, then run stages 01-04 on the generated demo competition
#   make test   create .venv if needed, then lint and run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Nothing in the demo or the tests needs the internet: say so, so no library waits on a network call.
OFFLINE := HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1

.PHONY: env demo test lint clean

env: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
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
