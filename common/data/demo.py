"""A small, deterministic demo competition in the Happywhale layout, drawn with NumPy and OpenCV.

Nothing is downloaded: :func:`make_demo` draws every image, so the whole pipeline (crop -> embed -> retrieve)
can run anywhere, and its tests can check known answers (``test.csv``, ``boxes.csv``).

Generative model. Each species has a fixed silhouette, colour and shading: a humpback-like tail fluke, a
dolphin-like dorsal fin, a mottled blue-whale-like back and a white beluga-like body. An individual is
that silhouette plus markings drawn from a seed derived from its id, so two individuals of one species differ
only by their markings: white blobs and a serrated trailing edge on flukes, notches, scars and spots on fins,
light/dark mottling on backs, dark scratches and spots on belugas. Each image puts one animal into a
sea scene (gradient, low-frequency swell, wave ripples, sensor noise, sometimes a sky band and a distractor:
foam, a bird or a buoy) at a random position, width (12-45 % of the image), mirror flip and rotation
(+-15 degrees), then jitters brightness/contrast, blurs some images and adds noise. The box is the tight
pixel bounding box of the animal's alpha mask, so ``boxes.csv`` is exact.

Files written into ``out_dir``::

    train.csv              image,species,individual_id        (sorted by image)
    test.csv               image,individual_id                (ground truth; unseen ids keep their own id)
    sample_submission.csv  image,predictions                  (new_individual + the 4 commonest train ids)
    boxes.csv              image,xmin,ymin,xmax,ymax          (train and test; covers img[ymin:ymax, xmin:xmax])
    train_images/, test_images/   <14 hex>.jpg (JPEG quality 90)
    _demo.json             the arguments, generator version and counts (written last: marks a complete demo)

Same arguments give byte-identical files on one machine (every random draw comes from a ``numpy`` generator
seeded from ``seed`` and the image or individual id).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from common.core.store import atomic_dir, read_json, write_csv, write_json

GENERATOR_VERSION = 1
MARKER = "_demo.json"
JPEG_QUALITY = 90
SPECIES: tuple[str, ...] = ("humpback_whale", "bottlenose_dolphin", "blue_whale", "beluga")
# Keyword arguments of the tiny variant the notebook tests run on (a few seconds end to end).
TINY_DEMO: dict[str, Any] = dict(
    n_individuals=8, n_unseen=2, images_per_individual=(3, 4), test_per_individual=(1, 2), image_size=(160, 120)
)
# Folder names that ensure_demo fills with a preset; any other missing folder named demo* gets the defaults.
PRESETS: dict[str, dict[str, Any]] = {"demo": {}, "demo_tiny": TINY_DEMO}


def _hex(*parts: Any, n: int) -> str:
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:n]


def plan_demo(
    n_individuals: int = 60,
    n_unseen: int = 12,
    images_per_individual: tuple[int, int] = (4, 8),
    test_per_individual: tuple[int, int] = (1, 2),
    n_species: int = 3,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decide which images exist, without drawing any: the tables :func:`make_demo` writes.

    Individual ``i`` has species ``SPECIES[i % n_species]``; the last ``n_unseen`` individuals (so spread over
    the species) appear only in test. Image counts per individual are uniform in the inclusive ranges.

    Args:
        n_individuals: individuals in all (train + unseen).
        n_unseen: individuals that appear only in test (scored as ``new_individual``).
        images_per_individual: inclusive (min, max) train images per train individual.
        test_per_individual: inclusive (min, max) test images per individual, unseen ones included.
        n_species: 1 to 4 species, taken in the order of ``SPECIES``.
        seed: master seed; ids and every drawing derive from it.

    Returns:
        ``(train, test)``: ``train`` has ``image, species, individual_id``; ``test`` has ``image, species,
        individual_id, unseen``. Both are sorted by image.
    """
    for name, (lo, hi) in (("images_per_individual", images_per_individual),
                           ("test_per_individual", test_per_individual)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{name}={(lo, hi)!r}: need 1 <= min <= max")
    if not 1 <= n_species <= len(SPECIES):
        raise ValueError(f"n_species={n_species}: need 1..{len(SPECIES)}")
    if not 0 <= n_unseen < n_individuals:
        raise ValueError(f"n_unseen={n_unseen}, n_individuals={n_individuals}: need 0 <= n_unseen < n_individuals")
    rng = np.random.default_rng([seed, 0])
    train_rows, test_rows = [], []
    for i in range(n_individuals):
        ind = _hex("demo-individual", seed, i, n=12)
        species = SPECIES[i % n_species]
        unseen = i >= n_individuals - n_unseen
        n_train = 0 if unseen else int(rng.integers(images_per_individual[0], images_per_individual[1] + 1))
        n_test = int(rng.integers(test_per_individual[0], test_per_individual[1] + 1))
        for k in range(n_train):
            train_rows.append((_hex("demo-train", seed, i, k, n=14) + ".jpg", species, ind))
        for k in range(n_test):
            test_rows.append((_hex("demo-test", seed, i, k, n=14) + ".jpg", species, ind, unseen))
    train = pd.DataFrame(train_rows, columns=["image", "species", "individual_id"])
    test = pd.DataFrame(test_rows, columns=["image", "species", "individual_id", "unseen"])
    if len(set(train["image"]) | set(test["image"])) != len(train) + len(test):  # 56-bit ids: never in practice
        raise RuntimeError("demo image ids collide; change the seed")
    return (train.sort_values("image", ignore_index=True), test.sort_values("image", ignore_index=True))


# ---------------------------------------------------------------------------------------------- animals
def _mirror(right: list[tuple[float, float]]) -> np.ndarray:
    """A symmetric outline from its right half (listed from bottom centre to top centre)."""
    left = [(1.0 - x, y) for x, y in reversed(right)]
    return np.array(right + left, np.float64)


# Per species: canvas (width, height), outline in unit coordinates (y down), body BGR colour, top/bottom shading.
_SHAPES: dict[str, dict[str, Any]] = {
    "humpback_whale": dict(size=(240, 110), color=(48, 44, 40), shade=(1.15, 0.8), outline=_mirror([
        (0.56, 1.0), (0.57, 0.74), (0.63, 0.58), (0.75, 0.44), (0.87, 0.29), (0.96, 0.12), (1.0, 0.0),
        (0.9, 0.08), (0.78, 0.14), (0.65, 0.18), (0.55, 0.22), (0.5, 0.3)])),
    "bottlenose_dolphin": dict(size=(180, 150), color=(125, 120, 112), shade=(0.8, 1.1), outline=np.array([
        (0.0, 1.0), (0.0, 0.88), (0.2, 0.78), (0.3, 0.52), (0.44, 0.28), (0.58, 0.12), (0.73, 0.03),
        (0.7, 0.16), (0.66, 0.32), (0.66, 0.52), (0.71, 0.7), (0.8, 0.78), (1.0, 0.88), (1.0, 1.0)])),
    "blue_whale": dict(size=(280, 90), color=(150, 132, 112), shade=(1.1, 0.75), outline=np.array([
        (0.0, 0.95), (0.04, 0.6), (0.15, 0.38), (0.35, 0.3), (0.6, 0.32), (0.7, 0.3), (0.75, 0.12),
        (0.8, 0.3), (0.9, 0.42), (1.0, 0.7), (1.0, 1.0), (0.02, 1.0)])),
    "beluga": dict(size=(240, 110), color=(212, 218, 220), shade=(1.05, 0.8), outline=np.array([
        (0.0, 0.7), (0.08, 0.45), (0.3, 0.3), (0.6, 0.28), (0.78, 0.2), (0.9, 0.22), (0.98, 0.38),
        (1.0, 0.55), (0.96, 0.72), (0.85, 0.85), (0.5, 0.92), (0.15, 0.88)])),
}
_WHITE, _DARK = (235, 235, 232), (30, 30, 34)


def _points_inside(mask: np.ndarray, margin: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` (x, y) points at least ``margin`` pixels inside ``mask``."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    inner = cv2.erode(mask, kernel)
    ys, xs = np.nonzero(inner if inner.any() else mask)
    pick = rng.integers(0, len(xs), size=n)
    return np.stack([xs[pick], ys[pick]], axis=1)


def _blobs(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, n: int, radius: tuple[int, int],
           colors: list[tuple[int, int, int]], lobes: int = 1) -> None:
    """Irregular spots: each one is ``lobes`` overlapping ellipses of one colour."""
    for x, y in _points_inside(mask, radius[0], n, rng):
        color = colors[int(rng.integers(len(colors)))]
        for _ in range(lobes):
            dx, dy = rng.integers(-radius[0], radius[0] + 1, size=2) if lobes > 1 else (0, 0)
            axes = tuple(int(a) for a in rng.integers(radius[0], radius[1] + 1, size=2))
            cv2.ellipse(img, (int(x + dx), int(y + dy)), axes, float(rng.uniform(0, 180)), 0, 360, color, -1,
                        cv2.LINE_AA)


def _scratches(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, n: int, length: tuple[int, int],
               color: tuple[int, int, int], thickness: int) -> None:
    for x, y in _points_inside(mask, 4, n, rng):
        angle, half = rng.uniform(0, np.pi), rng.uniform(*length) / 2
        d = np.array([np.cos(angle), np.sin(angle)]) * half
        p0, p1 = np.round([x, y] - d).astype(int), np.round([x, y] + d).astype(int)
        cv2.line(img, tuple(map(int, p0)), tuple(map(int, p1)), color, thickness, cv2.LINE_AA)


def _edge_cuts(mask: np.ndarray, edge: np.ndarray, rng: np.random.Generator, n: int,
               radius: tuple[int, int]) -> None:
    """Notches: discs cut out of ``mask`` centred on points of the polyline ``edge`` (pixels)."""
    seg = rng.integers(0, len(edge) - 1, size=n)
    for s in seg:
        t = rng.uniform(0.1, 0.9)
        x, y = edge[s] * (1 - t) + edge[s + 1] * t
        cv2.circle(mask, (int(round(x)), int(round(y))), int(rng.integers(radius[0], radius[1] + 1)), 0, -1,
                   cv2.LINE_AA)


def animal_template(species: str, individual_id: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Draw one individual on its species' canvas: the same image every time for the same arguments.

    Args:
        species: one of ``SPECIES``.
        individual_id: the individual's hex id; its markings derive from it and ``seed``.
        seed: the demo's master seed.

    Returns:
        ``(bgr, alpha)``: ``float32`` arrays ``(H, W, 3)`` in 0-255 and ``(H, W)`` in 0-1.
    """
    if species not in _SHAPES:
        raise ValueError(f"unknown demo species {species!r}; expected one of {SPECIES}")
    shape = _SHAPES[species]
    w, h = shape["size"]
    rng = np.random.default_rng([seed, 1, int(individual_id, 16)])
    outline = np.round(shape["outline"] * [w - 1, h - 1]).astype(np.int32)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [outline], 255, cv2.LINE_AA)
    shade = np.linspace(*shape["shade"], h, dtype=np.float32)[:, None, None]
    img = np.clip(np.asarray(shape["color"], np.float32) * shade, 0, 255).astype(np.uint8)
    img = np.ascontiguousarray(np.broadcast_to(img, (h, w, 3)))
    if species == "humpback_whale":  # white underside patches, a few dark dots, a serrated trailing edge
        _blobs(img, mask, rng, int(rng.integers(3, 6)), (7, 18), [_WHITE], lobes=3)
        _blobs(img, mask, rng, int(rng.integers(2, 5)), (3, 6), [_DARK])
        edge = outline[6:18]  # right tip -> centre notch -> left tip
        _edge_cuts(mask, edge, rng, int(rng.integers(3, 8)), (3, 7))
    elif species == "bottlenose_dolphin":  # trailing-edge notches, white scars, a few spots
        edge = outline[6:12]  # fin tip -> trailing edge -> back
        _edge_cuts(mask, edge, rng, int(rng.integers(1, 4)), (6, 13))
        _scratches(img, mask, rng, int(rng.integers(1, 4)), (20, 50), _WHITE, 3)
        _blobs(img, mask, rng, int(rng.integers(2, 5)), (5, 10), [_WHITE, _DARK])
    elif species == "blue_whale":  # light and dark mottling
        _blobs(img, mask, rng, int(rng.integers(7, 12)), (4, 11), [(205, 195, 180), (70, 62, 55)], lobes=2)
    else:  # beluga: dark scratches and spots on white
        _scratches(img, mask, rng, int(rng.integers(2, 5)), (25, 70), (95, 100, 105), 3)
        _blobs(img, mask, rng, int(rng.integers(2, 5)), (5, 10), [(90, 95, 100)])
    return img.astype(np.float32), mask.astype(np.float32) / 255.0


# ---------------------------------------------------------------------------------------------- scenes
def _background(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, int]:
    """Sea: colour gradient, swell, ripples and sometimes a sky band. Returns ``(bgr float32, horizon row)``."""
    base = np.array([rng.uniform(95, 170), rng.uniform(70, 135), rng.uniform(20, 65)], np.float32)
    t = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None, None]
    img = base * (1 + rng.uniform(-0.4, 0.4) * t)
    cell = max(8, w // 12)
    swell = rng.normal(size=(h // cell + 2, w // cell + 2)).astype(np.float32)
    img = img + rng.uniform(6, 16) * cv2.resize(swell, (w, h), interpolation=cv2.INTER_CUBIC)[..., None]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period, tilt, phase = rng.uniform(6, 16) * h / 240, rng.uniform(-0.3, 0.3), rng.uniform(0, 2 * np.pi)
    img = img + rng.uniform(3, 10) * np.sin(2 * np.pi * (yy + tilt * xx) / period + phase)[..., None]
    horizon = 0
    if rng.random() < 0.3:
        horizon = int(rng.uniform(0.08, 0.25) * h)
        sky = np.array([rng.uniform(190, 235), rng.uniform(175, 215), rng.uniform(150, 200)], np.float32)
        img[:horizon] = sky * np.linspace(0.9, 1.05, horizon, dtype=np.float32)[:, None, None]
    return img, horizon


def _distractor(img: np.ndarray, rng: np.random.Generator, avoid: tuple[int, int, int, int]) -> None:
    """Maybe draw foam, a bird or a buoy that does not overlap the box ``avoid``."""
    if rng.random() >= 0.5:
        return
    h, w = img.shape[:2]
    kind, size = int(rng.integers(3)), max(3, int(rng.uniform(0.03, 0.07) * w))
    x, y = int(rng.integers(size, w - size)), int(rng.integers(size, h - size))
    x0, y0, x1, y1 = avoid
    if x + size > x0 and x - size < x1 and y + size > y0 and y - size < y1:
        return
    if kind == 0:
        cv2.ellipse(img, (x, y), (size, max(2, size // 3)), float(rng.uniform(-20, 20)), 0, 360,
                    (225, 228, 230), -1, cv2.LINE_AA)
    elif kind == 1:
        pts = np.array([(x - size, y - size // 2), (x, y), (x + size, y - size // 2)], np.int32)
        cv2.polylines(img, [pts], False, (40, 40, 40), max(1, size // 5), cv2.LINE_AA)
    else:
        cv2.circle(img, (x, y), max(2, size // 2), (30, 110, 235), -1, cv2.LINE_AA)


def _place(bgr: np.ndarray, alpha: np.ndarray, rng: np.random.Generator, w: int, h: int,
           horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale, flip, rotate and translate an animal onto a ``w x h`` canvas (fully inside it)."""
    th0, tw0 = alpha.shape
    frac, flip, angle = rng.uniform(0.12, 0.45), rng.random() < 0.5, rng.uniform(-15, 15)
    cos, sin = abs(np.cos(np.radians(angle))), abs(np.sin(np.radians(angle)))
    top = horizon if horizon < 0.4 * h else 0
    for _ in range(20):  # shrink until the rotated animal fits below the horizon
        tw, th = max(8, round(frac * w)), max(4, round(frac * w * th0 / tw0))
        bw, bh = tw * cos + th * sin, tw * sin + th * cos
        if bw <= w - 4 and bh <= h - top - 4:
            break
        frac *= 0.9
    small = cv2.resize(bgr, (tw, th), interpolation=cv2.INTER_AREA)
    small_a = cv2.resize(alpha, (tw, th), interpolation=cv2.INTER_AREA)
    if flip:
        small, small_a = small[:, ::-1].copy(), small_a[:, ::-1].copy()
    cx = rng.uniform(bw / 2 + 2, w - bw / 2 - 2)
    cy = rng.uniform(top + bh / 2 + 2, h - bh / 2 - 2)
    m = cv2.getRotationMatrix2D((tw / 2, th / 2), angle, 1.0)
    m[:, 2] += (cx - tw / 2, cy - th / 2)
    fg = cv2.warpAffine(small, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    a = cv2.warpAffine(small_a, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    return fg, a


def render_image(
    image: str,
    species: str,
    individual_id: str,
    seed: int = 0,
    image_size: tuple[int, int] = (320, 240),
    template: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """Draw one demo image; a pure function of its arguments.

    Args:
        image: the image file name (``<hex>.jpg``); the scene's random draws derive from it and ``seed``.
        species: the animal's species.
        individual_id: the animal's id (its markings).
        seed: the demo's master seed.
        image_size: ``(width, height)`` in pixels.
        template: ``animal_template(species, individual_id, seed)`` if already drawn (a cache).

    Returns:
        ``(bgr uint8 (H, W, 3), alpha float32 (H, W), (xmin, ymin, xmax, ymax))``: the box is the tight
        bounding box of ``alpha > 0.5`` and covers ``img[ymin:ymax, xmin:xmax]``.
    """
    w, h = image_size
    rng = np.random.default_rng([seed, 2, int(Path(image).stem, 16)])
    bgr, alpha = template if template is not None else animal_template(species, individual_id, seed)
    scene, horizon = _background(rng, w, h)
    fg, a = _place(bgr * rng.uniform(0.85, 1.15), alpha, rng, w, h, horizon)
    ys, xs = np.nonzero(a > 0.5)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    _distractor(scene, rng, box)
    scene = scene * (1 - a[..., None]) + fg * a[..., None]
    scene = (scene - 128) * rng.uniform(0.75, 1.25) + 128 + rng.uniform(-25, 25)
    if rng.random() < 0.5:
        scene = cv2.GaussianBlur(scene, (0, 0), rng.uniform(0.4, 1.3) * w / 320)
    scene = scene + rng.normal(0, rng.uniform(2, 6), scene.shape).astype(np.float32)
    return np.clip(np.round(scene), 0, 255).astype(np.uint8), a, box


# ---------------------------------------------------------------------------------------------- files
def _is_demo(path: Path) -> bool:
    return (path / MARKER).is_file()


def make_demo(
    out_dir: str | os.PathLike,
    n_individuals: int = 60,
    n_unseen: int = 12,
    images_per_individual: tuple[int, int] = (4, 8),
    test_per_individual: tuple[int, int] = (1, 2),
    image_size: tuple[int, int] = (320, 240),
    n_species: int = 3,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Generate the demo competition into ``out_dir`` (see the module docstring for the files).

    The files are written into a hidden sibling folder that is renamed onto ``out_dir`` at the end, so a
    killed run never leaves half a demo. If ``out_dir`` already holds a demo made with the same arguments
    (its ``_demo.json``), nothing is done.

    Args:
        out_dir: the competition folder to create.
        n_individuals: individuals in all (train + unseen).
        n_unseen: individuals that appear only in test.
        images_per_individual: inclusive (min, max) train images per train individual.
        test_per_individual: inclusive (min, max) test images per individual.
        image_size: ``(width, height)`` of every image; at least ``(64, 48)``.
        n_species: 1 to 4 species.
        seed: master seed.
        overwrite: replace an existing demo made with other arguments. A folder that is not a demo (no
            ``_demo.json``) and is not empty is never replaced.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        FileExistsError: ``out_dir`` holds something else, or a demo with other arguments and not ``overwrite``.
    """
    out_dir = Path(out_dir)
    w, h = (int(v) for v in image_size)
    if w < 64 or h < 48:
        raise ValueError(f"image_size={image_size!r}: need width >= 64 and height >= 48")
    args = dict(n_individuals=n_individuals, n_unseen=n_unseen, images_per_individual=list(images_per_individual),
                test_per_individual=list(test_per_individual), image_size=[w, h], n_species=n_species, seed=seed)
    if out_dir.exists():
        if not out_dir.is_dir() or (any(out_dir.iterdir()) and not _is_demo(out_dir)):
            raise FileExistsError(f"{out_dir} exists and is not a demo folder (no {MARKER}): refusing to touch it")
        if _is_demo(out_dir):
            old = read_json(out_dir / MARKER)
            if old.get("args") == args and old.get("version") == GENERATOR_VERSION and not overwrite:
                return out_dir
            if not overwrite:
                raise FileExistsError(f"{out_dir} holds a demo made with {old.get('args')} (version "
                                      f"{old.get('version')}), not {args}: pass overwrite=True to replace it")
    train, test = plan_demo(n_individuals, n_unseen, tuple(images_per_individual), tuple(test_per_individual),
                            n_species, seed)  # validates the arguments before any drawing
    try:
        with atomic_dir(out_dir) as tmp:  # replaces an empty folder or an older demo (checked above)
            _write_demo(tmp, train, test, seed, (w, h))
            counts = dict(train_images=len(train), test_images=len(test),
                          unseen_test_images=int(test["unseen"].sum()),
                          train_individuals=train["individual_id"].nunique(), individuals=n_individuals)
            write_json(tmp / MARKER, dict(generator="common.data.demo", version=GENERATOR_VERSION, args=args,
                                          counts=counts))
    except OSError:
        # Another process finished the same demo first: keep its copy if it is the one we were asked for.
        if _is_demo(out_dir) and read_json(out_dir / MARKER) | {"counts": None} == dict(
                generator="common.data.demo", version=GENERATOR_VERSION, args=args, counts=None):
            return out_dir
        raise
    return out_dir


def _write_demo(root: Path, train: pd.DataFrame, test: pd.DataFrame, seed: int, size: tuple[int, int]) -> None:
    templates: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    boxes = []
    for folder, table in (("train_images", train), ("test_images", test)):
        (root / folder).mkdir(parents=True)
        for image, species, ind in table[["image", "species", "individual_id"]].itertuples(index=False):
            if ind not in templates:
                templates[ind] = animal_template(species, ind, seed)
            img, _, box = render_image(image, species, ind, seed, size, templates[ind])
            write_jpeg(root / folder / image, img)
            boxes.append((image, *box))
    write_tables(root, train, test, boxes)


def write_jpeg(path: Path, img: np.ndarray) -> None:
    """Write one generated image as a JPEG of :data:`JPEG_QUALITY`; raise when OpenCV cannot."""
    if not cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
        raise OSError(f"cv2.imwrite failed for {path}")


def write_tables(root: Path, train: pd.DataFrame, test: pd.DataFrame, boxes: list[tuple]) -> None:
    """The tables of a generated competition: ``train.csv``, ``test.csv`` (the truth), ``sample_submission.csv``
    (``new_individual`` and the four most frequent individuals) and ``boxes.csv`` (sorted by image).

    Args:
        root: the competition folder.
        train: ``image, species, individual_id`` of the train images.
        test: ``image, individual_id`` of the test images.
        boxes: ``(image, xmin, ymin, xmax, ymax)`` of every image.
    """
    write_csv(root / "train.csv", train[["image", "species", "individual_id"]])
    write_csv(root / "test.csv", test[["image", "individual_id"]])
    counts = train["individual_id"].value_counts()  # most frequent first, ties by id (vectorised: 15k+ ids)
    top4 = counts.rename_axis("i").reset_index(name="n").sort_values(["n", "i"], ascending=[False, True])["i"][:4]
    write_csv(root / "sample_submission.csv",
              pd.DataFrame({"image": test["image"], "predictions": " ".join(["new_individual", *top4])}))
    box_df = pd.DataFrame(boxes, columns=["image", "xmin", "ymin", "xmax", "ymax"])
    write_csv(root / "boxes.csv", box_df.sort_values("image", ignore_index=True))


def ensure_demo(data_dir: str | os.PathLike) -> Path:
    """Generate the demo on first use: ``inputs/demo`` (and ``inputs/demo_tiny``) need no download.

    Args:
        data_dir: a competition folder. If it does not exist (or is empty) and its name is one of ``PRESETS``
            (``demo``, ``demo_tiny``), it is generated with that preset. Any other folder is returned untouched
            (a missing one is reported by the caller: ``demo2`` or ``demo-tiny`` generate nothing).

    Returns:
        ``data_dir`` as a ``Path``.
    """
    data_dir = Path(data_dir)
    empty = data_dir.is_dir() and not any(data_dir.iterdir())
    if (not data_dir.exists() or empty) and data_dir.name in PRESETS:  # exact names: no typo makes a demo
        make_demo(data_dir, **PRESETS.get(data_dir.name, {}))
    return data_dir
