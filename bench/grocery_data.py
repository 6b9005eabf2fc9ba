"""The Grocery Store Dataset laid out as a competition, clean or with deterministic label noise (for bench/grocery.py).

Data: ``../shared/datasets/grocery`` (Klasson et al., "A Hierarchical Grocery Store Image Dataset with Visual and
Semantic Labels", WACV 2019, https://github.com/marcusklasson/GroceryStoreDataset, MIT), never copied into the
repository: 81 fine classes in 43 coarse classes, the official ``train`` split (2,640 images) and ``val`` split
(296 images). ``train.txt`` / ``val.txt`` lines are ``<split>/<path>.jpg, <fine id>, <coarse id>``;
``classes.csv`` names the ids (``Class Name (str)``, ``Class ID (int)``, ``Coarse Class Name (str)``,
``Coarse Class ID (int)``, ...).

:func:`write_competition` writes, under ``working/bench/grocery/<name>/``: ``train_images/`` and ``test_images/``
(the ``train`` and ``val`` JPEGs, copied, named by their file name), ``train.csv`` (``image, species,
individual_id, coarse``: ``individual_id`` the fine class name, ``species`` and ``coarse`` the coarse class name),
``test.csv`` (``image, individual_id, coarse``: the ``val`` truth: the official val split is this benchmark's
test set), ``sample_submission.csv`` and ``classes.csv``.

Label noise (:func:`noisy_labels`), as web-crawled training sets have it (the ACCV-2022 WebFG set): a fixed
share of the training images gets another fine class *of the same coarse class* (a confusable one: Granny-Smith
for Golden-Delicious). Only images whose coarse class has two or more fine classes can flip (50 of the 81 fine
classes are in such coarse classes). Deterministic: ``numpy.random.default_rng(seed)`` picks the images among
the eligible ones and each new class among the other fine classes of the coarse class. The test set stays clean.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from common.core import store
from common.data.competition import DataError

DATA_VERSION = 1  # bump when the layout changes: converted folders are rebuilt
SPLITS = {"train": "train.txt", "test": "val.txt"}  # this benchmark's name -> the official list


def read_classes(source: Path) -> pd.DataFrame:
    """``classes.csv`` as ``fine_id, fine, coarse_id, coarse`` indexed by fine id (0..80).

    Args:
        source: the ``grocery`` folder.
    """
    path = source / "classes.csv"
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    raw = pd.read_csv(path)
    cols = {"Class Name (str)": "fine", "Class ID (int)": "fine_id", "Coarse Class Name (str)": "coarse",
            "Coarse Class ID (int)": "coarse_id"}
    missing = [c for c in cols if c not in raw.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(raw.columns)}")
    table = raw[list(cols)].rename(columns=cols)
    if sorted(table["fine_id"]) != list(range(len(table))):
        raise DataError(f"{path}: fine class ids are not 0..{len(table) - 1}")
    return table.set_index("fine_id", drop=False).sort_index()


def read_split(source: Path, split: str, classes: pd.DataFrame) -> pd.DataFrame:
    """One split's images: ``file`` (absolute), ``image`` (file name), ``fine``, ``coarse`` names.

    Args:
        source: the ``grocery`` folder.
        split: ``train`` or ``test`` (the official ``val`` list).
        classes: :func:`read_classes`.
    """
    path = source / SPLITS[split]
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not parts[1].isdecimal() or not parts[2].isdecimal():
            raise DataError(f"{path}, line {n}: expected '<path>, <fine id>, <coarse id>', got {line!r}")
        fine_id, coarse_id = int(parts[1]), int(parts[2])
        if fine_id not in classes.index or classes.loc[fine_id, "coarse_id"] != coarse_id:
            raise DataError(f"{path}, line {n}: fine id {fine_id} / coarse id {coarse_id} disagree with classes.csv")
        file = source / parts[0]
        if not file.is_file():
            raise DataError(f"{path}, line {n}: image {file} not found")
        rows.append({"file": str(file), "image": file.name, "fine": classes.loc[fine_id, "fine"],
                     "coarse": classes.loc[fine_id, "coarse"]})
    table = pd.DataFrame(rows)
    repeated = table["image"][table["image"].duplicated()]
    if len(repeated):
        raise DataError(f"{path}: file name {repeated.iloc[0]!r} appears twice (images are named by file name)")
    return table


def noisy_labels(fine: list[str], coarse: list[str], share: float, seed: int = 0) -> np.ndarray:
    """Fine labels with ``round(share * N)`` of them flipped to another fine class of the same coarse class.

    Args:
        fine: fine class per image.
        coarse: coarse class per image.
        share: share of *all* images to flip; must not exceed the share of eligible images (those whose coarse
            class holds two or more fine classes).
        seed: ``numpy.random.default_rng`` seed: the same arguments give the same labels.

    Returns:
        The new fine labels (``object`` array); exactly ``round(share * N)`` differ from ``fine``.
    """
    fine, coarse = np.asarray(fine, dtype=object), np.asarray(coarse, dtype=object)
    siblings = {c: sorted(set(fine[coarse == c])) for c in sorted(set(coarse))}
    eligible = np.flatnonzero([len(siblings[c]) > 1 for c in coarse])
    n = round(share * len(fine))
    if not 0 <= share <= 1 or n > len(eligible):
        raise ValueError(f"share={share}: {n} flips asked, only {len(eligible)} images have a same-coarse sibling")
    rng = np.random.default_rng(seed)
    out = fine.copy()
    for i in np.sort(rng.choice(eligible, size=n, replace=False)):
        others = [f for f in siblings[coarse[i]] if f != fine[i]]
        out[i] = others[int(rng.integers(len(others)))]
    return out


def write_competition(source: Path, out: Path, noise: float = 0.0, noise_seed: int = 0) -> Path:
    """Write the competition folder (module docstring), built beside ``out`` and renamed into place.

    Args:
        source: the ``grocery`` folder.
        out: the folder to create (replaced if it exists).
        noise: share of training labels flipped within their coarse class (0: clean).
        noise_seed: the seed of :func:`noisy_labels`.
    """
    classes = read_classes(source)
    train, test = read_split(source, "train", classes), read_split(source, "test", classes)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, table in (("train", train), ("test", test)):
        (tmp / f"{split}_images").mkdir(parents=True)
        for file, image in zip(table["file"], table["image"], strict=True):
            shutil.copyfile(file, tmp / f"{split}_images" / image)
    labels = noisy_labels(train["fine"], train["coarse"], noise, noise_seed) if noise else train["fine"].to_numpy()
    pd.DataFrame({"image": train["image"], "species": train["coarse"], "individual_id": labels,
                  "coarse": train["coarse"], "clean_label": train["fine"]}).to_csv(tmp / "train.csv", index=False)
    pd.DataFrame({"image": test["image"], "individual_id": test["fine"], "coarse": test["coarse"]}).to_csv(
        tmp / "test.csv", index=False)
    pd.DataFrame({"image": test["image"], "predictions": " ".join(classes["fine"][:5])}).to_csv(
        tmp / "sample_submission.csv", index=False)
    counts = classes.assign(n_train=classes["fine"].map(train["fine"].value_counts()).fillna(0).astype(int),
                            n_test=classes["fine"].map(test["fine"].value_counts()).fillna(0).astype(int))
    counts.to_csv(tmp / "classes.csv", index=False)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def convert(work: Path, shared: Path, noise: float = 0.0, noise_seed: int = 0) -> Path:
    """Convert once into ``work/grocery`` (clean) or ``work/grocery_noise<pct>``; reused while the lists, the
    class table and the parameters are unchanged.

    Args:
        work: the parent folder (``working/bench/grocery``).
        shared: the shared datasets folder holding ``grocery/``.
        noise: share of flipped training labels.
        noise_seed: the flip seed.
    """
    source = shared / "grocery"
    digest = hashlib.sha1()
    for name in ("classes.csv", *SPLITS.values()):
        if not (source / name).is_file():
            raise DataError(f"{source / name}: file not found (is ../shared/datasets/grocery there?)")
        digest.update((source / name).read_bytes())
    params = {"version": DATA_VERSION, "noise": float(noise), "noise_seed": int(noise_seed),
              "source": digest.hexdigest()}
    out = work / (f"grocery_noise{round(100 * noise)}" if noise else "grocery")
    if not store.stage_done(out, params):
        write_competition(source, out, noise, noise_seed)
        store.mark_done(out, params)
    return out
