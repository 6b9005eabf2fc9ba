"""Unreadable images in real data: stop (``bad_images=error``, the default) or skip them (``bad_images=skip``).

With ``skip``, every image is decoded once (the result is cached under ``working/.checked/`` by the images'
names, sizes and times) and:

* an unreadable **train** image is dropped from ``train.csv``'s table (it trains and indexes nothing);
* an unreadable **test** image keeps its row: it is read as a plain grey placeholder, so the submission still
  has a row for it (``new_individual`` usually comes first), never a silently missing one;
* every skipped image is printed (the notebook shows it), kept in ``comp.skipped`` and listed with its reason
  in ``working/<exp>/metrics.json`` under ``skipped_images``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from common.core import paths, store
from common.data.competition import Competition, _signature, image_problem, open_competition

SKIPPED_COLUMNS = ["image", "split", "reason"]


def find_unreadable(files: list[str], workers: int = 4) -> dict[str, str]:
    """``{path: reason}`` for every file that does not decode fully (see :func:`image_problem`).

    Args:
        files: image paths.
        workers: decoding threads.
    """
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return {f: p for f, p in zip(files, pool.map(image_problem, map(Path, files)), strict=True) if p}


def placeholder() -> Path:
    """A 64x64 grey PNG under ``working/``: what an unreadable test image is read as."""
    path = paths.working_dir() / ".placeholder.png"
    if not path.is_file():
        with store.atomic_path(path) as tmp:
            Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp, format="PNG")
    return path


def open_checked(cfg: Any) -> Competition:
    """Open ``cfg.data`` the way ``cfg.bad_images`` says (``error``: stop at the first unreadable image).

    Args:
        cfg: a stage config (``data``, ``exp``, ``bad_images``).
    """
    if getattr(cfg, "bad_images", "error") != "skip":
        return open_competition(cfg.data)
    comp = open_competition(cfg.data, check_pixels=False)
    files = list(comp.train["path"]) + list(comp.test["path"])
    marker = paths.working_dir() / ".checked" / f"{_signature(files)}.json"
    if marker.exists() and "bad" in store.read_json(marker):
        bad = store.read_json(marker)["bad"]
    else:
        bad = find_unreadable(files)
        store.write_json(marker, {"root": str(comp.root), "images": len(files), "bad": bad})
    return skip(comp, bad, cfg.exp)


def skip(comp: Competition, bad: dict[str, str], exp: str = "") -> Competition:
    """``comp`` without its unreadable train images and with its unreadable test images read as a placeholder.

    Args:
        comp: the competition.
        bad: ``{path: reason}`` from :func:`find_unreadable`.
        exp: the experiment whose ``metrics.json`` lists the skipped images (empty: none written).
    """
    rows = [(img, split, bad[p]) for split, table in (("train", comp.train), ("test", comp.test))
            for img, p in zip(table["image"], table["path"], strict=True) if p in bad]
    skipped = pd.DataFrame(rows, columns=SKIPPED_COLUMNS)
    train = comp.train[~comp.train["path"].isin(bad)].reset_index(drop=True)
    test = comp.test.copy()
    if (skipped["split"] == "test").any():
        test.loc[test["path"].isin(bad), "path"] = str(placeholder())
    for img, split, reason in rows:
        kept = "dropped from training" if split == "train" else "kept, read as a grey placeholder"
        print(f"skipped unreadable {split} image {img!r} ({kept}): {reason}")
    if exp:
        store.update_json(paths.exp_dir(exp) / "metrics.json", {"skipped_images": skipped.to_dict("records")})
    return Competition(root=comp.root, train=train, test=test, boxes=comp.boxes, truth=comp.truth, skipped=skipped)


def readable(table: pd.DataFrame, comp: Competition) -> pd.DataFrame:
    """``table``'s rows whose image was not skipped as unreadable (what a detector can be run on).

    Args:
        table: rows with an ``image`` column (e.g. ``comp.test``).
        comp: the competition (``comp.skipped`` from :func:`skip`).
    """
    if comp.skipped is None or comp.skipped.empty:
        return table
    return table[~table["image"].isin(set(comp.skipped["image"]))]


def write_placeholders(comp: Competition, folder: Path) -> None:
    """Put the placeholder under each skipped test image's name in ``folder`` (stage 01's ``crops/test``),
    so the stages that read crops still find one image per test row.

    Args:
        comp: the competition.
        folder: the crops folder of the test images.
    """
    if comp.skipped is None or comp.skipped.empty:
        return
    for image in comp.skipped.loc[comp.skipped["split"] == "test", "image"]:
        with store.atomic_path(Path(folder) / image) as tmp:
            tmp.write_bytes(placeholder().read_bytes())
