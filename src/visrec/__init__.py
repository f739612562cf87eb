"""visrec: the CS231n curriculum as working software, on PyTorch.

    import visrec
    ds = visrec.load_dataset("fashion-mnist")
    model = visrec.create_model("convnet", in_chans=1, num_classes=10, image_size=28)
    run = visrec.train("fashion-mnist", epochs=8)
    run.evaluate("test"), run.predict(["shoe.png"])
"""

from . import doctor  # noqa: E402
from .config import Config, resolve_config  # noqa: E402
from .data import Dataset, ImageSet, load_dataset  # noqa: E402
from .errors import VisrecError  # noqa: E402
from .fit import Trainer, resume, train, train_seeds  # noqa: E402
from .models import create_model, list_models, register_model  # noqa: E402
from .report import write_report  # noqa: E402
from .runs import Run, list_runs  # noqa: E402
from .tasks import Task, create_task, register_task  # noqa: E402
from .training import Callback  # noqa: E402
from .version import __version__  # noqa: E402, F401

__all__ = [
    "Callback", "Config", "Dataset", "ImageSet", "Run", "Task", "Trainer", "VisrecError", "__version__", "create_model",
    "create_task", "doctor", "list_models", "list_runs", "load_dataset", "register_model", "register_task",
    "resolve_config", "resume", "train", "train_seeds",
    "write_report",
]
