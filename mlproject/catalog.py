"""The built-in datasets: names, files, where Debian puts them, their classes and pixel statistics.

Importable without torch: the host side (`lr-finder doctor`) and the job read the same facts.
"""

from __future__ import annotations

BUILTIN_DATASETS = ("fashion-mnist", "mnist")
NUM_CLASSES = 10  # both have ten classes, labels 0-9
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's and Ubuntu's dataset-fashion-mnist
SYSTEM_DIRS = {"fashion-mnist": FASHION_MNIST_DIR, "mnist": "/usr/share/datasets/mnist"}
DEBIAN_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist"}  # Debian packages no MNIST
TORCHVISION_NAMES = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
ENV_DIRS = {"fashion-mnist": "FASHION_MNIST_DIR", "mnist": "MNIST_DIR"}  # a folder set by the environment
# Pixel mean and std of each training split, scaled to [0, 1].
NORMALIZATION = {"fashion-mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081)}
