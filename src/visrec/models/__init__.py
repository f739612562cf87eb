"""Models: the registry, the common classifier surface, and the built-in families."""

from . import classic, convnet, lenet, resnet_cifar  # noqa: F401 - importing registers the models
from ._registry import create_model, is_file_model, list_models, model_entry, register_model
from .layers import Classifier

__all__ = ["Classifier", "create_model", "is_file_model", "list_models", "model_entry", "register_model"]
