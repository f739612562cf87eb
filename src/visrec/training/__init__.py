"""Training: losses, optimizers, schedules, EMA, checkpoints, observers and the loop."""

from .callbacks import Callback, TrainState
from .loop import NonFiniteLoss, Trainer, resume, train

__all__ = ["Callback", "NonFiniteLoss", "TrainState", "Trainer", "resume", "train"]
