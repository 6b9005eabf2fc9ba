"""Local-feature re-ranking of stages 04 and 06 (``local_features: sift``): descriptors, the matcher, the weight.

Each train and test image (stage 01's crop when stage 02 trained on crops, else the full image; in stage 06 the
first embed member's) gets SIFT descriptors once. They are kept in ``04_retrieval/local/`` (``06_ensemble/local/``
in stage 06): ``{split}.npz`` holds the ``image`` ids and each image's descriptor ``count``,
``{split}_descriptors.npy`` the concatenated ``uint8`` rows, memory-mapped when read, so memory does not grow
with the images. They are reused while the images, the crops and the SIFT settings are unchanged, also from a
finished run attached to a Kaggle notebook (an inference kernel computes only the new test images'). Retrieval then
re-scores each query's first ``local_top`` global neighbours with :func:`common.lib.local_features.rerank`, out
of fold and on the test alike, so the ``new_individual`` threshold is tuned on scores of the test's form.
``local_weight`` < 0 chooses the weight out of fold: the weight of :data:`WEIGHTS` whose out-of-fold MAP@5 on
known individuals (their ranking alone, no threshold) is best.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from common.config import EnsembleConfig, RetrievalConfig
from common.core import paths, store
from common.core.runtime import usable_cores
from common.data.artefacts import image_paths
from common.data.competition import Competition, DataError
from common.data.fingerprint import fingerprint_key, marker_hash
from common.lib import local_features, metrics

DESCRIPTOR_LAYOUT = 2  # 2: index .npz + memory-mapped .npy (1: one .npz, read whole)
WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # the out-of-fold grid of local_weight


def used_crops(exp: str, folds: list[int]) -> bool:
    """Whether stage 02 trained (so stage 03 embedded) on stage 01's crops: the images to match are the same."""
    for k in folds:
        try:
            folder = paths.find_stage_dir(exp, "02", f"fold{k}/config.json")
        except paths.MissingStageError:
            continue
        return bool(store.read_json(folder / f"fold{k}" / "config.json").get("used_crops"))
    return False


