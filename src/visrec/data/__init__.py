"""Data: the dataset catalog, ImageSet and splits, preprocessing, augmentation and batching."""

from .augment import AUGMENTATIONS, MixedTargets, Pipeline, parse_augmentation
from .batches import DeviceBatches
from .catalog import CATALOG, dataset_names, dataset_status, fetch, load_dataset, locate
from .imageset import Dataset, ImageSet, stratified_split, stratified_subset
from .preprocess import Normalizer

__all__ = [
    "AUGMENTATIONS", "CATALOG", "Dataset", "DeviceBatches", "ImageSet", "MixedTargets", "Normalizer", "Pipeline",
    "dataset_names", "dataset_status", "fetch", "load_dataset", "locate", "parse_augmentation",
    "stratified_split", "stratified_subset",
]
