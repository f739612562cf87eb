"""Models: the registry, the common classifier surface, and the built-in families."""

from . import (  # noqa: F401 - importing registers the models
    caption,
    classic,
    convnet,
    densenet,
    detect,
    generative,
    inception,
    lenet,
    mobile,
    plain,
    reference,
    resnet,
    resnet_cifar,
    segment,
    style,
)
from ._registry import create_model, is_file_model, list_models, model_entry, register_model
from .layers import Classifier, feature_maps
from .summary import Summary, model_summary, summary

__all__ = ["Classifier", "Summary", "create_model", "feature_maps", "is_file_model", "list_models", "model_entry",
           "model_summary", "register_model", "summary"]
