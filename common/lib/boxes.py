"""Pure box maths for the crop stage: IoU, single-class average precision, best box per image, crop windows.

Boxes are ``xyxy`` in pixels, continuous coordinates: area = ``(xmax - xmin) * (ymax - ymin)``, without the
``+1`` of the old VOC devkit (the convention of ultralytics and torchvision). Box tables are pandas frames
with the columns ``image, xmin, ymin, xmax, ymax`` and, for predictions, ``conf``.

Nothing here reads images or imports a detector (image sizes come in as ``{image: (width, height)}``), so it
is cheap to import and to test. :mod:`common.engine.detector` re-exports the public functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

BOX_COLUMNS = ["xmin", "ymin", "xmax", "ymax"]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise intersection over union of two sets of ``xyxy`` boxes.

    Args:
        a: ``(N, 4)`` boxes.
        b: ``(M, 4)`` boxes.

    Returns:
        ``(N, M)`` float64 IoU matrix; a pair whose union is empty (two degenerate boxes) scores 0.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _check_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; found {list(df.columns)}")


def average_precision(pred: pd.DataFrame, truth: pd.DataFrame, iou_threshold: float = 0.5) -> float:
    """Single-class average precision, PASCAL VOC style with all-point interpolation.

    Detections of all images are sorted by confidence (ties keep table order) and matched greedily: a
    detection is a true positive when its highest-IoU ground-truth box of the same image reaches
    ``iou_threshold`` and was not matched before; otherwise (also when that box is taken) a false positive.
    AP is the area under the precision envelope (precision made non-increasing from the right) over recall,
    as in the VOC 2010+ devkit (Everingham et al., IJCV 2010, http://host.robots.ox.ac.uk/pascal/VOC/).

    Args:
        pred: detections, columns ``image, xmin, ymin, xmax, ymax, conf``.
        truth: ground truth, columns ``image, xmin, ymin, xmax, ymax``.
        iou_threshold: minimum IoU for a match.

    Returns:
        AP in ``[0, 1]``.

    Raises:
        ValueError: a column is missing, or ``truth`` holds no box (AP is undefined).
    """
    _check_columns(pred, ["image", *BOX_COLUMNS, "conf"], "predictions")
    _check_columns(truth, ["image", *BOX_COLUMNS], "ground truth")
    n_pos = len(truth)
    if n_pos == 0:
        raise ValueError("average_precision: the ground truth holds no box, AP is undefined")
    if len(pred) == 0:
        return 0.0
    gt_by_image = {
        str(k): g[BOX_COLUMNS].to_numpy(np.float64) for k, g in truth.groupby("image", sort=False)
    }
    taken = {k: np.zeros(len(v), dtype=bool) for k, v in gt_by_image.items()}
    order = np.argsort(-pred["conf"].to_numpy(np.float64), kind="stable")
    images = pred["image"].astype(str).to_numpy()[order]
    boxes = pred[BOX_COLUMNS].to_numpy(np.float64)[order]
    tp = np.zeros(len(order))
    for i, (image, box) in enumerate(zip(images, boxes, strict=True)):
        gts = gt_by_image.get(image)
        if gts is None:
            continue
        ious = box_iou(box[None], gts)[0]
        j = int(np.argmax(ious))
        if ious[j] >= iou_threshold and not taken[image][j]:
            taken[image][j] = True
            tp[i] = 1.0
    ctp = np.cumsum(tp)
    recall = ctp / n_pos
    precision = ctp / np.arange(1, len(tp) + 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the envelope: best precision at any higher recall
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def best_boxes(pred: pd.DataFrame, images: Sequence[str], min_conf: float) -> pd.DataFrame:
    """The most confident box per image, or a fallback row when no box reaches ``min_conf``.

    Args:
        pred: detections, columns ``image, xmin, ymin, xmax, ymax, conf`` (any number of rows per image).
        images: the images to report, in row order (an image without detections still gets a row).
        min_conf: a box with ``conf < min_conf`` is not trusted.

    Returns:
        One row per image in ``images``: ``image, xmin, ymin, xmax, ymax, conf, fallback``. Fallback rows have
        NaN box and confidence and ``fallback=True`` (the crop stage then uses the full image).
    """
    _check_columns(pred, ["image", *BOX_COLUMNS, "conf"], "predictions")
    images = [str(i) for i in images]
    if len(set(images)) != len(images):
        raise ValueError("best_boxes: `images` holds duplicate names")
    kept = pred[pred["conf"] >= min_conf].copy()
    kept["image"] = kept["image"].astype(str)
    top = kept.sort_values("conf", ascending=False, kind="stable").drop_duplicates("image").set_index("image")
    out = top.reindex(images)[[*BOX_COLUMNS, "conf"]].astype(np.float64)
    out.insert(0, "image", images)
    out["fallback"] = out["conf"].isna()
    return out.reset_index(drop=True)


def expand_box(
    box: Sequence[float],
    width: int,
    height: int,
    margin: float = 0.1,
) -> tuple[int, int, int, int]:
    """Grow a box by a relative margin on every side and clamp it to the image, in whole pixels.

    Args:
        box: ``(xmin, ymin, xmax, ymax)``; NaNs mean "no box" and give the full image.
        width: image width in pixels.
        height: image height in pixels.
        margin: added on each side as a fraction of the box's own width (left/right) and height (top/bottom).

    Returns:
        ``(x0, y0, x1, y1)`` integers with ``0 <= x0 < x1 <= width`` and ``0 <= y0 < y1 <= height``; the lower
        edges are floored and the upper ones ceiled so the crop always contains the grown box.
    """
    xmin, ymin, xmax, ymax = (float(v) for v in box)
    if any(np.isnan(v) for v in (xmin, ymin, xmax, ymax)):
        return 0, 0, int(width), int(height)
    dw, dh = margin * (xmax - xmin), margin * (ymax - ymin)
    x0 = min(max(int(np.floor(xmin - dw)), 0), width - 1)
    y0 = min(max(int(np.floor(ymin - dh)), 0), height - 1)
    x1 = max(min(int(np.ceil(xmax + dw)), width), x0 + 1)  # at least one pixel, even for a degenerate box
    y1 = max(min(int(np.ceil(ymax + dh)), height), y0 + 1)
    return x0, y0, x1, y1


def crop_area_share(crops: pd.DataFrame) -> float:
    """Median share of the source images' area that their crop windows keep (1.0: the crops are the full
    images, so cropping changed nothing; NaN without rows). Tells whether crops can help at all: animals that
    fill the frame leave little to cut.

    Args:
        crops: crop windows, columns ``width, height, crop_xmin, crop_ymin, crop_xmax, crop_ymax`` (pixels;
            the output of :func:`common.data.detection.crop_images`).
    """
    _check_columns(crops, ["width", "height", "crop_xmin", "crop_ymin", "crop_xmax", "crop_ymax"], "crops")
    if crops.empty:
        return float("nan")
    kept = (crops["crop_xmax"] - crops["crop_xmin"]) * (crops["crop_ymax"] - crops["crop_ymin"])
    return float((kept / (crops["width"] * crops["height"])).median())


def crop_ious(best: pd.DataFrame, truth: pd.DataFrame, sizes: dict[str, tuple[int, int]]) -> pd.Series:
    """IoU of each image's chosen box with its best-matching ground-truth box.

    Args:
        best: output of :func:`best_boxes`; fallback rows count as the full image.
        truth: ground truth, columns ``image, xmin, ymin, xmax, ymax``.
        sizes: ``{image: (width, height)}``, needed for the fallback rows.

    Returns:
        A float Series indexed by image, for the images of ``best`` that have at least one ground-truth box.
    """
    gt_by_image = {
        str(k): g[BOX_COLUMNS].to_numpy(np.float64) for k, g in truth.groupby("image", sort=False)
    }
    out = {}
    for row in best.itertuples(index=False):
        gts = gt_by_image.get(str(row.image))
        if gts is None:
            continue
        box = np.array([row.xmin, row.ymin, row.xmax, row.ymax], dtype=np.float64)
        if bool(row.fallback) or np.isnan(box).any():
            if str(row.image) not in sizes:
                raise ValueError(f"crop_ious: no image size for fallback image {row.image!r}")
            w, h = sizes[str(row.image)]
            box = np.array([0.0, 0.0, w, h])
        out[str(row.image)] = float(box_iou(box[None], gts)[0].max())
    return pd.Series(out, dtype=np.float64, name="crop_iou")


def check_box_values(boxes: pd.DataFrame, sizes: dict[str, tuple[int, int]]) -> None:
    """Raise ``ValueError`` naming the first row whose box is not a number, empty, or outside its image.

    Args:
        boxes: columns ``image, xmin, ymin, xmax, ymax`` in pixels.
        sizes: ``{image: (width, height)}`` for every image of ``boxes``.
    """
    values = boxes[BOX_COLUMNS].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    for row, (image, box) in enumerate(zip(boxes["image"].astype(str), values, strict=True)):
        where = f"boxes table row {row} (image {image!r})"
        x0, y0, x1, y1 = box.tolist()
        if np.isnan(box).any():
            got = boxes.iloc[row][BOX_COLUMNS].tolist()
            raise ValueError(f"{where}: box values must be numbers, got {got}")
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"{where}: empty box, need xmax > xmin and ymax > ymin, got {[x0, y0, x1, y1]}")
        w, h = sizes[image]
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            raise ValueError(f"{where}: box {[x0, y0, x1, y1]} lies outside the {w}x{h} image")


def xyxy_to_yolo(xyxy: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixel ``xyxy`` boxes to YOLO label values: centre x, centre y, width, height over the image size.

    Args:
        xyxy: ``(N, 4)`` boxes in pixels.
        width: image width.
        height: image height.

    Returns:
        ``(N, 4)`` array of ``cx, cy, w, h`` in ``[0, 1]``.
    """
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    scale = np.array([width, height, width, height], dtype=np.float64)
    centre = (xyxy[:, :2] + xyxy[:, 2:]) / 2
    return np.concatenate([centre, xyxy[:, 2:] - xyxy[:, :2]], axis=1) / scale


