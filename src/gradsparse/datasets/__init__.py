"""Data sets: readers for the files the papers used, and the real data that ships offline."""

from .mnist_5k import mnist_5k_path, offline_mnist, read_mnist_5k

__all__ = ["mnist_5k_path", "offline_mnist", "read_mnist_5k"]
