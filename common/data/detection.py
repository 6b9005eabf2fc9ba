"""Files of the crop stage: box tables checked against their images, the YOLO dataset, crops, sample plots.

Images are read with PIL and turned upright by their EXIF orientation, which is how OpenCV (and therefore
ultralytics) decodes them, so true boxes, predicted boxes and crops share one coordinate frame. Nothing here
imports ultralytics; :mod:`common.engine.detector` re-exports the public functions.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image, ImageOps

from common.core import store
from common.core.runtime import progress
from common.lib.boxes import BOX_COLUMNS, check_box_values, expand_box, xyxy_to_yolo

CROP_COLUMNS = ["crop_xmin", "crop_ymin", "crop_xmax", "crop_ymax"]
MANIFEST = "_crops.csv"


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image as OpenCV decodes it (EXIF rotation applied), reading only the header.

    Args:
        path: the image file.
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees: the axes swap
                w, h = h, w
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: image not found") from e
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: unreadable image ({e})") from e
    return int(w), int(h)


def read_image(path: Path) -> Image.Image:
    """Decode a whole image as upright RGB; a missing, unreadable or truncated file raises naming the file.

    Args:
        path: the image file.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            im.load()  # decodes everything: a truncated JPEG fails here, not later
            return ImageOps.exif_transpose(im).convert("RGB")
    except OSError as e:
        raise ValueError(f"{path}: unreadable or truncated image ({e})") from e


def validate_boxes(boxes: pd.DataFrame, image_dir: Path) -> dict[str, tuple[int, int]]:
    """Check a box table against its images; raise ``ValueError`` naming the first bad file and row.

    Args:
        boxes: columns ``image, xmin, ymin, xmax, ymax`` in pixels.
        image_dir: folder holding the images named in ``boxes``.

    Returns:
        ``{image: (width, height)}`` for every image of the table.
    """
    missing = [c for c in ["image", *BOX_COLUMNS] if c not in boxes.columns]
    if missing:
        raise ValueError(f"boxes table: missing column(s) {missing}; found {list(boxes.columns)}")
    if len(boxes) == 0:
        raise ValueError("boxes table is empty")
    sizes: dict[str, tuple[int, int]] = {}
    for row, image in enumerate(boxes["image"].astype(str)):
        if image not in sizes:
            path = Path(image_dir) / image
            if not path.is_file():
                raise ValueError(f"boxes table row {row}: image file {path} not found")
            try:
                sizes[image] = image_size(path)
            except ValueError as e:
                raise ValueError(f"boxes table row {row}: {e}") from e
    check_box_values(boxes, sizes)
    return sizes


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        dst.symlink_to(src.resolve())
    except OSError:  # no symlinks (Windows without developer mode, some network drives)
        shutil.copy2(src, dst)


def make_yolo_dataset(
    boxes: pd.DataFrame,
    image_dir: Path,
    out_dir: Path,
    val_fraction: float = 0.2,
    seed: int = 0,
    class_name: str = "animal",
) -> Path:
    """Write a one-class ultralytics dataset (images, label files, data yaml) from a box table.

    The split is by image and deterministic (a seeded permutation of the sorted names). Only images named in
    ``boxes`` are used. ``out_dir/images`` and ``out_dir/labels`` are rebuilt on every call; ``split.csv``
    records which image went where.

    Args:
        boxes: columns ``image, xmin, ymin, xmax, ymax`` in pixels, one row per box.
        image_dir: folder holding the images.
        out_dir: dataset folder to (re)write.
        val_fraction: share of images for validation (at least one image).
        seed: split seed.
        class_name: the single class's name.

    Returns:
        Path of the data yaml (with an absolute ``path:``, as ultralytics otherwise resolves relative paths
        against its own ``datasets_dir`` setting).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    image_dir, out_dir = Path(image_dir), Path(out_dir).resolve()
    sizes = validate_boxes(boxes, image_dir)
    names = sorted(sizes)
    if len(names) < 2:
        raise ValueError(f"boxes table: need at least 2 images to split, got {len(names)}")
    stems = pd.Series([str(Path(n).with_suffix("")) for n in names])
    if stems.duplicated().any():
        clash = stems[stems.duplicated()].tolist()
        raise ValueError(f"boxes table: images share a file stem (their labels would collide): {clash}")
    n_val = min(max(1, round(val_fraction * len(names))), len(names) - 1)
    perm = np.random.default_rng(seed).permutation(len(names))
    split = {names[i]: ("val" if k < n_val else "train") for k, i in enumerate(perm)}
    for sub in ("images", "labels"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    for part in ("train", "val"):
        (out_dir / "images" / part).mkdir(parents=True)
        (out_dir / "labels" / part).mkdir(parents=True)
    table = boxes.assign(image=boxes["image"].astype(str))
    for image, group in table.groupby("image", sort=True):
        w, h = sizes[image]
        xywh = xyxy_to_yolo(group[BOX_COLUMNS].to_numpy(np.float64), w, h)
        lines = ["0 " + " ".join(f"{v:.6f}" for v in box) for box in xywh]
        label, link = out_dir / "labels" / split[image] / image, out_dir / "images" / split[image] / image
        label.parent.mkdir(parents=True, exist_ok=True)  # names may hold sub-folders
        label.with_suffix(".txt").write_text("\n".join(lines) + "\n")
        link.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(image_dir / image, link)
    store.write_csv(out_dir / "split.csv", pd.DataFrame({"image": names, "split": [split[n] for n in names]}))
    data = {"path": str(out_dir), "train": "images/train", "val": "images/val", "names": {0: class_name}}
    yaml_path = out_dir / "data.yaml"
    with store.atomic_path(yaml_path) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    return yaml_path


def _load_manifest(path: Path) -> dict[str, tuple[int, ...]]:
    if not path.exists():
        return {}
    old = pd.read_csv(path)
    rows = old[["image", *CROP_COLUMNS]].itertuples(index=False)
    return {str(r[0]): tuple(int(v) for v in r[1:]) for r in rows}


def _save_manifest(path: Path, table: pd.DataFrame, old: dict[str, tuple[int, ...]]) -> None:
    """Write this run's rows plus the rows of an earlier run for images not reached yet (for resume)."""
    reached = set(table["image"].astype(str))  # built once: a set per row made this rows x old
    rest = [(k, *v) for k, v in old.items() if k not in reached]
    extra = pd.DataFrame(rest, columns=["image", *CROP_COLUMNS])
    store.write_csv(path, pd.concat([table, extra], ignore_index=True) if len(extra) else table)


