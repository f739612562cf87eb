from .callbacks import Callback, TrainState
from .loop import Trainer
from .step import NonFiniteLoss
from .task import EvalSettings, Evaluation, Task

__all__ = ["Callback", "EvalSettings", "Evaluation", "NonFiniteLoss", "Task", "TrainState", "Trainer"]
