"""Stage 06: ensemble earlier experiments, post-process, and write pseudo-label folders and the submission.

Classifier side, from the ``members``' stage-05 arrays (``05_classifier/oof.npz``, ``test.npz``,
``classes.json``, read by experiment name):

* each member's weight is its **out-of-fold accuracy** turned into ``(acc_i / min acc) ** weight_factor``
  (:func:`common.lib.ensemble.accuracy_weights`; ``weight_factor=0``: plain mean); the ensemble is the weighted mean
  of the members' probabilities (:func:`common.lib.ensemble.ensemble_probs`), out of fold and on the test set;
* pseudo-labels (:func:`common.lib.postprocess.select_pseudo_labels`): a new competition folder
  ``06_ensemble/pseudo_round<N>/`` whose ``train.csv`` is the original training rows plus the kept test rows and
  whose ``train_images/`` links to both, so stages 01-05 train on it with ``data=<that folder>``; the kept count
  of every round (earlier rounds read from ``data``'s own ``round`` column) is in ``pseudo_rounds.csv``;
* label cleaning (:func:`common.lib.postprocess.flag_noisy_labels`): ``flagged.csv`` and a folder ``cleaned/``
  without the flagged images; re-distribution (:func:`common.lib.postprocess.redistribute_labels`);
* model soups of fold models: :mod:`common.stages.soup`.

Members whose stage 05 wrote the top-k layout (many classes, ``prob_topk``) are read and combined as
:class:`common.lib.topk.TopK` (the union of the members' classes per row; the rules for a class a row does not
keep are :mod:`common.lib.topk`'s); ``06_ensemble/oof.npz`` and ``test.npz`` are then top-k too (``topk_index``,
``topk_prob``, ``rest_mass``), else dense ``probs`` as before.

Retrieval side (``embed_members``): :mod:`common.stages.ensemble_retrieval`. With it the submission is the retrieval
one (with ``new_individual``), else the classifier ensemble's five best classes; either way it is
``submissions/<exp>-<settings>.csv`` (:func:`submission_name`). ``06_ensemble/metrics.json`` holds everything,
``working/<exp>/metrics.json`` a headline under ``"ensemble"``.

``inference_only`` (a Kaggle kernel): the members' files are found by experiment name
(:func:`common.core.paths.find_stage_dir`: ``working/``, then attached datasets and kernel outputs), the weights are
computed again from their stored out-of-fold arrays, the blend ratio and thresholds come from the full run's
``06_ensemble/metrics.json`` (:func:`stored_run`); pseudo-labels, cleaning, soups and the out-of-fold retrieval are
skipped (``metrics.json``'s ``skipped``), and the submission equals the full run's.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.config import EnsembleConfig
from common.core import paths, store
from common.data.competition import Competition, row_rounds
from common.data.fingerprint import stage_fingerprint
from common.data.unreadable import open_checked
from common.lib import ensemble, metrics, postprocess, topk
from common.stages import retrieve_submit as submit
from common.stages import train_classifier as classify
from common.stages.ensemble_members import (  # noqa: F401  (re-exported: the stage's API in one place)
    Member,
    combine,
    load_member,
    load_members,
    member_file,
    member_weights,
)

STAGE = "06"
# What inference_only leaves out (it writes no training folders and runs no model), said in metrics.json.
INFERENCE_SKIPS = ["pseudo-labels", "label cleaning", "model soups", "out-of-fold retrieval and threshold tuning"]


def stage_dir(exp: str) -> Path:
    """``working/<exp>/06_ensemble``."""
    return paths.stage_dir(exp, STAGE)


















# ------------------------------------------------------------------------------------- competition folders
def write_competition(comp: Competition, train: pd.DataFrame, folder: str | os.PathLike) -> Path:
    """A competition folder (``common.data.competition`` layout) whose ``train.csv`` is ``train``; replaced atomically.

    ``train_images/`` and ``test_images/`` hold symbolic links to the original files (copies where links
    cannot be made); ``sample_submission.csv`` and ``test.csv`` are copied and ``boxes.csv`` is filtered to the
    folder's images when ``comp`` has them. A ``train`` row may be a test image (a pseudo-label, ``round`` > 0): its
    file comes from the test images, the one named in its ``test_image`` column when the table has one (a
    pseudo-label renamed by :func:`pseudo_names` because a training image has its name). A training image and a
    test image may share a name (their files differ): each link points to the file of its own split.

    Args:
        comp: the competition the rows come from.
        train: the new training table (``image, species, individual_id``, extra columns kept; ``path``
            dropped).
        folder: the folder to write.

    Raises:
        ValueError: an image that ``comp`` does not have, or a name twice in ``train`` (a pseudo-labelled test
            image named like a training image cannot share ``train_images/`` with it).
    """
    folder = Path(folder)
    images = train["image"].astype(str)
    twice = images.duplicated()
    if twice.any():
        row = int(np.flatnonzero(twice.to_numpy())[0]) + 1
        raise ValueError(f"write_competition: image {images.iloc[row - 1]!r} is in the new train.csv twice (row "
                         f"{row}): a training image and a pseudo-labelled test image share its name")
    train_files = dict(zip(comp.train["image"], comp.train["path"], strict=True))
    test_files = dict(zip(comp.test["image"], comp.test["path"], strict=True))
    pseudo = row_rounds(train) > 0
    sources = (train["test_image"].fillna("").astype(str) if "test_image" in train.columns
               else pd.Series("", index=train.index))
    files = []
    for image, is_pseudo, source in zip(images, pseudo, sources, strict=True):
        first, second = (test_files, train_files) if is_pseudo else (train_files, test_files)
        path = test_files.get(source) if is_pseudo and source else first.get(image, second.get(image))
        if path is None:
            raise ValueError(f"write_competition: image {image!r} is neither a training nor a test image of "
                             f"{comp.root}")
        files.append(path)
    with store.atomic_dir(folder) as tmp:
        for sub, names, paths in (("train_images", images, files),
                                  ("test_images", comp.test["image"].astype(str), comp.test["path"])):
            (tmp / sub).mkdir(parents=True)
            for image, path in zip(names, paths, strict=True):
                _link(Path(path).resolve(), tmp / sub / image)
        train.drop(columns=["path"], errors="ignore").to_csv(tmp / "train.csv", index=False)
        for name in ("sample_submission.csv", "test.csv"):
            if (comp.root / name).exists():
                shutil.copy2(comp.root / name, tmp / name)
        if (comp.root / "boxes.csv").exists():  # only the boxes of images the new folder holds
            boxes = pd.read_csv(comp.root / "boxes.csv", dtype=str, keep_default_na=False)
            keep = set(train["image"].astype(str)) | set(comp.test["image"])
            boxes[boxes["image"].isin(keep)].to_csv(tmp / "boxes.csv", index=False)
    return folder


def _link(target: Path, link: Path) -> None:
    try:
        os.symlink(target, link)
    except OSError:  # no symlinks (some Windows and network file systems): copy
        shutil.copy2(target, link)


def original_train(comp: Competition) -> pd.DataFrame:
    """``comp``'s training rows without earlier pseudo-label rounds (``round`` column 0 or absent), no ``path``."""
    train = comp.train.drop(columns=["path"])
    if "round" in train.columns:
        train = train[row_rounds(train) == 0].reset_index(drop=True)
    return train


