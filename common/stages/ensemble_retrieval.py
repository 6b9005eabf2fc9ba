"""Stage 06's retrieval side: concatenated embeddings of several runs, a classifier blend, other thresholds.

* Embeddings: the ``embed_members``' stage-03 outputs joined by :func:`common.lib.retrieval.concat_embeddings`
  (each part L2-normalised, then the whole), so one search scores the mean cosine similarity of the parts.
  Out of fold, query fold ``k`` uses the fold-``k`` models of every member (models that never saw it) against
  the other folds' images, as stage 04 does (``oof_new_share`` of the queries made unseen by hiding their
  individual); on the test set every fold of every member is joined, or, when every member was trained with
  ``full_fit``, each member's full-data model alone (:func:`answer_folds`). The members must share the fold split
  (``02_embedder/folds.csv``).
* Blend (``blend_ratio > 0``): :func:`common.lib.ensemble.blend_scores` of those scores with the classifier
  ensemble's probabilities, on the out-of-fold images both sides have. The classifier knows the individuals
  that were hidden from a fold's gallery, which no test image of an unseen individual allows, so out of fold a
  candidate that is not in the query's gallery is dropped after blending: the threshold is then tuned on the
  same situation the test set poses.
* Local features (``local_features: sift``): each query's neighbours re-ranked by SIFT matching as in stage 04
  (:mod:`common.stages.local_rerank`), on the first embed member's images, out of fold and on the test alike.
* ``new_individual`` threshold: ``global`` (:func:`common.lib.retrieval.tune_threshold`), ``species``
  (:func:`common.lib.postprocess.tune_species_thresholds`; a test image takes the species of its best candidate)
  or ``share`` (:func:`common.lib.postprocess.threshold_for_share` on the test scores).

Writes ``06_ensemble/retrieval_oof_scores.csv``, ``retrieval_oof_truth.csv``, ``retrieval_test_scores.csv``, ``threshold_sweep.csv`` and
``species_thresholds.csv`` (species mode).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.config import EnsembleConfig
from common.core import paths, store
from common.data.artefacts import load_fold_embeddings, read_folds
from common.data.competition import Competition
from common.lib import ensemble, metrics, postprocess, retrieval
from common.stages import local_rerank
from common.stages.local_rerank import Reranker
from common.stages.retrieve_submit import (
    fold_oof_scores,
    new_share_estimate,
    score_labelled,
    share_for_tuning,
    tune,
)


def embed_folds(names: list[str]) -> list[int]:
    """Folds whose train and test embeddings exist for every member; raises naming a member with none.

    Each file is looked for where :func:`common.core.paths.find_stage_dir` looks (``working/``, then the sources
    attached on Kaggle), so ``train.npz`` may come from a member's weights dataset and ``test.npz`` from the
    output of its stage-03 inference kernel.
    """
    found = {}
    for n in names:
        places = [p for p in paths.stage_candidates(n, "03") if p.is_dir()]
        folds = {int(p.name[4:]) for place in places for p in place.glob("fold*") if p.name[4:].isdigit()}
        found[n] = {k for k in folds if all(any((place / f"fold{k}" / f"{split}.npz").exists() for place in places)
                                            for split in ("train", "test"))}
        if not found[n]:
            raise FileNotFoundError(f"embed member {n!r}: no fold{{k}}/train.npz and test.npz under "
                                    f"{paths.stage_dir(n, '03')}; run stages 02-03 with exp={n} first"
                                    + paths.missing_hint(n, "03", "fold0/test.npz"))
    common = sorted(set.intersection(*found.values()))
    if not common:
        raise FileNotFoundError(f"embed members share no fold with embeddings: {found}")
    return common


def answer_folds(names: list[str], folds: list[int]) -> tuple[list[int], list[int]]:
    """The members' shared embedding folds split in two: the cross-validation folds, scored out of fold, and the
    models that answer the test. With stage 02's ``full_fit`` every member also has fold ``n_folds``, trained on
    every image (a fold that ``02_embedder/folds.csv`` does not list): it alone answers the test, as in stage 04.
    Otherwise the cross-validation folds answer it, joined.

    Raises:
        FileNotFoundError: when no cross-validation fold is shared (only the full models).
    """
    listed = set(read_folds(names[0])["fold"].astype(int))
    cv = [k for k in folds if k in listed]
    full = [k for k in folds if k not in listed]
    if not cv:
        raise FileNotFoundError(f"embed members {names}: only the full-data model's embeddings (fold {full}) are "
                                "shared; the threshold is tuned out of fold, so the folds' embeddings are needed too")
    return cv, full or cv


def shared_split(names: list[str]) -> pd.DataFrame:
    """The first member's ``02_embedder/folds.csv``, checked to equal every other member's."""
    ref = read_folds(names[0])
    for n in names[1:]:
        other = read_folds(n)
        if not ref[["image", "fold"]].equals(other[["image", "fold"]]):
            raise ValueError(f"embed member {n!r}: {paths.stage_dir(n, '02') / 'folds.csv'} splits the images "
                             f"otherwise than {names[0]!r}; concatenated out-of-fold embeddings need one split "
                             "(train the members with one fold_seed)")
    return ref


def joined(names: list[str], folds: list[int], split: str, images: pd.Series) -> np.ndarray:
    """Every member's embeddings of ``folds`` for ``images``, concatenated and re-normalised."""
    return retrieval.concat_embeddings([load_fold_embeddings(n, k, split, images) for n in names for k in folds])


