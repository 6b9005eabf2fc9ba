"""Stage 04: out-of-fold threshold tuning, test retrieval, the submission CSV and ``metrics.json``.

Out of fold: for fold ``k``, fold ``k``'s model embeds everything; the gallery is the training part
(folds != k) and the queries are fold ``k``'s images. A query whose individual is absent from the gallery is
a ``new_individual`` by construction. The individuals stage 02 left out of fold ``k``'s training (the fold
table's ``new_fold``) are also left out of its gallery, so they are strangers to the model as well, as the
test's new individuals are. The threshold maximises out-of-fold MAP@5 re-weighted to the test's share of new
individuals: ``test_new_share`` when given, else (``share_policy: estimate``, the default) that share estimated
from the test's own top-1 scores against the out-of-fold known and new score distributions when the estimate is
usable, else it minimises the worst loss over test shares 0.1-0.9 (``minimax``). It is never one that scores
below ``new_individual`` first for every image; ``metrics.json`` reports both, the estimated share beside the
out-of-fold share and how the threshold was tuned, and, when
``test.csv`` labels test images (all or some), the test MAP@5 on those and the best threshold on the test
itself (how well the out-of-fold threshold transfers).

Test: the gallery is every training image, the queries the test images. With ``fold_merge=mean`` each fold
scores the test images on its own and the per-individual scores are averaged; with ``concat`` the fold
embeddings are concatenated (and re-normalised) and searched once.

Files: ``04_retrieval/oof_scores.csv`` and ``test_scores.csv`` (``image, individual_id, score``),
``threshold_sweep.csv``, ``predictions.csv``; ``submissions/<exp>.csv``; ``working/<exp>/metrics.json``. On
Kaggle the submission is also written to ``/kaggle/working/submission.csv``, the file a competition scores.

With ``inference_only`` nothing is tuned: the threshold (and its sweep) stored by an earlier full run of the
experiment is used, read wherever :func:`common.core.paths.find_stage_dir` finds ``<exp>/04_retrieval`` (this run's
``working/``, else an attached Kaggle dataset), and only the test images are searched.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import EnsembleConfig, RetrievalConfig
from common.core import paths, store
from common.data.artefacts import load_fold_embeddings, read_folds
from common.data.competition import Competition
from common.data.fingerprint import stage_fingerprint
from common.lib import metrics, openset, retrieval
from common.stages import local_rerank
from common.stages.local_rerank import Reranker


@dataclasses.dataclass
class RetrievalResult:
    """Everything stage 04 computes; the notebook shows it piece by piece."""

    oof_scores: pd.DataFrame
    oof_truth: pd.Series
    sweep: pd.DataFrame
    threshold: float
    test_scores: pd.DataFrame
    submission: pd.DataFrame
    metrics: dict


def available_folds(cfg: RetrievalConfig) -> list[int]:
    """Requested folds whose embeddings exist; raises if none do."""
    folds = []
    for k in cfg.fold_list():
        try:
            paths.find_stage_dir(cfg.exp, "03", f"fold{k}/test.npz")
            folds.append(k)
        except paths.MissingStageError:
            continue
    if not folds:
        raise FileNotFoundError(f"no embeddings under {paths.stage_dir(cfg.exp, '03')}: run stage 03 first"
                                + paths.missing_hint(cfg.exp, "03", f"fold{cfg.fold_list()[0]}/test.npz"))
    return folds


def test_folds(cfg: RetrievalConfig, folds: list[int]) -> list[int]:
    """The models whose embeddings answer the test: the full model alone with ``full_fit`` (its embeddings must
    exist), else ``folds``. The threshold is tuned out of fold on ``folds`` either way."""
    if not cfg.full_fit:
        return folds
    paths.find_stage_dir(cfg.exp, "03", f"fold{cfg.n_folds}/test.npz",
                         hint=f"full_fit=true: the full model's embeddings (fold{cfg.n_folds}) are missing; run "
                              "stages 02 and 03 with full_fit=true")
    return [cfg.n_folds]


def oof_scores(cfg: RetrievalConfig, comp: Competition, folds: list[int], rerank: Reranker | None = None
               ) -> tuple[pd.DataFrame, pd.Series]:
    """Per-individual out-of-fold scores and the truth (``new_label`` for individuals unseen in training);
    ``rerank`` re-scores each fold's neighbours (local features) before they are grouped by individual."""
    table = read_folds(cfg.exp)
    tables, truths = [], []
    for k in folds:
        emb = load_fold_embeddings(cfg.exp, k, "train", comp.train["image"])
        scores, truth, _ = fold_oof_scores(cfg, emb, comp.train["image"], table, k, rerank)
        tables.append(scores)
        truths.append(truth)
    return pd.concat(tables, ignore_index=True), pd.concat(truths)


