"""Stage 06's model soups: the fold-k models of several stage-05 runs averaged into one fold-k model.

The ingredients follow Wortsman et al., "Model soups" (https://arxiv.org/abs/2203.05482): models fine-tuned
from the *same* initial weights with different hyperparameters (learning rate, augmentation, loss, seed...).
Here they are the ``soup_members`` experiments (default: ``members``), which must share the backbone, head,
class list and fold split; fold ``k``'s soup averages their ``05_classifier/fold{k}/model.pt``. (Averaging the
epochs of *one* run is stage 05's ``avg_last``/``avg_epochs``; runs from different random initialisations do
not soup: their average is not a good model.)

``uniform``: the plain mean (:func:`common.lib.ensemble.uniform_soup`). ``greedy``: ingredients sorted by their
accuracy on fold ``k``'s validation images, each kept if the soup's accuracy does not drop
(:func:`common.lib.ensemble.greedy_soup`). That choice is made on the same out-of-fold images the soup's
out-of-fold accuracy is then measured on, so that figure is optimistic for ``greedy``: judge by the test score.

Writes ``06_ensemble/soup/fold{k}.pt`` (the soup's weights), ``soup_steps.csv``, ``soup_oof.npz`` and
``soup_test.npz`` (``probs``, same layout as stage 05's; when the first ingredient's stage 05 wrote the top-k layout
of :mod:`common.lib.topk` (its ``metrics.json`` names ``prob_topk``), that layout with the same ``k``, predicted
batch by batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from common.config import EnsembleConfig
from common.core import store
from common.core.runtime import resolve_device
from common.data.artefacts import image_paths
from common.data.competition import Competition
from common.engine.classifier import build_model, fold_dir, predict_logits
from common.engine.classifier import stage_dir as classifier_dir
from common.engine.topk_scores import fold_mean, predict_topk
from common.lib import ensemble, topk
from common.lib.losses import class_prior, logit_adjust
from common.lib.metrics import rounded_report
from common.stages import train_classifier as classify

# config.json fields that must agree for two fold models to be averaged and run the same way
_SAME = ("label_column", "backbone", "head", "arc_k", "arc_s", "image_size", "n_folds", "seed", "use_crops",
         "max_images", "la_posthoc_tau")


def soup_folds(names: list[str]) -> list[int]:
    """Folds every ingredient run finished; raises naming the runs when none is common. A run's full model
    (``full_fit``: folder ``fold{n_folds}``, trained on every image) is left out: it has no held-out fold for
    the greedy choice or the out-of-fold score."""
    found = {}
    for n in names:
        folder = classifier_dir(n)
        if not folder.is_dir():
            raise FileNotFoundError(f"soup ingredient {n!r}: {folder} not found; run stage 05 with exp={n} first")
        found[n] = {int(p.name[4:]) for p in folder.glob("fold*") if p.name[4:].isdigit()
                    and store.stage_done(p) and (p / "model.pt").exists()
                    and int(p.name[4:]) < store.read_json(p / "config.json")["config"]["n_folds"]}
    common = sorted(set.intersection(*found.values()))
    if not common:
        raise FileNotFoundError(f"soup: no fold finished in every ingredient run: {found}")
    return common


def check_ingredients(names: list[str], fold: int) -> list[dict[str, Any]]:
    """Each run's fold ``config.json``, checked to match the first run's architecture, classes and split."""
    metas = [store.read_json(fold_dir(n, fold) / "config.json") for n in names]
    ref = metas[0]
    for n, meta in zip(names[1:], metas[1:], strict=True):
        where = fold_dir(n, fold) / "config.json"
        for key in _SAME:
            if meta["config"][key] != ref["config"][key]:
                raise ValueError(f"soup ingredient {n!r}: {where} has {key}={meta['config'][key]!r} but "
                                 f"{names[0]!r} has {ref['config'][key]!r}; a soup needs one architecture, "
                                 "class list and split")
        if meta["classes"] != ref["classes"] or meta["mean"] != ref["mean"] or meta["std"] != ref["std"]:
            raise ValueError(f"soup ingredient {n!r}: {where} lists other classes or normalisation than "
                             f"{names[0]!r}")
    return metas


def run_soup(cfg: EnsembleConfig, comp: Competition, out: Path) -> dict[str, Any]:
    """Cook one soup per common fold, predict out of fold and on the test set, score and write them.

    Args:
        cfg: stage config (``soup``, ``soup_members``, ``device``, ``num_workers``).
        comp: the competition.
        out: the stage folder.

    Returns:
        ``{"mode", "ingredients", "folds", "kept", "oof", "test"?}`` (``kept``: per fold, the runs in the soup).
    """
    names = cfg.member_list("soup_members")
    folds = soup_folds(names)
    device = resolve_device(cfg.device)
    info = store.read_json(classifier_dir(names[0]) / "classes.json")
    classes, counts = info["classes"], info["counts"]
    split = pd.read_csv(classifier_dir(names[0]) / "folds.csv", dtype={"image": str, "label": str})
    for n in names[1:]:
        other = pd.read_csv(classifier_dir(n) / "folds.csv", dtype={"image": str, "label": str})
        if not split[["image", "fold"]].equals(other[["image", "fold"]]):
            raise ValueError(f"soup ingredient {n!r}: {classifier_dir(n) / 'folds.csv'} splits the images "
                             f"otherwise than {names[0]!r} (train the ingredients with one fold_seed)")
    class_index = {c: i for i, c in enumerate(classes)}
    first = classifier_dir(names[0]) / "metrics.json"  # the layout of the ingredients' own arrays
    k_top = int(store.read_json(first).get("prob_topk", 0)) if first.exists() else 0
    oof_rows, oof_label, oof_logits, test_logits, kept, steps = [], [], [], [], {}, []
    for k in folds:
        metas = check_ingredients(names, k)
        conf = metas[0]["config"]
        model = build_model(metas[0], pretrained="none")
        valid = split[split["fold"] == k].merge(comp.train[["image", "path"]], on="image", how="left")
        valid = valid[valid["label"].isin(class_index)]
        used_crops = metas[0]["used_crops"]
        files = image_paths(valid, names[0], "train", used_crops)
        test_files = image_paths(comp.test, names[0], "test", used_crops)
        y = np.array([class_index[c] for c in valid["label"]])
        args = dict(image_size=conf["image_size"], mean=metas[0]["mean"], std=metas[0]["std"],
                    batch_size=2 * conf["batch_size"], tta_flip=conf["tta_flip"], device=device,
                    num_workers=cfg.num_workers, amp=conf["amp"], amp_cpu=conf.get("amp_cpu", False),
                    channels_last=conf.get("channels_last", True))

        def logits_of(state: dict, image_files: list[str], desc: str, model=model, args=args, k_top=k_top,
                      tau=conf["la_posthoc_tau"]):
            model.load_state_dict(state)
            if k_top:  # the top-k of each batch, never the whole (N, C) logits
                return predict_topk(model, image_files, len(classes), k_top, counts, tau, desc, **args)
            return predict_logits(model, image_files, desc=desc, **args)

        def accuracy(state: dict, k=k, files=files, y=y, model=model, args=args) -> float:
            model.load_state_dict(state)
            pred = predict_logits(model, files, desc=f"soup fold {k}", reduce=lambda lg: lg.argmax(1), **args)
            return float(((np.concatenate(pred) if pred else np.zeros(0, np.int64)) == y).mean())

        states = [torch.load(fold_dir(n, k) / "model.pt", map_location="cpu", weights_only=True) for n in names]
        if cfg.soup == "greedy":
            soup, kept[k], table = ensemble.greedy_soup(states, accuracy, names)
        else:
            soup, kept[k] = ensemble.uniform_soup(states), list(names)
            own = [accuracy(s) for s in states]
            table = pd.DataFrame({"step": range(len(names)), "candidate": names, "candidate_score": own,
                                  "kept": True})
        steps.append(table.assign(fold=k))
        with store.atomic_path(out / "soup" / f"fold{k}.pt") as tmp:
            torch.save(soup, tmp)
        oof_rows += list(valid["image"])
        oof_label.append(y)
        oof_logits.append(logits_of(soup, files, f"soup fold {k} out-of-fold"))
        test_logits.append(logits_of(soup, test_files, f"soup fold {k} test"))
    tau = conf["la_posthoc_tau"]

    def probs(logits: np.ndarray) -> np.ndarray:
        if tau:  # as stage 05: post-hoc logit adjustment by the class prior
            logits = logit_adjust(logits, class_prior(np.maximum(counts, 1)).numpy(), tau)
        return torch.softmax(torch.from_numpy(np.asarray(logits, np.float32)), 1).numpy()

    label = np.concatenate(oof_label)
    if k_top:
        oof = topk.concat([p for p, _, _ in oof_logits], len(classes), k_top)
        test, test_at, _ = fold_mean(test_logits)
        store.save_arrays(out / "soup_oof.npz", oof_rows,
                          **topk.to_arrays(oof, np.concatenate([lg for _, lg, _ in oof_logits])), label=label)
        store.save_arrays(out / "soup_test.npz", list(comp.test["image"]), **topk.to_arrays(test, test_at))
    else:
        oof = probs(np.concatenate(oof_logits))
        test = np.mean([probs(t) for t in test_logits], axis=0).astype(np.float32)
        store.save_arrays(out / "soup_oof.npz", oof_rows, probs=oof, label=label)
        store.save_arrays(out / "soup_test.npz", list(comp.test["image"]), probs=test)
    store.write_csv(out / "soup_steps.csv", pd.concat(steps, ignore_index=True))

    res: dict[str, Any] = {"mode": cfg.soup, "ingredients": names, "folds": folds,
                           "kept": {str(k): v for k, v in kept.items()}, "oof": rounded_report(label, oof, len(classes))}
    truth = classify.truth_labels(comp, conf["label_column"])
    if truth is not None and len(test):
        labels = truth.reindex(comp.test["image"])
        scored = labels.notna().to_numpy() & labels.isin(class_index).to_numpy()
        if scored.any():
            res["test"] = rounded_report(np.array([class_index[c] for c in labels[scored]]), test[scored], len(classes))
    return res