def read_grey(path: str) -> np.ndarray:
    """An image file as a ``uint8`` grey array; a clear error naming the file when it cannot be read."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise DataError(f"{path}: cannot be read as an image (local_features=sift)")
    return image


def array_path(path: Path) -> Path:
    """The flat ``uint8`` descriptor rows beside a descriptor index ``<split>.npz``: ``<split>_descriptors.npy``."""
    return path.with_name(f"{path.stem}_descriptors.npy")


def save_descriptors(path: Path, images: list[str], compute: Callable[[int], np.ndarray], key: str = "") -> None:
    """Ragged descriptors as two files: ``path`` (``.npz``: ``image`` ids, ``count`` rows per image and ``key``)
    and :func:`array_path` (one ``.npy`` of the concatenated rows, memory-mapped when read back).

    ``compute(i)`` gives image ``i``'s descriptors. Rows are streamed to disk as they come, so memory does not
    grow with the number of images (Happywhale's 80k images at 1,500 keypoints would be 15 GB), and a killed
    run resumes after the last image it finished when it is called again with the same ``key`` (the settings
    the descriptors depend on): hidden ``.<split>_*`` files hold the work in progress.
    """
    dim = local_features.DESCRIPTOR_DIM
    raw, count_file, state = (path.with_name(f".{path.stem}_{part}") for part in ("rows.raw", "counts.raw",
                                                                                     "partial.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    done = 0
    if state.exists() and raw.exists() and count_file.exists() and store.read_json(state).get("key") == key:
        counts = np.fromfile(count_file, np.int64)
        done = min(len(counts), len(images))
        rows = int(counts[:done].sum())
        os.truncate(count_file, done * 8)  # a row block written after the last count is dropped
        os.truncate(raw, min(rows * dim, raw.stat().st_size))
        if raw.stat().st_size != rows * dim:  # rows missing: start again
            done = 0
    if done == 0:
        store.write_json(state, {"key": key})
        raw.write_bytes(b"")
        count_file.write_bytes(b"")
    with open(raw, "ab") as rows_fh, open(count_file, "ab") as count_fh:
        for i in range(done, len(images)):
            d = np.ascontiguousarray(compute(i), dtype=np.uint8).reshape(-1, dim)
            rows_fh.write(d.tobytes())
            rows_fh.flush()  # the rows before their count: a count always has its rows
            count_fh.write(np.int64(len(d)).tobytes())
            count_fh.flush()
    counts = np.fromfile(count_file, np.int64)
    total = int(counts.sum())
    with store.atomic_path(array_path(path)) as tmp:
        flat = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(total, dim))
        source = np.memmap(raw, dtype=np.uint8, mode="r", shape=(total, dim)) if total else None
        for start in range(0, total, COPY_ROWS):
            flat[start:start + COPY_ROWS] = source[start:start + COPY_ROWS]
        flat.flush()
        del flat, source
    with store.atomic_path(path) as tmp, open(tmp, "wb") as fh:  # the index last: it marks the pair complete
        np.savez(fh, image=np.asarray(images, dtype=str), count=counts, key=np.asarray(key))
    for f in (raw, count_file, state):
        f.unlink()


def complete(path: Path, key: str) -> bool:
    """Whether :func:`save_descriptors` finished ``path`` (and its ``.npy``) with ``key``."""
    if not (path.exists() and array_path(path).exists()):
        return False
    with np.load(path, allow_pickle=False) as npz:
        return "key" in npz.files and str(npz["key"]) == key


COPY_ROWS = 1 << 18  # rows copied at a time into the .npy (32 MB)


def load_descriptors(path: Path, expected_images: list[str]) -> dict[str, np.ndarray]:
    """Read :func:`save_descriptors`' files back, checking the row order against ``expected_images``: each image's
    rows are a view of the memory-mapped array (nothing is read until a pair needs it)."""
    with np.load(path, allow_pickle=False) as npz:
        images, counts = npz["image"], npz["count"]
    store.check_row_order(images, expected_images, str(path))
    flat = np.load(array_path(path), mmap_mode="r", allow_pickle=False)
    if flat.ndim != 2 or flat.shape[1] != local_features.DESCRIPTOR_DIM or flat.dtype != np.uint8:
        raise ValueError(f"{array_path(path)}: expected uint8 rows of {local_features.DESCRIPTOR_DIM}, got "
                         f"{flat.dtype} {flat.shape}")
    if counts.sum() != len(flat):
        raise ValueError(f"{path}: counts add up to {counts.sum()} rows but {array_path(path)} holds {len(flat)}")
    ends = np.cumsum(counts)
    return {str(i): flat[e - c:e] for i, c, e in zip(images, counts, ends, strict=True)}


AUTO_SIDE = (256, 512)  # local_side=0: twice the images' median longer side, within these bounds
SIDE_SAMPLE = 200  # images whose size is read for local_side=0


def auto_side(files: list[str]) -> int:
    """``local_side=0``: twice the median longer side of (up to :data:`SIDE_SAMPLE` evenly spaced) ``files``,
    clipped to :data:`AUTO_SIDE`. Measured best: lion's ~130 px crops at 256, nyala's full frames at 512 (768
    did worse); dogfaces' 224 px faces get 448.
    """
    step = max(1, len(files) // SIDE_SAMPLE)
    sides = []
    for f in files[::step]:
        with Image.open(f) as im:  # reads the header only
            sides.append(max(im.size))
    return int(np.clip(2 * np.median(sides), *AUTO_SIDE)) if sides else AUTO_SIDE[1]


def split_key(settings: dict, split: str, ids: list[str], files: list[str]) -> str:
    """The key one split's descriptor files are complete for: the SIFT ``settings``, the split's image ids in
    order, and its image files' names and sizes (no modification times: a copy of the files, such as a finished
    run attached to a Kaggle notebook, keeps the key)."""
    images = hashlib.sha256("\n".join(f"{i}|{Path(f).name}|{os.path.getsize(f)}" for i, f in zip(
        ids, files, strict=True)).encode()).hexdigest()
    return fingerprint_key({**settings, "split": split, "images": images})


def stored_copy(cfg: RetrievalConfig | EnsembleConfig, split: str, key: str) -> Path | None:
    """A complete ``local/<split>.npz`` with ``key`` in a source attached to a Kaggle notebook (the training run's
    stage folder, :func:`common.core.paths.stage_candidates`), else ``None``: an inference kernel then reads the
    training run's train descriptors instead of recomputing them."""
    for folder in paths.stage_candidates(cfg.exp, cfg.stage)[1:]:
        candidate = folder / local_dir(cfg).name / f"{split}.npz"
        if complete(candidate, key):
            return candidate
    return None


