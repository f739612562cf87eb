"""The course's first classifiers, written out: kNN, multiclass SVM and softmax, the two-layer net, features.

    from visrec.classic import KNN, LinearClassifier, TwoLayerNet, extract, cross_validate_k
"""

from .baseline import METHODS, baseline
from .features import KINDS as FEATURES
from .features import color_histogram, extract, hog, standardize
from .knn import KNN, KFoldResult, cross_validate_k, distances, vote
from .linear import LinearClassifier, regularization, softmax_loss, svm_loss
from .twolayer import TwoLayerNet, twolayer_loss

__all__ = [
    "FEATURES", "METHODS", "KFoldResult", "baseline",
    "KNN", "LinearClassifier", "TwoLayerNet", "color_histogram", "cross_validate_k",
    "distances", "extract", "hog", "regularization", "softmax_loss", "standardize", "svm_loss", "twolayer_loss",
    "vote",
]
