"""MNIST-format sources (a TFDS name or an IDX folder) -> in-memory splits -> tf.data pipelines.

Loading gives uint8 arrays [N, 28, 28] and integer labels; the pipelines decode and scale in the graph.
Pipelines see only a `tf.distribute.InputContext` and the global batch size, never a strategy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import logging
import os
import socket
import struct
import threading
import zlib
from typing import Optional, Sequence, Tuple

import numpy as np

from trainer.config import CLASS_NAME_SETS, Config
from trainer.errors import TrainerError
from trainer.images import IMAGE_SIZE, NUM_CLASSES

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049
OFFLINE_HINT = ("train from local IDX files instead, e.g. `python -m trainer.task --dataset "
                "idx:/usr/share/datasets/fashion-mnist` (Debian package dataset-fashion-mnist), or point "
                "--data-dir at a folder where TFDS already prepared the dataset")


@dataclasses.dataclass(frozen=True)
class Splits:
    """Train, validation and test arrays: images uint8 [N, 28, 28], labels int64 [N]."""

    name: str
    class_names: Tuple[str, ...]
    train: Tuple[np.ndarray, np.ndarray]
    validation: Tuple[np.ndarray, np.ndarray]
    test: Tuple[np.ndarray, np.ndarray]


# ---------------------------------------------------------------------------------------------- IDX files

def read_idx(path: str, kind: str) -> np.ndarray:
    """Read one IDX file ('images' -> uint8 [N,28,28], 'labels' -> uint8 [N]); validate everything."""
    name = os.path.basename(path)
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as handle:
            raw = handle.read()
    # gzip raises BadGzipFile (an OSError) or EOFError when cut short, zlib.error when damaged inside
    except (OSError, EOFError, zlib.error) as error:
        raise TrainerError(f"{path}: cannot read IDX file ({error})") from None
    except MemoryError:
        raise TrainerError(f"{path}: out of memory while reading this data file (is it an MNIST-sized IDX file?)"
                           ) from None
    expected_magic, header_size = (_IMAGES_MAGIC, 16) if kind == "images" else (_LABELS_MAGIC, 8)
    if len(raw) < header_size:
        raise TrainerError(f"{path}: file too short for an IDX header ({len(raw)} bytes)")
    magic, count = struct.unpack(">II", raw[:8])
    if magic != expected_magic:
        raise TrainerError(f"{path}: not an IDX {kind} file (magic number {magic}, expected {expected_magic})")
    shape: Tuple[int, ...] = (count,)
    if kind == "images":
        rows, cols = struct.unpack(">II", raw[8:16])
        if (rows, cols) != (IMAGE_SIZE, IMAGE_SIZE):
            raise TrainerError(f"{path}: images are {rows}x{cols}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
        shape = (count, IMAGE_SIZE, IMAGE_SIZE)
    body = raw[header_size:]
    expected = int(np.prod(shape))
    if len(body) != expected:
        what = "truncated" if len(body) < expected else "longer than its header says"
        raise TrainerError(f"{path}: file {what}: header promises {count} {kind} ({expected} bytes), "
                           f"found {len(body)} bytes")
    array = np.frombuffer(body, dtype=np.uint8).reshape(shape)
    if kind == "labels" and count and array.max() > 9:
        raise TrainerError(f"{path}: label {int(array.max())} out of range 0-9 in {name}")
    return array


def _find_idx_file(folder: str, stem: str, shown: str) -> str:
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    raise TrainerError(f"{shown}: missing {stem} (or {stem}.gz); an idx: folder needs the four MNIST-format "
                       f"files {', '.join(IDX_FILES.values())}")


def load_idx_folder(folder: str) -> dict:
    """The four arrays of an IDX folder, checked for matching counts."""
    shown = folder
    if folder.startswith("gs://"):
        from trainer.storage import cached_copy
        folder = cached_copy(folder)  # checked against the bucket on every run; only changed objects download
    if not os.path.isdir(folder):
        raise TrainerError(f"{folder}: no such folder (--dataset idx:{folder})")
    try:
        arrays = {key: read_idx(_find_idx_file(folder, stem, shown), key.split("_")[1])
                  for key, stem in IDX_FILES.items()}
    except TrainerError as error:
        if shown == folder:
            raise
        # name the object in the bucket, not the local cache file the user never chose
        raise TrainerError(str(error).replace(folder.rstrip(os.sep), shown.rstrip("/"))) from None
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise TrainerError(f"{shown}: {IDX_FILES[split + '_images']} holds {len(images)} images but "
                               f"{IDX_FILES[split + '_labels']} holds {len(labels)} labels")
        if len(images) == 0:
            raise TrainerError(f"{shown}: {IDX_FILES[split + '_images']} holds no images")
    return arrays


def write_idx(folder: str, split: str, images: np.ndarray, labels: np.ndarray, compress: bool = False) -> None:
    """Write arrays as MNIST-format IDX files (used by tests and to prepare offline data)."""
    os.makedirs(folder, exist_ok=True)
    images = np.asarray(images, dtype=np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    labels = np.asarray(labels, dtype=np.uint8).reshape(-1)
    opener = gzip.open if compress else open
    suffix = ".gz" if compress else ""
    with opener(os.path.join(folder, IDX_FILES[f"{split}_images"] + suffix), "wb") as handle:
        handle.write(struct.pack(">IIII", _IMAGES_MAGIC, len(images), IMAGE_SIZE, IMAGE_SIZE) + images.tobytes())
    with opener(os.path.join(folder, IDX_FILES[f"{split}_labels"] + suffix), "wb") as handle:
        handle.write(struct.pack(">II", _LABELS_MAGIC, len(labels)) + labels.tobytes())


# ---------------------------------------------------------------------------------------------- TFDS

def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """A bounded connectivity probe (DNS included) so an offline machine fails in seconds."""
    result = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout + 1.0)
    return bool(result and result[0])


KNOWN_TFDS = ("mnist", "fashion_mnist", "kmnist", "mnist_corrupted")  # 28x28x1 images, 10 classes


def tfds_data_dir(data_dir: Optional[str]) -> str:
    return data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def check_tfds_offline(name: str, data_dir: Optional[str]) -> None:
    """Before TensorFlow loads (seconds on a busy machine): a TFDS dataset that is not prepared locally on
    a machine that cannot reach the download host fails now, with the offline alternatives. Only for the
    datasets known to fit (other names go to TFDS, which knows whether they exist)."""
    base = name.split(":")[0].split("/")[0]
    if base not in KNOWN_TFDS:
        return
    folder = os.path.join(tfds_data_dir(data_dir), base)
    for _, _, files in os.walk(folder):
        if "dataset_info.json" in files:
            return  # prepared (or partly): TFDS itself decides
    _require_download_host(name)


def _require_download_host(name: str) -> None:
    """TFDS alone retries a failed download for minutes; say what to do within seconds instead."""
    if not _reachable("storage.googleapis.com"):
        raise TrainerError(f"--dataset {name}: download failed (no internet connection); {OFFLINE_HINT}")


@contextlib.contextmanager
def _quiet_absl():
    """Hide absl's Python warnings for a moment (TFDS logs expected conditions as warnings)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_tfds(name: str, data_dir: Optional[str]) -> Tuple[dict, Tuple[str, ...]]:
    """Arrays of a TFDS dataset with 28x28x1 images and 10 labels, downloading it on first use."""
    import tensorflow_datasets as tfds

    with _quiet_absl():  # "Variant folder ... has no dataset_info.json" before a first download
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise TrainerError(f"--dataset {name}: no such TFDS dataset (try mnist, fashion_mnist, kmnist, "
                               "or idx:FOLDER)") from None
        prepared = builder.is_prepared()
    features = builder.info.features
    image_shape = tuple(features["image"].shape) if "image" in features else None
    num_classes = getattr(features["label"], "num_classes", None) if "label" in features else None
    if image_shape != (IMAGE_SIZE, IMAGE_SIZE, 1) or num_classes != NUM_CLASSES:
        raise TrainerError(f"--dataset {name}: needs {IMAGE_SIZE}x{IMAGE_SIZE}x1 images and {NUM_CLASSES} labels, "
                           "this dataset has "
                           f"images {image_shape} and {num_classes} labels")
    if not prepared:
        _require_download_host(name)
        try:
            builder.download_and_prepare()
        except Exception as error:  # network and checksum faults come in many types
            raise TrainerError(f"--dataset {name}: download failed ({type(error).__name__}: "
                               f"{str(error).splitlines()[0][:200]}); {OFFLINE_HINT}") from None
    arrays = {}
    for split, tfds_split in (("train", "train"), ("test", "test")):
        images, labels = tfds.as_numpy(builder.as_dataset(split=tfds_split, batch_size=-1, as_supervised=True))
        arrays[f"{split}_images"] = images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE).astype(np.uint8)
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    return arrays, tuple(features["label"].names)