def crop_images(best: pd.DataFrame, image_dir: Path, out_dir: Path, margin: float = 0.1) -> pd.DataFrame:
    """Cut one crop per image around its chosen box (the full image for a fallback), saved under its own name.

    Crops already on disk with the same window (recorded in ``out_dir/_crops.csv``) are kept, so a killed run
    resumes where it stopped.

    Args:
        best: :func:`common.lib.boxes.best_boxes` output (``image, xmin, ymin, xmax, ymax, fallback``).
        image_dir: folder of the source images.
        out_dir: folder for the crops (same file names as the sources).
        margin: relative margin added on each side (see :func:`common.lib.boxes.expand_box`).

    Returns:
        ``best`` plus ``width, height`` (source size) and ``crop_xmin, crop_ymin, crop_xmax, crop_ymax``.
    """
    missing = [c for c in ["image", *BOX_COLUMNS, "fallback"] if c not in best.columns]
    if missing:
        raise ValueError(f"crop_images: missing column(s) {missing} (pass the output of best_boxes)")
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    for image in best["image"].astype(str):  # fail before any work
        if not (image_dir / image).is_file():
            raise FileNotFoundError(f"{image_dir / image}: image not found")
    manifest = out_dir / MANIFEST
    done = _load_manifest(manifest)
    out = best.reset_index(drop=True).copy()
    values = np.zeros((len(out), 6), dtype=np.int64)
    next_checkpoint = 1000
    for i, row in enumerate(progress(list(out.itertuples(index=False)), desc="crop", unit="img")):
        src, dst = image_dir / str(row.image), out_dir / str(row.image)
        w, h = image_size(src)
        box = (np.nan,) * 4 if bool(row.fallback) else (row.xmin, row.ymin, row.xmax, row.ymax)
        window = expand_box(box, w, h, margin)
        if done.get(str(row.image)) != window or not dst.is_file():
            crop = read_image(src).crop(window)
            with store.atomic_path(dst) as tmp:
                if tmp.suffix.lower() in {".jpg", ".jpeg"}:
                    crop.save(tmp, quality=95)
                else:
                    crop.save(tmp)
        values[i] = (w, h, *window)
        # Checkpoint, so a killed run keeps what it finished: after 1000 images, then each time the count grew
        # by a tenth (at least 1000), so rewriting the manifest costs O(n) rows in all, not n^2 / 2000.
        if i + 1 >= next_checkpoint:
            next_checkpoint = i + 1 + max(1000, (i + 1) // 10)
            part = out.iloc[: i + 1].copy()
            part[["width", "height", *CROP_COLUMNS]] = values[: i + 1]
            _save_manifest(manifest, part, done)
    out[["width", "height", *CROP_COLUMNS]] = values
    _save_manifest(manifest, out, {})
    return out


def plot_boxes(
    image_dir: Path,
    pred_best: pd.DataFrame,
    truth: pd.DataFrame | None = None,
    n: int = 8,
    seed: int = 0,
):
    """A grid of sample images with the chosen box (red, with its confidence) and the true boxes (green).

    Args:
        image_dir: folder of the images.
        pred_best: :func:`common.lib.boxes.best_boxes` output.
        truth: optional true boxes (``image, xmin, ymin, xmax, ymax``).
        n: number of images (a seeded sample).
        seed: sampling seed.

    Returns:
        A ``matplotlib.figure.Figure``, built without pyplot so Jupyter shows it once and nothing leaks.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    rows = pred_best.sample(n=min(n, len(pred_best)), random_state=seed) if len(pred_best) else pred_best
    ncols = max(1, min(4, len(rows)))
    nrows = max(1, -(-len(rows) // ncols))
    fig = Figure(figsize=(3.2 * ncols, 3.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, row in zip(axes, rows.itertuples(index=False), strict=False):
        ax.imshow(np.asarray(read_image(Path(image_dir) / str(row.image))))
        if truth is not None:
            for t in truth[truth["image"].astype(str) == str(row.image)].itertuples(index=False):
                ax.add_patch(Rectangle((t.xmin, t.ymin), t.xmax - t.xmin, t.ymax - t.ymin, fill=False,
                                       edgecolor="lime", linewidth=2))
        fallback = bool(getattr(row, "fallback", False)) or np.isnan(row.xmin)
        if not fallback:
            ax.add_patch(Rectangle((row.xmin, row.ymin), row.xmax - row.xmin, row.ymax - row.ymin, fill=False,
                                   edgecolor="red", linewidth=2))
        title = "fallback: full image" if fallback else f"conf {getattr(row, 'conf', float('nan')):.2f}"
        ax.set_title(f"{row.image}\n{title}", fontsize=8)
    return fig
