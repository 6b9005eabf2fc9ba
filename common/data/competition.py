"""Competition tables, their validation, folds, the image dataset and its transforms.

The competition layout is Happywhale's, so a user can drop a competition folder into ``inputs/``::

    train.csv               image,species,individual_id
    train_images/<image>
    test_images/<image>
    sample_submission.csv   image,predictions        (five space-separated ids; gives the test images)
    boxes.csv   (optional)  image,xmin,ymin,xmax,ymax (pixels; trains the detector)
    test.csv    (optional)  image,individual_id       (ground truth: every run then scores MAP@5)

:func:`load_competition` checks all of it before any long work starts, and every error names the file and the
row (1-based data row, as a spreadsheet shows it below the header).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image

TRAIN_COLUMNS = ("image", "species", "individual_id")
SUBMISSION_COLUMNS = ("image", "predictions")
BOX_COLUMNS = ("image", "xmin", "ymin", "xmax", "ymax")
TRUTH_COLUMNS = ("image", "individual_id")


# Columns that hold ids: a value that reads as missing, or with spaces around it, is refused (never a class).
ID_COLUMNS = ("image", "species", "individual_id")
MISSING_WORDS = {"nan", "none", "null", "<na>"}


class DataError(ValueError):
    """A competition file is malformed; the message names the file and row."""


@dataclasses.dataclass
class Competition:
    """A validated competition folder.

    Attributes:
        root: the folder.
        train: ``image, species, individual_id`` (+ ``path``), one row per training image.
        test: ``image`` (+ ``path``), one row per test image, in sample-submission order.
        boxes: ``image, xmin, ymin, xmax, ymax`` or ``None``.
        truth: ``image, individual_id`` for test images, or ``None``.
    """

    root: Path
    train: pd.DataFrame
    test: pd.DataFrame
    boxes: pd.DataFrame | None
    truth: pd.DataFrame | None
    skipped: pd.DataFrame | None = None  # bad_images=skip: image, split, reason (common.data.unreadable)

    @property
    def known_individuals(self) -> set[str]:
        return set(self.train["individual_id"])

    def summary(self) -> pd.DataFrame:
        """A one-row-per-item summary table for notebooks."""
        rows = {
            "train images": len(self.train),
            "test images": len(self.test),
            "individuals (train)": self.train["individual_id"].nunique(),
            "species": self.train["species"].nunique(),
            "boxes": 0 if self.boxes is None else len(self.boxes),
            "ground truth": "yes" if self.truth is not None else "no",
        }
        if self.skipped is not None and len(self.skipped):
            rows["unreadable images skipped"] = ", ".join(f"{i} ({s})" for i, s in
                                                          zip(self.skipped["image"], self.skipped["split"], strict=True))
        if self.truth is not None:
            unseen = ~self.truth["individual_id"].isin(self.known_individuals)
            rows["test images of unseen individuals"] = f"{unseen.mean():.1%}"
        return pd.DataFrame({"value": rows}).rename_axis("item")


def read_table(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    """Read a CSV as strings and check it has ``columns``, non-empty values and unique ``image`` ids."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV ({err})") from err
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    for col in columns:
        blank = df[col].str.strip() == ""
        if blank.any():
            row = int(np.flatnonzero(blank.to_numpy())[0]) + 1
            raise DataError(f"{path}, row {row}: empty value in column {col!r}")
    for col in (c for c in columns if c in ID_COLUMNS):
        values = df[col]
        bad = (values != values.str.strip()) | values.str.strip().str.lower().isin(MISSING_WORDS)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0]) + 1
            value = values.iloc[row - 1]
            why = "spaces around the id" if value != value.strip() else "reads as a missing value"
            raise DataError(f"{path}, row {row}: {col} {value!r}: {why} ({int(bad.sum())} such row(s) in "
                            f"{col!r}); fix the file: ids are used exactly as written")
    if "image" in columns and columns != BOX_COLUMNS:
        dup = df["image"].duplicated()
        if dup.any():
            row = int(np.flatnonzero(dup.to_numpy())[0]) + 1
            raise DataError(f"{path}, row {row}: image {df['image'].iloc[row - 1]!r} appears twice")
    return df


