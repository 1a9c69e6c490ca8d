"""Image-classification sources (a TFDS name, an IDX folder, a folder of image files) -> in-memory splits
-> tf.data pipelines.

Loading gives uint8 arrays [N, H, W] (grey) or [N, H, W, 3] (colour) and integer labels; the shape, the
number of classes and their names come from the data (`Splits.shape`), never from module state. The
pipelines decode and scale in the graph. Pipelines see only a `tf.distribute.InputContext` and the global
batch size, never a strategy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import logging
import os
import socket
import struct
import sys
import threading
import zlib
from typing import List, Optional, Sequence, Tuple

import numpy as np

from trainer.atomic import read_regular_file
from trainer.config import CLASS_NAME_SETS, Config
from trainer.errors import TrainerError
from trainer.images import IMAGE_SIZE, MAX_SIDE, MIN_SIDE, NUM_CLASSES, ImageShape, image_shape

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
    """Train, validation and test arrays: images uint8 [N, H, W] or [N, H, W, 3], labels int64 [N].

    `preprocess` says how the images were made: "frame" (they came at this size) or "resize" (a folder's
    files, resized); `flips_keep_label` whether a mirrored image keeps its class (photos of objects, not
    digits or letters): the recipe flips only then, unless --flip or --no-flip says otherwise."""

    name: str
    class_names: Tuple[str, ...]
    train: Tuple[np.ndarray, np.ndarray]
    validation: Tuple[np.ndarray, np.ndarray]
    test: Tuple[np.ndarray, np.ndarray]
    preprocess: str = "frame"
    flips_keep_label: bool = False

    @property
    def shape(self) -> ImageShape:
        return image_shape(self.train[0], len(self.class_names))


# ---------------------------------------------------------------------------------------------- IDX files

def read_idx(path: str, kind: str) -> np.ndarray:
    """Read one IDX file ('images' -> uint8 [N,rows,cols], 'labels' -> uint8 [N]); validate everything."""
    try:
        raw = read_regular_file(path, path)  # a named pipe in the folder is refused, not waited on
        if path.endswith(".gz"):
            raw = gzip.decompress(raw)
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
        if not (MIN_SIDE <= rows <= MAX_SIDE and MIN_SIDE <= cols <= MAX_SIDE):
            raise TrainerError(f"{path}: images are {rows}x{cols}; each side must be {MIN_SIDE} to {MAX_SIDE} pixels")
        shape = (count, rows, cols)
    body = raw[header_size:]
    expected = int(np.prod(shape))
    if len(body) != expected:
        what = "truncated" if len(body) < expected else "longer than its header says"
        raise TrainerError(f"{path}: file {what}: header promises {count} {kind} ({expected} bytes), "
                           f"found {len(body)} bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _find_idx_file(folder: str, stem: str, shown: str) -> str:
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.lexists(path) and not os.path.isdir(path):  # read_idx refuses what is not a regular file
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
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        train_shape, test_shape = arrays["train_images"].shape[1:], arrays["test_images"].shape[1:]
        raise TrainerError(f"{shown}: the training images are {train_shape[0]}x{train_shape[1]} but the test images "
                           f"{test_shape[0]}x{test_shape[1]}")
    return arrays


def write_idx(folder: str, split: str, images: np.ndarray, labels: np.ndarray, compress: bool = False) -> None:
    """Write arrays as MNIST-format IDX files (used by tests and to prepare offline data): images uint8
    [N, rows, cols] (flat [N, 784] rows are taken as 28x28)."""
    os.makedirs(folder, exist_ok=True)
    images = np.asarray(images, dtype=np.uint8)
    if images.ndim != 3:
        images = images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    labels = np.asarray(labels, dtype=np.uint8).reshape(-1)
    opener = gzip.open if compress else open
    suffix = ".gz" if compress else ""
    with opener(os.path.join(folder, IDX_FILES[f"{split}_images"] + suffix), "wb") as handle:
        handle.write(struct.pack(">IIII", _IMAGES_MAGIC, len(images), *images.shape[1:]) + images.tobytes())
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


# Image sizes of TFDS datasets with fixed-size images (checked before TensorFlow loads: the offline check,
# deploy's depth check); any other TFDS name goes to TFDS, which says what it holds.
KNOWN_TFDS = {"mnist": (28, 28), "fashion_mnist": (28, 28), "kmnist": (28, 28), "mnist_corrupted": (28, 28),
              "emnist": (28, 28), "cifar10": (32, 32), "cifar100": (32, 32), "svhn_cropped": (32, 32),
              "cifar10_corrupted": (32, 32)}
# TFDS datasets whose images keep their class when mirrored left-right (photos of objects, animals, scenes,
# tissue); never digits, letters or other writing.
FLIP_SAFE_TFDS = ("cifar10", "cifar100", "cifar10_1", "cifar10_corrupted", "stl10", "eurosat", "patch_camelyon",
                  "horses_or_humans", "rock_paper_scissors", "colorectal_histology", "deep_weeds", "plant_village",
                  "beans", "imagenet_resized", "imagenet2012_subset", "downsampled_imagenet", "cats_vs_dogs",
                  "tf_flowers", "oxford_flowers102", "oxford_iiit_pet", "food101", "caltech_birds2011", "uc_merced")


def tfds_base(name: str) -> str:
    """`emnist/balanced:3.*` -> `emnist`."""
    return name.split(":")[0].split("/")[0]


def known_image_size(dataset: str) -> Optional[Tuple[int, int]]:
    """(height, width) of a dataset's images when known without loading it, else None."""
    if dataset.startswith(("idx:", "folder:")):
        return None
    return KNOWN_TFDS.get(tfds_base(dataset))


