"""Kaggle kernels: build the folders the Kaggle CLI pushes to run stages with the internet off.

Usage::

    python -m common.cli.kaggle build --exp demo --notebooks 01,03,04 --dataset-owner <user> \\
        --competition happy-whale-and-dolphin

writes ``working/kaggle/<exp>/`` (``--out``):

* ``code/``: the wheel of ``common``, the wheels listed in ``kaggle/extra-requirements.txt`` (what Kaggle's image
  lacks; versions from ``requirements.txt``), :data:`INSTALL_LIST` (what the notebooks' first cell installs) and
  ``dataset-metadata.json``;
* ``weights/``: the run's inference files laid out as in ``working/`` (``<exp>/02_embedder/fold{k}/model.pt``
  ..., never ``last.pt`` or optimiser state; for 06 ``<exp>/06_ensemble/metrics.json``, the blend ratio and
  thresholds) and ``dataset-metadata.json``, slug ``<exp>-weights``;
* ``kernels/<slug>/``: one folder per notebook, parameters injected (``data``, ``exp``, ``inference_only=True``
  and the run's own values) and a ``kernel-metadata.json`` (internet off, datasets, competition, and the earlier
  kernels whose outputs a stage reads);
* ``push.sh``: the ``kaggle datasets create`` / ``kaggle kernels push`` commands, in order.

``--single-kernel`` joins the stages into one kernel ``<exp>-inference`` (a code competition reruns one notebook
on its hidden test set). ``python -m common.cli.kaggle estimate`` measures an embedder here and estimates stage 03's
time on a T4 (:mod:`common.engine.throughput`).

On Kaggle each notebook's first cell installs ``common`` from the code dataset, and stages find checkpoints by
experiment name in the attached datasets and kernel outputs (:func:`common.core.paths.find_stage_dir`).
Kernel metadata fields follow https://github.com/Kaggle/kaggle-api/wiki/Kernel-Metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common.config import STAGE_CONFIGS
from common.core import paths, store

# The notebooks' first cell looks for this file under /kaggle/input/*/ and /kaggle/input/datasets/*/*/.
INSTALL_LIST = "reid-install-requirements.txt"
DISTRIBUTION = "reid-notebooks-common"
INFERENCE_STAGES = ("01", "03", "04", "05", "06")  # stages whose notebooks have an inference_only mode
# Stages whose outputs a stage reads: when both are built, the earlier kernel becomes a kernel source.
READS_FROM = {"03": ("01",), "04": ("03",), "05": ("01",)}
GPU_STAGES = ("01", "03", "05")  # a model runs: a GPU helps; retrieval (04) is a FAISS search on CPU
EXTRA_REQUIREMENTS = "kaggle/extra-requirements.txt"


# -- metadata --------------------------------------------------------------------------------------------------
def dataset_metadata(owner: str, slug: str, title: str, license_name: str = "other") -> dict[str, Any]:
    """``dataset-metadata.json`` of a Kaggle dataset (https://github.com/Kaggle/kaggle-api/wiki/Dataset-Metadata).

    Args:
        owner: Kaggle user name.
        slug: dataset slug (checked with :func:`common.core.paths.kaggle_slug`).
        title: dataset title (Kaggle wants 6-50 characters; padded or cut to fit).
        license_name: a Kaggle licence name (``other``, ``CC0-1.0``, ``apache-2.0`` ...).
    """
    if paths.kaggle_slug(slug, min_len=3) != slug:
        raise ValueError(f"dataset slug {slug!r} is not a Kaggle slug (try {paths.kaggle_slug(slug)!r})")
    title = (title if len(title) >= 6 else f"{title} (reid)")[:50]
    return {"title": title, "id": f"{_owner(owner)}/{slug}", "licenses": [{"name": license_name}]}


def kernel_metadata(owner: str, slug: str, code_file: str, datasets: list[str], competition: str,
                    kernels: list[str] | None = None, gpu: bool = True) -> dict[str, Any]:
    """``kernel-metadata.json``: a private notebook with the internet off.

    Args:
        owner: Kaggle user name.
        slug: kernel slug; the title is the slug with spaces (Kaggle derives the slug from the title).
        code_file: the notebook's file name in the kernel folder.
        datasets: ``owner/slug`` of the attached datasets.
        competition: competition slug.
        kernels: ``owner/slug`` of kernels whose outputs are attached.
        gpu: request a GPU accelerator.
    """
    if paths.kaggle_slug(slug) != slug:
        raise ValueError(f"kernel slug {slug!r} is not a Kaggle slug (try {paths.kaggle_slug(slug)!r})")
    return {
        "id": f"{_owner(owner)}/{slug}", "title": slug.replace("-", " "), "code_file": code_file,
        "language": "python", "kernel_type": "notebook", "is_private": True, "enable_gpu": bool(gpu),
        "enable_tpu": False, "enable_internet": False, "dataset_sources": list(datasets),
        "competition_sources": [competition] if competition else [], "kernel_sources": list(kernels or []),
        "model_sources": [],
    }


def _owner(owner: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", owner or ""):
        raise ValueError(f"--dataset-owner {owner!r}: give your Kaggle user name (letters, digits, '-', '_')")
    return owner


# -- code dataset ---------------------------------------------------------------------------------------------
def pinned_versions(root: Path) -> dict[str, str]:
    """``{canonical name: version}`` of ``requirements.txt`` and ``requirements-nodeps.txt``."""
    out: dict[str, str] = {}
    for name in ("requirements.txt", "requirements-nodeps.txt"):
        path = root / name
        for line in path.read_text().splitlines() if path.exists() else []:
            match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)\s*", line.split("#", 1)[0])
            if match:
                out[_canonical(match.group(1))] = match.group(2)
    return out


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def extra_requirements(path: Path | None, root: Path | None = None) -> list[str]:
    """``name==version`` lines from an extra-requirements file (versions from the pinned files).

    Args:
        path: one package a line (``#`` comments); ``None``: no extra wheels.
        root: where ``requirements.txt`` lives (default: the project root).
    """
    if path is None:
        return []
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: extra-requirements file not found (give a file or `none`)")
    pins = pinned_versions(root or paths.project_root())
    out = []
    for row, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if "==" in text:
            out.append(text)
            continue
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text):
            raise ValueError(f"{path}, line {row}: {text!r} is not a package name (or name==version)")
        if _canonical(text) not in pins:
            raise ValueError(f"{path}, line {row}: {text} is not pinned in requirements.txt; write {text}==<version>")
        out.append(f"{text}=={pins[_canonical(text)]}")
    return out


def build_wheel(dest: Path, root: Path | None = None) -> Path:
    """Build the wheel of ``common`` into ``dest`` from a copy of the sources (the checkout stays clean)."""
    root = root or paths.project_root()
    with tempfile.TemporaryDirectory(prefix="reid-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (root / name).exists():
                shutil.copy2(root / name, src / name)
        shutil.copytree(root / "common", src / "common", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest), str(src))
    wheels = sorted(dest.glob("reid_notebooks_common-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip wheel wrote no reid_notebooks_common wheel into {dest}")
    return wheels[-1]


def fetch_wheels(requirements: list[str], dest: Path, find_links: Path | None = None) -> None:
    """``pip download --no-deps --only-binary :all:`` of ``requirements`` into ``dest`` (offline from
    ``find_links`` when given, else from the package index)."""
    if not requirements:
        return
    source = ["--no-index", "--find-links", str(find_links)] if find_links else []
    _pip("download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(dest), *source, *requirements)


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def build_code_dataset(out: Path, owner: str, slug: str, requirements: list[str],
                       find_links: Path | None = None) -> Path:
    """``out/``: the wheel of ``common``, the ``requirements`` wheels, :data:`INSTALL_LIST`, metadata."""
    _fresh(out)
    wheel = build_wheel(out)
    fetch_wheels(requirements, out, find_links)
    version = wheel.name.split("-")[1]
    (out / INSTALL_LIST).write_text("\n".join([f"{DISTRIBUTION}=={version}", *requirements]) + "\n")
    store.write_json(out / "dataset-metadata.json", dataset_metadata(owner, slug, f"{slug} code"))
    return out


# -- weights dataset ------------------------------------------------------------------------------------------
def run_params(exp: str, stage: str) -> dict[str, Any]:
    """The parameters stage ``stage`` of ``exp`` last finished with (its ``_done.json``)."""
    marker = paths.stage_dir(exp, stage) / "_done.json"
    if not marker.exists():
        raise FileNotFoundError(f"{marker} not found: stage {stage} of experiment {exp!r} has not finished here")
    return store.read_json(marker)["params"]


def run_folds(exp: str, stage: str = "03") -> list[int]:
    """The folds stage 03 of ``exp`` embedded with (with the full model's, ``full_fit``), or the stage-05 models
    that answer the test (the full model alone with ``full_fit``): those inference uses."""
    cfg = STAGE_CONFIGS[stage](**_known(stage, run_params(exp, stage)))
    return cfg.test_folds() if stage == "05" else cfg.model_folds()


def used_crops(exp: str, stage: str = "02") -> bool:
    """True when the fold models of stage ``02`` (or ``05``) of ``exp`` were trained on stage 01's crops (so
    the test images need crops too)."""
    folds = run_folds(exp, "03" if stage == "02" else "05")
    configs = [paths.stage_dir(exp, stage) / f"fold{k}" / "config.json" for k in folds]
    return any(c.exists() and store.read_json(c).get("used_crops") for c in configs)


def weights_files(exp: str, stages: list[str]) -> dict[str, Path]:
    """``{path inside the weights dataset: source file}``: what inference of ``stages`` reads.

    Raises:
        FileNotFoundError: naming the first file the run lacks.
    """
    files: dict[str, Path] = {}
    if "06" in stages:  # the full run's blend ratio and thresholds; the members' files are in their own bundles
        files[f"{exp}/06_ensemble/metrics.json"] = paths.stage_dir(exp, "06") / "metrics.json"
        stages = [s for s in stages if s != "06"]
        if not stages:
            return _check(exp, files, with_detector=False)
    if "05" in stages:
        folder = paths.stage_dir(exp, "05")
        for name in ("classes.json", "folds.csv", "metrics.json", "oof.npz"):
            files[f"{exp}/05_classifier/{name}"] = folder / name
        for k in run_folds(exp, "05"):
            for name in ("config.json", "model.pt", "_done.json", "log.csv"):
                files[f"{exp}/05_classifier/fold{k}/{name}"] = folder / f"fold{k}" / name
    if classification_only(stages):
        return _check(exp, files, with_detector=used_crops(exp, "05"))
    files[f"{exp}/02_embedder/folds.csv"] = paths.stage_dir(exp, "02") / "folds.csv"
    for k in run_folds(exp):
        for name in ("config.json", "model.pt", "_done.json"):
            files[f"{exp}/02_embedder/fold{k}/{name}"] = paths.stage_dir(exp, "02") / f"fold{k}" / name
        files[f"{exp}/03_embeddings/fold{k}/train.npz"] = paths.stage_dir(exp, "03") / f"fold{k}" / "train.npz"
    if "04" in stages:
        for name in ("metrics.json", "threshold_sweep.csv"):
            files[f"{exp}/04_retrieval/{name}"] = paths.stage_dir(exp, "04") / name
    return _check(exp, files, with_detector=used_crops(exp) or ("05" in stages and used_crops(exp, "05")))


def classification_only(stages: list[str]) -> bool:
    """True for a bundle of stage 05 (and 01, 06): no embedder, no retrieval of this experiment."""
    return "05" in stages and set(stages) <= {"01", "05", "06"}


def _check(exp: str, files: dict[str, Path], with_detector: bool) -> dict[str, Path]:
    if with_detector:
        source = run_params(exp, "01").get("crops_from") or exp
        files[f"{exp}/01_crop/detector/weights/best.pt"] = (
            paths.stage_dir(source, "01") / "detector" / "weights" / "best.pt")
    missing = [str(src) for src in files.values() if not src.exists()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} not found ({len(missing)} file(s) missing): the run of {exp!r} "
                                "must finish the stages its kernels need here before its Kaggle bundle is built")
    return files


def build_weights_dataset(out: Path, owner: str, exp: str, stages: list[str]) -> Path:
    """``out/<exp>/...``: the run's inference files (hard links where possible), and metadata."""
    files = weights_files(exp, stages)
    _fresh(out)
    for rel, src in files.items():
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, target)
        except OSError:  # another file system: copy
            shutil.copy2(src, target)
    slug = paths.weights_slug(exp)
    store.write_json(out / "dataset-metadata.json", dataset_metadata(owner, slug, f"{exp} weights"))
    return out


# -- kernels --------------------------------------------------------------------------------------------------
def kernel_slug(exp: str, stage: str) -> str:
    """``<exp>-<stage>-<notebook words>``, e.g. ``demo-03-extract-embeddings``."""
    from common.cli.pipeline import notebook_for

    return paths.kaggle_slug(f"{exp} {notebook_for(stage).stem}")


def kernel_params(exp: str, stage: str, competition: str) -> dict[str, Any]:
    """Parameters injected into a kernel: the run's own, then ``data``, ``exp``, ``inference_only=True``."""
    params = run_params(exp, stage)
    if stage == "01" and params.get("crops_from"):  # the detector that made the crops, copied under <exp>
        params = run_params(params["crops_from"], "01")
    params = {**_known(stage, params), "data": competition, "exp": exp, "force": False, "inference_only": True}
    if stage == "01":
        params["crops_from"] = ""
    return params


def _known(stage: str, params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k in STAGE_CONFIGS[stage].field_names()}


def build_kernel(out: Path, owner: str, exp: str, stages: list[str], competition: str, datasets: list[str],
                 kernels: list[str], gpu: bool) -> Path:
    """``out/``: the stages' notebook with parameters injected, and ``kernel-metadata.json``.

    Several stages make one notebook: each stage's cells in turn (its parameters cell, then its injected
    values), the install cell once at the top. A code competition reruns one notebook on its hidden test set.
    """
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from common.cli.pipeline import notebook_for

    _fresh(out)
    nb = None
    for stage in stages:
        params = kernel_params(exp, stage, competition)
        STAGE_CONFIGS[stage](**params)  # a bad value fails here, not on Kaggle
        part = parameterize_notebook(load_notebook_node(str(notebook_for(stage))), params)
        if nb is None:
            nb = part
        else:  # the install cell (first code cell) ran already
            first_code = next(i for i, c in enumerate(part.cells) if c.cell_type == "code")
            nb.cells += [c for i, c in enumerate(part.cells) if i != first_code]
    for i, cell in enumerate(nb.cells):
        cell["id"] = str(i)  # unique ids once notebooks are joined
    install = next(c for c in nb.cells if c.cell_type == "code")
    install.source = pin_code_dataset(install.source, datasets[0])
    slug = out.name
    nbformat.write(nb, out / f"{slug}.ipynb")
    store.write_json(out / "kernel-metadata.json",
                     kernel_metadata(owner, slug, f"{slug}.ipynb", datasets, competition, kernels, gpu))
    return out


CODE_DATASET_LINE = re.compile(r'^code_dataset = "[^"\n]*"', re.M)


def pin_code_dataset(source: str, code_dataset: str) -> str:
    """The install cell's source with ``code_dataset = "<owner>/<slug>"``: the kernel installs from that code
    dataset only, never from another attached dataset that ships a file named :data:`INSTALL_LIST`.

    Args:
        source: the install cell (the first code cell of every notebook).
        code_dataset: ``owner/slug`` of the code dataset (the first of the kernel's ``dataset_sources``).
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", code_dataset):
        raise ValueError(f"code dataset {code_dataset!r}: expected owner/slug")
    pinned, n = CODE_DATASET_LINE.subn(f'code_dataset = "{code_dataset}"', source)
    if n != 1:
        raise ValueError(f"the install cell has {n} `code_dataset = ...` lines, expected one")
    return pinned


def build(exp: str, notebooks: list[str], owner: str, competition: str = "", out: Path | None = None,
          code_slug: str = "reid-common", extra: Path | None = None, find_links: Path | None = None,
          gpu: bool | None = None, single: bool = False) -> Path:
    """Write the code dataset, the weights dataset, one kernel per notebook and ``push.sh`` (module docstring).

    Args:
        exp: a finished experiment (stages 01-04 under ``working/<exp>``).
        notebooks: stages to make kernels of (``01``, ``03``, ``04``, ``05``, ``06``), run in this order on
            Kaggle. The ``06`` kernel also attaches every member's weights dataset and the output of the member's
            own ``05`` (``members``) or ``03`` (``embed_members``) kernel (:func:`ensemble_members`): build and
            push each member's bundle first.
        owner: Kaggle user name owning the datasets and kernels.
        competition: competition slug (default: the run's ``data`` name, slugified).
        out: output folder (default ``working/kaggle/<exp>``).
        code_slug: slug of the code dataset.
        extra: extra-requirements file (``None``: no extra wheels).
        find_links: folder of wheels to take the extra wheels from instead of the package index.
        gpu: GPU for every kernel; ``None``: for the stages that run a model (01, 03).
        single: one kernel ``<exp>-inference`` running every stage in turn (for code competitions, which rerun
            one notebook on the hidden test set), instead of one kernel per stage.
    """
    paths.check_exp_name(exp)
    bad = [s for s in notebooks if s not in INFERENCE_STAGES]
    if bad or not notebooks:
        raise ValueError(f"--notebooks {','.join(notebooks)}: choose among {list(INFERENCE_STAGES)}")
    first = "05" if classification_only(notebooks) else "06" if notebooks == ["06"] else "03"
    competition = competition or paths.kaggle_slug(Path(str(run_params(exp, first)["data"])).name, 3)
    out = Path(out) if out else paths.working_dir() / "kaggle" / exp
    code_slug = paths.kaggle_slug(code_slug, min_len=3)
    crops = {s: used_crops(exp, "02" if s == "03" else "05") for s in ("03", "05") if s in notebooks}
    if "01" in notebooks and not any(crops.values()):
        raise ValueError(f"--notebooks has 01 but the models of {exp!r} were trained on full images: leave 01 out")
    if any(crops.values()) and "01" not in notebooks:
        raise ValueError(f"the models of {exp!r} were trained on crops: add 01 to --notebooks (its kernel "
                         "crops the test images with the run's detector)")
    for stage in notebooks:  # every kernel's parameters must exist before anything is written
        kernel_params(exp, stage, competition)
    requirements = extra_requirements(extra)
    members = ensemble_members(exp, competition) if "06" in notebooks else {}
    build_weights_dataset(out / "weights", owner, exp, notebooks)
    build_code_dataset(out / "code", owner, code_slug, requirements, find_links)
    datasets = [f"{owner}/{code_slug}", f"{owner}/{paths.weights_slug(exp)}"]
    push = ["#!/usr/bin/env bash", "# Upload the datasets (first time: create; later: `kaggle datasets version "
            "-p DIR -m msg --dir-mode zip`), then push the kernels in order.", "set -euo pipefail",
            'cd "$(dirname "$0")"', "kaggle datasets create -p code --dir-mode zip",
            "kaggle datasets create -p weights --dir-mode zip"]
    groups = [notebooks] if single else [[stage] for stage in notebooks]
    for stages in groups:
        sources = [f"{owner}/{kernel_slug(exp, s)}" for stage in stages for s in READS_FROM.get(stage, ())
                   if s in notebooks and s not in stages]
        kernel_datasets = list(datasets)
        if "06" in stages:  # each member's weights dataset and the output of its own inference kernel
            kernel_datasets += [f"{owner}/{paths.weights_slug(m)}" for m in members]
            sources += [f"{owner}/{kernel_slug(m, s)}" for m, member_stages in members.items() for s in member_stages
                        if not (m == exp and s in stages)]
        kernel_datasets, sources = list(dict.fromkeys(kernel_datasets)), list(dict.fromkeys(sources))
        slug = kernel_slug(exp, stages[0]) if len(stages) == 1 else paths.kaggle_slug(f"{exp} inference")
        use_gpu = any(s in GPU_STAGES for s in stages) if gpu is None else gpu
        build_kernel(out / "kernels" / slug, owner, exp, stages, competition, kernel_datasets, sources, use_gpu)
        push.append(f"kaggle kernels push -p kernels/{slug}" + ("  # wait until it finishes before the next push"
                                                               if len(groups) > 1 else ""))
    (out / "push.sh").write_text("\n".join(push) + "\n")
    (out / "push.sh").chmod(0o755)
    return out


def ensemble_members(exp: str, competition: str = "") -> dict[str, list[str]]:
    """``{member experiment: [stages whose test outputs stage 06 of exp reads]}``: ``05`` for ``members``
    (its ``test.npz``), ``03`` for ``embed_members`` (its test embeddings), from the run's own parameters.

    On Kaggle the 06 kernel attaches each member's weights dataset (``<owner>/<member>-weights``, from
    ``build --exp <member> --notebooks 05`` or ``03,04``) and the output of the member's kernel of that stage.
    """
    cfg = STAGE_CONFIGS["06"](**kernel_params(exp, "06", competition or "x"))
    out: dict[str, list[str]] = {}
    for stage, field in (("05", "members"), ("03", "embed_members")):
        for m in cfg.member_list(field):
            out.setdefault(m, []).append(stage)
    return out


def _fresh(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m common.cli.kaggle build ...`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m common.cli.kaggle", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the code/weights datasets and kernel folders of an experiment")
    b.add_argument("--exp", required=True, help="finished experiment under working/")
    b.add_argument("--notebooks", default=None,
                   help="stages to make kernels of: 01,03,04,05,06 (default 01,03,04, or 03,04 without crops)")
    b.add_argument("--dataset-owner", required=True, help="your Kaggle user name")
    b.add_argument("--competition", default="", help="competition slug (default: the run's data name)")
    b.add_argument("--out", default=None, help="output folder (default working/kaggle/<exp>)")
    b.add_argument("--code-slug", default="reid-common", help="slug of the code dataset")
    b.add_argument("--extra-wheels", default=None,
                   help=f"extra-requirements file, or `none` (default {EXTRA_REQUIREMENTS})")
    b.add_argument("--find-links", default=None, help="take the extra wheels from this folder (offline)")
    b.add_argument("--single-kernel", action="store_true",
                   help="one kernel running every stage (code competitions) instead of one per stage")
    b.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="GPU for every kernel (default: only the stages that run a model, 01 and 03)")
    e = sub.add_parser("estimate", help="measure the embedder here and estimate stage 03's time on a T4")
    e.add_argument("--backbone", default="tf_efficientnet_lite0")
    e.add_argument("--image-size", type=int, default=160)
    e.add_argument("--n-folds", type=int, default=1, help="fold models that embed every test image")
    e.add_argument("--utilization", type=float, default=0.2, help="assumed share of the T4's fp16 peak")
    args = parser.parse_args(argv)
    if args.command == "estimate":
        from common.engine.throughput import estimate_t4_minutes, measure_throughput

        measured = measure_throughput(args.backbone, args.image_size)
        estimate = estimate_t4_minutes(measured, n_folds=args.n_folds, utilization=args.utilization)
        print(json.dumps({**{k: round(v, 3) for k, v in {**measured, **estimate}.items()}, **vars(args)}))
        return 0
    from common.cli.pipeline import parse_stages

    extra = None if args.extra_wheels == "none" else Path(args.extra_wheels or paths.project_root() /
                                                         EXTRA_REQUIREMENTS)
    stages = parse_stages(args.notebooks or ("01,03,04" if used_crops(args.exp) else "03,04"))
    out = build(args.exp, stages, args.dataset_owner, args.competition,
                Path(args.out) if args.out else None, args.code_slug, extra,
                Path(args.find_links) if args.find_links else None, args.gpu, args.single_kernel)
    print(f"wrote {out}:")
    print((out / "push.sh").read_text())
    print(json.dumps({"kernels": sorted(p.name for p in (out / "kernels").iterdir())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
