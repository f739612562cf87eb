"""Seeing inside a trained network: first-layer filters, activation maps, and attribution maps (vanilla gradients,
SmoothGrad, guided backpropagation, Grad-CAM, occlusion) that work on every model with the common surface.

    visrec explain runs/fm --method gradcam                  # 8 test images, their predicted classes
    visrec explain runs/fm --method saliency shoe.png --class Sneaker

Attribution methods are registered by name (`METHODS`); each maps a preprocessed batch, the model and one target
class per image to an (N, H, W) map where larger means "matters more for that class". Figures go into
RUN/explain/ as PNGs.
"""

from .methods import METHODS, attribute, register_method
from .run import Explanation, explain

__all__ = ["METHODS", "Explanation", "attribute", "explain", "register_method"]