@dataclasses.dataclass
class Descriptors:
    """What :func:`descriptors` returns.

    Args:
        rows: SIFT descriptors of every train and test image, keyed ``"train/<image>"`` and ``"test/<image>"``.
        side: the longer side they were computed at.
        keys: each split's :func:`split_key`, plus ``"crops"``: the stage-01 marker hash of the crops they
            were computed on (``None`` on full images). Stored match counts are valid for the same keys.
    """

    rows: dict[str, np.ndarray]
    side: int
    keys: dict[str, str | None]


def descriptors(cfg: RetrievalConfig | EnsembleConfig, comp: Competition, folds: list[int],
                images_exp: str = "") -> Descriptors:
    """SIFT descriptors of every train and test image. The images are those experiment ``images_exp`` (default
    ``cfg.exp``) embedded: its stage-01 crops when its stage 02 trained on them; the files go to ``cfg``'s stage
    folder. A split whose descriptors an attached source already holds for the same images (:func:`stored_copy`)
    is read from there."""
    exp = images_exp or cfg.exp
    crops = used_crops(exp, folds)
    folder = local_dir(cfg)
    files = {split: image_paths(table, exp, split, crops)
             for split, table in (("train", comp.train), ("test", comp.test))}
    side = cfg.local_side or auto_side(files["train"])
    settings = {"layout": DESCRIPTOR_LAYOUT, "side": side, "n_features": cfg.local_n_features, "used_crops": crops}
    keys: dict[str, str | None] = {"crops": marker_hash(paths.stage_dir(exp, "01")) if crops else None}
    out: dict[str, np.ndarray] = {}
    for split, table in (("train", comp.train), ("test", comp.test)):
        target = folder / f"{split}.npz"
        ids = [str(i) for i in table["image"]]
        key = keys[split] = split_key(settings, split, ids, files[split])
        source = target if complete(target, key) else stored_copy(cfg, split, key)
        if source is None:
            names = files[split]
            save_descriptors(target, ids, lambda i, names=names: local_features.sift_descriptors(
                read_grey(names[i]), side, cfg.local_n_features), key)
            source = target
        out.update({f"{split}/{k}": v for k, v in load_descriptors(source, ids).items()})
    return Descriptors(out, side, keys)


@dataclasses.dataclass
class Reranker:
    """Re-scores search results with local matches: ``(scores, idx, query_ids, gallery_ids, query_split)`` ->
    ``(scores, idx)``. The gallery is always training images.

    Args:
        matcher: the pair matcher (its cache is shared by every weight and fold).
        weight: the local term's weight.
        half: match count of local similarity 0.5.
        top: neighbours re-scored per query.
        side: the longer side the descriptors were computed at (reported in ``metrics.json``).
        keys: :attr:`Descriptors.keys`, stored with the match counts (:func:`save_pairs`).
    """

    matcher: local_features.PairMatcher
    weight: float
    half: float
    top: int
    side: int = 0
    keys: dict[str, str | None] = dataclasses.field(default_factory=dict)

    def __call__(self, scores: np.ndarray, idx: np.ndarray, query_ids, gallery_ids,
                 query_split: str) -> tuple[np.ndarray, np.ndarray]:
        top = min(self.top, scores.shape[1])
        queries = [f"{query_split}/{q}" for q in query_ids]
        gallery = np.array([f"train/{g}" for g in gallery_ids], dtype=object)
        matches = self.matcher.matches(queries, gallery, idx[:, :top])
        return local_features.rerank(scores, idx, matches, self.weight, self.half, top)


