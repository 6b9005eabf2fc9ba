"""Class-balanced sampling: draw training images so that rare classes are seen about as often as common ones.

Each image gets the weight ``n_c ** -power`` of its class ``c`` (``n_c`` images), and a
:class:`ClassBalancedSampler` (torch's ``WeightedRandomSampler``) draws with replacement in proportion to it. A class is then drawn with
probability proportional to ``n_c ** (1 - power)``: ``power = 1`` gives every class the same share
(class-balanced sampling), ``power = 0.5`` the square-root sampling of Mahajan et al.
(https://arxiv.org/abs/1805.00932), ``power = 0`` the plain image distribution. Kang et al., "Decoupling
Representation and Classifier for Long-Tailed Recognition" (https://arxiv.org/abs/1910.09217) compare these
as ``p_c ~ n_c ** q`` with ``q = 1 - power`` (instance-balanced q = 1, square-root q = 1/2, class-balanced
q = 0).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler


def class_balanced_weights(labels: Sequence | np.ndarray | torch.Tensor, power: float = 1.0) -> np.ndarray:
    """Per-image sampling weights ``n_c ** -power``, normalised to sum to 1.

    Args:
        labels: ``(N,)`` class of each image: integers or strings (any values ``np.unique`` can sort).
        power: 1 balances the classes, 0.5 is square-root sampling, 0 keeps the image distribution.

    Returns:
        A float64 array ``(N,)`` summing to 1.

    Raises:
        ValueError: if ``labels`` is empty or not 1-D, or ``power`` is negative.
    """
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"class_balanced_weights: labels must be a non-empty 1-D array, got shape {y.shape}")
    if not power >= 0:
        raise ValueError(f"class_balanced_weights: power must be >= 0, got {power}")
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    w = counts[inverse.reshape(-1)].astype(np.float64) ** -float(power)
    return w / w.sum()


class ClassBalancedSampler(WeightedRandomSampler):
    """torch's WeightedRandomSampler plus what it lacks: n_c ** -power weights and draws seeded per (seed, epoch).

    Draws ``num_samples`` indices with replacement, weighted by :func:`class_balanced_weights` (the draws are
    ``WeightedRandomSampler``'s ``torch.multinomial``). Its generator is seeded from ``(seed, epoch)`` at each
    iteration: call :meth:`set_epoch` at the start of each epoch (as with ``DistributedSampler``) so every
    epoch draws differently while a resumed run, and every DDP process, draws the same indices as an
    uninterrupted single process (the training loop then shards that one order). Pass it as
    ``DataLoader(..., sampler=sampler)`` (not with ``shuffle=True``), or iterate it for the epoch's order.

    Args:
        labels: ``(N,)`` class of each dataset item, in dataset order.
        power: see :func:`class_balanced_weights`.
        num_samples: indices per epoch; ``None`` for ``len(labels)``.
        seed: base seed of the draws.
    """

    def __init__(
        self,
        labels: Sequence | np.ndarray | torch.Tensor,
        power: float = 1.0,
        num_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        weights = torch.from_numpy(class_balanced_weights(labels, power))
        n = len(weights)
        if n > 2**24:  # torch.multinomial's limit on the number of categories
            raise ValueError(f"ClassBalancedSampler: {n} items is more than torch.multinomial's 2**24")
        if num_samples is not None and (int(num_samples) != num_samples or num_samples < 1):
            raise ValueError(
                f"ClassBalancedSampler: num_samples must be a positive integer, got {num_samples}"
            )
        super().__init__(weights, int(num_samples) if num_samples is not None else n, replacement=True)
        self.power = float(power)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose draws the next iteration yields.

        Args:
            epoch: the epoch about to start.
        """
        self.epoch = int(epoch)

    def _generator(self) -> torch.Generator:
        # SeedSequence mixes (seed, epoch) so that e.g. (0, 1) and (1, 0) give unrelated streams.
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator().manual_seed(int(state))

    def __iter__(self) -> Iterator[int]:
        self.generator = self._generator()  # fresh each time: iterating twice in an epoch repeats its order
        return super().__iter__()