def box_metrics(
    pred: pd.DataFrame,
    truth: pd.DataFrame,
    images: Sequence[str],
    min_conf: float = 0.25,
    sizes: dict[str, tuple[int, int]] | None = None,
) -> dict[str, float]:
    """Detector quality on a set of images (:func:`common.engine.detector.evaluate_boxes` reads the sizes for you).

    Args:
        pred: every predicted box, ``image, xmin, ymin, xmax, ymax, conf``.
        truth: true boxes, ``image, xmin, ymin, xmax, ymax``.
        images: the images to evaluate (others in ``pred`` and ``truth`` are ignored).
        min_conf: the threshold :func:`best_boxes` uses to choose the crop box.
        sizes: ``{image: (width, height)}``, needed for images that fall back to the full image.

    Returns:
        ``map50`` (:func:`average_precision` at IoU 0.5), ``crop_iou`` (mean, over images with a true box, of
        the IoU between the chosen box, or the full image for a fallback, and its best-matching true box),
        ``fallback_share`` (share of ``images`` with no box at or above ``min_conf``) and ``n_images``.
    """
    images = [str(i) for i in images]
    pred = pred[pred["image"].astype(str).isin(set(images))]
    truth = truth[truth["image"].astype(str).isin(set(images))]
    best = best_boxes(pred, images, min_conf)
    ious = crop_ious(best, truth, sizes or {})
    return {
        "map50": average_precision(pred, truth, 0.5),
        "crop_iou": float(ious.mean()) if len(ious) else float("nan"),
        "fallback_share": float(best["fallback"].mean()) if len(best) else float("nan"),
        "n_images": len(images),
    }
