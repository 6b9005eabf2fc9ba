"""Range and cross-field checks of every stage parameter, run when a config is built (before any work).

One table, :data:`RULES`: a parameter name -> its allowed range. A rule applies to every stage config that has
a field of that name (``batch_size`` of stage 02 and of stage 03 alike). :data:`CROSS` holds the rules that
relate two fields. :func:`check` raises ``ValueError`` naming the parameter, its value and what is allowed,
e.g. ``epochs=-1: must be >= 0``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Range:
    """An allowed interval: ``lo``/``hi`` (``None``: unbounded), each end open or closed."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def ok(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


POSITIVE = Range(0, None, lo_open=True)  # > 0
AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
SHARE = Range(0, 1)  # [0, 1]
SIMILARITY = Range(-1, 1)  # cosine similarity thresholds

RULES: dict[str, Range] = {
    # every stage
    "num_workers": Range(-1),
    "seed": NON_NEGATIVE,
    "fold_seed": Range(-1),
    # folds
    "n_folds": Range(2),
    # 01 detector and crops
    "detector_epochs": AT_LEAST_1,
    "detector_imgsz": Range(32),
    "detector_batch": AT_LEAST_1,
    "detector_val_fraction": Range(0, 1, lo_open=True, hi_open=True),
    "detector_freeze": NON_NEGATIVE,
    "box_conf": SHARE,
    "crop_margin": NON_NEGATIVE,
    # 02 / 05 training (epochs=0 is the untrained baseline of --baseline)
    "nproc": AT_LEAST_1,
    "image_size": Range(32),
    "embedding_dim": AT_LEAST_1,
    "epochs": NON_NEGATIVE,
    "validate_every": AT_LEAST_1,
    "batch_size": AT_LEAST_1,
    "lr": POSITIVE,
    "head_lr_mult": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "warmup_epochs": NON_NEGATIVE,
    "gem_p": POSITIVE,
    "dropout": Range(0, 1, hi_open=True),
    "arc_s": POSITIVE,
    "arc_m": NON_NEGATIVE,
    "arc_k": AT_LEAST_1,
    "species_weight": NON_NEGATIVE,
    "label_smoothing": Range(0, 1, hi_open=True),
    "rrc_scale_min": Range(0, 1, lo_open=True),
    "max_images": NON_NEGATIVE,
    "focal_gamma": NON_NEGATIVE,
    "eql_tau": NON_NEGATIVE,
    "la_loss_tau": NON_NEGATIVE,
    "la_posthoc_tau": NON_NEGATIVE,
    "mixup_alpha": NON_NEGATIVE,
    "cutmix_alpha": NON_NEGATIVE,
    "mix_prob": SHARE,
    "ema_decay": Range(0, 1, hi_open=True),
    "avg_last": NON_NEGATIVE,
    "distill_weight": SHARE,
    "distill_temperature": POSITIVE,
    # 04 / 06 retrieval and thresholds
    "knn_k": AT_LEAST_1,
    "new_threshold": Range(None, 1),  # negative: tune it
    "oof_new_share": Range(0, 1, hi_open=True),
    "threshold_min": SIMILARITY,
    "threshold_max": SIMILARITY,
    "threshold_step": POSITIVE,
    "n_examples": NON_NEGATIVE,
    "local_top": AT_LEAST_1,
    "local_side": NON_NEGATIVE,  # 0: automatic; 1-15 refused by CROSS
    "local_n_features": AT_LEAST_1,
    "local_half": POSITIVE,
    # 06 ensemble
    "weight_factor": NON_NEGATIVE,
    "pseudo_threshold": SHARE,
    "pseudo_round": AT_LEAST_1,
    "clean_threshold": SHARE,
    "redistribute_k": NON_NEGATIVE,
    "blend_ratio": SHARE,
    "new_share": SHARE,
    "species_min_queries": AT_LEAST_1,
    "gallery_size": NON_NEGATIVE,
}

# (fields, test, what is allowed): checked when the config has every field named.
CROSS: list[tuple[tuple[str, ...], Callable[..., bool], str]] = [
    (("threshold_min", "threshold_max"), lambda lo, hi: lo < hi, "threshold_min < threshold_max"),
    (("threshold_min", "threshold_max", "threshold_step"), lambda lo, hi, step: step <= hi - lo,
     "threshold_step <= threshold_max - threshold_min"),
    (("local_side",), lambda side: side == 0 or side >= 16, "local_side = 0 (automatic) or at least 16 pixels"),
]


# parameters that take one of a few words (besides each config's own _CHOICES)
WORDS: dict[str, tuple[str, ...]] = {"bad_images": ("error", "skip")}


def check(cfg: Any) -> None:
    """Raise ``ValueError`` on the first parameter of ``cfg`` outside its :data:`RULES` range or a :data:`CROSS` rule.

    Args:
        cfg: a stage config (any object with attributes; fields it lacks are not checked).
    """
    for name, allowed in RULES.items():
        if not hasattr(cfg, name):
            continue
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not allowed.ok(value):
            raise ValueError(f"{name}={value!r}: must be {allowed}")
    for name, words in WORDS.items():
        if hasattr(cfg, name) and getattr(cfg, name) not in words:
            raise ValueError(f"{name}={getattr(cfg, name)!r}: use one of {list(words)}")
    for names, test, text in CROSS:
        if all(hasattr(cfg, n) for n in names):
            values = [getattr(cfg, n) for n in names]
            if not test(*values):
                shown = ", ".join(f"{n}={v!r}" for n, v in zip(names, values, strict=True))
                raise ValueError(f"{shown}: need {text}")
