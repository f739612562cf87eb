"""The Solver: minibatch training of a NumPy model with an update rule, learning-rate decay per epoch, accuracy
checks, the best parameters kept, and checkpoints.

    solver = Solver(model, {"X_train": X, "y_train": y, "X_val": Xv, "y_val": yv}, update_rule="adam",
                    optim_config={"learning_rate": 1e-3}, lr_decay=0.95, num_epochs=10, batch_size=100)
    solver.train()
    solver.loss_history, solver.train_acc_history, solver.val_acc_history, model.params  # the best ones

Checkpoints (`checkpoint_name`) are `NAME_epoch_K.safetensors` (the parameters) with a `.json` beside it (epoch,
histories, update rule, hyperparameters), both written atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ._check import RefError
from .models import RefModel
from .optim import RULES


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Solver:
    """Trains `model` on `data` (X_train, y_train, X_val, y_val). Options: update_rule (a name in RULES or a
    function), optim_config, lr_decay (multiplies learning_rate after each epoch), batch_size, num_epochs,
    num_train_samples and num_val_samples (examples used for the accuracy checks; None = all), checkpoint_name,
    print_every, verbose, seed (minibatch sampling)."""

    def __init__(self, model: RefModel, data: dict[str, np.ndarray], **kwargs: Any):
        missing = [k for k in ("X_train", "y_train", "X_val", "y_val") if k not in data]
        if missing:
            raise RefError(f"Solver: data lacks {', '.join(missing)}", "give X_train, y_train, X_val and y_val")
        self.model = model
        self.X_train, self.y_train = data["X_train"], data["y_train"]
        self.X_val, self.y_val = data["X_val"], data["y_val"]
        for x, y, name in ((self.X_train, self.y_train, "train"), (self.X_val, self.y_val, "val")):
            if len(x) != len(y):
                raise RefError(f"Solver: X_{name} has {len(x)} examples but y_{name} has {len(y)}")
        rule = kwargs.pop("update_rule", "sgd")
        if isinstance(rule, str):
            if rule not in RULES:
                raise RefError(f"Solver: update_rule {rule!r} is not valid", f"use one of {', '.join(RULES)}")
            rule = RULES[rule]
        self.update_rule = rule
        self.optim_config = dict(kwargs.pop("optim_config", {}))
        self.lr_decay = kwargs.pop("lr_decay", 1.0)
        self.batch_size = kwargs.pop("batch_size", 100)
        self.num_epochs = kwargs.pop("num_epochs", 10)
        self.num_train_samples = kwargs.pop("num_train_samples", 1000)
        self.num_val_samples = kwargs.pop("num_val_samples", None)
        self.checkpoint_name = kwargs.pop("checkpoint_name", None)
        self.print_every = kwargs.pop("print_every", 10)
        self.verbose = kwargs.pop("verbose", True)
        self.rng = np.random.default_rng(kwargs.pop("seed", None))
        if kwargs:
            raise RefError(f"Solver: unknown option(s) {', '.join(sorted(kwargs))}",
                           "valid: update_rule, optim_config, lr_decay, batch_size, num_epochs, num_train_samples, "
                           "num_val_samples, checkpoint_name, print_every, verbose, seed")
        self._reset()

    def _reset(self) -> None:
        self.epoch = 0
        self.best_val_acc = 0.0
        self.best_params: dict[str, np.ndarray] = {}
        self.loss_history: list[float] = []
        self.train_acc_history: list[float] = []
        self.val_acc_history: list[float] = []
        self.optim_configs = {p: dict(self.optim_config) for p in self.model.params}

    def _step(self) -> None:
        idx = self.rng.choice(len(self.X_train), self.batch_size)
        loss, grads = self.model.loss(self.X_train[idx], self.y_train[idx])
        if not np.isfinite(loss):
            raise RefError(f"Solver: the loss became {loss} at iteration {len(self.loss_history) + 1}",
                           "lower optim_config['learning_rate'] or the weight scale")
        self.loss_history.append(float(loss))
        for p, w in self.model.params.items():
            self.model.params[p], self.optim_configs[p] = self.update_rule(w, grads[p], self.optim_configs[p])

    def check_accuracy(self, X: np.ndarray, y: np.ndarray, num_samples: int | None = None,  # noqa: N803
                       batch_size: int = 100) -> float:
        """The model's accuracy on (a random subsample of num_samples of) X, y, in batches (test mode)."""
        if num_samples is not None and len(X) > num_samples:
            idx = self.rng.choice(len(X), num_samples)
            X, y = X[idx], y[idx]  # noqa: N806
        preds = [np.argmax(self.model.loss(X[i:i + batch_size]), 1) for i in range(0, len(X), batch_size)]
        return float(np.mean(np.concatenate(preds) == y)) if len(X) else 0.0

    def _save_checkpoint(self) -> None:
        if self.checkpoint_name is None:
            return
        from safetensors.numpy import save_file

        base = Path(f"{self.checkpoint_name}_epoch_{self.epoch}")
        base.parent.mkdir(parents=True, exist_ok=True)
        params = {k: np.ascontiguousarray(v) for k, v in self.model.params.items()}
        _atomic(base.with_suffix(".safetensors"), lambda tmp: save_file(params, tmp))
        state = {"epoch": self.epoch, "update_rule": self.update_rule.__name__, "lr_decay": self.lr_decay,
                 "batch_size": self.batch_size, "num_epochs": self.num_epochs,
                 "learning_rate": {p: c.get("learning_rate") for p, c in self.optim_configs.items()},
                 "loss_history": self.loss_history, "train_acc_history": self.train_acc_history,
                 "val_acc_history": self.val_acc_history, "best_val_acc": self.best_val_acc}
        _atomic(base.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(state)))

    def train(self) -> None:
        """Run num_epochs epochs of len(X_train) / batch_size iterations; keep the best parameters by validation
        accuracy and put them in the model at the end."""
        n = len(self.X_train)
        per_epoch = max(n // self.batch_size, 1)
        total = self.num_epochs * per_epoch
        for t in range(total):
            self._step()
            if self.verbose and t % self.print_every == 0:
                print(f"(Iteration {t + 1} / {total}) loss: {self.loss_history[-1]:f}")
            first, last = t == 0, t == total - 1
            epoch_end = (t + 1) % per_epoch == 0
            if epoch_end:
                self.epoch += 1
                for c in self.optim_configs.values():
                    c["learning_rate"] = c.get("learning_rate", 1e-2) * self.lr_decay
            if first or last or epoch_end:
                train_acc = self.check_accuracy(self.X_train, self.y_train, self.num_train_samples)
                val_acc = self.check_accuracy(self.X_val, self.y_val, self.num_val_samples)
                self.train_acc_history.append(train_acc)
                self.val_acc_history.append(val_acc)
                self._save_checkpoint()
                if self.verbose:
                    print(f"(Epoch {self.epoch} / {self.num_epochs}) train acc: {train_acc:f}; val_acc: {val_acc:f}")
                if val_acc > self.best_val_acc or not self.best_params:
                    self.best_val_acc = val_acc
                    self.best_params = {k: v.copy() for k, v in self.model.params.items()}
        self.model.params = self.best_params
