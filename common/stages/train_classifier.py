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
  test order; with ``full_fit``, the model trained on every image (``fold{n_folds}``) answers the test alone
  (``probs`` are its own, ``probs_fold{n_folds}``), while the fold models still predict out of fold;
* ``metrics.json``: out-of-fold and (with ground truth) test accuracy, balanced accuracy, top-5.

With many classes (``prob_topk``: automatic above 1000 classes, or forced) ``oof.npz`` and ``test.npz`` hold
the top-k layout of :mod:`common.lib.topk` instead of ``logits``/``probs``/``probs_fold{k}``: ``topk_index``,
``topk_prob``, ``rest_mass``, ``topk_logit`` (and ``*_fold{k}``), computed batch by batch, so no ``N x C`` matrix
is ever held. The test file's average over folds is then :func:`common.lib.topk.weighted_mean` of the folds'
top-k (a class a fold does not keep adds 0 to the probability; its logit there counts as that fold's smallest
kept logit).

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
from common.engine.topk_scores import fold_mean, posthoc, predict_topk
from common.lib import topk
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
    logs = [train_fold(train_cfg, comp, folds, k).assign(fold=k) for k in cfg.model_folds()]
    train_seconds = float(sum(log["seconds"].sum() for log in logs))

    use_crops = cfg.use_crops and crops_available(cfg.exp)
    test_files = image_paths(comp.test, cfg.exp, "test", use_crops)
    k_top = topk.resolve_k(cfg.prob_topk, len(classes))
    if k_top:
        metrics = _predict_topk(cfg, comp, folds, classes, counts, k_top, test_files, device)
        meta = metrics.pop("meta")
        return _finish(cfg, out, metrics, meta, train_seconds, t0)
    oof_parts, test_logits, answering = [], {}, cfg.test_folds()
    for k in cfg.model_folds():
        model, meta = load_classifier(cfg.exp, k, device)
        args = dict(image_size=cfg.image_size, mean=meta["mean"], std=meta["std"], batch_size=2 * cfg.batch_size,
                    tta_flip=cfg.tta_flip, device=device, num_workers=cfg.num_workers, amp=cfg.amp,
                    amp_cpu=cfg.amp_cpu, channels_last=cfg.channels_last)
        if k in cfg.fold_list():  # the full model (full_fit) trained on every image: it has no out-of-fold part
            valid = folds[folds["fold"] == k].merge(comp.train[["image", "path"]], on="image", how="left")
            files = image_paths(valid, cfg.exp, "train", use_crops)
            oof_parts.append((valid, predict_logits(model, files, desc=f"fold {k} out-of-fold", **args), k))
        if k in answering:
            test_logits[k] = (predict_logits(model, test_files, desc=f"fold {k} test", **args)
                              if len(test_files) else np.zeros((0, len(classes)), np.float32))

    oof_images = [img for part, _, _ in oof_parts for img in part["image"]]
    oof_raw = np.concatenate([lg for _, lg, _ in oof_parts]).astype(np.float32)
    oof_label = np.array([class_index[c] for part, _, _ in oof_parts for c in part["label"]])
    oof_fold = np.concatenate([np.full(len(p), k) for p, _, k in oof_parts])
    oof_logits = posthoc(oof_raw, counts, cfg.la_posthoc_tau)
    store.save_arrays(out / "oof.npz", oof_images, logits=oof_logits, probs=_softmax(oof_logits),
                      label=oof_label, fold=oof_fold)
    test_raw = np.mean(list(test_logits.values()), axis=0).astype(np.float32)
    per_fold = {f"probs_fold{k}": _softmax(posthoc(lg, counts, cfg.la_posthoc_tau))
                for k, lg in test_logits.items()}
    test_adj = posthoc(test_raw, counts, cfg.la_posthoc_tau)
    test_probs = np.mean(list(per_fold.values()), axis=0).astype(np.float32)
    store.save_arrays(out / "test.npz", list(comp.test["image"]), logits=test_adj, probs=test_probs, **per_fold)

    metrics: dict[str, Any] = {
        "label_column": cfg.label_column, "n_classes": len(classes), "folds": cfg.fold_list(),
        "test_folds": answering, "final_weights": meta["final_weights"], "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "posthoc_tau": cfg.la_posthoc_tau,
        "oof": rounded_report(oof_label, oof_logits, len(classes)),
    }
    if cfg.la_posthoc_tau:
        metrics["oof_no_posthoc"] = rounded_report(oof_label, oof_raw, len(classes))
    raw_probs = (np.mean([_softmax(lg) for lg in test_logits.values()], axis=0)
                 if cfg.la_posthoc_tau and len(test_files) else None)
    metrics.update(_test_scores(cfg, comp, classes, test_probs,
                                {k: per_fold[f"probs_fold{k}"] for k in answering}, raw_probs))
    if len(test_files):
        write_submission(cfg, comp, test_probs, classes)
    return _write_metrics(cfg, out, metrics)


