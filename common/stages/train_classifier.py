"""Stage 05: fine-tune a timm classifier per fold (:mod:`common.engine.classifier`), then predict and score.

Every trick of the winning classification solutions is one :class:`~common.config.ClassifierConfig` field.

Outputs under ``working/<exp>/05_classifier/``:

* ``folds.csv`` (``image, label, fold``) and ``classes.json`` (class names in logit order, their counts);
* per fold ``fold{k}/``: ``config.json``, ``last.pt`` (model, optimiser, scheduler, scaler, EMA and loss
  state after the last finished epoch: a killed run resumes from it), ``epoch{N}.pt`` (the weights of the
  epochs to average), ``model.pt`` (the final weights), ``log.csv``, ``_done.json``;
* ``oof.npz``: out-of-fold ``logits`` and ``probs`` (float32, ``(N, C)``), ``label`` (class index) and ``fold``
  for every validation image of the trained folds, with their ``image`` ids (``common.core.store.save_arrays``);
* ``test.npz``: ``logits``/``probs`` averaged over the fold models and ``probs_fold{k}`` per fold, rows in
  test order;
* ``metrics.json``: out-of-fold and (with ground truth) test accuracy, balanced accuracy, top-5.

Predictions are ``softmax(logits)``; with ``la_posthoc_tau > 0`` the saved ``logits``/``probs`` and the
submission are the adjusted ones (``logits - tau * log prior``) and ``metrics.json`` also scores the raw ones.
The submission ``submissions/<exp>-classifier.csv`` lists each test image's five most likely classes.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import torch

from common.config import ClassifierConfig
from common.core import paths, store
from common.core.runtime import resolve_device
from common.data.artefacts import crops_available, image_paths
from common.data.competition import Competition
from common.data.fingerprint import check_model, stage_fingerprint
from common.data.unreadable import open_checked
from common.engine import launch
from common.engine.classifier import (  # noqa: F401  (re-exported: the stage's API in one place)
    LOG_COLUMNS,
    fold_dir,
    label_table,
    load_classifier,
    predict_logits,
    prepare_folds,
    stage_dir,
    train_fold,
)
from common.lib.losses import class_prior, logit_adjust
from common.lib.metrics import rounded_report


def truth_labels(comp: Competition, label_column: str) -> pd.Series | None:
    """Ground-truth classes of the test images (from ``test.csv``), indexed by image, or ``None``."""
    path = comp.root / "test.csv"
    if not path.exists():
        return None
    table = pd.read_csv(path, dtype=str)
    if label_column not in table.columns:
        return None
    return table.set_index("image")[label_column].astype(str)


def _softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits).float(), dim=1).numpy()


def _posthoc(logits: np.ndarray, counts: list[int], tau: float) -> np.ndarray:
    if not tau:
        return logits
    return logit_adjust(logits, class_prior(np.maximum(counts, 1)).numpy(), tau).astype(np.float32)


def run_classification(cfg: ClassifierConfig, comp: Competition | None = None) -> dict[str, Any]:
    """The whole stage: folds, training, out-of-fold and test predictions, submission and metrics.

    Args:
        cfg: stage config.
        comp: the competition (opened from ``cfg.data`` when not given).

    Returns:
        The metrics written to ``05_classifier/metrics.json``.
    """
    out = stage_dir(cfg.exp)
    if (not cfg.force and store.stage_done(out, stage_fingerprint(cfg), type(cfg).defaults())
            and (out / "metrics.json").exists()):
        return store.read_json(out / "metrics.json")  # finished with these parameters: nothing to redo
    comp = comp if comp is not None else open_checked(cfg)
    if cfg.inference_only:
        return infer_classification(cfg, comp)
    folds = prepare_folds(cfg, comp)
    info = store.read_json(stage_dir(cfg.exp) / "classes.json")
    classes, counts = info["classes"], info["counts"]
    class_index = {c: i for i, c in enumerate(classes)}
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    train_cfg = launch.train_elsewhere("05", cfg, out)  # nproc > 1: torchrun trains, this process reads
    logs = [train_fold(train_cfg, comp, folds, k).assign(fold=k) for k in cfg.fold_list()]
    train_seconds = float(sum(log["seconds"].sum() for log in logs))

    use_crops = cfg.use_crops and crops_available(cfg.exp)
    test_files = image_paths(comp.test, cfg.exp, "test", use_crops)
    oof_parts, test_logits = [], {}
    for k in cfg.fold_list():
        model, meta = load_classifier(cfg.exp, k, device)
        valid = folds[folds["fold"] == k].merge(comp.train[["image", "path"]], on="image", how="left")
        files = image_paths(valid, cfg.exp, "train", use_crops)
        args = dict(image_size=cfg.image_size, mean=meta["mean"], std=meta["std"], batch_size=2 * cfg.batch_size,
                    tta_flip=cfg.tta_flip, device=device, num_workers=cfg.num_workers, amp=cfg.amp)
        oof_parts.append((valid, predict_logits(model, files, desc=f"fold {k} out-of-fold", **args), k))
        test_logits[k] = (predict_logits(model, test_files, desc=f"fold {k} test", **args)
                          if len(test_files) else np.zeros((0, len(classes)), np.float32))

    oof_images = [img for part, _, _ in oof_parts for img in part["image"]]
    oof_raw = np.concatenate([lg for _, lg, _ in oof_parts]).astype(np.float32)
    oof_label = np.array([class_index[c] for part, _, _ in oof_parts for c in part["label"]])
    oof_fold = np.concatenate([np.full(len(p), k) for p, _, k in oof_parts])
    oof_logits = _posthoc(oof_raw, counts, cfg.la_posthoc_tau)
    store.save_arrays(out / "oof.npz", oof_images, logits=oof_logits, probs=_softmax(oof_logits),
                      label=oof_label, fold=oof_fold)
    test_raw = np.mean([test_logits[k] for k in cfg.fold_list()], axis=0).astype(np.float32)
    per_fold = {f"probs_fold{k}": _softmax(_posthoc(lg, counts, cfg.la_posthoc_tau))
                for k, lg in test_logits.items()}
    test_adj = _posthoc(test_raw, counts, cfg.la_posthoc_tau)
    test_probs = np.mean(list(per_fold.values()), axis=0).astype(np.float32)
    store.save_arrays(out / "test.npz", list(comp.test["image"]), logits=test_adj, probs=test_probs, **per_fold)

    metrics: dict[str, Any] = {
        "label_column": cfg.label_column, "n_classes": len(classes), "folds": cfg.fold_list(),
        "final_weights": meta["final_weights"], "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "posthoc_tau": cfg.la_posthoc_tau,
        "oof": rounded_report(oof_label, oof_logits, len(classes)),
    }
    if cfg.la_posthoc_tau:
        metrics["oof_no_posthoc"] = rounded_report(oof_label, oof_raw, len(classes))
    truth = truth_labels(comp, cfg.label_column)
    if truth is not None and len(test_files):
        labels = truth.reindex(comp.test["image"])
        scored = labels.notna().to_numpy() & labels.isin(class_index).to_numpy()
        if scored.any():
            y = np.array([class_index[c] for c in labels[scored]])
            metrics["test"] = rounded_report(y, test_probs[scored], len(classes))
            metrics["test_by_fold"] = {str(k): rounded_report(y, p[scored], len(classes))
                                       for k, p in ((k, per_fold[f"probs_fold{k}"]) for k in cfg.fold_list())}
            if cfg.la_posthoc_tau:
                raw_probs = np.mean([_softmax(test_logits[k]) for k in cfg.fold_list()], axis=0)
                metrics["test_no_posthoc"] = rounded_report(y, raw_probs[scored], len(classes))
            metrics["test_unscored"] = int((~scored).sum())
    if len(test_files):
        top5 = np.argsort(-test_probs, axis=1, kind="stable")[:, :5]
        sub = pd.DataFrame({"image": comp.test["image"],
                            "predictions": [" ".join(classes[i] for i in row) for row in top5]})
        store.write_csv(paths.submission_path(f"{cfg.exp}-classifier"), sub)
    store.write_json(out / "metrics.json", metrics)
    store.update_json(paths.exp_dir(cfg.exp) / "metrics.json", {"classifier": headline(metrics)})
    store.mark_done(out, stage_fingerprint(cfg))
    return metrics


def infer_classification(cfg: ClassifierConfig, comp: Competition) -> dict[str, Any]:
    """``inference_only``: test predictions of an earlier full run's fold models (found by experiment name, e.g.
    in an attached Kaggle dataset); no training. Writes ``test.npz``, the submission (on Kaggle also
    ``/kaggle/working/submission.csv``) and ``metrics.json`` (the run's out-of-fold scores, test scores when
    ``test.csv`` has the truth)."""
    out = stage_dir(cfg.exp)
    hint = "inference_only needs a full stage-05 run of this experiment"
    run = paths.find_stage_dir(cfg.exp, "05", "metrics.json", hint=hint)
    where = paths.find_stage_dir(cfg.exp, "05", "classes.json", hint=hint) / "classes.json"
    info = store.read_json(where)
    classes, counts = info["classes"], info["counts"]
    device = resolve_device(cfg.device)
    models = [(k, *load_classifier(cfg.exp, k, device)) for k in cfg.fold_list()]  # all found before any work
    for k, _, meta in models:
        check_model(meta, comp.root, f"{cfg.exp} stage 05 fold{k}/config.json")
    if models[0][2]["classes"] != classes:  # the logits' order is the trained model's
        raise ValueError(f"{where}: its classes are not those fold {models[0][0]}'s model was trained on: this "
                         f"competition's train.csv differs from the one the run of {cfg.exp!r} used")
    per_fold = {}
    for k, model, meta in models:
        files = image_paths(comp.test, cfg.exp, "test", meta["used_crops"])
        logits = predict_logits(model, files, image_size=meta["config"]["image_size"], mean=meta["mean"],
                                std=meta["std"], batch_size=2 * cfg.batch_size, tta_flip=cfg.tta_flip, device=device,
                                num_workers=cfg.num_workers, amp=cfg.amp, desc=f"fold {k} test")
        per_fold[k] = _posthoc(logits, counts, cfg.la_posthoc_tau)
    probs = {f"probs_fold{k}": _softmax(lg) for k, lg in per_fold.items()}
    test_probs = np.mean(list(probs.values()), axis=0).astype(np.float32)
    store.save_arrays(out / "test.npz", list(comp.test["image"]), probs=test_probs, **probs,
                      logits=np.mean(list(per_fold.values()), axis=0).astype(np.float32))
    stored = store.read_json(run / "metrics.json")
    metrics: dict[str, Any] = {"label_column": cfg.label_column, "n_classes": len(classes), "folds": cfg.fold_list(),
                               "inference_only": True, "oof": stored["oof"],
                               "final_weights": models[-1][2]["final_weights"]}
    truth = truth_labels(comp, cfg.label_column)
    class_index = {c: i for i, c in enumerate(classes)}
    if truth is not None and len(comp.test):
        labels = truth.reindex(comp.test["image"])
        scored = labels.notna().to_numpy() & labels.isin(class_index).to_numpy()
        if scored.any():
            metrics["test"] = rounded_report(np.array([class_index[c] for c in labels[scored]]), test_probs[scored],
                                      len(classes))
    top5 = np.argsort(-test_probs, axis=1, kind="stable")[:, :5]
    sub = pd.DataFrame({"image": comp.test["image"], "predictions": [" ".join(classes[i] for i in row) for row in top5]})
    store.write_csv(paths.submission_path(f"{cfg.exp}-classifier"), sub)
    if paths.on_kaggle():
        store.write_csv(paths.working_dir() / "submission.csv", sub)
    store.write_json(out / "metrics.json", metrics)
    store.mark_done(out, stage_fingerprint(cfg))
    return metrics




def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The few figures worth a line: out-of-fold and test accuracy and balanced accuracy."""
    out = {"oof_accuracy": metrics["oof"]["accuracy"], "oof_balanced_accuracy": metrics["oof"]["balanced_accuracy"]}
    if "test" in metrics:
        out.update(test_accuracy=metrics["test"]["accuracy"],
                   test_balanced_accuracy=metrics["test"]["balanced_accuracy"])
    return out


