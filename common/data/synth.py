"""A Happywhale-shaped synthetic competition at any size, for measuring how every stage scales.

:mod:`common.data.demo` draws a few hundred images of a few dozen individuals with uniform image counts. This module
plans and draws a competition shaped like Happywhale (https://www.kaggle.com/competitions/happy-whale-and-dolphin):
51,033 train images of 15,587 individuals (3.27 images per individual, about 60 % of individuals with one or
two images, a long tail), 27,956 test images (35.4 % of all images), 30 species, and test images of individuals
never seen in training. Images are small (default 96 x 72 px) so a CPU can run every stage on 80,000 of them.

Shape chosen (module constants, see :func:`count_distribution`):

* images per train individual: a truncated Zipf-Mandelbrot law ``P(k) ~ (k + q)^-a`` for ``k = 1..400``, with
  ``a = 4.231, q = 5.550`` fitted so that the mean is Happywhale's 51,033 / 15,587 = 3.274 and 60 % of the
  individuals have one or two images (the two figures the project's issue 14 states). It gives 38.8 % singletons,
  21.2 % pairs, 4.3 % of individuals with more than 10 images; the cap of 400 is about the largest real class.
  A plain Zipf law cannot match both figures (matching the mean gives 79 % with one or two images).
* species: 30, per individual, with geometric weights ``0.82^j`` (the commonest has 18 % of the individuals;
  Happywhale's commonest, bottlenose_dolphin, has about 19 % of the images). Species ``j`` is drawn with the
  demo's silhouette ``j % 4`` in a per-species tint.
* test: 35.4 % of all images. 20 % of the test images (an assumption; the true share is hidden on Kaggle) show
  individuals that are not in train, whose test-image counts follow the same law; the other test images pick a
  train individual with probability proportional to its train count.

Determinism: every draw comes from ``numpy`` generators seeded from ``seed`` (and each image's id for its scene,
as in the demo), so the same arguments give the same files on one machine. Drawing reuses
:func:`common.data.demo.render_image` (about 1 ms per 96 x 72 image plus 0.2 ms of JPEG writing on one core) and
draws each individual's template once, for all its images, so memory does not grow with the individuals.

Files, as :mod:`common.data.demo` (``train.csv``, ``test.csv``, ``sample_submission.csv``, ``boxes.csv``,
``train_images/``, ``test_images/``) plus ``_synth.json`` written last (args, version, counts).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd

from common.core.store import atomic_dir, read_json, write_json
from common.data.demo import (
    SPECIES,
    animal_template,
    render_image,
    write_jpeg,
    write_tables,
)

GENERATOR_VERSION = 1
MARKER = "_synth.json"
ZM_A, ZM_Q, MAX_PER_INDIVIDUAL = 4.23108, 5.54972, 400
N_SPECIES, SPECIES_DECAY = 30, 0.82
TEST_SHARE = 27956 / (51033 + 27956)  # 0.354
NEW_SHARE = 0.2
SPECIES_NAMES: tuple[str, ...] = SPECIES + tuple(f"species_{j:02d}" for j in range(len(SPECIES), N_SPECIES))


def count_distribution(a: float = ZM_A, q: float = ZM_Q, k_max: int = MAX_PER_INDIVIDUAL) -> np.ndarray:
    """``P(k)`` for ``k = 1..k_max`` images per individual (index ``k - 1``): ``(k + q)^-a``, normalised.

    Args:
        a: the exponent.
        q: the Mandelbrot offset (``q = 0`` is Zipf's law).
        k_max: the largest count.
    """
    p = (np.arange(1, k_max + 1, dtype=np.float64) + q) ** -a
    return p / p.sum()


def _counts(rng: np.random.Generator, total: int) -> np.ndarray:
    """Images per individual drawn from :func:`count_distribution` until they sum to ``total`` (last one cut)."""
    if total <= 0:
        return np.zeros(0, np.int64)
    p = count_distribution()
    mean = float((p * np.arange(1, len(p) + 1)).sum())
    out = np.zeros(0, np.int64)
    while out.sum() < total:
        out = np.concatenate([out, rng.choice(len(p), size=int(total / mean * 1.2) + 8, p=p) + 1])
    end = int(np.searchsorted(np.cumsum(out), total))  # first index where the running sum reaches total
    out = out[: end + 1].copy()
    out[-1] -= int(out.sum() - total)
    return out


def _image_names(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct random 56-bit hex names ``<14 hex>.jpg``."""
    values = np.zeros(0, np.int64)
    while len(values) < n:  # a collision among 2^56 values: practically never, but redraw if so
        values = np.unique(np.concatenate([values, rng.integers(0, 2**56, size=n - len(values))]))
    values = rng.permutation(values)
    return [f"{int(v):014x}.jpg" for v in values]


def plan_synth(n_images: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decide which images exist (no drawing): the tables :func:`make_synth` writes.

    Args:
        n_images: train + test images (Happywhale: 78,989).
        seed: master seed.

    Returns:
        ``(train, test)``: ``train`` has ``image, species, individual_id``; ``test`` has ``image, species,
        individual_id, unseen``; both sorted by image.
    """
    if n_images < 20:
        raise ValueError(f"n_images={n_images}: need at least 20")
    rng = np.random.default_rng([seed, 0])
    n_test = int(round(n_images * TEST_SHARE))
    n_train = n_images - n_test
    n_new = int(round(n_test * NEW_SHARE))
    seen_counts, new_counts = _counts(rng, n_train), _counts(rng, n_new)
    n_seen, n_ind = len(seen_counts), len(seen_counts) + len(new_counts)
    w = SPECIES_DECAY ** np.arange(N_SPECIES)
    species = rng.choice(N_SPECIES, size=n_ind, p=w / w.sum())
    ids = np.array([f"{int(v):012x}" for v in rng.choice(2**48, size=n_ind, replace=False)])
    train_ind = np.repeat(np.arange(n_seen), seen_counts)
    test_ind = np.concatenate([rng.choice(n_seen, size=n_test - n_new, p=seen_counts / seen_counts.sum()),
                               np.repeat(np.arange(n_seen, n_ind), new_counts)])
    names = _image_names(rng, n_train + n_test)
    names_arr = np.array(SPECIES_NAMES)
    train = pd.DataFrame({"image": names[:n_train], "species": names_arr[species[train_ind]],
                          "individual_id": ids[train_ind]})
    test = pd.DataFrame({"image": names[n_train:], "species": names_arr[species[test_ind]],
                         "individual_id": ids[test_ind], "unseen": test_ind >= n_seen})
    return train.sort_values("image", ignore_index=True), test.sort_values("image", ignore_index=True)


def _template(species: str, individual_id: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The demo template of silhouette ``j % 4`` for species ``j``, tinted per species."""
    j = SPECIES_NAMES.index(species)
    bgr, alpha = animal_template(SPECIES[j % len(SPECIES)], individual_id, seed)
    if j >= len(SPECIES):
        tint = np.random.default_rng([seed, 3, j]).uniform(0.6, 1.4, size=3).astype(np.float32)
        bgr = np.clip(bgr * tint, 0, 255)
    return bgr, alpha


def _write(root: Path, train: pd.DataFrame, test: pd.DataFrame, seed: int, size: tuple[int, int]) -> None:
    both = pd.concat([train.assign(folder="train_images"), test.assign(folder="test_images")], ignore_index=True)
    both = both.sort_values(["individual_id", "image"], kind="stable", ignore_index=True)
    for folder in ("train_images", "test_images"):
        (root / folder).mkdir(parents=True)
    boxes, current, template = [], None, None
    for image, species, ind, folder in both[["image", "species", "individual_id", "folder"]].itertuples(
            index=False):
        if ind != current:  # images grouped by individual: one template in memory at a time
            current, template = ind, _template(species, ind, seed)
        img, _, box = render_image(image, species, ind, seed, size, template)
        write_jpeg(root / folder / image, img)
        boxes.append((image, *box))
    write_tables(root, train, test, boxes)


def make_synth(out_dir: str | os.PathLike, n_images: int, image_size: tuple[int, int] = (96, 72), seed: int = 0,
               overwrite: bool = False) -> Path:
    """Generate the synthetic competition into ``out_dir`` (atomically, as :func:`common.data.demo.make_demo`).

    Args:
        out_dir: the competition folder.
        n_images: train + test images.
        image_size: ``(width, height)``, at least ``(64, 48)``.
        seed: master seed.
        overwrite: replace a synthetic competition made with other arguments.

    Returns:
        ``out_dir`` as a ``Path``; nothing is redrawn when it already holds the same arguments' output.
    """
    out_dir = Path(out_dir)
    w, h = (int(v) for v in image_size)
    if w < 64 or h < 48:
        raise ValueError(f"image_size={image_size!r}: need width >= 64 and height >= 48")
    args = dict(n_images=int(n_images), image_size=[w, h], seed=int(seed))
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / MARKER).is_file():
            raise FileExistsError(f"{out_dir} exists and is not a synthetic competition (no {MARKER})")
        old = read_json(out_dir / MARKER)
        if old.get("args") == args and old.get("version") == GENERATOR_VERSION:
            return out_dir
        if not overwrite:
            raise FileExistsError(f"{out_dir} holds {old.get('args')}, not {args}: pass overwrite=True")
    train, test = plan_synth(n_images, seed)
    with atomic_dir(out_dir) as tmp:  # a kill leaves the old folder (or none), never half a competition
        _write(tmp, train, test, seed, (w, h))
        counts = dict(train_images=len(train), test_images=len(test), unseen_test_images=int(test["unseen"].sum()),
                      train_individuals=int(train["individual_id"].nunique()),
                      individuals=int(pd.concat([train["individual_id"], test["individual_id"]]).nunique()))
        write_json(tmp / MARKER, dict(generator="common.data.synth", version=GENERATOR_VERSION, args=args, counts=counts))
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """``python -m common.data.synth inputs/synth_80k --images 80000``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--images", type=int, required=True, help="train + test images")
    ap.add_argument("--size", type=int, nargs=2, default=(96, 72), metavar=("W", "H"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    out = make_synth(a.out_dir, a.images, tuple(a.size), a.seed, a.overwrite)
    print(read_json(out / MARKER)["counts"])


if __name__ == "__main__":
    main()