def write_submission(cfg: ClassifierConfig, comp: Competition, test_probs: topk.Scores, classes: list[str]
                     ) -> pd.DataFrame:
    """``submissions/<exp>-classifier.csv``: each test image's five most likely classes; returns the table.

    Args:
        cfg: stage config (``exp``).
        comp: the competition (test rows in order).
        test_probs: ``(N, C)`` test probabilities, dense or :class:`common.lib.topk.TopK`.
        classes: class names in column order.
    """
    top5 = topk.top_n(test_probs, 5)
    sub = pd.DataFrame({"image": comp.test["image"],
                        "predictions": [" ".join(classes[i] for i in row) for row in top5]})
    store.write_csv(paths.submission_path(f"{cfg.exp}-classifier"), sub)
    return sub


def _finish(cfg: ClassifierConfig, out, metrics: dict[str, Any], meta: dict, train_seconds: float, t0: float
            ) -> dict[str, Any]:
    """The top-k run's metrics.json, headline and marker (the arrays and submission are written)."""
    metrics = {"label_column": cfg.label_column, "folds": cfg.fold_list(), "test_folds": cfg.test_folds(),
               "final_weights": meta["final_weights"],
               "train_seconds": round(train_seconds, 1), "seconds": round(time.perf_counter() - t0, 1),
               "posthoc_tau": cfg.la_posthoc_tau, **metrics}
    return _write_metrics(cfg, out, metrics)


def _write_metrics(cfg: ClassifierConfig, out, metrics: dict[str, Any]) -> dict[str, Any]:
    """A full run's ``metrics.json``, its headline in the experiment's ``metrics.json``, and the stage marker."""
    store.write_json(out / "metrics.json", metrics)
    store.update_json(paths.exp_dir(cfg.exp) / "metrics.json", {"classifier": headline(metrics)})
    store.mark_done(out, stage_fingerprint(cfg))
    return metrics


def _test_scores(cfg: ClassifierConfig, comp: Competition, classes: list[str], probs: topk.Scores,
                 per_fold: dict[int, topk.Scores] | None = None, raw: topk.Scores | None = None) -> dict[str, Any]:
    """Test scores on the test images that ``test.csv`` labels with a known class: ``test`` and, for a full run
    (``per_fold`` given), ``test_by_fold``, ``test_no_posthoc`` (with ``raw``: the probabilities before post-hoc
    adjustment) and ``test_unscored``; empty without such labels.

    Args:
        cfg: stage config (``label_column``).
        comp: the competition.
        classes: class names in column order.
        probs: test probabilities, dense or top-k, rows in ``comp.test`` order.
        per_fold: each fold's test probabilities.
        raw: test probabilities without post-hoc logit adjustment.
    """
    truth = truth_labels(comp, cfg.label_column)
    if truth is None or not len(comp.test):
        return {}
    class_index = {c: i for i, c in enumerate(classes)}
    labels = truth.reindex(comp.test["image"])
    scored = labels.notna().to_numpy() & labels.isin(class_index).to_numpy()
    if not scored.any():
        return {}
    y, n = np.array([class_index[c] for c in labels[scored]]), len(classes)
    out: dict[str, Any] = {"test": rounded_report(y, probs[scored], n)}
    if per_fold is not None:
        out["test_by_fold"] = {str(f): rounded_report(y, p[scored], n) for f, p in per_fold.items()}
        if raw is not None:
            out["test_no_posthoc"] = rounded_report(y, raw[scored], n)
        out["test_unscored"] = int((~scored).sum())
    return out