def fold_oof_scores(cfg: RetrievalConfig | EnsembleConfig, emb: np.ndarray, images: pd.Series,
                    table: pd.DataFrame, fold: int, rerank: Reranker | None = None
                    ) -> tuple[pd.DataFrame, pd.Series, set[str]]:
    """One fold's out-of-fold retrieval: its images query the other folds' images, with a seeded share of
    individuals hidden from the gallery (:func:`hide_individuals`). Shared by stages 04 and 06.

    Args:
        cfg: a config with ``oof_new_share``, ``seed`` (and ``fold_seed`` in stage 04), ``knn_k`` and ``new_label``.
        emb: embeddings of every training image, rows in ``images`` order.
        images: the training image ids of ``emb``'s rows.
        table: the fold table (``image, individual_id, fold``).
        fold: the fold whose images are the queries.
        rerank: re-scores the neighbours (:class:`common.stages.local_rerank.Reranker`); ``None``: as searched.

    Returns:
        Per-individual scores (``image, individual_id, score``), the truth per query image (``new_label`` for
        individuals absent from the gallery) and the gallery's individuals.
    """
    row = pd.Series(np.arange(len(images)), index=images)
    fit, valid = table[table["fold"] != fold], table[table["fold"] == fold]
    if "new_fold" in table.columns and (table["new_fold"] >= 0).any():
        # stage 02 left these out of the fold's training: strangers to its model
        hidden = set(table.loc[table["new_fold"] == fold, "individual_id"].astype(str))
    else:  # every individual was trained on (stage 02's oof_new_share=0, or an older fold table): hide some here
        hidden = hide_individuals(valid["individual_id"], fit["individual_id"], cfg.oof_new_share,
                                  cfg.split_seed() + fold)
    if getattr(cfg, "oof_gallery", "fold") == "all":  # every other training image, the query itself left out
        gallery = table[~table["individual_id"].isin(hidden)]
        scores, idx = leave_self_out(emb[row[gallery["image"]].to_numpy()], emb[row[valid["image"]].to_numpy()],
                                     gallery["image"].astype(str).to_numpy(), valid["image"].astype(str).to_numpy(),
                                     cfg.knn_k)
        others = gallery["individual_id"].astype(str).value_counts()
        ids = valid["individual_id"].astype(str)
        in_gallery = ~ids.isin(hidden)
        has_other = ids.map(others).fillna(0).to_numpy() - in_gallery.to_numpy() > 0
        truth = pd.Series(np.where(has_other, ids, cfg.new_label), index=valid["image"].astype(str).to_numpy())
    else:
        gallery = fit[~fit["individual_id"].isin(hidden)]
        scores, idx = retrieval.search(emb[row[gallery["image"]].to_numpy()], emb[row[valid["image"]].to_numpy()],
                                       k=cfg.knn_k)
        truth = pd.Series(retrieval.oof_truth(valid["individual_id"], gallery["individual_id"], cfg.new_label),
                          index=valid["image"].astype(str).to_numpy())
    if rerank is not None:
        scores, idx = rerank(scores, idx, valid["image"].astype(str).to_numpy(),
                             gallery["image"].astype(str).to_numpy(), "train")
    table_k = retrieval.individual_scores(scores, idx, gallery["individual_id"].to_numpy(), valid["image"])
    return table_k, truth, set(gallery["individual_id"].astype(str))


