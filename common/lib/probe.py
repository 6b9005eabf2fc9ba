"""A linear probe: multinomial logistic regression on frozen features, as the starting head of LP-FT.

LP-FT (Kumar et al., 2022, "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution",
https://arxiv.org/abs/2202.10054): fit the linear head on the frozen backbone's features first, then fine-tune
the whole model from it, so that the first fine-tuning steps do not push a random head's large gradients into
the pretrained features. With no fine-tuning at all the probe is itself the model: on two CPU cores it beat every
fine-tuned run on the Grocery Store Dataset (``bench/RESULTS.md``).

The fit is full-batch L-BFGS in float64 on standardised features (the standardisation is then folded into the
returned weights), so it is deterministic and needs no learning rate. It minimises

    mean cross-entropy + l2 / 2 * |W|^2          (the bias is not penalised)

which is scikit-learn's ``LogisticRegression(C=1 / (l2 * n))`` for ``n`` training rows; a test checks the two
agree.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class Probe:
    """A fitted probe in the features' own units: ``logits = features @ weight.T + bias``.

    Attributes:
        weight: float32 ``(n_classes, D)``.
        bias: float32 ``(n_classes,)``.
        train_accuracy: accuracy of the probe on the rows it was fitted on.
        iterations: L-BFGS iterations used.
        converged: L-BFGS stopped (gradient or change under tolerance) before ``max_iter`` iterations.
    """

    weight: np.ndarray
    bias: np.ndarray
    train_accuracy: float
    iterations: int
    converged: bool


def fit_linear_probe(features: np.ndarray, labels: np.ndarray, n_classes: int, l2: float = 0.01,
                     max_iter: int = 500, tol: float = 1e-6) -> Probe:
    """Fit a multinomial logistic regression of ``labels`` on ``features``.

    Args:
        features: ``(N, D)`` pooled features, one row per training image.
        labels: ``(N,)`` class ids in ``[0, n_classes)``.
        n_classes: number of classes (the head's rows). A class with no row here gets a zero weight row and a
            bias one below the lowest best logit of any training row: on those rows it is never the top class.
        l2: L2 penalty on the weights of standardised features (must be > 0: separable classes would
            otherwise send the weights to infinity).
        max_iter: L-BFGS iterations at most.
        tol: stop when the gradient's largest entry is below this.

    Raises:
        ValueError: on shapes that disagree, labels out of range, no rows, or ``l2 <= 0``.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError(f"fit_linear_probe: features {x.shape} and labels {y.shape} do not match")
    if len(x) == 0:
        raise ValueError("fit_linear_probe: no training rows")
    if l2 <= 0:
        raise ValueError(f"fit_linear_probe: l2={l2} must be > 0")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"fit_linear_probe: labels must be in [0, {n_classes}), got {y.min()}..{y.max()}")
    present, y_local = np.unique(y, return_inverse=True)
    mu = x.mean(0)
    sd = x.std(0)
    sd[sd < 1e-12] = 1.0  # a constant feature stays 0 after centring
    z = torch.from_numpy((x - mu) / sd)
    target = torch.from_numpy(y_local.astype(np.int64))
    w = torch.zeros(len(present), x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(present), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, target) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    if len(present) > 1:  # one class: nothing to separate, the zero head is the optimum
        opt.step(objective)
    iterations = int(opt.state[w].get("n_iter", 0))  # L-BFGS keeps its counters with the first parameter
    with torch.no_grad():
        fitted = z @ w.T + b
        accuracy = float((fitted.argmax(1) == target).double().mean())
        floor = float(fitted.max(1).values.min()) - 1.0  # below every training row's best logit
    w_std, b_std = w.detach().numpy(), b.detach().numpy()
    weight = np.zeros((n_classes, x.shape[1]), dtype=np.float64)
    bias = np.full(n_classes, floor, dtype=np.float64)
    weight[present] = w_std / sd  # z = (x - mu) / sd  =>  logits = x @ (W / sd).T + (b - (W / sd) @ mu)
    bias[present] = b_std - weight[present] @ mu
    return Probe(weight.astype(np.float32), bias.astype(np.float32), accuracy, iterations, iterations < max_iter)