def earlier_rounds(comp: Competition, label_column: str) -> pd.DataFrame:
    """The pseudo-label rows ``comp``'s ``train.csv`` already holds (a folder written by an earlier round)."""
    if "round" not in comp.train.columns:
        return pd.DataFrame(columns=["image", label_column, "confidence", "round"])
    rounds = row_rounds(comp.train).astype(int)
    rows = comp.train[rounds > 0]
    return pd.DataFrame({"image": rows["image"], label_column: rows[label_column],
                         "confidence": pd.to_numeric(rows["confidence"], errors="coerce"),
                         "round": rounds[rounds > 0]})


# ------------------------------------------------------------------------------------------- the stage
def submission_name(cfg: EnsembleConfig) -> str:
    """``<exp>-<settings>``: the knobs that made the submission, e.g. ``ens-ens3-w25-rd16`` or
    ``ens-emb2-ens3-w25-blend0.3-thrspecies``."""
    parts = [cfg.exp]
    members = cfg.member_list("members")
    if cfg.member_list("embed_members"):
        parts.append(f"emb{len(cfg.member_list('embed_members'))}")
    if members and (not cfg.member_list("embed_members") or cfg.blend_ratio > 0):
        parts += [f"ens{len(members)}", f"w{cfg.weight_factor:g}"] + (["rescale"] if cfg.rescale else [])
    if cfg.member_list("embed_members"):
        if cfg.blend_ratio > 0:
            parts.append(f"blend{cfg.blend_ratio:g}" + ("cos" if cfg.blend_on == "cosine" else ""))
        parts.append(f"thr{cfg.threshold_mode}" + (f"{cfg.new_share:g}" if cfg.threshold_mode == "share" else ""))
    elif cfg.redistribute_k:
        parts.append(f"rd{cfg.redistribute_k}")
    return "-".join(parts)