def oof_scores(cfg: EnsembleConfig, comp: Competition, names: list[str], folds: list[int],
               rerank: Reranker | None = None) -> tuple[pd.DataFrame, pd.Series, dict[str, set[str]]]:
    """Out-of-fold ``image, individual_id, score``, the truth, and each query's gallery individuals (``rerank``:
    local-feature re-ranking of each fold's neighbours, as in stage 04)."""
    table = shared_split(names)
    tables, truths, gallery = [], [], {}
    for k in folds:
        emb = joined(names, [k], "train", comp.train["image"])
        scores, truth, known = fold_oof_scores(cfg, emb, comp.train["image"], table, k, rerank)
        tables.append(scores)
        truths.append(truth)
        gallery.update({str(i): known for i in table.loc[table["fold"] == k, "image"]})
    return pd.concat(tables, ignore_index=True), pd.concat(truths), gallery


def test_scores(cfg: EnsembleConfig, comp: Competition, names: list[str], folds: list[int],
                rerank: Reranker | None = None) -> pd.DataFrame:
    """Test ``image, individual_id, score`` against every training image, all folds and members joined
    (``rerank``: as in :func:`oof_scores`)."""
    gallery = joined(names, folds, "train", comp.train["image"])
    queries = joined(names, folds, "test", comp.test["image"])
    scores, idx = retrieval.search(gallery, queries, k=cfg.knn_k)
    if rerank is not None:
        scores, idx = rerank(scores, idx, comp.test["image"].astype(str).to_numpy(),
                             comp.train["image"].astype(str).to_numpy(), "test")
    return retrieval.individual_scores(scores, idx, comp.train["individual_id"].to_numpy(), comp.test["image"])


def _kind(cfg: EnsembleConfig) -> str:
    """``blend_scores``' kind: probabilities, or cosines already divided by ``arc_s`` (logits of scale 1)."""
    return "logit" if cfg.blend_on == "cosine" else "prob"


def blend_oof(cfg: EnsembleConfig, oof: pd.DataFrame, truth: pd.Series, gallery: dict[str, set[str]],
              ens: dict) -> tuple[pd.DataFrame, pd.Series]:
    """The blended out-of-fold table on the images both sides scored, without out-of-gallery candidates."""
    common = sorted(set(oof["image"].astype(str)) & set(ens["oof_images"]))
    if not common:
        raise ValueError("blend_ratio > 0: the classifier members and the embed members share no out-of-fold "
                         "image; train them on the same folds (n_folds, seed, folds)")
    pos = {img: i for i, img in enumerate(ens["oof_images"])}
    probs = ens["oof_blend"][[pos[i] for i in common]]
    table = oof[oof["image"].astype(str).isin(set(common))]
    blended = ensemble.blend_scores(table, probs, common, ens["classes"], cfg.blend_ratio, kind=_kind(cfg))
    keep = [ind in gallery[img] for img, ind in zip(blended["image"], blended["individual_id"], strict=True)]
    return blended[keep].reset_index(drop=True), truth[common]


