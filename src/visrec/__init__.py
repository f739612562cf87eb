"""visrec: the CS231n curriculum as working software, on PyTorch.

    import visrec
    ds = visrec.load_dataset("fashion-mnist")
    model = visrec.create_model("convnet", in_chans=1, num_classes=10, image_size=28)
    run = visrec.train("fashion-mnist", epochs=8)
    run.evaluate("test"), run.predict(["shoe.png"])

The names below are imported when first used, so `import visrec` (and the command line's `--help`) does not
pay for PyTorch and the model zoo until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

_EXPORTS = {
    "Callback": ".training", "Config": ".config", "Dataset": ".data", "ImageSet": ".data", "Run": ".runs",
    "Task": ".tasks", "Trainer": ".fit", "VisrecError": ".errors", "create_model": ".models",
    "create_task": ".tasks", "list_models": ".models", "list_runs": ".runs", "load_dataset": ".data",
    "register_model": ".models", "register_task": ".tasks", "resolve_config": ".config", "resume": ".fit",
    "train": ".fit", "train_seeds": ".fit", "write_report": ".report",
}
_SUBPACKAGES = {"doctor", "data", "models", "training", "tasks", "explain", "classic", "config", "runs", "fit",
                "report", "transfer", "ensemble", "tune", "export", "evaluate", "device", "io", "checkpoint", "errors",
                "plotting", "cli", "serve"}

__all__ = [
    "Callback", "Config", "Dataset", "ImageSet", "Run", "Task", "Trainer", "VisrecError", "__version__", "create_model",
    "create_task", "doctor", "list_models", "list_runs", "load_dataset", "register_model", "register_task",
    "resolve_config", "resume", "train", "train_seeds", "write_report",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'visrec' has no attribute {name!r}")
    globals()[name] = value
    return value


def _task_recipe(name: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A task's recipe and per-model recipes, from its class (see visrec.config.task_recipe)."""
    from .tasks import task_class

    cls = task_class(name)
    return dict(cls.recipe), {k: dict(v) for k, v in cls.model_recipes.items()}


def _task_options(name: str) -> type:
    from .tasks import task_class

    return task_class(name).Options


def _option_classes() -> dict[str, type]:
    from .tasks import TASKS

    return {name: cls.Options for name, cls in TASKS.items()}


def _wire() -> None:
    """What a lower layer asks of a higher one, installed here, at the top: the config's recipes and the task options
    it checks come from the tasks (imported only when a config names a task or lists every key)."""
    from . import config

    config.recipe_source = _task_recipe
    config.options_source = _task_options
    config.option_classes = _option_classes


_wire()


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBPACKAGES})


if TYPE_CHECKING:
    from . import doctor
    from .config import Config, resolve_config
    from .data import Dataset, ImageSet, load_dataset
    from .errors import VisrecError
    from .fit import Trainer, resume, train, train_seeds
    from .models import create_model, list_models, register_model
    from .report import write_report
    from .runs import Run, list_runs
    from .tasks import Task, create_task, register_task
    from .training import Callback