def top5_predictions(probs: topk.Scores, classes: list[str], first: list[str] | None = None) -> list[str]:
    """Five classes per row, best first; ``first`` (e.g. re-distributed labels) replaces each row's first.

    Args:
        probs: dense ``(N, C)`` scores or a :class:`common.lib.topk.TopK`.
        classes: column names.
        first: a label per row to put first, or ``None``.
    """
    order = topk.top_n(probs, min(6, probs.shape[1]))
    rows = []
    for r, idx in enumerate(order):
        names = [classes[i] for i in idx]
        if first is not None:
            names = [first[r]] + [n for n in names if n != first[r]]
        rows.append(" ".join(names[:5]))
    return rows


def run_ensemble(cfg: EnsembleConfig, comp: Competition | None = None) -> dict[str, Any]:
    """The whole stage (see the module docstring); returns what it writes to ``06_ensemble/metrics.json``.

    Args:
        cfg: stage config.
        comp: the competition whose test images are predicted (opened from ``cfg.data`` when not given).
    """
    from common.stages import ensemble_retrieval
    from common.stages import soup as soup_stage

    comp = comp if comp is not None else open_checked(cfg)
    out = stage_dir(cfg.exp)
    names = cfg.member_list("members")
    if not names and not cfg.member_list("embed_members"):
        raise ValueError("stage 06 has nothing to do: set members (stage-05 runs) and/or embed_members "
                         "(stage-03 runs)")
    members = load_members(names) if names else []  # every input read or located before any work
    stored = stored_run(cfg) if cfg.inference_only else None
    if cfg.soup != "none" and not cfg.inference_only:
        soup_stage.soup_folds(cfg.member_list("soup_members"))
    if cfg.member_list("embed_members"):
        if not cfg.inference_only:  # the split matters out of fold only
            ensemble_retrieval.shared_split(cfg.member_list("embed_members"))
        ensemble_retrieval.embed_folds(cfg.member_list("embed_members"))
    result: dict[str, Any] = {"exp": cfg.exp, "members": names, "submission": None}
    if cfg.inference_only:
        result.update(inference_only=True, skipped=INFERENCE_SKIPS)
    ens = None
    if members:  # inference: weights from the stored out-of-fold arrays as in a full run; no new training folders
        ens = classifier_ensemble(dataclasses.replace(cfg, pseudo_threshold=0.0, clean_threshold=0.0)
                                  if cfg.inference_only else cfg, comp, members, out)
        result.update(ens["metrics"])
        if stored is not None and stored.get("weights") not in (None, result["weights"]):
            raise ValueError(f"inference_only: the member weights {result['weights']} differ from "
                             f"{stored['weights']} of the full run ({stored['where']}): the members' "
                             "05_classifier/oof.npz are not the ones that run ensembled")
    if cfg.soup != "none" and not cfg.inference_only:
        result["soup"] = soup_stage.run_soup(cfg, comp, out)
    if cfg.member_list("embed_members"):
        result["retrieval"], submission = ensemble_retrieval.run_retrieval_ensemble(
            cfg, comp, ens, out,
            stored=None if stored is None else {**stored["retrieval"], "where": stored["where"]})
    else:
        first = ens["redistributed"] if ens is not None and cfg.redistribute_k else None
        submission = pd.DataFrame({"image": comp.test["image"],
                                   "predictions": top5_predictions(ens["test_probs"], ens["classes"], first)})
        if comp.truth is not None and ens["label_column"] == "individual_id":
            truth = comp.truth.set_index("image")["individual_id"].reindex(submission["image"])
            scored = truth.notna().to_numpy()
            result["test_map5"] = metrics.map5_report(truth[scored].tolist(),
                                                      submission["predictions"][scored].str.split().tolist(),
                                                      comp.known_individuals, cfg.new_label)
    name = submission_name(cfg)
    submit.write_submission(name, submission)  # on Kaggle also /kaggle/working/submission.csv
    result["submission"] = name
    store.write_json(out / "metrics.json", result)
    store.update_json(paths.exp_dir(cfg.exp) / "metrics.json", {"ensemble": headline(result)})
    store.mark_done(out, stage_fingerprint(cfg))
    return result