def run_retrieval_ensemble(cfg: EnsembleConfig, comp: Competition, ens: dict | None, out: Path,
                           stored: dict[str, Any] | None = None) -> tuple[dict[str, Any], pd.DataFrame]:
    """Scores, blend, threshold and submission of the retrieval side; returns ``(metrics, submission)``.

    Args:
        cfg: stage config.
        comp: the competition.
        ens: the classifier ensemble (:func:`common.stages.ensemble_postprocess.classifier_ensemble`), needed to blend.
        out: the stage folder.
        stored: ``inference_only``: the ``"retrieval"`` metrics of the full run, whose thresholds are used
            (nothing is scored out of fold); ``None``: tune them.
    """
    names = cfg.member_list("embed_members")
    folds, answer = answer_folds(names, embed_folds(names))
    # local-feature re-ranking (local_features: sift) on the images the first embed member embedded
    reranker, local = local_rerank.make_reranker(cfg, comp, folds, images_exp=names[0]), {}
    if stored is not None:
        return infer_retrieval_ensemble(cfg, comp, ens, out, stored, answer, reranker)
    if reranker is not None:
        local, _ = local_rerank.set_weight(cfg, reranker, oof=lambda r: oof_scores(cfg, comp, names, folds, r)[:2])
    oof, truth, gallery = oof_scores(cfg, comp, names, folds, reranker)
    test = blend_test(cfg, comp, test_scores(cfg, comp, names, answer, reranker), ens)
    if cfg.blend_ratio > 0:
        oof, truth = blend_oof(cfg, oof, truth, gallery, ens)
    grid = np.round(np.arange(cfg.threshold_min, cfg.threshold_max + 1e-9, cfg.threshold_step), 6)
    # the global threshold as stage 04 tunes it: for the test's share of new individuals (given, estimated, or
    # the minimax threshold), never below new_individual first for every image
    shares = new_share_estimate(oof, truth, test, cfg.new_label)
    share, source = share_for_tuning(cfg, shares)
    best, sweep = tune(cfg, oof, truth, share, minimax=source == "minimax")
    images = list(comp.test["image"].astype(str))
    res: dict[str, Any] = {"embed_members": names, "folds": folds, "test_folds": answer,
                           "blend_ratio": cfg.blend_ratio, "threshold_mode": cfg.threshold_mode, "oof_map5_global": float(sweep["map5"].max()),
                           **shares, "tuned_for_new_share": share, "tuned_for_new_share_source": source, **local}
    if reranker is not None:
        res.update(local_rerank.save_pairs(cfg, reranker))
    if cfg.threshold_mode == "species":
        species = comp.train.set_index("image")["species"]
        per, best, summary = postprocess.tune_species_thresholds(oof, truth, species, grid,
                                                                 cfg.species_min_queries, new_label=cfg.new_label)
        store.write_csv(out / "species_thresholds.csv", summary)
        individual_species = comp.train.drop_duplicates("individual_id").set_index("individual_id")["species"]
        sub = postprocess.predict_by_species(test, postprocess.candidate_species(test, individual_species), per,
                                             best, new_label=cfg.new_label, images=images)[["image", "predictions"]]
        oof_pred = postprocess.predict_by_species(oof, species, per, best, new_label=cfg.new_label,
                                                  images=list(truth.index))
        res.update(threshold=best, species_thresholds=per)
    else:
        thr = best
        if cfg.threshold_mode == "share":
            thr, achieved = postprocess.threshold_for_share(test, cfg.new_share, images)
            res["target_share"] = cfg.new_share
        sub = retrieval.predict(test, thr, new_label=cfg.new_label, images=images)
        oof_pred = retrieval.predict(oof, thr, new_label=cfg.new_label, images=list(truth.index))
        res["threshold"] = float(thr)
    res["oof_map5"] = metrics.map_at_k(truth.tolist(), oof_pred["predictions"].str.split().tolist())
    res.update(test_report(cfg, comp, sub, test))
    store.write_csv(out / "retrieval_oof_scores.csv", oof)
    store.write_csv(out / "retrieval_oof_truth.csv",
                    truth.rename_axis("image").rename("individual_id").reset_index())
    store.write_csv(out / "retrieval_test_scores.csv", test)
    store.write_csv(out / "threshold_sweep.csv", sweep)
    return res, sub


