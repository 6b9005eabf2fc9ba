"""Every notebook executed by papermill, chained 01 -> 06 through the runner on params/debug.yaml.

Also checks that a stage rerun by hand (papermill on the notebook itself, with ``params_file`` set, the way a
user reruns one stage in Jupyter) gives the same submission as the runner (stage 04, stage 05 retrained from
scratch, stage 06), and that a second runner call skips finished stages.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from common.cli import pipeline
from common.config import STAGE_CONFIGS, load_params
from common.core import paths

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "params" / "debug.yaml"
STAGES = ["01", "02", "03", "04", "05", "06"]
ENSEMBLE_SUBMISSION = "nbtest-emb1-ens1-w25-blend0.5-thrspecies"  # params/debug.yaml's stage-06 settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("nbrun")
    mp = pytest.MonkeyPatch()
    for var, sub in (("REID_INPUT_DIR", "inputs"), ("REID_WORKING_DIR", "working"),
                     ("REID_SUBMISSIONS_DIR", "submissions")):
        mp.setenv(var, str(base / sub))
    mp.setenv("REID_PROGRESS", "off")
    params = {**load_params(DEBUG), "exp": "nbtest"}
    metrics = pipeline.run(STAGES, params, log_output=False)
    yield {"base": base, "params": params, "metrics": metrics}
    mp.undo()


def test_chain_writes_every_contracted_file(run_dirs):
    exp = paths.exp_dir("nbtest")
    for nb in ("01_crop_images", "02_train_embedder", "03_extract_embeddings", "04_retrieve_submit",
               "05_train_classifier", "06_ensemble_postprocess"):
        record = nbformat.read(exp / f"{nb}.ipynb", as_version=4)
        injected = [c for c in record.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert injected, f"{nb}: the executed record must keep the injected parameters"
        assert '"nbtest"' in injected[0].source
    assert (exp / "01_crop" / "boxes.csv").exists()
    crop_metrics = json.loads((exp / "01_crop" / "metrics.json").read_text())  # the detector path's area share
    assert all(0 < crop_metrics[f"{s}_crop_area_median"] <= 1 for s in ("train", "test"))
    # the sample-boxes figure is kept as a PNG, although ultralytics switched matplotlib's backend while training
    crop_record = nbformat.read(exp / "01_crop_images.ipynb", as_version=4)
    outputs = [o for c in crop_record.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), "01: no image/png output in the record"
    assert not any("<Figure size" in o.get("data", {}).get("text/plain", "") for o in outputs
                   if "image/png" not in o.get("data", {}))
    for fold in (0, 1):
        assert (exp / "02_embedder" / f"fold{fold}" / "model.pt").exists()
        for split in ("train", "test"):
            assert (exp / "03_embeddings" / f"fold{fold}" / f"{split}.npz").exists()
    sub = pd.read_csv(paths.submission_path("nbtest"))
    sample = pd.read_csv(paths.inputs_dir() / "demo_tiny" / "sample_submission.csv")
    assert sub["image"].tolist() == sample["image"].tolist()
    assert sub["predictions"].str.split().map(len).between(1, 5).all()
    metrics = json.loads((exp / "metrics.json").read_text())
    assert metrics == run_dirs["metrics"]
    for key in ("map5", "map5_known", "map5_new", "threshold", "new_share"):
        assert key in metrics
    assert 0.0 <= metrics["map5"] <= 1.0
    # stage 05: its arrays, its metrics (merged into the experiment's, next to stage 04's) and its submission
    cls_dir = exp / "05_classifier"
    for name in ("oof.npz", "test.npz", "metrics.json", "classes.json", "fold0/model.pt", "fold1/model.pt"):
        assert (cls_dir / name).exists(), name
    assert set(metrics["classifier"]) >= {"oof_accuracy", "oof_balanced_accuracy", "test_accuracy"}
    cls_sub = pd.read_csv(paths.submission_path("nbtest-classifier"))
    assert cls_sub["image"].tolist() == sample["image"].tolist()
    assert (cls_sub["predictions"].str.split().map(len) == 5).all()
    # stage 06: the ensemble's arrays, pseudo-label and cleaned folders, its metrics and its submission
    ens_dir = exp / "06_ensemble"
    for name in ("oof.npz", "test.npz", "members.csv", "metrics.json", "pseudo_round1/train.csv",
                 "pseudo_rounds.csv", "flagged.csv", "cleaned/train.csv", "redistributed.csv", "soup/fold0.pt",
                 "soup/fold1.pt", "retrieval_oof_scores.csv", "species_thresholds.csv"):
        assert (ens_dir / name).exists(), name
    assert metrics["ensemble"]["submission"] == ENSEMBLE_SUBMISSION
    assert set(metrics["ensemble"]) >= {"oof_accuracy", "retrieval_oof_map5", "retrieval_map5", "pseudo_kept"}
    ens_sub = pd.read_csv(paths.submission_path(ENSEMBLE_SUBMISSION))
    assert ens_sub["image"].tolist() == sample["image"].tolist()
    assert ens_sub["predictions"].str.split().map(len).between(1, 5).all()


def test_rerun_skips_finished_stages(run_dirs, capsys):
    pipeline.run(STAGES, run_dirs["params"], log_output=False)
    out = capsys.readouterr().out
    assert out.count("skipped") == len(STAGES), out


@pytest.mark.parametrize("stage, submission", [("04", "nbtest"), ("05", "nbtest-classifier"),
                                               ("06", ENSEMBLE_SUBMISSION)])
def test_stage_by_hand_equals_runner(run_dirs, tmp_path, stage, submission):
    """papermill on a notebook itself, with params_file (as in Jupyter) and force=True, rewrites the same
    submission and metrics (stage 05 retrains both folds from scratch to get there)."""
    import papermill as pm

    before = pd.read_csv(paths.submission_path(submission))
    metrics_before = json.loads((paths.exp_dir("nbtest") / "metrics.json").read_text())
    nb = pipeline.notebook_for(stage)
    pm.execute_notebook(str(nb), str(tmp_path / "by_hand.ipynb"), cwd=str(nb.parent), progress_bar=False,
                        parameters={"params_file": str(DEBUG), "exp": "nbtest", "force": True})
    after = pd.read_csv(paths.submission_path(submission))
    pd.testing.assert_frame_equal(before, after)
    assert json.loads((paths.exp_dir("nbtest") / "metrics.json").read_text()) == metrics_before


def test_parameters_cells_match_config_defaults():
    """Each notebook declares every field of its stage's config, with the same default and, as papermill reads
    it (``--help-notebook``), the field's help. The cells are generated (tests/test_notebook_cells.py checks
    that); this reads them back the way papermill does."""
    import papermill as pm

    for stage, cls in STAGE_CONFIGS.items():
        declared = pm.inspect_notebook(str(pipeline.notebook_for(stage)))
        defaults, docs = cls.defaults(), cls.field_docs()
        assert set(defaults) | {"params_file"} == set(declared), stage
        for name, value in defaults.items():
            literal = declared[name]["default"]
            assert eval(literal) == value, f"{stage}: {name} defaults to {literal} in the notebook, {value} in config"
            assert declared[name]["help"] == docs[name], f"{stage}: papermill reads {name}'s help differently"
            assert declared[name]["inferred_type_name"] == type(value).__name__, (stage, name)