def stored_run(cfg: EnsembleConfig) -> dict[str, Any]:
    """``inference_only``: the ``06_ensemble/metrics.json`` of an earlier full run of ``cfg.exp`` (found by name,
    e.g. in its attached weights dataset), checked to come from the same members and settings; ``where`` added.

    Raises:
        MissingStageError: no such file; the message says what to attach.
        ValueError: that run ensembled other members or used other settings.
    """
    folder = paths.find_stage_dir(cfg.exp, STAGE, "metrics.json",
                                  hint="inference_only takes the blend ratio and thresholds of a full stage-06 run "
                                       "of this experiment")
    run = store.read_json(folder / "metrics.json")
    ret = run.get("retrieval") or {}
    now = {"submission": submission_name(cfg), "members": cfg.member_list("members"),
           "embed_members": cfg.member_list("embed_members")}
    then = {"submission": run.get("submission"), "members": run.get("members"),
            "embed_members": ret.get("embed_members", [])}
    if now != then:
        raise ValueError(f"inference_only: {folder / 'metrics.json'} was written by a full run with {then}, not "
                         f"{now}: run inference with the parameters of that run")
    return {**run, "where": str(folder / "metrics.json"), "retrieval": ret}


def classifier_ensemble(cfg: EnsembleConfig, comp: Competition, members: list[Member], out: Path) -> dict:
    """Weights, OOF and test ensembles, pseudo-labels, cleaning and re-distribution; written under ``out``."""
    raw = member_weights(members, cfg.weight_factor, cfg.weight_by)
    weights = raw / raw.sum()
    oof, oof_images, classes = combine(members, weights, "oof")
    test, test_images, _ = combine(members, weights, "test")
    where = str(comp.root / "sample_submission.csv")
    test = ensemble.align(test, test_images, classes, list(comp.test["image"]), classes, "the members' test.npz",
                          where)
    label_column = members[0].label_column
    oof_label = members[0].oof_label  # the ensemble keeps member 0's row and class order
    scale = float(raw.sum() / len(raw)) if cfg.rescale else 1.0  # the reference's --scale: rows sum to mean(w)
    for name, rows, values, extra in (("oof.npz", oof_images, oof, {"label": oof_label}),
                                      ("test.npz", list(comp.test["image"]), test, {})):
        scaled = topk.scale(values, scale)  # dense: probs; top-k: topk_index, topk_prob, rest_mass
        arrays = topk.to_arrays(scaled) if isinstance(scaled, topk.TopK) else {"probs": scaled}
        store.save_arrays(out / name, rows, **arrays, **extra)
    store.write_json(out / "classes.json", {"label_column": label_column, "classes": classes})
    table = pd.DataFrame({"member": [m.exp for m in members],
                          "oof_accuracy": [m.oof_accuracy for m in members],
                          f"oof_{cfg.weight_by}": [m.oof_score(cfg.weight_by) for m in members],
                          "oof_images": [len(m.oof_images) for m in members],
                          "oof_images_own": [m.oof_own for m in members],
                          "raw_factor": raw, "weight": weights})
    store.write_csv(out / "members.csv", table)
    n = len(classes)
    res: dict[str, Any] = {"weights_from": f"out-of-fold {cfg.weight_by} of each member on the "
                                           f"{len(oof_images)} training images every member predicted out of "
                                           "fold (05_classifier/oof.npz)",
                           "weight_factor": cfg.weight_factor, "rescale": cfg.rescale,
                           "weights": dict(zip(table["member"], np.round(weights, 6).tolist(), strict=True)),
                           "oof": metrics.rounded_report(oof_label, oof, n)}
    truth = classify.truth_labels(comp, label_column)
    if truth is not None and len(test):
        labels = truth.reindex(comp.test["image"])
        scored = labels.notna().to_numpy() & labels.isin(set(classes)).to_numpy()
        if scored.any():
            res["test"] = metrics.rounded_report(np.array([classes.index(c) for c in labels[scored]]), test[scored], n)
    ens = {"classes": classes, "label_column": label_column, "oof_probs": oof, "oof_images": oof_images,
           "oof_label": oof_label, "test_probs": test, "redistributed": None,
           "oof_blend": oof, "test_blend": test}  # what the retrieval side blends with (blend_on)
    if cfg.blend_on == "cosine" and cfg.blend_ratio > 0:  # the classifier's logits, on the retrieval scale
        linear = [m.exp for m in members if m.oof_cosine is None]
        if linear:
            raise ValueError(f"blend_on=cosine: member(s) {linear} have a linear head, whose logits have no cosine "
                             "scale; use blend_on=prob or ArcFace-head members (head=arcface or subcenter)")
        ens["oof_blend"] = combine(members, weights, "oof", "cosine")[0]
        ens["test_blend"] = ensemble.align(combine(members, weights, "test", "cosine")[0], test_images, classes,
                                           list(comp.test["image"]), classes, "the members' test.npz", where)
    if cfg.pseudo_threshold > 0:
        res["pseudo"] = write_pseudo_labels(cfg, comp, test, classes, label_column, out)
    if cfg.clean_threshold > 0:
        res["clean"] = clean_labels(cfg, comp, oof, oof_images, classes, oof_label, out)
    if cfg.redistribute_k:
        pred, moves = postprocess.redistribute_labels(test, list(comp.test["image"]), classes, cfg.redistribute_k)
        store.write_csv(out / "redistributed.csv", pred)
        store.write_csv(out / "moves.csv", moves)
        before = np.bincount(topk.argmax(test), minlength=n)
        after = pred["label"].value_counts().reindex(classes).fillna(0).to_numpy()
        res["redistribute"] = {"k": cfg.redistribute_k, "moved": len(moves),
                               "classes_below_k_before": int((before < cfg.redistribute_k).sum()),
                               "classes_below_k_after": int((after < cfg.redistribute_k).sum())}
        ens["redistributed"] = pred["label"].tolist()
    return {**ens, "metrics": res}


