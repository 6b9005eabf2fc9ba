"""common.cli.notebooks: the notebooks' parameters cells are what the generator writes from the configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.cli import notebooks as gen
from common.cli import pipeline
from common.config import STAGE_CONFIGS, CropConfig, ExtractConfig

ROOT = Path(__file__).resolve().parents[1]


def test_committed_cells_are_the_generated_ones():
    assert gen.stale() == [], "a notebook's parameters cell differs: run `python -m common.cli.notebooks`"
    assert gen.main(["--check"]) == 0


@pytest.mark.parametrize("value, expected", [("demo", '"demo"'), ("", '""'), (42, "42"), (1e-3, "0.001"),
                                             (-0.25, "-0.25"), (True, "True"), ("a \"b\"", '"a \\"b\\""')])
def test_literal(value, expected):
    assert gen.literal(value) == expected
    assert eval(expected) == value


def test_line_and_its_errors():
    assert gen.line("lr", "float", 0.5, "peak learning rate.") == "lr: float = 0.5  # peak learning rate."
    with pytest.raises(ValueError, match="parameter m: .* has '='"):
        gen.line("m", "float", 0.5, "m = a * n")  # papermill skips a line with two '='
    with pytest.raises(TypeError, match="default"):
        gen.literal([1])


def test_cell_of_stage_03_known_answer():
    cell = gen.parameters_cell(ExtractConfig).splitlines()
    params = [ln for ln in cell if ln and not ln.startswith("#")]
    assert [ln.split(":")[0] for ln in params] == ["params_file", "data", "exp", "seed", "device", "num_workers",
                                                    "force", "bad_images", "n_folds", "folds", "fold_seed", "full_fit",
                                                    "batch_size", "tta_flip",
                                                    "inference_only"]
    assert 'batch_size: int = 64  # images per forward pass.' in params
    assert "folds: str = \"0\"  # which folds to run: all or a comma list such as 0 or 0,2." in params
    headings = [ln for ln in cell if ln.startswith("# --")]
    assert headings == ["# -- every stage", "# -- per-fold stages (02-05)", "# -- stage 03 only"]
    assert "03.key" in params[0]  # params_file's help names this stage's per-stage keys


def test_every_field_is_in_its_cell_once():
    for stage, cls in STAGE_CONFIGS.items():
        names = [ln.split(":")[0] for ln in gen.parameters_cell(cls).splitlines() if ln and ln[0] != "#"]
        assert names == ["params_file", *cls.field_names()], stage


@pytest.fixture
def notebooks_copy(tmp_path):
    dest = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", dest)
    return dest


def test_check_and_write_on_a_stale_notebook(notebooks_copy, capsys):
    path = pipeline.notebook_for("01", notebooks_copy)
    original = path.read_text()
    nb = json.loads(original)
    cell = gen.tagged_cell(nb, path)
    cell["source"] = ["crop: bool = True  # (1  no crop)\n", "box_conf: float = 0.3"]  # hand-edited, garbled
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    assert gen.stale(notebooks_copy) == [path]
    assert gen.main(["--check", "--notebooks", str(notebooks_copy)]) == 1
    assert "01_crop_images.ipynb: parameters cell differs" in capsys.readouterr().out
    assert gen.write(notebooks_copy) == [path]
    assert path.read_text() == original  # the cell is back, every other byte unchanged
    assert gen.write(notebooks_copy) == []  # nothing stale: nothing written
    assert gen.source(gen.tagged_cell(json.loads(original), path)) == gen.parameters_cell(CropConfig)


def test_a_notebook_without_one_parameters_cell_is_an_error(notebooks_copy):
    path = pipeline.notebook_for("03", notebooks_copy)
    nb = json.loads(path.read_text())
    gen.tagged_cell(nb, path)["metadata"]["tags"] = []
    path.write_text(json.dumps(nb))
    with pytest.raises(ValueError, match="03_extract_embeddings.ipynb: 0 cells tagged"):
        gen.stale(notebooks_copy)
