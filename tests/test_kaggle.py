"""common.cli.kaggle: the bundle of a finished tiny run, run the way Kaggle runs it.

The real check builds the code and weights datasets and the kernel folders of a params/debug.yaml run (stages
01-05), then executes the kernels 01 -> 03 -> 04 and 05 with papermill inside a fake ``/kaggle`` tree (``KAGGLE_ROOT``),
``KAGGLE_KERNEL_RUN_TYPE=Batch``, the network made to fail, and a fresh virtual environment that holds the base
stack but not ``common``: the first cell must install ``common`` from the code dataset, each stage must find the
checkpoints by experiment name, and stage 04 must write ``/kaggle/working/submission.csv``, equal to the local
run's submission (same threshold). Each kernel starts with an empty ``working/``; an earlier kernel's output is
mounted under ``input/`` as Kaggle does for ``kernel_sources``. Both mount layouts are exercised.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pandas as pd
import pytest

from common.cli import kaggle
from common.config import load_params
from common.core import paths

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "params" / "debug.yaml"
EXP = "kgl"
OWNER = "tester"
COMPETITION = "demo-tiny"  # Kaggle competition slugs use dashes; the data is mounted under this name

# Loaded first by the fresh interpreter and by every kernel it starts: only loopback connections (papermill's
# kernel talks over 127.0.0.1) and no DNS, like a Kaggle notebook with the internet off.
SITECUSTOMIZE = '''
import socket

_LOCAL = ("127.0.0.1", "::1", "localhost")
_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _check(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOCAL:
        raise OSError(101, f"network is unreachable (internet off): {address[0]}")


def connect(self, address):
    _check(self, address)
    return _connect(self, address)


def connect_ex(self, address):
    _check(self, address)
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if host not in _LOCAL and host is not None:
        raise socket.gaierror(-3, f"temporary failure in name resolution (internet off): {host}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
'''


# -- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_torch_thread):
    """params/debug.yaml stages 01-05 under a temporary working folder, then the Kaggle bundles of the run."""
    from common.config import ClassifierConfig, CropConfig, EmbedderConfig, ExtractConfig, RetrievalConfig
    from common.data.competition import open_competition
    from common.stages import crop_images as crop_stage
    from common.stages import extract_embeddings as embed
    from common.stages import retrieve_submit as submit
    from common.stages import train_classifier as classify
    from common.stages import train_embedder

    base = tmp_path_factory.mktemp("kaggle_run")
    mp = pytest.MonkeyPatch()
    for var, sub in (("REID_INPUT_DIR", "inputs"), ("REID_WORKING_DIR", "working"),
                     ("REID_SUBMISSIONS_DIR", "submissions")):
        mp.setenv(var, str(base / sub))
    mp.setenv("REID_PROGRESS", "off")
    mp.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    mp.setenv("KAGGLE_ROOT", str(base / "no-kaggle"))
    params = {**load_params(DEBUG), "exp": EXP}
    comp = open_competition(params["data"])
    pick = lambda cls: cls(**{k: v for k, v in params.items() if k in cls.field_names()})  # noqa: E731
    crop_stage.run_crop(pick(CropConfig), comp)
    ecfg = pick(EmbedderConfig)
    train_embedder.run_training(ecfg, comp, train_embedder.prepare_folds(ecfg, comp))
    embed.run_extraction(pick(ExtractConfig), comp)
    result = submit.run_retrieval(pick(RetrievalConfig), comp)
    ccfg = pick(ClassifierConfig)
    classify.prepare_folds(ccfg, comp)
    classify.run_classification(ccfg, comp)
    assert kaggle.main(["build", "--exp", EXP, "--notebooks", "01,03,04,05", "--dataset-owner", OWNER,
                        "--competition", COMPETITION, "--out", str(base / "bundle"), "--extra-wheels", "none"]) == 0
    out = base / "bundle"
    kaggle.build(EXP, ["01", "03", "04"], OWNER, COMPETITION, out=base / "single", single=True)
    yield {"base": base, "bundle": out, "single": base / "single", "comp_root": comp.root, "result": result,
           "submission": paths.submission_path(EXP),
           "classifier_submission": paths.submission_path(f"{EXP}-classifier")}
    mp.undo()


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A virtual environment with the base stack (this venv's packages, minus `common`) and no network."""
    root = tmp_path_factory.mktemp("venv")
    site = Path(sysconfig.get_paths()["purelib"])
    # The base stack: a folder of links to this environment's packages, without `common` (its editable
    # install's metadata and .pth finder) and without any .pth file (a plain path entry does not run them).
    stack = root / "stack"
    stack.mkdir()
    for entry in site.iterdir():
        name = entry.name
        if name.endswith(".pth") or name.startswith(("__editable__", "reid_notebooks_common")):
            continue
        (stack / name).symlink_to(entry)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "env")], check=True)
    python = root / "env" / "bin" / "python"
    env_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
    (env_site / "base_stack.pth").write_text(f"{stack}\n")
    (env_site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"python": python, "site": env_site}