def pseudo_names(kept: pd.DataFrame, train: pd.DataFrame, round_no: int) -> pd.DataFrame:
    """Rename the kept test images whose name a training image already has (the Grocery Store Dataset's official
    splits reuse file names: ``train/Golden-Delicious_001.jpg`` is another photo than ``val/...``): such a row
    becomes ``pseudo<round>_<name>``, with the test image it came from in a ``test_image`` column (empty for the
    others), so that :func:`write_competition` links the test file. Unclashing names are kept as they are.

    Raises:
        ValueError: naming the test image when its new name is a training image's name too.
    """
    names = set(train["image"].astype(str))
    clash = kept["image"].astype(str).isin(names)
    if not clash.any():
        return kept
    out = kept.copy()
    out.insert(1, "test_image", np.where(clash, out["image"].astype(str), ""))
    out.loc[clash, "image"] = [f"pseudo{int(round_no)}_{name}" for name in out.loc[clash, "image"].astype(str)]
    again = out.loc[clash, "image"].isin(names)
    if again.any():
        first = out.loc[clash].loc[again, "test_image"].iloc[0]
        raise ValueError(f"pseudo-labels: test image {first!r} has a training image's name, and so has its new "
                         f"name 'pseudo{int(round_no)}_{first}': rename the training image")
    return out