def tfds_data_dir(data_dir: Optional[str]) -> str:
    return data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def check_tfds_offline(name: str, data_dir: Optional[str]) -> None:
    """Before TensorFlow loads (seconds on a busy machine): a known TFDS dataset that is not prepared locally
    on a machine that cannot reach the download host fails now, with the offline alternatives. Other names
    go to TFDS, which knows whether they exist, and so does every name when this process serves TFDS data
    without downloads (`tfds.testing.mock_data`)."""
    if tfds_base(name) not in KNOWN_TFDS or _downloads_replaced():
        return
    folder = os.path.join(tfds_data_dir(data_dir), tfds_base(name))
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


def _downloads_replaced() -> bool:
    """Whether this process has replaced TFDS's download_and_prepare (tfds.testing.mock_data makes it a
    no-op and serves generated examples, though is_prepared() is False and info.splits is empty); False
    while TFDS is not even imported."""
    builders = sys.modules.get("tensorflow_datasets.core.dataset_builder")
    if builders is None:
        return False
    prepare = getattr(builders.DatasetBuilder, "download_and_prepare", None)
    return not getattr(prepare, "__module__", "").startswith("tensorflow_datasets.core")


def _serves_without_download(builder) -> bool:
    """Whether TFDS can give this builder's examples without downloading: prepared files, or downloads
    replaced in this process."""
    return builder.is_prepared() or _downloads_replaced()


def _tfds_shape(name: str, features) -> Tuple[Tuple[int, int, int], int]:
    """(height, width, channels) of the image feature and the label's number of classes, or a TrainerError
    saying why this dataset is not one of images of one size with one label."""
    if "image" not in features or "label" not in features:
        raise TrainerError(f"--dataset {name}: not an image-classification dataset (it has no 'image' and "
                           f"'label' features, only {', '.join(sorted(features.keys()))})")
    shape = tuple(features["image"].shape)
    num_classes = getattr(features["label"], "num_classes", None)
    if len(shape) != 3 or None in shape:
        raise TrainerError(f"--dataset {name}: its images vary in size ({shape}); save them into a folder of "
                           "images and train with --dataset folder:DIR (which resizes them)")
    if shape[2] not in (1, 3):
        raise TrainerError(f"--dataset {name}: images with {shape[2]} channels; the trainer takes grey (1) or "
                           "RGB (3) images")
    if not num_classes or num_classes < 2:
        raise TrainerError(f"--dataset {name}: its label has {num_classes} classes; at least 2 are needed")
    return (int(shape[0]), int(shape[1]), int(shape[2])), int(num_classes)