PAIRS_FILE = "pairs.npz"  # match counts already computed, reused by the next run with the same descriptors


def local_dir(cfg: RetrievalConfig | EnsembleConfig) -> Path:
    """Where the stage of ``cfg`` keeps its descriptors and match counts: ``<stage folder>/local``."""
    return paths.stage_dir(cfg.exp, cfg.stage) / "local"


def make_reranker(cfg: RetrievalConfig | EnsembleConfig, comp: Competition, folds: list[int],
                  images_exp: str = "") -> Reranker | None:
    """The re-ranker of ``cfg`` at weight ``max(local_weight, 0)``, or ``None`` when ``local_features`` is none.
    Match counts stored by an earlier run on the same descriptors (:func:`save_pairs`) are loaded.
    ``images_exp``: as in :func:`descriptors`."""
    if cfg.local_features == "none":
        return None
    desc = descriptors(cfg, comp, folds, images_exp)
    matcher = local_features.PairMatcher(desc.rows.__getitem__, threads=usable_cores())
    matcher.cache.update(stored_pairs(local_dir(cfg) / PAIRS_FILE, desc.keys))
    return Reranker(matcher, max(cfg.local_weight, 0.0), cfg.local_half, cfg.local_top, desc.side, desc.keys)


def stored_pairs(path: Path, keys: dict[str, str | None]) -> dict[tuple[str, str], int]:
    """The match counts :func:`save_pairs` stored in ``path`` that are still valid: those whose images' splits
    have the same descriptor keys now (a new test set keeps the train-train counts of the out-of-fold sweep);
    none when the crops differ or the file predates the keys."""
    if not path.exists():
        return {}
    with np.load(path, allow_pickle=False) as npz:
        stored = {k[:-len("_key")]: str(npz[k]) for k in npz.files if k.endswith("_key")}
        if "crops" not in stored or stored["crops"] != str(keys["crops"]):
            return {}
        valid = {split for split in ("train", "test") if stored.get(split) == keys[split]}
        a, b, matches = npz["a"].tolist(), npz["b"].tolist(), npz["matches"].tolist()
    return {(x, y): m for x, y, m in zip(a, b, matches, strict=True)
            if x.split("/", 1)[0] in valid and y.split("/", 1)[0] in valid}


def save_pairs(cfg: RetrievalConfig | EnsembleConfig, reranker: Reranker) -> dict[str, int]:
    """Store the matcher's match counts (``a``, ``b``: the two image keys; ``matches``) for the next run, with the
    descriptor keys they are valid for (``train_key``, ``test_key``, ``crops_key``: :func:`stored_pairs`);
    returns the ``metrics.json`` field ``local_pairs_matched``."""
    keys = sorted(reranker.matcher.cache)
    valid = {f"{name}_key": np.asarray(str(value)) for name, value in reranker.keys.items()}
    with store.atomic_path(local_dir(cfg) / PAIRS_FILE) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, a=np.array([k[0] for k in keys], dtype=str), b=np.array([k[1] for k in keys], dtype=str),
                 matches=np.array([reranker.matcher.cache[k] for k in keys], np.int32), **valid)
    return {"local_pairs_matched": len(keys)}