def write_pseudo_labels(cfg: EnsembleConfig, comp: Competition, test: np.ndarray, classes: list[str],
                        label_column: str, out: Path) -> dict[str, Any]:
    """Round ``pseudo_round``: the kept test rows, ``train_round<N>.csv``, the folder and the per-round counts."""
    earlier = earlier_rounds(comp, label_column)
    if len(earlier) and cfg.pseudo_round <= int(earlier["round"].max()):
        raise ValueError(f"pseudo_round={cfg.pseudo_round}: {comp.root / 'train.csv'} already holds round "
                         f"{int(earlier['round'].max())}; use pseudo_round={int(earlier['round'].max()) + 1}")
    kept = postprocess.select_pseudo_labels(test, list(comp.test["image"]), classes, cfg.pseudo_threshold,
                                            cfg.pseudo_round, label_column)
    train = original_train(comp)
    kept = pseudo_names(kept, train, cfg.pseudo_round)
    table_path = postprocess.write_pseudo_training_table(train, kept, out, cfg.pseudo_round, label_column)
    table = pd.read_csv(table_path, dtype=str, keep_default_na=False)
    for col in ("image", "species", "individual_id"):  # a pseudo row of another label_column knows no individual
        table.loc[table[col] == "", col] = "unknown"
    folder = write_competition(comp, table, out / f"pseudo_round{cfg.pseudo_round}")
    store.write_csv(out / f"pseudo_round{cfg.pseudo_round}.csv", kept)
    rounds = postprocess.pseudo_label_summary(pd.concat([earlier, kept], ignore_index=True), label_column,
                                              n_test=len(comp.test)) if len(earlier) + len(kept) else \
        pd.DataFrame({"round": [cfg.pseudo_round], "n_images": [0]})
    store.write_csv(out / "pseudo_rounds.csv", rounds)
    store.write_csv(folder / "pseudo_rounds.csv", rounds)
    return {"round": cfg.pseudo_round, "threshold": cfg.pseudo_threshold, "kept": len(kept),
            "share": len(kept) / max(len(comp.test), 1), "folder": str(folder), "table": str(table_path)}


def clean_labels(cfg: EnsembleConfig, comp: Competition, oof: np.ndarray, images: list[str], classes: list[str],
                 labels: np.ndarray, out: Path) -> dict[str, Any]:
    """``flagged.csv`` (training images only) and the folder ``cleaned/`` without them."""
    flagged = postprocess.flag_noisy_labels(oof, images, classes, labels, cfg.clean_threshold)
    flagged = flagged[flagged["image"].isin(set(comp.train["image"]))].reset_index(drop=True)
    store.write_csv(out / "flagged.csv", flagged)
    clean = postprocess.write_clean_table(comp.train.drop(columns=["path"]), flagged, out / "cleaned_train.csv")
    folder = write_competition(comp, clean, out / "cleaned")
    return {"threshold": cfg.clean_threshold, "flagged": len(flagged), "kept": len(clean), "folder": str(folder)}