def _finish_inference(cfg: ClassifierConfig, comp: Competition, metrics: dict[str, Any], probs: topk.Scores,
                      classes: list[str]) -> dict[str, Any]:
    """``inference_only``'s test scores, submission (on Kaggle also ``/kaggle/working/submission.csv``),
    ``metrics.json`` and marker."""
    metrics.update(_test_scores(cfg, comp, classes, probs))
    sub = write_submission(cfg, comp, probs, classes)
    if paths.on_kaggle():
        store.write_csv(paths.working_dir() / "submission.csv", sub)
    store.write_json(stage_dir(cfg.exp) / "metrics.json", metrics)
    store.mark_done(stage_dir(cfg.exp), stage_fingerprint(cfg))
    return metrics


def _predict_topk(cfg: ClassifierConfig, comp: Competition, folds: pd.DataFrame, classes: list[str],
                  counts: list[int], k: int, test_files: list[str], device) -> dict[str, Any]:
    """Out-of-fold and test predictions in the top-k layout; ``oof.npz``, ``test.npz``, the submission and the
    scores (plus ``meta``: the last fold's ``config.json``)."""
    out, tau, n = stage_dir(cfg.exp), cfg.la_posthoc_tau, len(classes)
    class_index = {c: i for i, c in enumerate(classes)}
    use_crops = cfg.use_crops and crops_available(cfg.exp)
    oof, test, images, labels, fold_of, answering = [], {}, [], [], [], cfg.test_folds()
    for k_fold in cfg.model_folds():
        model, meta = load_classifier(cfg.exp, k_fold, device)
        args = dict(image_size=cfg.image_size, mean=meta["mean"], std=meta["std"], batch_size=2 * cfg.batch_size,
                    tta_flip=cfg.tta_flip, device=device, num_workers=cfg.num_workers, amp=cfg.amp,
                    amp_cpu=cfg.amp_cpu, channels_last=cfg.channels_last)
        if k_fold in answering:
            test[k_fold] = predict_topk(model, test_files, n, k, counts, tau, f"fold {k_fold} test", **args)
        if k_fold not in cfg.fold_list():
            continue  # the full model (full_fit): no out-of-fold part
        valid = folds[folds["fold"] == k_fold].merge(comp.train[["image", "path"]], on="image", how="left")
        oof.append(predict_topk(model, image_paths(valid, cfg.exp, "train", use_crops), n, k, counts, tau,
                                f"fold {k_fold} out-of-fold", **args))
        images += list(valid["image"])
        labels += [class_index[c] for c in valid["label"]]
        fold_of += [k_fold] * len(valid)
    oof_probs, oof_raw = topk.concat([p for p, _, _ in oof], n, k), topk.concat([r for _, _, r in oof], n, k)
    label = np.array(labels, dtype=np.int64)
    store.save_arrays(out / "oof.npz", images, **topk.to_arrays(oof_probs, np.concatenate([lg for _, lg, _ in oof])),
                      label=label, fold=np.array(fold_of, dtype=np.int64))
    probs, logits, raw = fold_mean(list(test.values()))
    per_fold = {f: p for f, (p, _, _) in test.items()}
    arrays = topk.to_arrays(probs, logits)
    for f, p in per_fold.items():
        arrays.update(topk.to_arrays(p, suffix=f"_fold{f}"))
    store.save_arrays(out / "test.npz", list(comp.test["image"]), **arrays)
    metrics: dict[str, Any] = {"n_classes": n, "prob_topk": k, "oof": rounded_report(label, oof_probs, n)}
    if tau:
        metrics["oof_no_posthoc"] = rounded_report(label, oof_raw, n)
    metrics.update(_test_scores(cfg, comp, classes, probs, per_fold, raw if tau else None))
    if len(test_files):
        write_submission(cfg, comp, probs, classes)
    return {**metrics, "meta": meta}


