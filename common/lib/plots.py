"""Figures for the retrieval stage and training logs: threshold sweep, retrieval examples, training curves.

Every function builds and returns a :class:`matplotlib.figure.Figure` and shows nothing. The figure is closed
in pyplot before it is returned, so a notebook displays it exactly once (as the cell's last expression or with
``display(fig)``) and a script saves it with ``fig.savefig(path)`` without a window or a leak.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from common.lib.metrics import NEW_LABEL

RIGHT, WRONG = "tab:green", "tab:red"


def _finish(fig: Figure) -> Figure:
    fig.tight_layout()
    plt.close(fig)  # detach from pyplot: returned, never auto-shown
    return fig


def plot_threshold_sweep(sweep: pd.DataFrame, best: float) -> Figure:
    """MAP@5 and the share of images predicted ``new_individual`` first, against the threshold.

    Args:
        sweep: table from :func:`common.lib.retrieval.tune_threshold` (``threshold, map5, new_share`` and, when
            present, ``map5_known, map5_new``).
        best: the chosen threshold, drawn as a vertical line.
    """
    missing = [c for c in ("threshold", "map5", "new_share") if c not in sweep.columns]
    if missing:
        raise ValueError(f"plot_threshold_sweep: sweep lacks column(s) {missing}")
    sweep = sweep.sort_values("threshold")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(sweep["threshold"], sweep["map5"], color="black", lw=2, label="MAP@5")
    for col, style in (("map5_known", "tab:blue"), ("map5_new", "tab:orange")):
        if col in sweep.columns and sweep[col].notna().any():
            ax.plot(sweep["threshold"], sweep[col], color=style, lw=1, label=col.replace("map5_", "MAP@5 "))
    ax.plot(sweep["threshold"], sweep["new_share"], color="grey", ls="--", label="share new_individual first")
    best_map = float(sweep.loc[np.isclose(sweep["threshold"], best), "map5"].max()) if len(sweep) else np.nan
    ax.axvline(best, color="tab:red", ls=":", label=f"best {best:.3f} (MAP@5 {best_map:.4f})")
    ax.set_xlabel("similarity threshold")
    ax.set_ylabel("score / share")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title("new_individual threshold sweep (out-of-fold)")
    return _finish(fig)


def select_examples(
    predictions: pd.DataFrame,
    truth: Mapping[str, str],
    n: int,
    seed: int = 0,
) -> list[str]:
    """Pick images to show: half whose first prediction is right, half wrong, the same on every run.

    Args:
        predictions: ``image, predictions`` (space-separated) from :func:`common.lib.retrieval.predict`.
        truth: ``image -> true label`` (``new_individual`` for unseen individuals).
        n: how many images; if one group is short the other fills in.
        seed: picks within each group with ``numpy.random.default_rng(seed)`` over the sorted ids.

    Returns:
        Image ids, right ones first.
    """
    truth = {str(a): str(b) for a, b in dict(truth).items()}
    missing = [i for i in predictions["image"].astype(str) if i not in truth]
    if missing:
        raise ValueError(f"select_examples: {len(missing)} images have no truth, e.g. {missing[0]!r}")
    ids = predictions["image"].astype(str)
    first = predictions["predictions"].astype(str).str.split().str[0]
    is_right = (first == ids.map(truth)).to_numpy()
    right = sorted(ids[is_right])
    wrong = sorted(ids[~is_right])
    rng = np.random.default_rng(seed)
    n_right = min(len(right), max(n - len(wrong), (n + 1) // 2))
    n_wrong = min(len(wrong), n - n_right)
    pick_r = [right[i] for i in sorted(rng.choice(len(right), n_right, replace=False))] if n_right else []
    pick_w = [wrong[i] for i in sorted(rng.choice(len(wrong), n_wrong, replace=False))] if n_wrong else []
    return pick_r + pick_w


def example_tiles(
    images: Sequence[str],
    predictions: pd.DataFrame,
    table: pd.DataFrame,
    truth: Mapping[str, str],
    query_paths: Mapping[str, Path],
    individual_paths: Mapping[str, Path],
    new_label: str = NEW_LABEL,
) -> tuple[list[Path], list[str], list[list[tuple[Path | None, str, float]]]]:
    """Build the arguments of :func:`plot_retrieval_examples` for chosen images.

    Args:
        images: image ids to show (e.g. from :func:`select_examples`).
        predictions: ``image, predictions`` from :func:`common.lib.retrieval.predict`.
        table: the ``image, individual_id, score`` table the predictions came from (for the scores).
        truth: ``image -> true label``.
        query_paths: ``image -> path`` of the query images.
        individual_paths: ``individual_id -> path`` of one gallery image per individual.
        new_label: the "not in the gallery" label (shown as a blank tile with no score).
    """
    pred = dict(zip(predictions["image"].astype(str), predictions["predictions"].astype(str), strict=True))
    score = {
        (str(i), str(j)): float(s) for i, j, s in table[["image", "individual_id", "score"]].itertuples(False)
    }
    queries, truths, top = [], [], []
    for image in (str(i) for i in images):
        if image not in pred:
            raise ValueError(f"example_tiles: image {image!r} has no predictions")
        queries.append(Path(query_paths[image]))
        truths.append(str(truth[image]))
        row = []
        for label in pred[image].split():
            path = None if label == new_label else Path(individual_paths[label])
            row.append((path, label, score.get((image, label), float("nan"))))
        top.append(row)
    return queries, truths, top


def _show(ax, path: Path | None) -> None:
    if path is None:
        ax.set_facecolor("0.9")
    else:
        from PIL import Image  # matplotlib's own dependency

        with Image.open(path) as im:
            ax.imshow(np.asarray(im.convert("RGB")))
    ax.set_xticks([])
    ax.set_yticks([])


def plot_retrieval_examples(
    queries: list[Path],
    truths: list[str],
    top: list[list[tuple[Path | None, str, float]]],
    n_rows: int,
) -> Figure:
    """One row per query: the query image, then its ranked predictions, titled green if right, red if wrong.

    Args:
        queries: query image paths.
        truths: true label of each query.
        top: per query, its predictions as ``(gallery image path or None, label, score)``; ``None`` draws a
            blank tile (``new_individual``); a NaN score is not printed.
        n_rows: how many queries to show (the first ``n_rows``).
    """
    if not (len(queries) == len(truths) == len(top)):
        raise ValueError(
            f"plot_retrieval_examples: {len(queries)} queries, {len(truths)} truths, {len(top)} rows"
        )
    n_rows = min(n_rows, len(queries))
    if n_rows < 1:
        raise ValueError("plot_retrieval_examples: nothing to show")
    paths = [Path(q) for q in queries[:n_rows]] + [Path(p) for row in top[:n_rows] for p, _, _ in row if p]
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise FileNotFoundError(
            f"plot_retrieval_examples: {len(absent)} image files missing, e.g. {absent[0]}"
        )
    n_cols = 1 + max(len(row) for row in top[:n_rows])
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.2 * n_cols, 2.4 * n_rows), squeeze=False)
    for r in range(n_rows):
        _show(axes[r, 0], Path(queries[r]))
        axes[r, 0].set_title(f"query\n{truths[r]}", fontsize=8)
        for c in range(1, n_cols):
            ax = axes[r, c]
            if c - 1 >= len(top[r]):
                ax.axis("off")
                continue
            path, label, score = top[r][c - 1]
            _show(ax, path)
            if path is None:
                ax.text(0.5, 0.5, label, ha="center", va="center", fontsize=8, transform=ax.transAxes)
            text = label if np.isnan(score) else f"{label}\n{score:.3f}"
            ax.set_title(text, fontsize=8, color=RIGHT if label == truths[r] else WRONG)
    return _finish(fig)


def plot_training_curves(log: pd.DataFrame) -> Figure:
    """Loss, a validation metric (when logged) and learning rate against the epoch, one line per fold.

    Args:
        log: ``epoch, train_loss, lr`` and optionally ``valid_loss``, ``valid_map5`` or ``valid_acc``, and
            ``fold`` when several folds are stacked (as :func:`common.stages.train_embedder.run_training` returns them).

    Returns:
        A figure with 2 axes (loss, lr), or 3 when a validation metric has values (loss, metric, lr).
    """
    missing = [c for c in ("epoch", "train_loss", "lr") if c not in log.columns]
    if missing:
        raise ValueError(f"plot_training_curves: log lacks column(s) {missing}")
    metric = next((c for c in ("valid_map5", "valid_acc") if c in log.columns and log[c].notna().any()), None)
    fig, axes = plt.subplots(1, 3 if metric else 2, figsize=(12 if metric else 8, 3.5), squeeze=False)
    ax_loss, *rest = list(axes[0])
    ax_metric, ax_lr = (rest[0], rest[1]) if metric else (None, rest[0])
    groups = log.groupby("fold") if "fold" in log.columns and log["fold"].nunique() > 1 else [(None, log)]
    for i, (fold, part) in enumerate(groups):
        tag, color = ("" if fold is None else f"fold {fold} "), f"C{i}"
        ax_loss.plot(part["epoch"], part["train_loss"], marker="o", color=color, label=f"{tag}train")
        if "valid_loss" in part.columns and part["valid_loss"].notna().any():
            valid = part.dropna(subset=["valid_loss"])  # validate_every > 1 leaves NaN rows: join the others
            ax_loss.plot(valid["epoch"], valid["valid_loss"], marker="o", linestyle="--", color=color,
                         label=f"{tag}valid")
        if metric:
            valid = part.dropna(subset=[metric])
            ax_metric.plot(valid["epoch"], valid[metric], marker="o", color=color)
        ax_lr.plot(part["epoch"], part["lr"], color=color)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend(fontsize=8)
    if metric:
        ax_metric.set(xlabel="epoch", ylabel=metric, title=f"validation {metric.removeprefix('valid_')}")
    ax_lr.set(xlabel="epoch", ylabel="lr", title="learning rate (end of epoch)")
    for a in fig.axes:
        a.grid(alpha=0.3)
    return _finish(fig)


def plot_similarity_histogram(embeddings: np.ndarray, labels: Sequence[str], max_pairs: int = 200_000,
                              seed: int = 0) -> Figure:
    """Cosine similarity of same-individual pairs against different-individual pairs.

    The further apart the two histograms, the easier retrieval and the ``new_individual`` threshold are.

    Args:
        embeddings: L2-normalised rows.
        labels: one individual id per row.
        max_pairs: pairs sampled at most (all pairs when there are fewer).
        seed: sampling seed.
    """
    labels = np.asarray([str(x) for x in labels])
    n = len(labels)
    rng = np.random.default_rng(seed)
    if n * (n - 1) // 2 <= max_pairs:
        i, j = np.triu_indices(n, k=1)
    else:
        i, j = rng.integers(0, n, max_pairs), rng.integers(0, n, max_pairs)
        keep = i != j
        i, j = i[keep], j[keep]
    sims = np.einsum("ij,ij->i", embeddings[i], embeddings[j])
    same = labels[i] == labels[j]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = np.linspace(-1, 1, 81)
    ax.hist(sims[~same], bins=bins, density=True, alpha=0.6, label=f"different individuals ({(~same).sum()})")
    if same.any():
        ax.hist(sims[same], bins=bins, density=True, alpha=0.6, label=f"same individual ({same.sum()})")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.legend()
    return _finish(fig)


def plot_class_recall(metrics: dict, classes: pd.DataFrame, max_classes: int = 60) -> Figure:
    """Per-class recall (test when scored, else out-of-fold) against the class's training images.

    On long-tailed data this shows where the tail classes lose accuracy and what a long-tail trick recovers.

    Args:
        metrics: stage 05's ``metrics.json`` (:func:`common.stages.train_classifier.run_classification`'s result).
        classes: :func:`common.stages.train_classifier.class_summary` (class index, ``images`` column), any order.
        max_classes: at most this many classes are drawn (the most frequent, then the rarest, halves).
    """
    key = "test" if "test" in metrics else "oof"
    recall = metrics[key]["per_class_recall"]
    names = sorted(classes.index)  # logit order = sorted class names
    table = pd.DataFrame({"images": classes["images"].reindex(names).to_numpy(), "recall": recall}, index=names)
    table = table.sort_values("images", ascending=False, kind="stable")
    if len(table) > max_classes:
        table = pd.concat([table.head(max_classes // 2), table.tail(max_classes - max_classes // 2)])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(table) + 2), 3.5))
    x = np.arange(len(table))
    ax.bar(x, table["recall"].fillna(0).to_numpy(), color="C0", alpha=0.8)
    ax.set(ylim=(0, 1.05), ylabel=f"{key} recall", title=f"{key} recall per class, most frequent first "
           f"(balanced accuracy {metrics[key]['balanced_accuracy']:.3f})")
    ax.set_xticks(x, [str(n)[:12] for n in table.index], rotation=90, fontsize=7)
    twin = ax.twinx()
    twin.plot(x, table["images"].to_numpy(), color="C3", marker=".")
    twin.set(ylabel="training images", yscale="log")
    ax.grid(alpha=0.3, axis="y")
    return _finish(fig)


def plot_flagged_images(flagged: pd.DataFrame, image_paths: Mapping[str, str | Path], n_cols: int = 6) -> Figure:
    """A gallery of training images whose label the out-of-fold ensemble confidently disputes.

    Each tile is titled with the given label, the predicted one and the prediction's probability.

    Args:
        flagged: ``image, label, predicted, confidence`` rows (:func:`common.lib.postprocess.flag_noisy_labels`), in
            the order to show.
        image_paths: ``image -> file`` for every flagged image.
        n_cols: tiles per row.
    """
    missing = [c for c in ("image", "label", "predicted", "confidence") if c not in flagged.columns]
    if missing:
        raise ValueError(f"plot_flagged_images: table lacks column(s) {missing}")
    if flagged.empty:
        raise ValueError("plot_flagged_images: nothing to show")
    absent = [i for i in flagged["image"] if i not in image_paths or not Path(image_paths[i]).is_file()]
    if absent:
        raise FileNotFoundError(f"plot_flagged_images: no image file for {len(absent)} images, e.g. {absent[0]!r}")
    n_cols = max(1, min(n_cols, len(flagged)))
    n_rows = -(-len(flagged) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.2 * n_cols, 2.6 * n_rows), squeeze=False)
    for ax, row in zip(axes.ravel(), flagged.itertuples(index=False), strict=False):
        _show(ax, Path(image_paths[row.image]))
        ax.set_title(f"{row.image}\nlabel {row.label}\npred {row.predicted} {row.confidence:.2f}", fontsize=7,
                     color=WRONG)
    for ax in axes.ravel()[len(flagged):]:
        ax.axis("off")
    return _finish(fig)