def blend_test(cfg: EnsembleConfig, comp: Competition, test: pd.DataFrame, ens: dict | None) -> pd.DataFrame:
    """The test scores blended with the classifier ensemble (``blend_ratio > 0``), else as they are."""
    if cfg.blend_ratio <= 0:
        return test
    if ens["label_column"] != "individual_id":
        raise ValueError(f"blend_ratio > 0: the classifier members classify {ens['label_column']!r}, not "
                         "individual_id; their classes cannot be blended with individuals")
    return ensemble.blend_scores(test, ens["test_blend"], list(comp.test["image"]), ens["classes"],
                                 cfg.blend_ratio, kind=_kind(cfg))


def test_report(cfg: EnsembleConfig, comp: Competition, sub: pd.DataFrame, test: pd.DataFrame | None = None
                ) -> dict[str, Any]:
    """Share of test images answered ``new_label`` first and, when ``test.csv`` gives the truth (all of the test
    or part), what stage 04 reports (:func:`common.stages.retrieve_submit.score_labelled`): MAP@5 overall, known
    and new; with the test's scores ``test``, also the best threshold on the test itself and the known images'
    MAP@5 from the ranking alone."""
    res: dict[str, Any] = {"new_share": float((sub["predictions"].str.split().str[0] == cfg.new_label).mean())}
    if comp.truth is not None:
        rep = score_labelled(cfg, comp, sub, test)
        res.update({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rep.items()})
    return res


def infer_retrieval_ensemble(cfg: EnsembleConfig, comp: Competition, ens: dict | None, out: Path,
                             stored: dict[str, Any], folds: list[int], reranker: Reranker | None = None
                             ) -> tuple[dict[str, Any], pd.DataFrame]:
    """``inference_only``: the test search and blend of :func:`run_retrieval_ensemble` with the full run's
    thresholds and local weight (``share`` mode recomputes its threshold from the test scores, as the full run
    did); ``folds`` are the models that answer the test (:func:`answer_folds`)."""
    names = cfg.member_list("embed_members")
    local = {}
    if reranker is not None:
        local, _ = local_rerank.set_weight(cfg, reranker, stored=lambda: (
            stored.get("local_weight"), stored.get("where", "the full stage-06 run's metrics.json")))
    test = blend_test(cfg, comp, test_scores(cfg, comp, names, folds, reranker), ens)
    images = list(comp.test["image"].astype(str))
    res: dict[str, Any] = {"embed_members": names, "test_folds": folds, "blend_ratio": cfg.blend_ratio,
                           "threshold_mode": cfg.threshold_mode, "inference_only": True,
                           "oof_map5": stored.get("oof_map5"), **local}  # the full run's, for reference
    if reranker is not None:
        res.update(local_rerank.save_pairs(cfg, reranker))
    if cfg.threshold_mode == "species":
        per, best = {str(k): float(v) for k, v in stored["species_thresholds"].items()}, float(stored["threshold"])
        individual_species = comp.train.drop_duplicates("individual_id").set_index("individual_id")["species"]
        sub = postprocess.predict_by_species(test, postprocess.candidate_species(test, individual_species), per,
                                             best, new_label=cfg.new_label, images=images)[["image", "predictions"]]
        res.update(threshold=best, species_thresholds=per)
    else:
        thr = float(stored["threshold"])
        if cfg.threshold_mode == "share":
            thr, _ = postprocess.threshold_for_share(test, cfg.new_share, images)
            res["target_share"] = cfg.new_share
        sub = retrieval.predict(test, thr, new_label=cfg.new_label, images=images)
        res["threshold"] = float(thr)
    res.update(test_report(cfg, comp, sub, test))
    store.write_csv(out / "retrieval_test_scores.csv", test)
    return res, sub


def plot_sweep(exp: str, result: dict[str, Any]):
    """The out-of-fold threshold sweep of the retrieval side with the chosen threshold, or ``None``."""
    from common.lib import plots

    path = paths.stage_dir(exp, "06") / "threshold_sweep.csv"
    if "retrieval" not in result or not path.exists():
        return None
    return plots.plot_threshold_sweep(pd.read_csv(path), result["retrieval"]["threshold"])