def leave_self_out(gallery: np.ndarray, queries: np.ndarray, gallery_ids: np.ndarray, query_ids: np.ndarray,
                   k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`retrieval.search` of ``queries`` some of which are gallery rows themselves: each query's own row
    (same image id) is dropped from its neighbours; a query not in the gallery drops its last neighbour, so every
    row keeps the same number (``k``, or the gallery size - 1 when smaller).

    Args:
        gallery: ``(n_gallery, d)`` normalised embeddings.
        queries: ``(n_queries, d)`` normalised embeddings.
        gallery_ids: image id of each gallery row.
        query_ids: image id of each query row.
        k: neighbours wanted per query.
    """
    scores, idx = retrieval.search(gallery, queries, k=k + 1)
    is_self = (idx >= 0) & (gallery_ids[np.clip(idx, 0, None)] == query_ids[:, None])
    keep = ~is_self
    keep[~is_self.any(axis=1), -1] = False
    width = idx.shape[1] - 1
    return scores[keep].reshape(len(idx), width), idx[keep].reshape(len(idx), width)


def hide_individuals(valid_ids: pd.Series, gallery_ids: pd.Series, share: float, seed: int) -> set[str]:
    """Individuals to remove from an out-of-fold gallery so that about ``share`` of the queries are new.

    Stratified folds put most individuals in every fold's training part, so without this the out-of-fold
    queries hold few or no unseen individuals and the ``new_individual`` threshold cannot be tuned. Individuals
    of the validation fold are hidden in a seeded random order until the images of unseen individuals (those
    hidden plus those naturally absent from the gallery) reach ``share`` of the queries.

    Args:
        valid_ids: individual of each query image.
        gallery_ids: individual of each gallery image.
        share: target share of query images whose individual is not in the gallery (0 hides nobody).
        seed: seed of the order.

    Returns:
        The hidden individual ids.
    """
    valid_ids = valid_ids.astype(str)
    counts = valid_ids.value_counts()
    in_gallery = set(gallery_ids.astype(str))
    unseen = int(counts[[i for i in counts.index if i not in in_gallery]].sum())
    target = share * len(valid_ids)
    candidates = sorted(i for i in counts.index if i in in_gallery)
    order = np.random.default_rng(seed).permutation(len(candidates))
    hidden: set[str] = set()
    for j in order:
        if unseen >= target:
            break
        hidden.add(candidates[j])
        unseen += int(counts[candidates[j]])
    return hidden


ALL_NEW = 2.0  # above every cosine score: new_individual first for every image


def tune(cfg: RetrievalConfig | EnsembleConfig, scores: pd.DataFrame, truth: pd.Series, share: float | None = None,
         minimax: bool = False) -> tuple[float, pd.DataFrame]:
    """The sweep over thresholds; the tuned threshold, or ``new_threshold`` when it is fixed (>= 0).

    The sweep ends with the row ``threshold = 2`` (:data:`ALL_NEW`: ``new_individual`` first for every image).
    Its ``objective`` column is MAP@5 out of fold; or, with a share of new test queries (``share``, else
    ``test_new_share`` when >= 0), MAP@5 re-weighted to that share (:func:`common.lib.openset.share_sweep`); or,
    with ``minimax``, minus the worst loss over test shares 0.1-0.9 (:func:`common.lib.openset.max_regret`). The
    tuned threshold maximises it (ties: the lowest), and is never one that scores below the
    all-``new_individual`` row: then that row is chosen.
    """
    if share is None or not math.isfinite(share):
        share = cfg.test_new_share if cfg.test_new_share >= 0 else None
    grid = np.round(np.arange(cfg.threshold_min, cfg.threshold_max + 1e-9, cfg.threshold_step), 6)
    _, sweep = retrieval.tune_threshold(scores, truth, [*grid, ALL_NEW])
    if minimax and share is None:
        sweep["objective"] = -openset.max_regret(sweep)
    else:
        sweep["objective"] = sweep["map5"] if share is None else openset.share_sweep(sweep, share)
    best = float(sweep["threshold"].iloc[int(np.argmax(sweep["objective"].to_numpy()))])  # ties: the lowest
    fixed = getattr(cfg, "new_threshold", -1.0)  # stage 04's; stage 06 always tunes
    return (best if fixed < 0 else fixed), sweep


def stored_threshold(cfg: RetrievalConfig) -> tuple[float, pd.DataFrame]:
    """The threshold and sweep of an earlier full run of ``cfg.exp`` (``new_threshold`` wins when >= 0).

    Raises:
        FileNotFoundError: no ``<exp>/04_retrieval/threshold_sweep.csv`` in ``working/`` or any attached
            Kaggle source; the message says what to attach.
    """
    folder = paths.find_stage_dir(cfg.exp, "04", "threshold_sweep.csv",
                                  hint="inference_only needs a full stage-04 run of this experiment first")
    sweep = pd.read_csv(folder / "threshold_sweep.csv")
    tuned = store.read_json(folder / "metrics.json")["threshold"]
    return (float(tuned) if cfg.new_threshold < 0 else cfg.new_threshold), sweep


def write_submission(exp: str, submission: pd.DataFrame) -> list[Path]:
    """Write ``submissions/<exp>.csv`` and, on Kaggle, also ``/kaggle/working/submission.csv``."""
    written = [store.write_csv(paths.submission_path(exp), submission)]
    if paths.on_kaggle():
        written.append(store.write_csv(paths.working_dir() / "submission.csv", submission))
    return written


def test_scores(cfg: RetrievalConfig, comp: Competition, folds: list[int], rerank: Reranker | None = None
                ) -> pd.DataFrame:
    """Per-individual scores of every test image against the whole training gallery (``rerank``: as in
    :func:`oof_scores`)."""
    labels = comp.train["individual_id"].to_numpy()

    def search(gallery: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found = retrieval.search(gallery, queries, k=cfg.knn_k)
        if rerank is None:
            return found
        return rerank(*found, comp.test["image"].astype(str).to_numpy(), comp.train["image"].astype(str).to_numpy(),
                      "test")

    train = [load_fold_embeddings(cfg.exp, k, "train", comp.train["image"]) for k in folds]
    test = [load_fold_embeddings(cfg.exp, k, "test", comp.test["image"]) for k in folds]
    if cfg.fold_merge == "concat" or len(folds) == 1:
        gallery, queries = retrieval.concat_embeddings(train), retrieval.concat_embeddings(test)
        scores, idx = search(gallery, queries)
        return retrieval.individual_scores(scores, idx, labels, comp.test["image"])
    neighbours = [search(g, q) for g, q in zip(train, test, strict=True)]
    return average_fold_scores(neighbours, labels, comp.test["image"])


SCORE_CHUNK = 8192  # query images per block of per-fold score tables (bounds memory at folds x chunk x k rows)


def average_fold_scores(neighbours: list[tuple[np.ndarray, np.ndarray]], labels: np.ndarray, images: pd.Series,
                        chunk: int | None = None) -> pd.DataFrame:
    """:func:`retrieval.average_scores` of every fold's :func:`retrieval.individual_scores`, built ``chunk``
    query images at a time: the same table as building all folds' tables at once (each image's rows depend on
    that image's neighbours only), but the per-fold pandas tables never hold more than ``chunk`` images, instead
    of folds x queries x k rows (14 M rows for 5 folds, 28k test images and k = 100).

    Args:
        neighbours: ``(scores, indices)`` of :func:`retrieval.search`, one pair per fold, rows in ``images`` order.
        labels: the individual of every gallery row.
        images: the query image ids.
        chunk: images per block (default :data:`SCORE_CHUNK`).
    """
    chunk = chunk or SCORE_CHUNK
    images = pd.Series(images).reset_index(drop=True)
    parts = []
    for a in range(0, len(images), chunk):
        rows = slice(a, a + chunk)
        tables = [retrieval.individual_scores(s[rows], i[rows], labels, images[rows]) for s, i in neighbours]
        parts.append(retrieval.average_scores(tables))
    if len(parts) == 1:
        return parts[0]
    out = pd.concat(parts, ignore_index=True)
    return out.sort_values(["image", "score", "individual_id"], ascending=[True, False, True], ignore_index=True)


def score(cfg: RetrievalConfig, comp: Competition, submission: pd.DataFrame, threshold: float,
          sweep: pd.DataFrame, folds: list[int] | None = None, test_table: pd.DataFrame | None = None,
          answered_by: list[int] | None = None) -> dict:
    """``metrics.json``: threshold, share of ``new_individual`` answers, OOF MAP@5 beside the all-``new_individual``
    answer's, and, when ``test.csv`` labels test images, test MAP@5 on those (:func:`score_labelled`).

    ``folds`` are the folds actually used (:func:`available_folds`); default: the requested ones.
    ``answered_by``: the models that answered the test (:func:`test_folds`); default: computed from ``folds``.
    """
    folds = cfg.fold_list() if folds is None else list(folds)
    first = submission["predictions"].str.split().str[0]
    best_row = sweep.iloc[(sweep["threshold"] - threshold).abs().argmin()]
    all_new = sweep[sweep["threshold"] >= ALL_NEW]
    out = {
        "exp": cfg.exp,
        "threshold": float(threshold),
        "threshold_tuned": cfg.new_threshold < 0,
        "new_share": float((first == cfg.new_label).mean()),
        "oof_map5": float(best_row["map5"]),
        "folds": folds,
        "test_folds": test_folds(cfg, folds) if answered_by is None else list(answered_by),
        "fold_merge": cfg.fold_merge,
        "n_test": len(submission),
    }
    if len(all_new):
        out["oof_map5_all_new"] = float(all_new["map5"].iloc[0])  # new_individual first for every image
        out["all_new_chosen"] = bool(threshold >= ALL_NEW)
    if "objective" in sweep and cfg.test_new_share >= 0:
        out["test_new_share_given"] = cfg.test_new_share
    if "objective" in sweep and not sweep["objective"].equals(sweep["map5"]):
        out["oof_objective"] = float(best_row["objective"])
        if len(all_new):
            out["oof_objective_all_new"] = float(all_new["objective"].iloc[0])
    if comp.truth is not None:
        out.update(score_labelled(cfg, comp, submission, test_table))
    return _json_safe(out)


def _json_safe(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def score_labelled(cfg: RetrievalConfig, comp: Competition, submission: pd.DataFrame,
                   test_table: pd.DataFrame | None = None) -> dict:
    """Test MAP@5 (overall, known, new) on the test images that ``test.csv`` labels, which may be only part of
    the test set; with the test's scores, also the best threshold chosen on the test itself (a measurement of
    how well the out-of-fold threshold transfers: ``test_best_threshold``, ``test_map5_best``), and the known
    images' MAP@5 from the ranking alone, ``new_individual`` never answered (``test_map5_known_ranking``: how
    well the embeddings find known individuals, apart from the threshold; ``map5_known`` is at most this).

    Args:
        cfg: the stage's config (``new_label``, threshold grid).
        comp: the competition; ``comp.truth`` must not be ``None``.
        submission: ``image, predictions``.
        test_table: the test's ``image, individual_id, score`` table, or ``None``.
    """
    truth = comp.truth.assign(image=comp.truth["image"].astype(str)).drop_duplicates("image")
    truth = truth[truth["image"].isin(set(submission["image"].astype(str)))]
    labelled = submission[submission["image"].astype(str).isin(set(truth["image"]))]
    labels = truth.set_index("image")["individual_id"].astype(str).reindex(labelled["image"].astype(str))
    report = metrics.map5_report(labels.tolist(), labelled["predictions"].str.split().tolist(),
                                 comp.known_individuals, cfg.new_label)
    out = {**report, "n_labelled": len(labelled), "n_unlabelled": len(submission) - len(labelled)}
    if test_table is not None and len(labelled):
        known = {str(x) for x in comp.known_individuals}
        mapped = {i: (t if t in known else cfg.new_label) for i, t in labels.items()}
        grid = np.round(np.arange(cfg.threshold_min, cfg.threshold_max + 1e-9, cfg.threshold_step), 6)
        part = test_table[test_table["image"].astype(str).isin(mapped)]
        best, sweep = retrieval.tune_threshold(part, mapped, [*grid, ALL_NEW])
        out.update({"test_best_threshold": best, "test_map5_best": float(sweep["map5"].max()),
                    "test_map5_all_new": float(sweep["map5"].iloc[-1])})
        if any(t != cfg.new_label for t in mapped.values()):
            out["test_map5_known_ranking"] = retrieval.known_ranking_map5(part, mapped, cfg.new_label)
    return out


def new_share_estimate(oof: pd.DataFrame, truth: pd.Series, test: pd.DataFrame, new_label: str) -> dict:
    """The test's share of new individuals estimated from its top-1 scores
    (:func:`common.lib.openset.estimate_new_share`), beside the out-of-fold share, with how well the out-of-fold
    top-1 scores separate known from new queries (``oof_known_new_auc``: 0.5 is chance) and whether the estimate
    is usable (:func:`common.lib.openset.estimate_reliable`)."""
    images = truth.index.astype(str)
    top = openset.top1_scores(oof, images)
    is_new = (truth.astype(str) == new_label).to_numpy()
    test_top = openset.top1_scores(test, test["image"].unique())
    estimate = openset.estimate_new_share(top[~is_new], top[is_new], test_top)
    auc = openset.separation(top[~is_new], top[is_new])
    return _json_safe({"oof_true_new_share": float(is_new.mean()) if len(is_new) else float("nan"),
                       "test_new_share_estimate": estimate, "oof_known_new_auc": auc,
                       "estimate_reliable": openset.estimate_reliable(int((~is_new).sum()), int(is_new.sum()),
                                                                      len(test_top), auc)})


def share_for_tuning(cfg: RetrievalConfig | EnsembleConfig, shares: dict) -> tuple[float | None, str]:
    """The share of new test queries the threshold is tuned for, and how it was chosen: ``given``
    (``test_new_share >= 0``); ``estimated`` (``share_policy: estimate`` and a usable estimate from the test's own
    top-1 scores, :func:`new_share_estimate` and :func:`common.lib.openset.estimate_reliable`); ``minimax``
    (``None``: no share, the threshold with the smallest worst-case loss over shares 0.1-0.9; ``share_policy:
    minimax``, or ``estimate`` without a usable estimate); ``oof`` (``None``: the out-of-fold share as it is).
    """
    if cfg.test_new_share >= 0:
        return cfg.test_new_share, "given"
    if cfg.share_policy == "oof":
        return None, "oof"
    estimate = shares.get("test_new_share_estimate")
    if (cfg.share_policy == "estimate" and shares.get("estimate_reliable") and estimate is not None
            and math.isfinite(estimate)):
        return float(estimate), "estimated"
    return None, "minimax"


def stored_local_weight(cfg: RetrievalConfig) -> tuple[float | None, str]:
    """``inference_only``: the local weight the experiment's full stage-04 run stored, and the file it is read from."""
    folder = paths.find_stage_dir(cfg.exp, "04", "metrics.json",
                                  hint="inference_only with local_weight < 0 needs a full stage-04 run first")
    return store.read_json(folder / "metrics.json").get("local_weight"), str(folder / "metrics.json")


