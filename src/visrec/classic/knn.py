"""k-nearest neighbours on torch: L1, L2 and cosine distances, computed in chunks, with a majority vote.

Distances are computed a chunk of queries at a time, so memory stays at chunk x N_train:
- L2 through the expansion ||a - b||^2 = ||a||^2 - 2 a.b + ||b||^2 (one matrix product per chunk);
- L1 with `torch.cdist(p=1)`, which accumulates |a - b| without building the chunk x N x D tensor;
- cosine as 1 - a.b / (||a|| ||b||).

Tie rule: the vote counts the labels of the k nearest; among classes tied for the most votes, the one
whose first member comes nearest wins (so k=1 is always the nearest neighbour, and a tie at any k is
decided by distance, never by class index). Training points at equal distance are ordered by index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import VisrecError, unknown_name

METRICS = ("l2", "l1", "cosine")


def distances(queries: torch.Tensor, train: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """(M, D) x (N, D) -> (M, N) distances (squared L2 for "l2": same order, cheaper)."""
    if metric == "l2":
        d = (queries * queries).sum(1, keepdim=True) - 2 * queries @ train.T + (train * train).sum(1)
        return d.clamp_min_(0)
    if metric == "l1":
        return torch.cdist(queries, train, p=1)
    if metric == "cosine":
        qn = queries / queries.norm(dim=1, keepdim=True).clamp_min(1e-12)
        tn = train / train.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return 1 - qn @ tn.T
    raise unknown_name("kNN metric", metric, METRICS, "--metric")


def vote(neighbor_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(M, k) labels of the neighbours, nearest first -> (M,) predictions with the documented tie rule."""
    m, k = neighbor_labels.shape
    counts = torch.zeros(m, num_classes, dtype=torch.long, device=neighbor_labels.device)
    counts.scatter_add_(1, neighbor_labels, torch.ones_like(neighbor_labels))
    # Rank of each class's nearest member (k if absent): among tied counts, the smaller rank wins.
    ranks = torch.full((m, num_classes), k, dtype=torch.long, device=neighbor_labels.device)
    pos = torch.arange(k, device=neighbor_labels.device).expand(m, k)
    ranks.scatter_reduce_(1, neighbor_labels, pos, reduce="amin")
    score = counts * (k + 1) + (k - ranks)  # votes first, then nearness
    return score.argmax(1)


@dataclass
class KNN:
    """A kNN classifier. `fit` stores the data; `predict(x, k)` votes among the k nearest."""

    metric: str = "l2"
    chunk: int = 1024
    train_x: torch.Tensor = field(default=None, repr=False)
    train_y: torch.Tensor = field(default=None, repr=False)
    num_classes: int = 0

    def fit(self, x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None) -> KNN:
        if self.metric not in METRICS:
            raise unknown_name("kNN metric", self.metric, METRICS, "--metric")
        if len(x) == 0:
            raise VisrecError("kNN needs at least one training example")
        self.train_x, self.train_y = x.float().reshape(len(x), -1), y.long()
        self.num_classes = num_classes or int(y.max()) + 1
        return self

    def neighbors(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """(M, k) indices of the k nearest training points, nearest first (ties by index)."""
        if self.train_x is None:
            raise VisrecError("kNN.predict called before fit")
        n = len(self.train_x)
        if k < 1 or k > n:
            raise VisrecError(f"k={k} is not possible with {n} training examples", f"use 1 <= k <= {n}")
        x = x.float().reshape(len(x), -1)
        if x.shape[1] != self.train_x.shape[1]:
            raise VisrecError(f"features of dimension {x.shape[1]} do not match the training features' "
                              f"{self.train_x.shape[1]}", "compute query and training features the same way")
        out = []
        for q in x.split(self.chunk):
            d = distances(q, self.train_x, self.metric)
            idx = torch.topk(d, k, dim=1, largest=False).indices
            kth = d.gather(1, idx).amax(1, keepdim=True)
            boundary_ties = (d <= kth).sum(1) > k  # more candidates than places: ties at the k-th distance
            if bool(boundary_ties.any()):  # rare: settle those rows exactly with a stable full sort
                rows = boundary_ties.nonzero().flatten()
                idx[rows] = torch.sort(d[rows], dim=1, stable=True).indices[:, :k]
            out.append(_by_distance_then_index(d.gather(1, idx), idx))
        return torch.cat(out)

    def predict(self, x: torch.Tensor, k: int | list[int] = 1) -> torch.Tensor | dict[int, torch.Tensor]:
        """Predictions for one k, or a dict k -> predictions for several (one distance pass)."""
        ks = [k] if isinstance(k, int) else list(k)
        nb = self.neighbors(x, max(ks))
        labels = self.train_y[nb]
        preds = {kk: vote(labels[:, :kk], self.num_classes) for kk in ks}
        return preds[ks[0]] if isinstance(k, int) else preds


def _by_distance_then_index(d: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Order each row's indices by (distance, index)."""
    order = torch.argsort(idx, dim=1, stable=True)
    d2, i2 = d.gather(1, order), idx.gather(1, order)
    return i2.gather(1, torch.sort(d2, dim=1, stable=True).indices)


@dataclass
class KFoldResult:
    ks: list[int]
    fold_acc: dict[int, list[float]]  # k -> accuracy on each held-out fold

    def mean(self, k: int) -> float:
        return sum(self.fold_acc[k]) / len(self.fold_acc[k])

    def std(self, k: int) -> float:
        a = torch.tensor(self.fold_acc[k], dtype=torch.float64)
        return float(a.std(unbiased=False)) if len(a) > 1 else 0.0

    @property
    def best_k(self) -> int:
        """The k with the highest mean accuracy; the smaller k on a tie."""
        return max(self.ks, key=lambda k: (round(self.mean(k), 12), -k))

    def table(self) -> list[dict]:
        return [{"k": k, "mean": self.mean(k), "std": self.std(k), "folds": self.fold_acc[k]} for k in self.ks]


def cross_validate_k(x: torch.Tensor, y: torch.Tensor, ks: list[int], folds: int = 5, metric: str = "l2",
                     seed: int = 0, num_classes: int | None = None) -> KFoldResult:
    """n-fold cross-validation of k on the training data: every fold is held out once."""
    n = len(x)
    if folds < 2 or folds > n:
        raise VisrecError(f"--folds {folds} is not possible with {n} examples", f"use 2 <= folds <= {n}")
    fold_train = n - -(-n // folds)  # the smallest training part: all but the largest fold
    if min(ks) < 1 or max(ks) > fold_train:
        raise VisrecError(f"k={max(ks) if max(ks) > fold_train else min(ks)} is not possible: a cross-validation "
                          f"training part has {fold_train} examples", f"use 1 <= k <= {fold_train}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = perm.tensor_split(folds)
    c = num_classes or int(y.max()) + 1
    acc: dict[int, list[float]] = {k: [] for k in ks}
    for i in range(folds):
        held = parts[i]
        keep = torch.cat([p for j, p in enumerate(parts) if j != i])
        model = KNN(metric).fit(x[keep], y[keep], c)
        preds = model.predict(x[held], ks)
        for k in ks:
            acc[k].append((preds[k] == y[held]).float().mean().item())
    return KFoldResult(list(ks), acc)
