"""The image format every part of the trainer agrees on: MNIST-format square grayscale images and their
number of classes. Data checks its files against it, the model takes it as input, the export serves it."""

IMAGE_SIZE = 28
NUM_CLASSES = 10
