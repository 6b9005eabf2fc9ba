"""Stage 06's members: the stage-05 runs an ensemble combines, read by experiment name (``working/`` or an
attached Kaggle source), aligned on the training images every member predicted out of fold, and weighted by
their out-of-fold accuracy (:func:`common.lib.ensemble.accuracy_weights`).

A member's scores are what :func:`common.lib.topk.read_scores` reads: dense ``(N, C)`` arrays, or the top-k layout
stage 05 writes for many classes (:class:`common.lib.topk.TopK`); everything downstream takes either."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from common.core import paths, store
from common.lib import ensemble, metrics, topk


@dataclasses.dataclass
class Member:
    """One stage-05 run's arrays, as written by :func:`common.stages.train_classifier.run_classification`."""

    exp: str
    classes: list[str]
    label_column: str
    oof_images: list[str]
    oof_probs: topk.Scores  # dense (N, C) or top-k (common.lib.topk)
    oof_label: np.ndarray
    test_images: list[str]
    test_probs: topk.Scores
    oof_own: int = 0  # out-of-fold rows in the member's own oof.npz (before keeping the images all members share)
    oof_cosine: topk.Scores | None = None  # logits / arc_s: the cosine to each class centre (ArcFace heads only)
    test_cosine: topk.Scores | None = None

    @property
    def oof_accuracy(self) -> float:
        return float((topk.argmax(self.oof_probs) == self.oof_label).mean()) if len(self.oof_label) else 0.0

    def oof_score(self, by: str = "accuracy") -> float:
        """Out-of-fold ``accuracy`` or ``balanced_accuracy`` (mean per-class recall) of the member."""
        if by == "accuracy" or not len(self.oof_label):
            return self.oof_accuracy
        return float(metrics.classification_report(self.oof_label, self.oof_probs, len(self.classes))[by])


def member_file(exp: str, name: str, stage: str = "05") -> Path:
    """``<exp>/05_classifier/<name>`` (or another ``stage``'s file), read where :func:`common.core.paths.find_stage_dir`
    finds it: ``working/`` first, then the datasets and kernel outputs attached on Kaggle. The error names the
    member and, on Kaggle, the dataset slug to attach."""
    try:
        return paths.find_stage_dir(exp, stage, name, hint=f"run stage {stage} with exp={exp} first (or drop it "
                                                          "from the members)") / name
    except paths.MissingStageError as err:
        raise paths.MissingStageError(f"ensemble member {exp!r}: {err}") from None


def load_member(exp: str) -> Member:
    """Read experiment ``exp``'s stage-05 arrays; the error names the experiment and the missing file."""
    files = {name: member_file(exp, name) for name in ("classes.json", "oof.npz", "test.npz")}
    info = store.read_json(files["classes.json"])
    oof, test = store.load_arrays(files["oof.npz"]), store.load_arrays(files["test.npz"])
    n = len(info["classes"])
    oof_probs, test_probs = (topk.read_scores(arrays, n, "probs", source=str(files[name]))
                             for arrays, name in ((oof, "oof.npz"), (test, "test.npz")))
    oof_cos = test_cos = None
    fold_config = sorted(files["classes.json"].parent.glob("fold*/config.json"))  # stored beside classes.json
    cfg = store.read_json(fold_config[0])["config"] if fold_config else {}
    if cfg.get("head") in ("arcface", "subcenter"):  # ArcFace logits are s * cos: divided by s, a cosine
        oof_cos, test_cos = (topk.divide(topk.read_scores(arrays, n, "logits", source=str(files[name])),
                                         cfg["arc_s"])
                             for arrays, name in ((oof, "oof.npz"), (test, "test.npz")))
    return Member(exp, [str(c) for c in info["classes"]], str(info.get("label_column", "individual_id")),
                  [str(i) for i in oof["image"]], oof_probs, oof["label"].astype(int),
                  [str(i) for i in test["image"]], test_probs, oof_own=len(oof["image"]),
                  oof_cosine=oof_cos, test_cosine=test_cos)