def _check_files_exist(df: pd.DataFrame, folder: Path, table: Path) -> None:
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found (needed by {table.name})")
    present = {p.name for p in folder.iterdir()}
    missing = ~df["image"].isin(present)
    if missing.any():
        row = int(np.flatnonzero(missing.to_numpy())[0]) + 1
        raise DataError(
            f"{table}, row {row}: image {df['image'].iloc[row - 1]!r} not found in {folder} "
            f"({int(missing.sum())} missing in all)"
        )


def _check_boxes_inside(boxes: pd.DataFrame, root: Path, train_images: set[str]) -> None:
    """Raise naming ``boxes.csv`` and its 1-based row when a box lies outside its image (header read only)."""
    sizes: dict[str, tuple[int, int]] = {}
    for row, (image, x0, y0, x1, y1) in enumerate(boxes[["image", *BOX_COLUMNS[1:]]].itertuples(index=False), 1):
        if image not in sizes:
            folder = "train_images" if image in train_images else "test_images"
            try:
                with Image.open(root / folder / image) as im:
                    sizes[image] = im.size
            except OSError:  # unreadable: the pixel check reports it (or bad_images=skip skips it)
                sizes[image] = (np.inf, np.inf)
        w, h = sizes[image]
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            raise DataError(f"{root / 'boxes.csv'}, row {row}: box {[x0, y0, x1, y1]} of image {image!r} lies "
                            f"outside the {w}x{h} image")


def image_problem(path: Path) -> str | None:
    """Why an image cannot be used (decoded fully, unlike ``verify()``, so truncated files are caught), or ``None``.

    Args:
        path: the image file.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.width < 2 or im.height < 2:
                return "image is smaller than 2x2 pixels"
    except Exception as err:  # PIL raises several types for bad files
        return f"{type(err).__name__}: {err}"
    return None


def check_images(paths: Sequence[Path], workers: int = 4) -> None:
    """Decode every image fully; raise naming the first unreadable or truncated one.

    Args:
        paths: image files.
        workers: decoding threads (PIL releases the GIL while decoding).
    """

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for path, problem in zip(paths, pool.map(image_problem, paths), strict=True):
            if problem:
                raise DataError(f"{path}: unreadable or truncated image ({problem})")


def load_competition(root: str | Path, check_pixels: bool = True) -> Competition:
    """Load and validate a competition folder (see the module docstring for the layout).

    Args:
        root: the competition folder.
        check_pixels: decode every image once to catch unreadable or truncated files up front.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: competition folder not found")
    train_csv = root / "train.csv"
    train = read_table(train_csv, TRAIN_COLUMNS)
    if train.empty:
        raise DataError(f"{train_csv}: no rows")
    _check_files_exist(train, root / "train_images", train_csv)

    sub_csv = root / "sample_submission.csv"
    if sub_csv.exists():
        test = read_table(sub_csv, SUBMISSION_COLUMNS)[["image"]]
    else:  # no sample submission: every file in test_images/ is a test image, in name order
        folder = root / "test_images"
        files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
        # hidden files (.DS_Store) and folders (.ipynb_checkpoints/) are not test images
        names = sorted(p.name for p in files if not p.name.startswith("."))
        test = pd.DataFrame({"image": names})
    _check_files_exist(test, root / "test_images", sub_csv)

    boxes = None
    if (root / "boxes.csv").exists():
        boxes = read_table(root / "boxes.csv", BOX_COLUMNS)
        known = set(train["image"]) | set(test["image"])
        unknown = ~boxes["image"].isin(known)
        if unknown.any():
            row = int(np.flatnonzero(unknown.to_numpy())[0]) + 1
            raise DataError(f"{root / 'boxes.csv'}, row {row}: image {boxes['image'].iloc[row - 1]!r} "
                            "is neither in train.csv nor a test image")
        for col in BOX_COLUMNS[1:]:
            values = pd.to_numeric(boxes[col], errors="coerce")
            if values.isna().any():
                row = int(np.flatnonzero(values.isna().to_numpy())[0]) + 1
                raise DataError(f"{root / 'boxes.csv'}, row {row}: {col} is not a number")
            boxes[col] = values.astype(float)
        flat = (boxes["xmax"] <= boxes["xmin"]) | (boxes["ymax"] <= boxes["ymin"])
        if flat.any():
            row = int(np.flatnonzero(flat.to_numpy())[0]) + 1
            raise DataError(f"{root / 'boxes.csv'}, row {row}: box has xmax<=xmin or ymax<=ymin")
        _check_boxes_inside(boxes, root, set(train["image"]))

    original = train["image"][(row_rounds(train) == 0).to_numpy()]  # pseudo-label rows are test images by design
    overlap = test["image"].isin(set(original))
    if overlap.any():  # reported, not refused: a test image seen in training inflates every score
        row = int(np.flatnonzero(overlap.to_numpy())[0]) + 1
        source = sub_csv.name if sub_csv.exists() else "test_images/"
        warnings.warn(f"{root / source}, row {row}: test image {test['image'].iloc[row - 1]!r} is also in "
                      f"train.csv ({int(overlap.sum())} test image(s) in all)", stacklevel=2)

    truth = None
    if (root / "test.csv").exists():
        truth = read_table(root / "test.csv", TRUTH_COLUMNS)[list(TRUTH_COLUMNS)]
        unknown = ~truth["image"].isin(set(test["image"]))
        if unknown.any():
            row = int(np.flatnonzero(unknown.to_numpy())[0]) + 1
            raise DataError(f"{root / 'test.csv'}, row {row}: image {truth['image'].iloc[row - 1]!r} "
                            "is not a test image")

    train = train.assign(path=[str(root / "train_images" / i) for i in train["image"]])
    test = test.assign(path=[str(root / "test_images" / i) for i in test["image"]])
    if check_pixels:
        check_images([Path(p) for p in pd.concat([train["path"], test["path"]])])
    return Competition(root=root, train=train.reset_index(drop=True), test=test.reset_index(drop=True),
                       boxes=boxes, truth=truth)