# ------------------------------------------------------------------------------------- notebook helpers
def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The few figures worth a line in ``working/<exp>/metrics.json``."""
    out: dict[str, Any] = {"submission": result.get("submission"), "members": result.get("members")}
    for key in ("oof", "test"):
        if key in result:
            out[f"{key}_accuracy"] = result[key]["accuracy"]
    if result.get("test_map5"):
        out["test_map5"] = result["test_map5"]["map5"]
    ret = result.get("retrieval") or {}
    out.update({f"retrieval_{k}": ret[k] for k in ("oof_map5", "map5", "threshold") if k in ret})
    if "pseudo" in result:
        out["pseudo_kept"] = result["pseudo"]["kept"]
    return out


def summary_table(result: dict[str, Any]) -> pd.DataFrame:
    """One row per headline figure of the run (what was written and how it scores)."""
    rows: dict[str, Any] = {"submission": f"{result['submission']}.csv", "members": ", ".join(result["members"])}
    rows.update({k.replace("_", " "): v for k, v in headline(result).items() if k not in ("submission", "members")})
    if result.get("inference_only"):
        rows["inference only"] = "skipped: " + ", ".join(result["skipped"])
    for key, fields in (("pseudo", ("round", "kept", "folder")), ("clean", ("flagged", "kept", "folder")),
                        ("redistribute", ("moved", "classes_below_k_before", "classes_below_k_after"))):
        rows.update({f"{key} {f.replace('_', ' ')}": result[key][f] for f in fields if key in result})
    if "soup" in result:
        rows["soup kept"] = "; ".join(f"fold {k}: {', '.join(v)}" for k, v in result["soup"]["kept"].items())
    return pd.DataFrame({"value": {k: str(v) for k, v in rows.items()}}).rename_axis("item")


def members_table(exp: str, result: dict[str, Any]) -> pd.DataFrame | None:
    """``members.csv``: each member's out-of-fold accuracy, raw factor and normalised weight (``None``: no members)."""
    if not result.get("members"):
        return None
    return pd.read_csv(stage_dir(exp) / "members.csv").set_index("member")


def metrics_table(result: dict[str, Any]) -> pd.DataFrame | None:
    """Accuracy, balanced accuracy and top-5 of the ensemble (out of fold, test) and of the soup."""
    rows = {f"ensemble {k}": result[k] for k in ("oof", "test") if k in result}
    for k in ("oof", "test"):
        if k in result.get("soup", {}):
            rows[f"soup {k}"] = result["soup"][k]
    if not rows:
        return None
    cols = ["accuracy", "balanced_accuracy", "top5", "n"]
    return pd.DataFrame({k: {c: v[c] for c in cols} for k, v in rows.items()}).T.rename_axis("scored on")


def pseudo_rounds(exp: str, result: dict[str, Any]) -> pd.DataFrame | None:
    """Pseudo-labels kept per round (earlier rounds from ``data``'s ``train.csv``), or ``None``."""
    if "pseudo" not in result:
        return None
    return pd.read_csv(stage_dir(exp) / "pseudo_rounds.csv").set_index("round")


def plot_flagged(exp: str, comp: Competition, result: dict[str, Any], n: int = 12):
    """Gallery of the most confidently flagged training images (``flagged.csv``), or ``None`` if none."""
    from common.lib import plots

    if "clean" not in result or n < 1:
        return None
    flagged = pd.read_csv(stage_dir(exp) / "flagged.csv", dtype={"image": str, "label": str, "predicted": str})
    if flagged.empty:
        return None
    files = dict(zip(comp.train["image"], comp.train["path"], strict=True))
    return plots.plot_flagged_images(flagged.head(n), files)
