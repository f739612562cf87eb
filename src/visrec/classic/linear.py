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
import time
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

    def fit_newton(self, X: torch.Tensor, y: torch.Tensor, num_classes: int, *, steps: int = 30, tol: float = 1e-10,
                   max_params: int = 6000) -> LinearClassifier:
        """Full-batch Newton's method on the L2-regularized softmax loss (convex: a handful of steps reach the
        optimum). Each step builds the ((d+1)K)^2 Hessian in float64, O(n d^2 K^2), and solves with it, with a
        backtracking line search; `history` holds the loss per step and `step_seconds` the cost of each."""
        if self.kind != "softmax" or self.reg_type != "l2":
            raise VisrecError("Newton's method is implemented for the softmax classifier with L2 regularization",
                              "use --method softmax (and the default --reg-type l2), or the SGD solver")
        n, d = X.shape
        k = num_classes
        if (d + 1) * k > max_params:
            raise VisrecError(f"Newton's method needs a {(d + 1) * k}x{(d + 1) * k} Hessian here ({d} features x {k} "
                              f"classes), above the {max_params} this solver takes",
                              "use smaller features (--features hog), fewer classes, or the SGD solver")
        Xd = X.double()
        A = torch.cat([Xd, torch.ones(n, 1, dtype=Xd.dtype)], 1)  # the bias as a constant feature
        theta = torch.zeros(d + 1, k, dtype=torch.float64)

        def loss_grad(th: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
            loss, dW, db = softmax_loss(th[:-1], th[-1], Xd, y, self.reg)
            return float(loss), torch.cat([dW, db[None]]), th

        self.history, self.step_seconds = [], []
        loss, grad, _ = loss_grad(theta)
        for _ in range(steps):
            t0 = time.perf_counter()
            p = (A @ theta).softmax(1)  # (n, K)
            H = torch.zeros(k, d + 1, k, d + 1, dtype=torch.float64)
            for a in range(k):
                for b in range(a, k):
                    w = p[:, a] * (float(a == b) - p[:, b]) / n
                    block = (A * w[:, None]).T @ A
                    H[a, :, b] = block
                    if a != b:
                        H[b, :, a] = block
            H = H.reshape(k * (d + 1), k * (d + 1))
            reg_diag = torch.zeros(k, d + 1, dtype=torch.float64)
            reg_diag[:, :-1] = 2 * self.reg  # the L2 term's curvature, on W only
            H += torch.diag(reg_diag.flatten() + 1e-10)
            g = grad.T.reshape(-1)  # (K, d+1) order, as H
            step = torch.linalg.solve(H, g).reshape(k, d + 1).T
            t, decrease = 1.0, float(g @ step.T.reshape(-1))
            while t > 1e-8:  # backtracking (Armijo)
                new_loss, new_grad, new_theta = loss_grad(theta - t * step)
                if new_loss <= loss - 1e-4 * t * decrease:
                    break
                t /= 2
            theta, loss, grad = new_theta, new_loss, new_grad
            self.history.append(loss)
            self.step_seconds.append(time.perf_counter() - t0)
            if decrease / 2 < tol:  # the Newton decrement: the optimum is reached
                break
        self.W, self.b = theta[:-1].to(X.dtype), theta[-1].to(X.dtype)
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