def make_folds(individual_ids: Sequence[str], n_folds: int, seed: int) -> np.ndarray:
    """Assign each image a fold, stratified by individual.

    Individuals are visited in a seeded random order and their images (also shuffled) are dealt to folds
    round-robin, continuing the count across individuals. So an individual with ``n >= n_folds`` images has
    images in every fold, fold sizes differ by at most one, and an individual with fewer images is absent from
    some folds' training part, which is exactly what out-of-fold ``new_individual`` tuning needs.

    Args:
        individual_ids: one id per image, in table order.
        n_folds: number of folds (>= 2).
        seed: seed of the random order.

    Returns:
        ``int`` array of fold numbers, aligned with ``individual_ids``.
    """
    ids = np.asarray([str(i) for i in individual_ids])
    if n_folds < 2:
        raise ValueError("n_folds must be >= 2")
    if len(ids) < n_folds:
        raise DataError(f"{len(ids)} training images cannot fill {n_folds} folds")
    rng = np.random.default_rng(seed)
    uniques, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    order = rng.permutation(len(uniques))
    # Rows grouped by individual, ascending within each group (what np.flatnonzero(ids == u) gave): one sort,
    # O(n log n), instead of comparing every id with every individual (n_images x n_individuals).
    grouped = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    folds = np.empty(len(ids), dtype=np.int64)
    position = 0
    for u in order:  # one generator call per individual, in the same order as before: the same folds
        rows = rng.permutation(grouped[starts[u]:starts[u + 1]])
        folds[rows] = (position + np.arange(len(rows))) % n_folds
        position += len(rows)
    return folds


