"""Datasets: MVTec-layout folders, plain image folders and the synthetic generator."""
from edgecore.data.datasets import (
    IMAGE_EXTENSIONS,
    ImageStream,
    Sample,
    SkippedImageWarning,
    is_mvtec_category,
    list_images,
    test_samples,
    train_samples,
)
from edgecore.data.synthetic import DEFECT_TYPES, make_synthetic_dataset

__all__ = [
    "DEFECT_TYPES",
    "IMAGE_EXTENSIONS",
    "ImageStream",
    "Sample",
    "SkippedImageWarning",
    "is_mvtec_category",
    "list_images",
    "make_synthetic_dataset",
    "test_samples",
    "train_samples",
]