def known_map5(table: pd.DataFrame, truth: pd.Series, new_label: str) -> float:
    """MAP@5 of the ranking alone (no ``new_individual``) on the queries whose individual is in the gallery."""
    known = truth[truth != new_label]
    if known.empty:
        return float("nan")
    ranked = table.sort_values(["image", "score", "individual_id"], ascending=[True, False, True])
    top = ranked.groupby("image", sort=False)["individual_id"].apply(lambda s: list(s.astype(str))[:5])
    return metrics.map_at_k(known.astype(str).tolist(), [top.get(i, []) for i in known.index])


def choose_weight(reranker: Reranker, oof: Callable[[Reranker], tuple[pd.DataFrame, pd.Series]],
                  new_label: str) -> tuple[float, dict[str, float], float, tuple[pd.DataFrame, pd.Series]]:
    """The weight of :data:`WEIGHTS` with the best out-of-fold known-individual MAP@5 (ties: the smallest).

    Args:
        reranker: the re-ranker whose weight is chosen (left at the chosen weight).
        oof: out-of-fold scores and truth for a re-ranker (stage 04's :func:`oof_scores`).
        new_label: the ``new_individual`` label.

    Returns:
        The weight, ``{weight: known MAP@5}``, the seconds spent, and the out-of-fold scores and truth at the
        chosen weight (the caller tunes the threshold on them instead of computing them again).
    """
    start = time.perf_counter()
    sweep, results = {}, {}
    for w in WEIGHTS:
        reranker.weight = w
        results[w] = oof(reranker)
        sweep[f"{w:g}"] = round(known_map5(*results[w], new_label), 6)
    best = max(WEIGHTS, key=lambda w: (np.nan_to_num(sweep[f"{w:g}"], nan=-1.0), -w))
    reranker.weight = best
    return best, sweep, time.perf_counter() - start, results[best]


def set_weight(cfg: RetrievalConfig | EnsembleConfig, reranker: Reranker,
               oof: Callable[[Reranker], tuple[pd.DataFrame, pd.Series]] | None = None,
               stored: Callable[[], tuple[float | None, str]] | None = None
               ) -> tuple[dict, tuple[pd.DataFrame, pd.Series] | None]:
    """Set ``reranker``'s weight: ``local_weight`` when >= 0; with ``inference_only`` the weight an earlier full
    run stored; else chosen out of fold (:func:`choose_weight`).

    Args:
        cfg: the stage config (``local_weight``, ``inference_only``, ``new_label``).
        reranker: the re-ranker whose weight is set.
        oof: the stage's out-of-fold scores and truth for a re-ranker (needed to choose the weight).
        stored: the full run's stored weight (``None`` when it had no local features) and the file it came from
            (needed with ``inference_only``).

    Returns:
        The ``metrics.json`` fields that say which weight and why, and the out-of-fold scores and truth at the
        chosen weight when they were computed to choose it (else ``None``).
    """
    chosen = None
    info = {"local_features": cfg.local_features, "local_side_used": reranker.side}
    if cfg.local_weight >= 0:
        reranker.weight, source = cfg.local_weight, "given"
    elif cfg.inference_only:
        if stored is None:
            raise ValueError("set_weight: inference_only with local_weight < 0 needs the stored weight")
        weight, where = stored()
        if weight is None:
            raise ValueError(f"local_weight={cfg.local_weight}: {where} has no local weight (its run had "
                             f"local_features=none); give local_weight >= 0 or rerun the full stage {cfg.stage}")
        reranker.weight, source = float(weight), "stored"
    else:
        if oof is None:
            raise ValueError("set_weight: local_weight < 0 needs the out-of-fold scores to choose the weight")
        _, sweep, seconds, chosen = choose_weight(reranker, oof, cfg.new_label)
        source = "oof"
        # a list in weight order: a JSON object's keys would be written sorted as strings ("16" before "2")
        info.update({"local_weight_sweep": [{"weight": float(w), "oof_known_map5": v} for w, v in sweep.items()],
                     "local_weight_seconds": round(seconds, 1)})
    info.update({"local_weight": reranker.weight, "local_weight_source": source})
    return info, chosen