def infer_classification(cfg: ClassifierConfig, comp: Competition) -> dict[str, Any]:
    """``inference_only``: test predictions of an earlier full run's fold models (found by experiment name, e.g.
    in an attached Kaggle dataset; with ``full_fit``, its full model alone); no training. Writes ``test.npz``,
    the submission (on Kaggle also ``/kaggle/working/submission.csv``) and ``metrics.json`` (the run's
    out-of-fold scores, test scores when ``test.csv`` has the truth)."""
    out = stage_dir(cfg.exp)
    hint = "inference_only needs a full stage-05 run of this experiment"
    run = paths.find_stage_dir(cfg.exp, "05", "metrics.json", hint=hint)
    where = paths.find_stage_dir(cfg.exp, "05", "classes.json", hint=hint) / "classes.json"
    info = store.read_json(where)
    classes, counts = info["classes"], info["counts"]
    device = resolve_device(cfg.device)
    models = [(k, *load_classifier(cfg.exp, k, device)) for k in cfg.test_folds()]  # all found before any work
    for k, _, meta in models:
        check_model(meta, comp.root, f"{cfg.exp} stage 05 fold{k}/config.json")
    if models[0][2]["classes"] != classes:  # the logits' order is the trained model's
        raise ValueError(f"{where}: its classes are not those fold {models[0][0]}'s model was trained on: this "
                         f"competition's train.csv differs from the one the run of {cfg.exp!r} used")
    k_top = topk.resolve_k(cfg.prob_topk, len(classes))
    if k_top:
        return _infer_topk(cfg, comp, models, classes, counts, k_top, device, run)
    per_fold = {}
    for k, model, meta in models:
        files = image_paths(comp.test, cfg.exp, "test", meta["used_crops"])
        logits = predict_logits(model, files, image_size=meta["config"]["image_size"], mean=meta["mean"],
                                std=meta["std"], batch_size=2 * cfg.batch_size, tta_flip=cfg.tta_flip, device=device,
                                num_workers=cfg.num_workers, amp=cfg.amp, amp_cpu=cfg.amp_cpu,
                                desc=f"fold {k} test")
        per_fold[k] = posthoc(logits, counts, cfg.la_posthoc_tau)
    probs = {f"probs_fold{k}": _softmax(lg) for k, lg in per_fold.items()}
    test_probs = np.mean(list(probs.values()), axis=0).astype(np.float32)
    store.save_arrays(out / "test.npz", list(comp.test["image"]), probs=test_probs, **probs,
                      logits=np.mean(list(per_fold.values()), axis=0).astype(np.float32))
    stored = store.read_json(run / "metrics.json")
    metrics: dict[str, Any] = {"label_column": cfg.label_column, "n_classes": len(classes), "folds": cfg.fold_list(),
                               "test_folds": cfg.test_folds(), "inference_only": True, "oof": stored["oof"],
                               "final_weights": models[-1][2]["final_weights"]}
    return _finish_inference(cfg, comp, metrics, test_probs, classes)


def _infer_topk(cfg: ClassifierConfig, comp: Competition, models: list, classes: list[str], counts: list[int],
                k: int, device, run) -> dict[str, Any]:
    """``inference_only`` in the top-k layout (:func:`infer_classification`'s outputs, bounded memory)."""
    out, n = stage_dir(cfg.exp), len(classes)
    per_fold = {}
    for f, model, meta in models:
        files = image_paths(comp.test, cfg.exp, "test", meta["used_crops"])
        per_fold[f] = predict_topk(model, files, n, k, counts, cfg.la_posthoc_tau, f"fold {f} test",
                                   image_size=meta["config"]["image_size"], mean=meta["mean"], std=meta["std"],
                                   batch_size=2 * cfg.batch_size, tta_flip=cfg.tta_flip, device=device,
                                   num_workers=cfg.num_workers, amp=cfg.amp, amp_cpu=cfg.amp_cpu)
    probs, logits, _ = fold_mean(list(per_fold.values()))
    arrays = topk.to_arrays(probs, logits)
    for f, (p, _, _) in per_fold.items():
        arrays.update(topk.to_arrays(p, suffix=f"_fold{f}"))
    store.save_arrays(out / "test.npz", list(comp.test["image"]), **arrays)
    metrics: dict[str, Any] = {"label_column": cfg.label_column, "n_classes": n, "folds": cfg.fold_list(),
                               "test_folds": cfg.test_folds(), "inference_only": True, "prob_topk": k,
                               "oof": store.read_json(run / "metrics.json")["oof"],
                               "final_weights": models[-1][2]["final_weights"]}
    return _finish_inference(cfg, comp, metrics, probs, classes)


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