# ---------------------------------------------------------------------------------------------- splits

def resolve_class_names(config: Config, tfds_names: Optional[Sequence[str]] = None) -> Tuple[str, ...]:
    if config.class_names in CLASS_NAME_SETS:
        return CLASS_NAME_SETS[config.class_names]
    if config.class_names != "auto":
        return tuple(name.strip() for name in config.class_names.split(","))
    if tfds_names:
        return tuple(tfds_names)
    folder = config.idx_dir.rstrip("/").lower()
    return CLASS_NAME_SETS["fashion" if "fashion" in os.path.basename(folder) else "digits"]


def split_arrays(arrays: dict, config: Config, name: str, class_names: Sequence[str]) -> Splits:
    """Seeded shuffle of the training split, cut to --train-limit, then the validation slice taken off."""
    images, labels = arrays["train_images"], arrays["train_labels"].astype(np.int64)
    order = np.random.default_rng(config.seed).permutation(len(images))
    if config.train_limit is not None:
        order = order[:config.train_limit]
    num_validation = int(round(len(order) * config.validation_fraction))
    if num_validation < 1 or num_validation >= len(order):
        raise TrainerError(f"--validation-fraction {config.validation_fraction} of {len(order)} training "
                           "examples leaves no validation or no training data")
    validation_index, train_index = order[:num_validation], order[num_validation:]
    return Splits(
        name=name,
        class_names=tuple(class_names),
        train=(images[train_index], labels[train_index]),
        validation=(images[validation_index], labels[validation_index]),
        test=(arrays["test_images"], arrays["test_labels"].astype(np.int64)),
    )