def training_logs(exp: str, folds_run: list[int]) -> pd.DataFrame:
    """Every requested fold's ``log.csv`` stacked, with a ``fold`` column (for the training-curve plot)."""
    files = [paths.find_stage_dir(exp, "05", f"fold{k}/log.csv") / f"fold{k}" / "log.csv" for k in folds_run]
    return pd.concat([pd.read_csv(f).assign(fold=k) for f, k in zip(files, folds_run, strict=True)],
                     ignore_index=True)


def class_summary(exp: str) -> pd.DataFrame:
    """Classes in logit order with their training-image counts (from ``classes.json``), most frequent first."""
    info = store.read_json(stage_dir(exp) / "classes.json")
    table = pd.DataFrame({"class": info["classes"], "images": info["counts"]})
    return table.sort_values("images", ascending=False, kind="stable").set_index("class")


def metrics_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """One row per scored set (out-of-fold, test, with and without post-hoc adjustment, per fold)."""
    rows = {}
    for key, rep in metrics.items():
        if isinstance(rep, dict) and "accuracy" in rep:
            rows[key] = rep
    for fold, rep in metrics.get("test_by_fold", {}).items():
        rows[f"test, fold {fold} model"] = rep
    cols = ["accuracy", "balanced_accuracy", "top5", "n"]
    return pd.DataFrame({k: {c: v[c] for c in cols} for k, v in rows.items()}).T.rename_axis("scored on")