def kaggle_env(kaggle_root: Path, home: Path) -> dict[str, str]:
    """The environment of a Kaggle kernel: no REID_* variables, Kaggle's markers, dead proxies, offline pip."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REID_", "KAGGLE_", "PYTHON", "JUPYTER", "VIRTUAL_ENV", "PIP_"))}
    env.update({
        "KAGGLE_ROOT": str(kaggle_root), "KAGGLE_KERNEL_RUN_TYPE": "Batch", "REID_PROGRESS": "off",
        "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9", "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "HOME": str(home),
        "JUPYTER_DATA_DIR": str(home / "jupyter"), "IPYTHONDIR": str(home / "ipython"),
        "MPLCONFIGDIR": str(home / "mpl"), "PIP_NO_CACHE_DIR": "1",
        "OMP_NUM_THREADS": "1",  # the shared 2-core CI machine: threads spinning against each other cost minutes
    })
    return env


def mount(src: Path, dst: Path) -> Path:
    """Kaggle mounts attached sources read-only: a copy under ``input/`` does it here."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst, symlinks=False)
    return dst


def run_kernel(venv: dict, kernel_dir: Path, kaggle_root: Path, env: dict[str, str]) -> Path:
    """Execute a kernel folder's notebook with papermill in ``/kaggle/working`` (emptied first, as on Kaggle)."""
    meta = json.loads((kernel_dir / "kernel-metadata.json").read_text())
    working = kaggle_root / "working"
    if working.exists():
        shutil.rmtree(working)
    working.mkdir(parents=True)
    record = kaggle_root / "records" / meta["code_file"]
    record.parent.mkdir(exist_ok=True)
    done = subprocess.run([str(venv["python"]), "-m", "papermill", str(kernel_dir / meta["code_file"]), str(record),
                           "--cwd", str(working), "--no-progress-bar"], env=env, cwd=working,
                          capture_output=True, text=True)
    assert done.returncode == 0, f"{meta['id']} failed:\n{done.stderr[-4000:]}"
    return record


