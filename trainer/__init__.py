"""Packaged trainer for a convolutional network on MNIST-format digits."""

__version__ = "0.1.0"
