# The trainer's image for Vertex AI custom jobs (and any Docker host).
#   docker build -t trainer:cpu .                                       CPU (default)
#   docker build --build-arg VARIANT=gpu -t trainer:gpu .               CUDA GPUs (tensorflow[and-cuda])
#   docker build --build-arg VARIANT=tpu -t trainer:tpu .               Cloud TPU VMs (tensorflow-tpu 2.20 + pinned libtpu;
#                                                                       the trainer sets TensorFlow's PJRT variables itself)
# The entry point is the trainer. Mount the data and a job dir, so the outputs outlive the container
# (--user: your uid, so the files are yours and the mounted folder writable):
#   mkdir -p runs && docker run --rm --user "$(id -u):$(id -g)" \
#       -v /usr/share/datasets/fashion-mnist:/data:ro -v "$PWD/runs:/runs" \
#       trainer:cpu --dataset idx:/data --job-dir /runs/docker1 --epochs 1
# tuning.task runs from the same image: `--entrypoint python ... -m tuning.task`.

ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG VARIANT=cpu
# Only for VARIANT=tpu: tensorflow-tpu 2.20.0 asks for libtpu~=0.0.14 (both on PyPI); the pin keeps
# rebuilds on one libtpu. TensorFlow reaches the TPU through libtpu's PJRT plugin: `--strategy tpu`, or
# `auto` on a TPU VM, sets PJRT_DEVICE, NEXT_PLUGGABLE_DEVICE_USE_C_API and TF_PLUGGABLE_DEVICE_LIBRARY_PATH
# (to the libtpu package's libtpu.so) before TensorFlow loads; `docker run -e NAME=VALUE` overrides them.
ARG TF_TPU_VERSION=2.20.0
ARG LIBTPU_VERSION=0.0.14

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MPLCONFIGDIR=/tmp/matplotlib

RUN useradd --create-home --uid 1000 trainer
WORKDIR /opt/mnist-trainer

COPY setup.py README.md LICENSE ./
COPY trainer ./trainer
COPY tuning ./tuning
COPY deploy ./deploy

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# DL3013 reads ".[extras]" (this project, whose setup.py bounds every dependency) as an unpinned package.
# hadolint ignore=DL3013
RUN if [ "${VARIANT}" = "tpu" ]; then \
        pip install --no-cache-dir "tensorflow-tpu==${TF_TPU_VERSION}" "libtpu==${LIBTPU_VERSION}" && \
        pip install --no-cache-dir ".[cloud,bayesian]" && \
        python -c "from trainer.distribute import libtpu_library; assert libtpu_library(), 'no libtpu.so'"; \
    else \
        pip install --no-cache-dir ".[${VARIANT},cloud,bayesian]"; \
    fi && \
    python -m trainer.task --help > /dev/null

USER 1000
WORKDIR /home/trainer
ENTRYPOINT ["python", "-m", "trainer.task"]
