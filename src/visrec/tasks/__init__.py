"""Tasks, registered by name: what a run learns. The training loop knows them only through
`visrec.training.task.Task`; a task in a user's file trains the same way (`--task my_task.py:MyTask`).

    visrec tasks                                   # the registered tasks
    visrec train scenes --task classification      # the default
"""

from __future__ import annotations

from ..config import Config
from ..data import Dataset
from ..errors import VisrecError, unknown_name
from ..io import import_from_file
from ..training.task import EvalSettings, Evaluation, Task
from .captioning import CaptioningTask
from .classification import ClassificationTask
from .detection import DetectionTask, InstanceTask
from .generate import GenerateTask
from .keypoints import KeypointsTask
from .localization import LocalizationTask
from .segmentation import SegmentationTask
from .style import StyleTask

TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a Task subclass available by its `name`."""
    TASKS[cls.name] = cls
    return cls


register_task(ClassificationTask)
register_task(LocalizationTask)
register_task(SegmentationTask)
register_task(DetectionTask)
register_task(InstanceTask)
register_task(CaptioningTask)
register_task(StyleTask)
register_task(GenerateTask)
register_task(KeypointsTask)


def is_file_task(name: str) -> bool:
    return ":" in name and name.split(":", 1)[0].endswith(".py")


def task_class(name: str) -> type[Task]:
    """The Task subclass of a registered name or of `path/to/file.py:ClassName`: what a task declares (its primary
    metric, its capabilities) without building one."""
    if is_file_task(name):
        cls = import_from_file(name, "task", "--task path/to/file.py:ClassName")
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise VisrecError(f"{name} is not a subclass of visrec.training.task.Task",
                              "define `class MyTask(visrec.Task)` with loss, batch_stats and evaluate")
        return cls
    if name not in TASKS:
        raise unknown_name("task", name, TASKS, "task.name")
    return TASKS[name]


def create_task(name: str, cfg: Config | None = None) -> Task:
    """A task by registered name, or `path/to/file.py:ClassName` (a Task subclass in the user's file)."""
    task = task_class(name)(cfg)
    task.name = task.name or name  # a file task without a name is known by its spec
    return task


def task_of_run(run) -> tuple[Task, Dataset]:
    """A run's task, ready for its data (checked, head width known), and that data rebuilt from the run's config:
    what evaluation and the report need to look at a run of any task again."""
    from ..run_store import dataset_from_config

    task = create_task(run.config.task.name, run.config)
    ds = dataset_from_config(run.config)
    task.check(ds)
    task.num_outputs(ds)
    return task, ds


__all__ = ["TASKS", "CaptioningTask", "ClassificationTask", "DetectionTask", "EvalSettings", "Evaluation",
           "GenerateTask", "InstanceTask", "KeypointsTask", "LocalizationTask", "SegmentationTask", "StyleTask", "Task",
           "create_task", "register_task", "task_class", "task_of_run"]