def _keep_oof(member: Member, images: list[str]) -> Member:
    """``member`` with its out-of-fold rows restricted to ``images``, in that order."""
    row = {img: i for i, img in enumerate(member.oof_images)}
    idx = np.array([row[i] for i in images], dtype=np.int64)
    return dataclasses.replace(member, oof_images=list(images), oof_probs=member.oof_probs[idx],
                               oof_label=member.oof_label[idx],
                               oof_cosine=None if member.oof_cosine is None else member.oof_cosine[idx])


def load_members(names: list[str]) -> list[Member]:
    """Every member, checked to share the label column and the set of classes (named file and class)."""
    if not names:
        raise ValueError("members is empty: name the stage-05 experiments to ensemble")
    out = [load_member(n) for n in names]
    ref = out[0]
    for m in out[1:]:
        where = paths.stage_dir(m.exp, "05") / "classes.json"
        if m.label_column != ref.label_column:
            raise ValueError(f"ensemble member {m.exp!r}: {where} classifies {m.label_column!r} but member "
                             f"{ref.exp!r} classifies {ref.label_column!r}")
        only_m, only_ref = sorted(set(m.classes) - set(ref.classes)), sorted(set(ref.classes) - set(m.classes))
        if only_m or only_ref:
            example = f"{only_m[0]!r} only in {m.exp!r}" if only_m else f"{only_ref[0]!r} only in {ref.exp!r}"
            raise ValueError(f"ensemble member {m.exp!r}: {where} lists other classes than member {ref.exp!r} "
                             f"({len(only_m)} only in {m.exp!r}, {len(only_ref)} only in {ref.exp!r}; e.g. "
                             f"{example}): train every member on the same data and label_column")
    # Members may have predicted different training images out of fold (folds=0 against folds=all, another
    # seed's split): weights and the OOF ensemble use the images every member predicted, in member 0's order.
    shared = set(ref.oof_images).intersection(*(m.oof_images for m in out[1:]))
    if not shared:
        raise ValueError(f"ensemble members {names}: no training image was predicted out of fold by every member "
                         "(05_classifier/oof.npz): train them with the same n_folds and seed, and overlapping folds")
    images = [i for i in ref.oof_images if i in shared]
    return [m if len(m.oof_images) == len(images) else _keep_oof(m, images) for m in out]


def member_weights(members: list[Member], factor: float, by: str = "accuracy") -> np.ndarray:
    """Raw (unnormalised) weights ``(score / min score) ** factor``, the score being each member's out-of-fold
    ``accuracy`` or ``balanced_accuracy`` (``by``); all 1 for one member or factor 0."""
    if len(members) == 1 or factor == 0:
        return np.ones(len(members))
    scores = [m.oof_score(by) for m in members]
    zero = [m.exp for m, s in zip(members, scores, strict=True) if s <= 0]
    if zero:
        raise ValueError(f"ensemble member(s) {zero}: out-of-fold accuracy 0, so (acc / min acc) ** "
                         f"{factor:g} is undefined; drop them or set weight_factor=0")
    return ensemble.accuracy_weights(scores, factor, normalize=False)


def combine(members: list[Member], weights: np.ndarray, split: str, values: str = "probs"
            ) -> tuple[np.ndarray, list[str], list[str]]:
    """Weighted mean of the members' ``oof`` or ``test`` ``probs`` or ``cosine`` scores (normalised weights),
    in the first member's row and class order."""
    names = [str(paths.stage_dir(m.exp, "05") / f"{split}.npz") for m in members]
    probs = [getattr(m, f"{split}_{'probs' if values == 'probs' else 'cosine'}") for m in members]
    images = [m.oof_images if split == "oof" else m.test_images for m in members]
    return ensemble.ensemble_probs(probs, images, [m.classes for m in members], weights, names,
                                   kind="prob" if values == "probs" else "logit")
