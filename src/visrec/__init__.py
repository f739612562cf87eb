"""visrec: the CS231n curriculum as working software, on PyTorch.

    import visrec
    ds = visrec.load_dataset("fashion-mnist")
    model = visrec.create_model("convnet", in_chans=1, num_classes=10, image_size=28)
    run = visrec.train("fashion-mnist", epochs=8)
    run.evaluate("test"), run.predict(["shoe.png"])
"""

__version__ = "0.1.0"

from . import doctor  # noqa: E402
from .config import Config, resolve_config  # noqa: E402
from .data import Dataset, ImageSet, load_dataset  # noqa: E402
from .errors import VisrecError  # noqa: E402
from .models import create_model, list_models, register_model  # noqa: E402
from .report import write_report  # noqa: E402
from .runs import Run, list_runs  # noqa: E402
from .training import Callback, Trainer, resume, train  # noqa: E402

__all__ = [
    "Callback", "Config", "Dataset", "ImageSet", "Run", "Trainer", "VisrecError", "__version__", "create_model",
    "doctor", "list_models", "list_runs", "load_dataset", "register_model", "resolve_config", "resume", "train",
    "write_report",
]
