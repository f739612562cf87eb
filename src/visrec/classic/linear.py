"""Linear classifiers with hand-written, vectorized losses and gradients (no autograd), as in the course.

Scores are s = X W + b for X (N, D), W (D, C), b (C,). Losses (means over the batch):
- multiclass SVM (Weston-Watkins): sum_{j != y} max(0, s_j - s_y + delta);
- softmax: -log(exp(s_y) / sum_j exp(s_j)), computed with the max subtracted.
Regularization R(W) on the weights, not the bias: `l2` = reg * sum W^2; `l1` = reg * sum |W|;
`elastic` = reg * (l1_ratio * sum |W| + (1 - l1_ratio) * sum W^2). With W = 0 the softmax loss is
exactly ln C and the SVM loss is (C - 1) * delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import VisrecError, unknown_name

REGULARIZERS = ("l2", "l1", "elastic")


def regularization(W: torch.Tensor, reg: float, kind: str = "l2", l1_ratio: float = 0.5):
    """(R(W), dR/dW)."""
    if kind == "l2":
        return reg * (W * W).sum(), 2 * reg * W
    if kind == "l1":
        return reg * W.abs().sum(), reg * W.sign()
    if kind == "elastic":
        return (reg * (l1_ratio * W.abs().sum() + (1 - l1_ratio) * (W * W).sum()),
                reg * (l1_ratio * W.sign() + 2 * (1 - l1_ratio) * W))
    raise unknown_name("regularization", kind, REGULARIZERS, "--reg-type")


def svm_loss(W, b, X, y, reg: float = 0.0, delta: float = 1.0, reg_type: str = "l2", l1_ratio: float = 0.5):
    """Loss and gradients (dW, db) of the multiclass SVM."""
    n = X.shape[0]
    rows = torch.arange(n, device=X.device)
    scores = X @ W + b
    margins = (scores - scores[rows, y][:, None] + delta).clamp_min(0)
    margins[rows, y] = 0
    r, dr = regularization(W, reg, reg_type, l1_ratio)
    loss = margins.sum() / n + r
    mask = (margins > 0).to(X.dtype)
    mask[rows, y] = -mask.sum(1)
    return loss, X.T @ mask / n + dr, mask.sum(0) / n


def softmax_loss(W, b, X, y, reg: float = 0.0, reg_type: str = "l2", l1_ratio: float = 0.5):
    """Loss and gradients (dW, db) of the softmax classifier."""
    n = X.shape[0]
    rows = torch.arange(n, device=X.device)
    scores = X @ W + b
    scores = scores - scores.amax(1, keepdim=True)
    log_p = scores - scores.exp().sum(1, keepdim=True).log()
    r, dr = regularization(W, reg, reg_type, l1_ratio)
    loss = -log_p[rows, y].mean() + r
    d = log_p.exp()
    d[rows, y] -= 1
    d /= n
    return loss, X.T @ d + dr, d.sum(0)


LOSSES = {"svm": svm_loss, "softmax": softmax_loss}


@dataclass
class LinearClassifier:
    """Minibatch SGD on a hand-written loss. `kind` is svm or softmax."""

    kind: str = "softmax"
    reg: float = 1e-4
    reg_type: str = "l2"
    l1_ratio: float = 0.5
    W: torch.Tensor = field(default=None, repr=False)
    b: torch.Tensor = field(default=None, repr=False)
    history: list[float] = field(default_factory=list, repr=False)

    def fit(self, X: torch.Tensor, y: torch.Tensor, num_classes: int, *, lr: float = 1e-3, epochs: int = 10,
            batch_size: int = 256, lr_decay: float = 0.9, seed: int = 0) -> LinearClassifier:
        if self.kind not in LOSSES:
            raise unknown_name("linear classifier", self.kind, LOSSES, "--method")
        g = torch.Generator().manual_seed(seed)
        n, d = X.shape
        self.W = 1e-3 * torch.randn(d, num_classes, generator=g, dtype=X.dtype).to(X.device)
        self.b = torch.zeros(num_classes, dtype=X.dtype, device=X.device)
        loss_fn = LOSSES[self.kind]
        lr0 = lr
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=g).to(X.device)
            for idx in perm.split(batch_size):
                loss, dW, db = loss_fn(self.W, self.b, X[idx], y[idx], self.reg, reg_type=self.reg_type,
                                       l1_ratio=self.l1_ratio)
                if not math.isfinite(loss.item()):
                    raise VisrecError(
                        f"the {self.kind} loss became non-finite in epoch {epoch + 1} (lr={lr0:g}, reg={self.reg:g})",
                        "lower the learning rate (--lr) or the regularization strength (--reg)")
                self.W -= lr * dW
                self.b -= lr * db
            self.history.append(loss.item())
            lr *= lr_decay
        return self

    def scores(self, X: torch.Tensor) -> torch.Tensor:
        if self.W is None:
            raise VisrecError("predict called before fit")
        if X.shape[1] != self.W.shape[0]:
            raise VisrecError(f"features of dimension {X.shape[1]} do not match the classifier's {self.W.shape[0]}",
                              "compute the features the same way for training and prediction")
        return X @ self.W + self.b

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        return self.scores(X).argmax(1)