def run_retrieval(cfg: RetrievalConfig, comp: Competition) -> RetrievalResult:
    """The whole stage: OOF scores -> threshold -> test scores -> submission -> metrics, all written out."""
    folds = available_folds(cfg)
    out = paths.stage_dir(cfg.exp, "04")
    reranker, local, chosen_oof = local_rerank.make_reranker(cfg, comp, folds), {}, None
    if reranker is not None:
        local, chosen_oof = local_rerank.set_weight(cfg, reranker, oof=lambda r: oof_scores(cfg, comp, folds, r),
                                                    stored=lambda: stored_local_weight(cfg))
    answered_by = test_folds(cfg, folds)
    test = test_scores(cfg, comp, answered_by, reranker)
    if cfg.inference_only:
        threshold, sweep = stored_threshold(cfg)
        oof, truth = pd.DataFrame(columns=["image", "individual_id", "score"]), pd.Series(dtype=str)
    else:
        oof, truth = chosen_oof or oof_scores(cfg, comp, folds, reranker)
        shares = new_share_estimate(oof, truth, test, cfg.new_label)
        share, source = share_for_tuning(cfg, shares)
        threshold, sweep = tune(cfg, oof, truth, share, minimax=source == "minimax")
    submission = retrieval.predict(test, threshold, k=5, new_label=cfg.new_label, images=comp.test["image"])
    if reranker is not None:
        local.update(local_rerank.save_pairs(cfg, reranker))
    result_metrics = {**score(cfg, comp, submission, threshold, sweep, folds, test, answered_by), **local}
    if not cfg.inference_only:
        result_metrics.update({**shares, "tuned_for_new_share": share, "tuned_for_new_share_source": source})
        result_metrics = _json_safe(result_metrics)
        store.write_csv(out / "oof_scores.csv", oof)
        store.write_csv(out / "oof_truth.csv", truth.rename_axis("image").rename("individual_id").reset_index())
    store.write_csv(out / "threshold_sweep.csv", sweep)
    store.write_csv(out / "test_scores.csv", test)
    write_submission(cfg.exp, submission)
    store.write_json(out / "metrics.json", result_metrics)
    # Keep other stages' keys (stage 05 writes "classifier"); stage 04's own keys are replaced.
    store.update_json(paths.exp_dir(cfg.exp) / "metrics.json", result_metrics)
    store.mark_done(out, stage_fingerprint(cfg))
    return RetrievalResult(oof, truth, sweep, threshold, test, submission, result_metrics)


