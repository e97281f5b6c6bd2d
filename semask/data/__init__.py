"""Data for SeMask (arXiv 2112.12782): datasets, the paper's augmentation pipeline, the toy set, converters."""
from semask.data.classes import (ADE20K_CLASSES, ADE20K_PALETTE, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE,
                                 COCO_STUFF_CLASSES, COCO_STUFF_PALETTE)
from semask.data.datasets import (ADE20K, IGNORE_INDEX, COCOStuff10k, Cityscapes, DatasetError, DatasetWarning,
                                  FolderDataset, SegmentationDataset, read_image, read_label)
from semask.data.loader import build_dataloader, cycle, measure_pipeline_throughput, seed_worker
from semask.data.photometric import PhotoMetricDistortion
from semask.data.toy import TOY_CLASSES, TOY_PALETTE, ToyDataset, make_toy_dataset
from semask.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, TEST_PRESETS, TEST_RATIOS, TRAIN_PRESETS,
                                    TestPipelineConfig, TestTransform, TrainPipelineConfig, TrainTransform,
                                    rescale_size, resize_image, resize_label, get_test_preset, train_preset)

__all__ = [
    "ADE20K", "Cityscapes", "COCOStuff10k", "FolderDataset", "ToyDataset", "SegmentationDataset", "DatasetError",
    "DatasetWarning", "IGNORE_INDEX", "read_image", "read_label", "make_toy_dataset", "build_dataloader",
    "seed_worker", "cycle",
    "measure_pipeline_throughput", "PhotoMetricDistortion",
    "ADE20K_CLASSES", "ADE20K_PALETTE", "CITYSCAPES_CLASSES", "CITYSCAPES_PALETTE", "COCO_STUFF_CLASSES",
    "COCO_STUFF_PALETTE", "TOY_CLASSES", "TOY_PALETTE",
    "IMAGENET_MEAN", "IMAGENET_STD", "TEST_RATIOS", "TRAIN_PRESETS", "TEST_PRESETS", "TrainPipelineConfig",
    "TestPipelineConfig", "TrainTransform", "TestTransform", "train_preset", "get_test_preset", "rescale_size",
    "resize_image", "resize_label",
]