def _tfds_split(tfds, builder, split: str, shape: Tuple[int, int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """One split's arrays, read in batches (as_dataset(batch_size=-1) would hold the whole split twice)."""
    images, labels = [], []
    for batch_images, batch_labels in tfds.as_numpy(builder.as_dataset(split=split, as_supervised=True).batch(4096)):
        images.append(batch_images)
        labels.append(batch_labels)
    if not images:
        raise TrainerError(f"--dataset {builder.name}: its {split} split holds no examples")
    stacked = np.concatenate(images).astype(np.uint8)
    return (stacked.reshape(-1, shape[0], shape[1]) if shape[2] == 1 else stacked), np.concatenate(labels)


# TFDS datasets whose images are stored transposed (EMNIST's files are, and TFDS keeps them so): the loader
# turns them upright, so that the model learns letters as they are written and predict reads them so.
TRANSPOSED_TFDS = ("emnist",)


def load_tfds(name: str, data_dir: Optional[str]) -> Tuple[dict, Tuple[str, ...], int]:
    """Arrays of a TFDS image-classification dataset, downloading it on first use; its class names (may be
    empty) and number of classes. A dataset without a test split gets one held out from its training split."""
    import tensorflow_datasets as tfds

    with _quiet_absl():  # "Variant folder ... has no dataset_info.json" before a first download
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise TrainerError(f"--dataset {name}: no such TFDS dataset (try mnist, fashion_mnist, cifar10, "
                               "emnist/balanced, or idx:FOLDER, folder:DIR)") from None
        ready = _serves_without_download(builder)
    features = builder.info.features
    shape, num_classes = _tfds_shape(name, features)
    if not ready:
        _require_download_host(name)
        try:
            builder.download_and_prepare()
        except Exception as error:  # network and checksum faults come in many types
            raise TrainerError(f"--dataset {name}: download failed ({type(error).__name__}: "
                               f"{str(error).splitlines()[0][:200]}); {OFFLINE_HINT}") from None
    known_splits = set(builder.info.splits.keys())  # empty when TFDS does not know them (mock data)
    if known_splits and "train" not in known_splits:
        raise TrainerError(f"--dataset {name}: has no 'train' split (only {', '.join(sorted(known_splits))})")
    train = _tfds_split(tfds, builder, "train", shape)
    if known_splits and "test" not in known_splits:
        train, test = holdout_test(*train)
    else:
        test = _tfds_split(tfds, builder, "test", shape)
    if builder.name in TRANSPOSED_TFDS:  # stored as the original files hold them: each image's rows are its columns
        train, test = (np.ascontiguousarray(np.swapaxes(train[0], 1, 2)), train[1]), \
            (np.ascontiguousarray(np.swapaxes(test[0], 1, 2)), test[1])
    arrays = dict(train_images=train[0], train_labels=train[1], test_images=test[0], test_labels=test[1])
    return arrays, tuple(getattr(features["label"], "names", None) or ()), num_classes


# ---------------------------------------------------------------------------------------------- splits

TEST_FRACTION = 0.2  # share of each class held out as the test split when the data has no test split
TEST_HOLDOUT_SEED = 0  # fixed, not --seed: every run of the same data tests on the same images


def holdout_test(images: np.ndarray, labels: np.ndarray) -> Tuple[Tuple[np.ndarray, np.ndarray],
                                                                  Tuple[np.ndarray, np.ndarray]]:
    """(train, test): TEST_FRACTION of each class's examples (rounded; none of a class with one example)
    held out by a shuffle with a fixed seed."""
    rng = np.random.default_rng(TEST_HOLDOUT_SEED)
    test_index: List[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(len(members) * TEST_FRACTION)) if len(members) > 1 else 0
        test_index.extend(int(index) for index in rng.permutation(members)[:max(count, 1 if len(members) > 1 else 0)])
    test_mask = np.zeros(len(labels), dtype=bool)
    test_mask[np.asarray(test_index, dtype=np.int64)] = True
    return (images[~test_mask], labels[~test_mask]), (images[test_mask], labels[test_mask])


def resolve_class_names(config: Config, data_names: Optional[Sequence[str]] = None,
                        num_classes: Optional[int] = None, max_label: int = 0) -> Tuple[str, ...]:
    """The class names: --class-names when given (a set of ten, or one name per class), else the data's own
    (TFDS's label names, a folder's subfolders), else for IDX files digits or Fashion-MNIST's ten when the
    labels fit ten classes (the folder's name decides), else the label numbers."""
    count = num_classes if num_classes is not None else (NUM_CLASSES if max_label < NUM_CLASSES else max_label + 1)
    if config.class_names in CLASS_NAME_SETS:
        names = CLASS_NAME_SETS[config.class_names]
    elif config.class_names != "auto":
        names = tuple(name.strip() for name in config.class_names.split(","))
        if num_classes is None:
            count = max(len(names), max_label + 1)
    elif data_names and len(data_names) == count:
        names = tuple(data_names)
    elif config.dataset_kind == "idx" and count == NUM_CLASSES:
        folder = config.idx_dir.rstrip("/").lower()
        names = CLASS_NAME_SETS["fashion" if "fashion" in os.path.basename(folder) else "digits"]
    else:
        names = tuple(str(label) for label in range(count))
    if len(names) != count:
        raise TrainerError(f"--class-names {config.class_names}: {len(names)} names, but --dataset {config.dataset} "
                           f"has {count} classes; give one name per class")
    return names


def _check_labels(name: str, arrays: dict, num_classes: int) -> None:
    for split in ("train", "test"):
        labels = arrays[f"{split}_labels"]
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            bad = int(labels.max()) if labels.max() >= num_classes else int(labels.min())
            raise TrainerError(f"--dataset {name}: {split} label {bad} is out of range for its {num_classes} "
                               f"classes (0 to {num_classes - 1})")


def split_arrays(arrays: dict, config: Config, name: str, class_names: Sequence[str], **extra) -> Splits:
    """Seeded shuffle of the training split, cut to --train-limit, then the validation slice taken off
    (unless `arrays` brings its own validation_images and validation_labels). `extra`: Splits' preprocess
    and flips_keep_label."""
    images, labels = arrays["train_images"], arrays["train_labels"].astype(np.int64)
    order = np.random.default_rng(config.seed).permutation(len(images))
    if config.train_limit is not None:
        order = order[:config.train_limit]
    if "validation_images" in arrays:
        validation = (arrays["validation_images"], arrays["validation_labels"].astype(np.int64))
        train = (images[order], labels[order])
    else:
        num_validation = int(round(len(order) * config.validation_fraction))
        if num_validation < 1 or num_validation >= len(order):
            raise TrainerError(f"--validation-fraction {config.validation_fraction} of {len(order)} training "
                               "examples leaves no validation or no training data")
        validation_index, train_index = order[:num_validation], order[num_validation:]
        train, validation = (images[train_index], labels[train_index]), (images[validation_index],
                                                                         labels[validation_index])
    return Splits(
        name=name,
        class_names=tuple(class_names),
        train=train,
        validation=validation,
        test=(arrays["test_images"], arrays["test_labels"].astype(np.int64)),
        **extra,
    )


def _load(config: Config) -> Splits:
    if config.dataset_kind == "idx":
        arrays = load_idx_folder(config.idx_dir)
        max_label = max(int(arrays["train_labels"].max()), int(arrays["test_labels"].max()))
        names = resolve_class_names(config, max_label=max_label)
        _check_labels(config.dataset, arrays, len(names))
        return split_arrays(arrays, config, config.dataset, names)
    if config.dataset_kind == "folder":
        from trainer.image_folder import load_image_folder

        arrays, folder_names = load_image_folder(config.folder_dir, config.image_size)
        if "all_images" in arrays:  # the folder has no split of its own
            (arrays["train_images"], arrays["train_labels"]), (arrays["test_images"], arrays["test_labels"]) = \
                holdout_test(arrays.pop("all_images"), arrays.pop("all_labels"))
        names = resolve_class_names(config, folder_names, len(folder_names))
        return split_arrays(arrays, config, config.dataset, names, preprocess="resize")
    arrays, tfds_names, num_classes = load_tfds(config.dataset, config.data_dir)
    names = resolve_class_names(config, tfds_names, num_classes)
    _check_labels(config.dataset, arrays, num_classes)
    return split_arrays(arrays, config, config.dataset, names,
                        flips_keep_label=tfds_base(config.dataset) in FLIP_SAFE_TFDS)


def load_splits(config: Config) -> Splits:
    """Load the configured dataset and split it; every fault is a TrainerError naming the file or setting
    (running out of memory here names the data, not the model)."""
    try:
        return _load(config)
    except MemoryError:
        raise TrainerError(f"--dataset {config.dataset}: out of memory while loading the data (is it too large for "
                           "this machine? --train-limit does not shrink what is read)") from None


def epoch_augment(config: Config, splits: Splits, epoch: int) -> str:
    """The augmentation of the 0-based `epoch`: config.augment_at(epoch), with flips added to `shift` when
    they keep the label (--flip, or by default when the data says so) and taken off with --no-flip."""
    augment = config.augment_at(epoch)
    flip = config.flip if config.flip is not None else splits.flips_keep_label
    if augment == "shift" and flip:
        return "shift-flip"
    if augment == "shift-erase" and flip:
        return "shift-flip-erase"  # the pipeline's own name for both: not a --augment choice
    if augment == "shift-flip" and config.flip is False:
        return "shift"
    return augment


# ---------------------------------------------------------------------------------------------- pipelines

def _decode(images, labels):
    """uint8 [B, H, W] or [B, H, W, 3] -> float32 [B, H, W, C] in [0, 1]; labels int32."""
    import tensorflow as tf
    images = tf.cast(images, tf.float32)
    if images.shape.rank == 3:
        images = images[..., tf.newaxis]
    return images / 255.0, tf.cast(labels, tf.int32)


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
    `skip_steps` resumes mid-epoch. `augment` (shift, shift-flip, shift-erase, shift-flip-erase) applies
    trainer.augment to each batch with a seed from (seed, epoch, batch number), so augmented batches are
    reproducible too.
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
    height, width = int(images.shape[1]), int(images.shape[2])
    channels = 1 if len(images.shape) == 3 else int(images.shape[3])

    def gather(index, number):
        batch_images, batch_labels = _decode(tf.gather(images, index), tf.gather(labels, index))
        if augment != "none":
            from trainer.augment import batch_seed, max_shift, random_erase, shift_and_flip

            batch_images = shift_and_flip(tf.ensure_shape(batch_images, [batch, height, width, channels]),
                                          batch_seed(seed, epoch, number), flip="flip" in augment,
                                          max_shift=max_shift(height, width))
            if augment.endswith("erase"):
                batch_images = random_erase(batch_images, batch_seed(seed, epoch, number))
        return batch_images, batch_labels

    dataset = tf.data.Dataset.from_tensor_slices((order.astype(np.int32), batch_numbers.astype(np.int64)))
    return dataset.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def run_dataset(tensors: TrainTensors, global_batch_size: int, seed: int, epochs: Sequence[Tuple[int, str]],
                input_context=None, skip_steps: int = 0):
    """The training batches of every (epoch, augment) in `epochs`, one epoch after the other, repeated without
    end: one dataset, and so one iterator, for the whole run (each epoch's batches exactly as
    `train_dataset` makes them; `skip_steps` applies to the first epoch).

    One iterator, because destroying a distributed iterator stalled a two-worker cluster for up to ~10 s
    (its prefetching threads wind down first), and a new one per epoch paid that at every epoch's start.
    Without end, because over a finite dataset the distributed iterator of a multi-worker cluster all-reduces
    a "has data" flag before every step; the loop takes exactly each epoch's steps, so the repeat is never
    reached. Memory: the epochs' shuffled index batches, about 12 bytes per example and epoch."""
    datasets = [train_dataset(tensors, global_batch_size, seed, epoch, input_context, skip_steps if index == 0 else 0,
                              augment) for index, (epoch, augment) in enumerate(epochs)]
    dataset = datasets[0]
    for following in datasets[1:]:
        dataset = dataset.concatenate(following)
    return dataset.repeat()


def eval_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int):
    """Every example once, in order, decoded (for the chief's local evaluation and predictions)."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
    return dataset.map(_decode, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