def split_fold(train: pd.DataFrame, folds: np.ndarray, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training part (folds != ``fold``) and validation part (fold == ``fold``), checking neither is empty."""
    fit, valid = train[folds != fold], train[folds == fold]
    if fit.empty or valid.empty:
        raise DataError(f"fold {fold} has {len(fit)} training and {len(valid)} validation images")
    return fit.reset_index(drop=True), valid.reset_index(drop=True)


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image as an RGB ``uint8`` array; raise naming the file when it cannot be decoded."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"{path}: cannot be read as an image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def build_transforms(image_size: int, train: bool, mean: Sequence[float], std: Sequence[float],
                     scale_min: float = 0.7, hflip: bool = True):
    """Albumentations 2.x pipeline.

    Training: random resized crop (mild by default: crops are already tight), flip, small affine, colour and
    blur jitter. Flip is on because extraction uses flip TTA; if your markings are side-specific, turn it off.

    Args:
        image_size: square output size.
        train: training augmentations, or plain resize for evaluation.
        mean: normalisation mean (0-1 scale).
        std: normalisation std (0-1 scale).
        scale_min: smallest area share kept by the random resized crop (1 = the whole image, resized).
        hflip: random horizontal flips in training.
    """
    import albumentations as A

    norm = A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0)
    if not train:
        return A.Compose([A.Resize(image_size, image_size), norm])
    return A.Compose([
        A.RandomResizedCrop(size=(image_size, image_size), scale=(scale_min, 1.0), ratio=(0.8, 1.25)),
        A.HorizontalFlip(p=0.5 if hflip else 0.0),
        A.Affine(rotate=(-10, 10), translate_percent=(-0.05, 0.05), p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        A.GaussianBlur(blur_limit=(3, 5), p=0.1),
        norm,
    ])


class ImageDataset(torch.utils.data.Dataset):
    """Images (and optional integer labels) through a transform, as CHW float tensors.

    Args:
        paths: image files.
        labels: one integer per image, or ``None`` for unlabelled images.
        species: one integer per image for the auxiliary head, or ``None``.
        transform: an albumentations pipeline that ends with ``Normalize``.

    Attributes:
        sample_seed: when set (training sets it once per epoch), the transform is reseeded before each image
            from ``(sample_seed, index)``, so an image's augmentation depends on the epoch and the image only:
            not on the loader workers, the process that loads it, or the images loaded before it.
    """

    sample_seed: int | None = None

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int] | None = None,
        species: Sequence[int] | None = None,
        transform=None,
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.species = None if species is None else np.asarray(species, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image = read_rgb(self.paths[i])
        if self.sample_seed is not None and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(int(np.random.SeedSequence([self.sample_seed, i]).generate_state(1)[0]))
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        item = {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()}
        if self.labels is not None:
            item["label"] = torch.tensor(self.labels[i])
        if self.species is not None:
            item["species"] = torch.tensor(self.species[i])
        return item


def _signature(files: Sequence[str]) -> str:
    import hashlib

    h = hashlib.sha1()
    for f in files:
        st = Path(f).stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def row_rounds(train: pd.DataFrame) -> pd.Series:
    """The pseudo-label round of each row of a ``train.csv`` table, as floats: 0 for an original training row
    (``round`` empty, unreadable or 0), and 0 for every row when there is no ``round`` column."""
    if "round" not in train.columns:
        return pd.Series(0.0, index=train.index)
    return pd.to_numeric(train["round"], errors="coerce").fillna(0)


def open_competition(data: str, check_pixels: bool = True) -> Competition:
    """Resolve ``data`` (see :func:`common.core.paths.data_dir`), generate the demo if asked for, load and validate.

    The full pixel check runs once per set of image files: its result is cached under
    ``working/.checked/`` by a signature of the files' names, sizes and modification times.
    """
    from common.core import paths, store
    from common.data import demo

    root = demo.ensure_demo(paths.data_dir(data))
    comp = load_competition(root, check_pixels=False)
    if check_pixels:
        files = list(comp.train["path"]) + list(comp.test["path"])
        marker = paths.working_dir() / ".checked" / f"{_signature(files)}.json"
        if not marker.exists():
            check_images([Path(p) for p in files])
            store.write_json(marker, {"root": str(root), "images": len(files)})
    return comp