def load_splits(config: Config) -> Splits:
    """Load the configured dataset and split it; every fault is a TrainerError naming the file or setting
    (running out of memory here names the data, not the model)."""
    try:
        if config.dataset_kind == "idx":
            arrays = load_idx_folder(config.idx_dir)
            return split_arrays(arrays, config, config.dataset, resolve_class_names(config))
        arrays, names = load_tfds(config.dataset, config.data_dir)
        return split_arrays(arrays, config, config.dataset, resolve_class_names(config, names))
    except MemoryError:
        raise TrainerError(f"--dataset {config.dataset}: out of memory while loading the data (is it MNIST-sized? "
                           "--train-limit does not shrink what is read)") from None


# ---------------------------------------------------------------------------------------------- pipelines

def _decode(images, labels):
    import tensorflow as tf
    images = tf.cast(images, tf.float32)[..., tf.newaxis] / 255.0
    return images, tf.cast(labels, tf.int32)


def steps_per_epoch(num_examples: int, global_batch_size: int, num_input_pipelines: int = 1) -> int:
    """Steps every worker runs per epoch: equal on all workers (MultiWorkerMirrored hangs otherwise)."""
    per_pipeline = num_examples // num_input_pipelines
    per_pipeline_batch = global_batch_size // num_input_pipelines
    return per_pipeline // per_pipeline_batch


class TrainTensors:
    """The training split converted to tensors once (on the host), shared by every epoch's pipeline."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        import tensorflow as tf

        with tf.device("/cpu:0"):
            self.images = tf.constant(images)
            self.labels = tf.constant(labels.astype(np.int32))
        self.size = len(images)


def epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of the training examples: the same on every worker and after a resume."""
    return np.random.default_rng((seed, epoch)).permutation(size)


def train_dataset(tensors: TrainTensors, global_batch_size: int, seed: int, epoch: int,
                  input_context=None, skip_steps: int = 0, augment: str = "none"):
    """One epoch of shuffled, batched, decoded training data for one input pipeline.

    The epoch's permutation is drawn in numpy and cut into index batches; each batch is gathered from
    the in-memory tensors and decoded as a whole (no per-example work, no shuffle buffer to fill before
    the first step). Pipelines take strided shares of the permutation (explicit sharding, no AUTO
    policy); batches are per replica with a fixed size (static shapes, the same step count on every
    worker). The seed and epoch fix the order, so a resumed run sees what an uninterrupted one would;
    `skip_steps` resumes mid-epoch. `augment` (shift, shift-flip) applies trainer.augment to each batch
    with a seed from (seed, epoch, batch number), so augmented batches are reproducible too.
    """
    import tensorflow as tf

    num_pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    batch = input_context.get_per_replica_batch_size(global_batch_size) if input_context else global_batch_size
    num_replicas = input_context.num_replicas_in_sync if input_context else 1
    batches_per_step = num_replicas // num_pipelines
    steps = steps_per_epoch(tensors.size, global_batch_size, num_pipelines)
    order = epoch_order(tensors.size, seed, epoch)[pipeline_id::num_pipelines]
    order = order[:steps * batches_per_step * batch].reshape(steps * batches_per_step, batch)
    batch_numbers = np.arange(len(order)) * num_pipelines + pipeline_id  # unique over all pipelines
    order, batch_numbers = order[skip_steps * batches_per_step:], batch_numbers[skip_steps * batches_per_step:]
    images, labels = tensors.images, tensors.labels

    def gather(index, number):
        batch_images, batch_labels = _decode(tf.gather(images, index), tf.gather(labels, index))
        if augment != "none":
            from trainer.augment import batch_seed, random_erase, shift_and_flip

            batch_images = shift_and_flip(tf.ensure_shape(batch_images, [batch, IMAGE_SIZE, IMAGE_SIZE, 1]),
                                          batch_seed(seed, epoch, number), flip=augment == "shift-flip")
            if augment == "shift-erase":
                batch_images = random_erase(batch_images, batch_seed(seed, epoch, number))
        return batch_images, batch_labels

    dataset = tf.data.Dataset.from_tensor_slices((order.astype(np.int32), batch_numbers.astype(np.int64)))
    return dataset.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def eval_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int):
    """Every example once, in order, decoded (for the chief's local evaluation and predictions)."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
    return dataset.map(_decode, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