def cell_text(record: Path) -> str:
    nb = json.loads(record.read_text())
    out = []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            out.append("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


# -- the real check -------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("layout, single", [("slug", False), ("owner", True)])
def test_kernels_run_offline_like_kaggle(tiny_run, fresh_venv, tmp_path, layout, single):
    """01 -> 03 -> 04 (and 05) as chained Kaggle kernels, or 01-04 as one (--single-kernel): install from the
    bundle, find the run by name, write submission.csv."""
    venv, bundle = fresh_venv, tiny_run["single" if single else "bundle"]
    # as fresh as a new Kaggle session: remove what the other layout's run installed
    for installed in [venv["site"] / "common", *venv["site"].glob("reid_notebooks_common-*.dist-info")]:
        shutil.rmtree(installed, ignore_errors=True)
    probe = subprocess.run([str(venv["python"]), "-c", "import common"], cwd=tmp_path, capture_output=True,
                           text=True, env=kaggle_env(tmp_path / "none", tmp_path))
    assert probe.returncode != 0 and "No module named 'common'" in probe.stderr, "the fresh venv must lack common"
    probe = subprocess.run([str(venv["python"]), "-c", "import socket; socket.create_connection(('8.8.8.8', 53), 2)"],
                           cwd=tmp_path, capture_output=True, text=True, env=kaggle_env(tmp_path / "none", tmp_path))
    assert "internet off" in probe.stderr, "the network must fail in the fresh venv"

    root = tmp_path / "kaggle"
    where = {"slug": lambda slug: root / "input" / slug,
             "owner": lambda slug: root / "input" / "datasets" / OWNER / slug}[layout]
    kernel_where = {"slug": lambda slug: root / "input" / slug,
                    "owner": lambda slug: root / "input" / "notebooks" / OWNER / slug}[layout]
    comp_dir = root / "input" / COMPETITION if layout == "slug" else root / "input" / "competitions" / COMPETITION
    mount(tiny_run["comp_root"], comp_dir)
    mount(bundle / "code", where("reid-common"))
    mount(bundle / "weights", where(paths.weights_slug(EXP)))
    env = kaggle_env(root, tmp_path / "home")

    stages = ("01", "03", "04", "05")
    kernels = {"inference": f"{EXP}-inference"} if single else {s: kaggle.kernel_slug(EXP, s) for s in stages}
    assert sorted(p.name for p in (bundle / "kernels").iterdir()) == sorted(kernels.values())
    sample = pd.read_csv(tiny_run["comp_root"] / "sample_submission.csv")
    working = root / "working" / EXP
    for stage, slug in kernels.items():
        record = run_kernel(venv, bundle / "kernels" / slug, root, env)
        if stage in ("01", "inference"):
            text = cell_text(record)
            assert f"from {venv['site'] / 'common'}" in text, text[:2000]  # installed from the bundle
            assert (working / "01_crop" / "crops" / "test").is_dir()
            assert not (working / "01_crop" / "crops" / "train").exists()  # nothing trained
        if stage in ("03", "inference"):
            assert (working / "03_embeddings" / "fold0" / "test.npz").exists()
            assert not (working / "03_embeddings" / "fold0" / "train.npz").exists()
        if stage in ("01", "03"):
            mount(root / "working", kernel_where(slug))  # the kernel's output, attached to the next one
        if stage in ("04", "05", "inference"):
            submission = pd.read_csv(root / "working" / "submission.csv")
            assert list(submission.columns) == ["image", "predictions"]
            assert submission["image"].tolist() == sample["image"].tolist()
            assert (submission["predictions"].str.split().map(len) == 5).all()
            local = tiny_run["classifier_submission" if stage == "05" else "submission"]
            pd.testing.assert_frame_equal(submission, pd.read_csv(local))  # what the local run submitted
        if stage in ("04", "inference"):
            metrics = json.loads((working / "04_retrieval" / "metrics.json").read_text())
            assert metrics["threshold"] == pytest.approx(tiny_run["result"].threshold)  # the stored threshold
        if stage == "05":
            assert not (working / "05_classifier" / "fold0" / "model.pt").exists()  # nothing trained

    listed = subprocess.run([str(venv["python"]), "-m", "pip", "list", "--path", str(venv["site"])],
                            capture_output=True, text=True, env=env)
    assert "reid-notebooks-common" in listed.stdout, listed.stdout + listed.stderr


# -- the bundle's contents ------------------------------------------------------------------------------------
def test_bundle_layout(tiny_run):
    bundle = tiny_run["bundle"]
    code = bundle / "code"
    assert [p.name for p in code.glob("*.whl")] == ["reid_notebooks_common-0.1.0-py3-none-any.whl"]
    assert (code / kaggle.INSTALL_LIST).read_text() == "reid-notebooks-common==0.1.0\n"  # --extra-wheels none
    assert json.loads((code / "dataset-metadata.json").read_text())["id"] == "tester/reid-common"
    weights = bundle / "weights"
    files = sorted(str(p.relative_to(weights)) for p in weights.rglob("*") if p.is_file())
    per_fold = [f"{EXP}/{stage}/fold{k}/{name}" for k in (0, 1)
                for stage, name in (("02_embedder", "_done.json"), ("02_embedder", "config.json"),
                                    ("02_embedder", "model.pt"), ("03_embeddings", "train.npz"))]
    per_fold += [f"{EXP}/05_classifier/fold{k}/{name}" for k in (0, 1)
                 for name in ("_done.json", "config.json", "model.pt", "log.csv")]
    stage05 = [f"{EXP}/05_classifier/{name}" for name in ("classes.json", "folds.csv", "metrics.json", "oof.npz")]
    assert files == sorted([  # exactly what inference reads: no last.pt, no optimiser state, no test outputs
        "dataset-metadata.json", f"{EXP}/01_crop/detector/weights/best.pt", f"{EXP}/02_embedder/folds.csv",
        f"{EXP}/04_retrieval/metrics.json", f"{EXP}/04_retrieval/threshold_sweep.csv", *per_fold, *stage05])
    assert json.loads((weights / "dataset-metadata.json").read_text())["id"] == f"{OWNER}/{EXP}-weights"
    slugs = {s: kaggle.kernel_slug(EXP, s) for s in ("01", "03", "04", "05")}
    assert slugs == {"01": "kgl-01-crop-images", "03": "kgl-03-extract-embeddings", "04": "kgl-04-retrieve-submit",
                     "05": "kgl-05-train-classifier"}
    for stage, slug in slugs.items():
        meta = json.loads((bundle / "kernels" / slug / "kernel-metadata.json").read_text())
        assert meta["id"] == f"{OWNER}/{slug}" and meta["title"] == slug.replace("-", " ")
        assert meta["kernel_type"] == "notebook" and meta["language"] == "python" and meta["is_private"] is True
        assert meta["enable_internet"] is False
        assert meta["enable_gpu"] is (stage != "04")  # a model runs in 01, 03 and 05; 04 is a CPU search
        assert meta["dataset_sources"] == [f"{OWNER}/reid-common", f"{OWNER}/{EXP}-weights"]
        assert meta["competition_sources"] == [COMPETITION]
        earlier = {"01": [], "03": [f"{OWNER}/{slugs['01']}"], "04": [f"{OWNER}/{slugs['03']}"],
                   "05": [f"{OWNER}/{slugs['01']}"]}[stage]
        assert meta["kernel_sources"] == earlier
        nb = json.loads((bundle / "kernels" / slug / meta["code_file"]).read_text())
        injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
        text = "".join(injected[0]["source"])
        install = "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])
        assert f'\ncode_dataset = "{OWNER}/reid-common"' in install  # installs from its own code dataset only
        assert f'data = "{COMPETITION}"' in text and f'exp = "{EXP}"' in text and "inference_only = True" in text
    single = json.loads((tiny_run["single"] / "kernels" / f"{EXP}-inference" / "kernel-metadata.json").read_text())
    assert single["kernel_sources"] == [] and single["enable_gpu"] is True  # one kernel: nothing to chain
    cells = json.loads((tiny_run["single"] / "kernels" / f"{EXP}-inference" / single["code_file"]).read_text())["cells"]
    assert sum("reid-install-requirements.txt" in "".join(c["source"]) for c in cells) == 1  # installed once
    injected = ["".join(c["source"]) for c in cells if "injected-parameters" in c["metadata"].get("tags", [])]
    assert len(injected) == 3 and all("inference_only = True" in text for text in injected)  # 01, 03, 04
    assert len({c["id"] for c in cells}) == len(cells)
    nb04 = "".join("".join(c["source"]) for c in json.loads(
        (bundle / "kernels" / slugs["04"] / f"{slugs['04']}.ipynb").read_text())["cells"])
    assert "knn_k = 10" in nb04 and 'folds = "all"' in nb04  # the run's own parameters (params/debug.yaml)


def test_metadata_fields():
    meta = kaggle.dataset_metadata("alice", "reid-common", "code")
    assert meta == {"title": "code (reid)", "id": "alice/reid-common", "licenses": [{"name": "other"}]}
    with pytest.raises(ValueError, match="not a Kaggle slug"):
        kaggle.dataset_metadata("alice", "Reid_Common", "code of reid")
    with pytest.raises(ValueError, match="Kaggle user name"):
        kaggle.kernel_metadata("al ice", "my-kernel", "k.ipynb", [], "comp")
    meta = kaggle.kernel_metadata("alice", "my-kernel", "k.ipynb", ["alice/d"], "", gpu=False)
    assert meta["competition_sources"] == [] and meta["enable_gpu"] is False and meta["kernel_sources"] == []


def test_extra_requirements(tmp_path):
    (tmp_path / "requirements.txt").write_text("faiss-cpu==1.15.1\nUltralytics_Thop==2.2.3  # comment\n")
    extra = tmp_path / "extra.txt"
    extra.write_text("# wheels\nfaiss-cpu   # search\n\nultralytics-thop\nfoo==1.0\n")
    assert kaggle.extra_requirements(extra, tmp_path) == ["faiss-cpu==1.15.1", "ultralytics-thop==2.2.3", "foo==1.0"]
    assert kaggle.extra_requirements(None, tmp_path) == []
    extra.write_text("faiss-cpu\nnot-pinned\n")
    with pytest.raises(ValueError, match=r"extra.txt, line 2: not-pinned is not pinned"):
        kaggle.extra_requirements(extra, tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        kaggle.extra_requirements(tmp_path / "missing.txt", tmp_path)


def test_default_extra_requirements_are_pinned():
    pins = kaggle.extra_requirements(ROOT / kaggle.EXTRA_REQUIREMENTS)
    assert [p.split("==")[0] for p in pins][:2] == ["faiss-cpu", "ultralytics"]


def test_fetch_wheels_offline_from_a_folder(tiny_run, tmp_path):
    kaggle.fetch_wheels(["reid-notebooks-common==0.1.0"], tmp_path, find_links=tiny_run["bundle"] / "code")
    assert [p.name for p in tmp_path.iterdir()] == ["reid_notebooks_common-0.1.0-py3-none-any.whl"]
    with pytest.raises(RuntimeError, match="pip .*download"):
        kaggle.fetch_wheels(["no-such-package==1.0"], tmp_path, find_links=tmp_path)


def fake_run(working: Path, exp: str, used_crops: bool) -> None:
    """The markers and files of a finished two-fold run of stages 02-04, without fold 1's model.pt."""
    from common.core import store

    params = {"exp": exp, "data": "demo_tiny", "n_folds": 2, "folds": "all"}
    store.mark_done(working / exp / "03_embeddings", params)
    store.mark_done(working / exp / "04_retrieval", params)
    (working / exp / "02_embedder").mkdir(parents=True)
    for name in ("04_retrieval/metrics.json", "04_retrieval/threshold_sweep.csv", "02_embedder/folds.csv"):
        (working / exp / name).write_text("x")
    for k in (0, 1):
        fold = working / exp / "02_embedder" / f"fold{k}"
        store.write_json(fold / "config.json", {"used_crops": used_crops})
        store.mark_done(fold, {})
        if k == 0:
            (fold / "model.pt").write_bytes(b"x")
        (working / exp / "03_embeddings" / f"fold{k}").mkdir(parents=True, exist_ok=True)
        (working / exp / "03_embeddings" / f"fold{k}" / "train.npz").write_bytes(b"x")


def test_build_names_the_missing_file(isolated, monkeypatch):
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    fake_run(isolated / "working", "fk", used_crops=False)
    with pytest.raises(FileNotFoundError, match=r"fk/02_embedder/fold1/model.pt not found \(1 file"):
        kaggle.build("fk", ["03", "04"], OWNER, out=isolated / "out")
    assert not (isolated / "out" / "code").exists()  # checked before anything is built
    with pytest.raises(ValueError, match="trained on full images: leave 01 out"):
        kaggle.build("fk", ["01", "03", "04"], OWNER, out=isolated / "out")
    with pytest.raises(ValueError, match="choose among"):
        kaggle.build("fk", ["02"], OWNER)
    fake_run(isolated / "working", "fc", used_crops=True)  # trained on crops: 03 needs 01's test crops
    with pytest.raises(ValueError, match="add 01 to --notebooks"):
        kaggle.build("fc", ["03", "04"], OWNER, out=isolated / "out")
    with pytest.raises(FileNotFoundError, match=r"fc/01_crop/_done.json not found"):
        kaggle.build("fc", ["01", "03", "04"], OWNER, out=isolated / "out")


def test_stage_05_bundles_the_models_that_answer_the_test(isolated):
    """A stage-05 run's Kaggle bundle carries the models its inference loads: every requested fold's, or with
    ``full_fit`` the full model (``fold{n_folds}``) alone."""
    from common.core import store

    for exp, full_fit, expected in (("folds", False, [0, 2]), ("full", True, [3])):
        store.write_json(paths.stage_dir(exp, "05") / "_done.json",
                         {"params": {"n_folds": 3, "folds": "0,2", "full_fit": full_fit}})
        assert kaggle.run_folds(exp, "05") == expected


# -- the notebooks' install cell ------------------------------------------------------------------------------
def install_cell() -> str:
    cells = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        assert "parameters" in code[1]["metadata"].get("tags", []), f"{path.name}: install cell, then parameters"
        cells.append("".join(code[0]["source"]))
    assert len(set(cells)) == 1, "every notebook starts with the same install cell"
    return cells[0]


def test_install_cell_does_nothing_locally(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    monkeypatch.setenv("KAGGLE_ROOT", str(tmp_path / "no-kaggle"))
    namespace: dict = {}
    exec(install_cell(), namespace)
    assert calls == [] and namespace["common"].__name__ == "common"  # no pip call, a plain import
    monkeypatch.delenv("KAGGLE_ROOT")  # the default root, /kaggle, is not there either on this machine
    if not Path("/kaggle/input").exists():
        exec(install_cell(), {})
        assert calls == []


@pytest.mark.parametrize("mount", ["input/reid-common", "input/datasets/alice/reid-common"])
def test_install_cell_installs_from_the_bundle_offline(tmp_path, monkeypatch, mount):
    bundle = tmp_path / mount
    bundle.mkdir(parents=True)
    (bundle / kaggle.INSTALL_LIST).write_text("reid-notebooks-common==0.1.0\n")
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: calls.append(cmd))
    monkeypatch.setenv("KAGGLE_ROOT", str(tmp_path))
    exec(install_cell(), {})
    (cmd,) = calls
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"] and "--no-index" in cmd
    assert cmd[cmd.index("--find-links") + 1] == str(bundle)
    assert cmd[cmd.index("-r") + 1] == str(bundle / kaggle.INSTALL_LIST)


# -- a missing dataset ----------------------------------------------------------------------------------------
def test_missing_weights_dataset_names_the_slug(tiny_run, tmp_path, monkeypatch):
    from common.config import ExtractConfig, RetrievalConfig
    from common.data.competition import open_competition
    from common.stages import extract_embeddings as embed
    from common.stages import retrieve_submit as submit

    root = tmp_path / "kaggle"
    mount(tiny_run["comp_root"], root / "input" / COMPETITION)
    mount(tiny_run["bundle"] / "code", root / "input" / "reid-common")  # the code, but not the weights
    (root / "working").mkdir()
    for var in ("REID_INPUT_DIR", "REID_WORKING_DIR", "REID_SUBMISSIONS_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_ROOT", str(root))
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    comp = open_competition(COMPETITION)
    for call in (lambda: embed.run_extraction(ExtractConfig(exp=EXP, n_folds=2, folds="all", inference_only=True),
                                              comp),
                 lambda: submit.run_retrieval(RetrievalConfig(exp=EXP, n_folds=2, folds="all", inference_only=True),
                                              comp)):
        with pytest.raises(FileNotFoundError, match=rf"attach the dataset '<owner>/{EXP}-weights'") as err:
            call()
        assert "reid-common" in str(err.value) and str(root / "input") in str(err.value)


# -- the runtime estimate -------------------------------------------------------------------------------------
def test_estimate_t4_minutes_by_hand():
    from common.engine.throughput import estimate_t4_minutes

    est = estimate_t4_minutes({"gflops_per_image": 1.0, "decode_images_per_s": 100.0}, n_images=10_000, n_folds=2,
                              utilization=0.5, workers=4)
    # GPU: 1e9 FLOPs x 2 (flip) x 2 folds x 1e4 images = 4e13 FLOPs at 65e12 x 0.5 FLOP/s = 1.2308 s
    assert est["gpu_minutes"] == pytest.approx(1.2308 / 60, rel=1e-4)
    # loading: 2 folds x 1e4 images at 100 img/s x 4 workers = 50 s
    assert est["loading_minutes"] == pytest.approx(50 / 60)
    assert est["stage03_minutes"] == est["loading_minutes"]  # the larger of the two


def test_measure_throughput_runs(one_torch_thread):
    from common.engine.throughput import measure_throughput

    out = measure_throughput("mobilenetv3_small_100", 32, batch_size=2, batches=1, jpeg_size=(64, 48))
    assert out["gflops_per_image"] > 0 and out["cpu_images_per_s"] > 0 and out["decode_images_per_s"] > 0


def test_build_06_attaches_the_members_weights_and_kernels(isolated, monkeypatch):
    """Stage 06's kernel: its weights dataset holds the full run's 06_ensemble/metrics.json only; every member's
    weights dataset and the output of the member's own inference kernel (05 for members, 03 for embed_members)
    are attached; it runs on the CPU."""
    from common.core import store

    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.setattr(kaggle, "build_code_dataset", lambda out, *a, **k: out.mkdir(parents=True))  # no wheel
    stage = isolated / "working" / "ens" / "06_ensemble"
    params = {"exp": "ens", "data": "demo_tiny", "members": "self,clf-b", "embed_members": "emb-c,self",
              "blend_ratio": 0.5, "knn_k": 10, "inputs": {"05:clf-b": None}}  # `inputs`: a fingerprint's extra key
    store.mark_done(stage, params)
    store.write_json(stage / "metrics.json", {"submission": "ens-emb2-ens2-w25-blend0.5-thrglobal"})
    (stage / "members.csv").write_text("member\n")  # not read by inference: stays out of the dataset
    out = kaggle.build("ens", ["06"], OWNER, out=isolated / "out")
    weights = out / "weights"
    assert sorted(str(p.relative_to(weights)) for p in weights.rglob("*") if p.is_file()) == [
        "dataset-metadata.json", "ens/06_ensemble/metrics.json"]
    slug = kaggle.kernel_slug("ens", "06")
    assert slug == "ens-06-ensemble-postprocess"
    meta = json.loads((out / "kernels" / slug / "kernel-metadata.json").read_text())
    assert meta["dataset_sources"] == [f"{OWNER}/reid-common", f"{OWNER}/ens-weights", f"{OWNER}/clf-b-weights",
                                       f"{OWNER}/emb-c-weights"]  # "self" is ens: its dataset listed once
    assert meta["kernel_sources"] == [f"{OWNER}/ens-05-train-classifier", f"{OWNER}/ens-03-extract-embeddings",
                                      f"{OWNER}/clf-b-05-train-classifier", f"{OWNER}/emb-c-03-extract-embeddings"]
    assert meta["enable_gpu"] is False and meta["enable_internet"] is False
    assert meta["competition_sources"] == ["demo-tiny"]
    nb = json.loads((out / "kernels" / slug / meta["code_file"]).read_text())
    text = "".join(next(c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", []))["source"])
    assert "inference_only = True" in text and 'members = "self,clf-b"' in text and "blend_ratio = 0.5" in text
    assert "inputs" not in text
    assert kaggle.ensemble_members("ens") == {"ens": ["05", "03"], "clf-b": ["05"], "emb-c": ["03"]}


@pytest.mark.parametrize("pinned", ["alice/reid-common", "alice/my-code"])
def test_install_cell_installs_only_from_the_kernels_code_dataset(tmp_path, monkeypatch, pinned):
    slug = pinned.split("/")[1]
    # another attached dataset ships a file of the same name, sorted first: it must never be installed from
    for mount in ("input/aaa-evil", "input/datasets/mallory/" + slug, f"input/datasets/alice/{slug}"):
        (tmp_path / mount).mkdir(parents=True)
        (tmp_path / mount / kaggle.INSTALL_LIST).write_text("evil==1.0\n" if "alice" not in mount else "ok==1\n")
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: calls.append(cmd))
    monkeypatch.setenv("KAGGLE_ROOT", str(tmp_path))
    exec(kaggle.pin_code_dataset(install_cell(), pinned), {})
    (cmd,) = calls
    assert cmd[cmd.index("-r") + 1] == str(tmp_path / "input/datasets/alice" / slug / kaggle.INSTALL_LIST)
    calls.clear()
    exec(kaggle.pin_code_dataset(install_cell(), "bob/not-attached"), {})
    assert calls == []  # the kernel's code dataset is not attached: nothing else is installed instead


def test_pin_code_dataset():
    cell = 'import os\ncode_dataset = "reid-common"  # note\nprint(code_dataset)\n'
    assert kaggle.pin_code_dataset(cell, "alice/x") == 'import os\ncode_dataset = "alice/x"  # note\nprint(code_dataset)\n'
    with pytest.raises(ValueError, match="expected owner/slug"):
        kaggle.pin_code_dataset(cell, 'a/b"; import evil #')
    with pytest.raises(ValueError, match="0 `code_dataset"):
        kaggle.pin_code_dataset("print(1)\n", "alice/x")
