"""The course's two-layer net, affine - ReLU - affine with a softmax loss, with its backward pass written out.

loss = mean_i -log softmax(s_i)_{y_i} + reg * (sum W1^2 + sum W2^2), with s = relu(X W1 + b1) W2 + b2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import VisrecError


def twolayer_loss(params: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor, reg: float = 0.0):
    """(loss, grads) with grads a dict of the same keys as params: W1, b1, W2, b2."""
    W1, b1, W2, b2 = params["W1"], params["b1"], params["W2"], params["b2"]
    n = X.shape[0]
    rows = torch.arange(n, device=X.device)
    h_pre = X @ W1 + b1
    h = h_pre.clamp_min(0)
    s = h @ W2 + b2
    s = s - s.amax(1, keepdim=True)
    log_p = s - s.exp().sum(1, keepdim=True).log()
    loss = -log_p[rows, y].mean() + reg * ((W1 * W1).sum() + (W2 * W2).sum())
    ds = log_p.exp()
    ds[rows, y] -= 1
    ds /= n
    dW2 = h.T @ ds + 2 * reg * W2
    db2 = ds.sum(0)
    dh = ds @ W2.T
    dh_pre = dh * (h_pre > 0).to(dh.dtype)
    dW1 = X.T @ dh_pre + 2 * reg * W1
    db1 = dh_pre.sum(0)
    return loss, {"W1": dW1, "b1": db1, "W2": dW2, "b2": db2}


@dataclass
class TwoLayerNet:
    hidden: int = 100
    reg: float = 1e-4
    params: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    history: list[float] = field(default_factory=list, repr=False)

    def fit(self, X, y, num_classes: int, *, lr: float = 0.1, epochs: int = 10, batch_size: int = 256,
            lr_decay: float = 0.95, momentum: float = 0.9, seed: int = 0) -> TwoLayerNet:
        g = torch.Generator().manual_seed(seed)
        n, d = X.shape
        kw = {"dtype": X.dtype}
        self.params = {
            "W1": (torch.randn(d, self.hidden, generator=g, **kw) * math.sqrt(2.0 / d)).to(X.device),
            "b1": torch.zeros(self.hidden, **kw).to(X.device),
            "W2": (torch.randn(self.hidden, num_classes, generator=g, **kw) / math.sqrt(self.hidden)).to(X.device),
            "b2": torch.zeros(num_classes, **kw).to(X.device),
        }
        vel = {k: torch.zeros_like(v) for k, v in self.params.items()}
        lr0 = lr
        for epoch in range(epochs):
            for idx in torch.randperm(n, generator=g).to(X.device).split(batch_size):
                loss, grads = twolayer_loss(self.params, X[idx], y[idx], self.reg)
                if not math.isfinite(loss.item()):
                    raise VisrecError(f"the two-layer net's loss became non-finite in epoch {epoch + 1} "
                                      f"(lr={lr0:g}, reg={self.reg:g})", "lower the learning rate (--lr)")
                for k in self.params:
                    vel[k] = momentum * vel[k] - lr * grads[k]
                    self.params[k] += vel[k]
            self.history.append(loss.item())
            lr *= lr_decay
        return self

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        if not self.params:
            raise VisrecError("predict called before fit")
        if X.shape[1] != self.params["W1"].shape[0]:
            raise VisrecError(f"features of dimension {X.shape[1]} do not match the net's "
                              f"{self.params['W1'].shape[0]}", "compute the features the same way")
        h = (X @ self.params["W1"] + self.params["b1"]).clamp_min(0)
        return (h @ self.params["W2"] + self.params["b2"]).argmax(1)
