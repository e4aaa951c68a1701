"""CIFAR-10 data: load (files, cache, bundled sample, download, device tensors) and split (subsets,
imbalance profiles, label budgets, validation split)."""
from .load import (CACHE_NAME, CIFAR_MEAN, CIFAR_STD, CLASSES, NUM_CLASSES, SAMPLE_PATH, CifarArrays, DataNotFound,
                   cache_path, clear_memory_cache, default_data_dir, is_offline_folder, load_cifar10,
                   load_npz, load_offline_folder, load_sample, to_device_tensors, TORCHVISION_FOLDER)
from .split import (IMBALANCE, SPLIT_PARAMS, Split, build_split, label_budget, long_tail_counts,
                    per_class_subset, random_subset, split_params, step_counts, train_val_split,
                    validate_split_spec)

__all__ = ["CACHE_NAME", "TORCHVISION_FOLDER", "CIFAR_MEAN", "CIFAR_STD", "CLASSES", "NUM_CLASSES", "SAMPLE_PATH", "CifarArrays", "DataNotFound",
           "cache_path", "clear_memory_cache", "default_data_dir", "is_offline_folder", "load_cifar10",
           "load_npz", "load_offline_folder", "load_sample", "to_device_tensors", "IMBALANCE", "SPLIT_PARAMS",
           "Split", "build_split", "label_budget", "long_tail_counts", "per_class_subset", "random_subset",
           "split_params", "step_counts", "train_val_split", "validate_split_spec"]