def plot_examples(cfg: RetrievalConfig, comp: Competition, result: RetrievalResult):
    """Queries beside their top-5 answers, right and wrong: test images when ``test.csv`` gives the truth,
    else out-of-fold training images. Crops are shown when stage 01 made them. ``None`` (nothing to show)
    with ``inference_only`` and no test truth: no out-of-fold predictions were made."""
    from common.data.artefacts import crops_available, image_paths
    from common.lib import plots

    if comp.truth is None and result.oof_truth.empty:
        return None

    crops = crops_available(cfg.exp)
    train_paths = dict(zip(comp.train["image"], image_paths(comp.train, cfg.exp, "train", crops), strict=True))
    gallery = dict(zip(comp.train["individual_id"], comp.train["image"].map(train_paths), strict=False))
    if comp.truth is not None:
        known = comp.known_individuals
        truth = {i: (t if t in known else cfg.new_label)
                 for i, t in zip(comp.truth["image"], comp.truth["individual_id"], strict=True)}
        predictions = result.submission[result.submission["image"].isin(truth)]
        table, query_paths = result.test_scores, dict(
            zip(comp.test["image"], image_paths(comp.test, cfg.exp, "test", crops), strict=True))
    else:
        truth = result.oof_truth.to_dict()
        predictions = retrieval.predict(result.oof_scores, result.threshold, k=5, new_label=cfg.new_label,
                                        images=list(truth))
        table, query_paths = result.oof_scores, train_paths
    chosen = plots.select_examples(predictions, truth, cfg.n_examples, seed=cfg.seed)
    queries, truths, top = plots.example_tiles(chosen, predictions, table, truth, query_paths, gallery,
                                               cfg.new_label)
    return plots.plot_retrieval_examples(queries, truths, top, n_rows=len(queries))
