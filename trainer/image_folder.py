"""`--dataset folder:DIR`: a folder of image files with one subfolder per class -> uint8 arrays.

DIR/CLASS/**/*.png (or .jpg, .jpeg, .bmp, .gif, .webp, .tif, .tiff): the classes are the subfolder names,
sorted. When DIR holds `train` and `test` subfolders (and optionally `validation`), each is such a folder
of class subfolders and gives that split; otherwise TEST_FRACTION of every class is held out as the test
split by a shuffle with a fixed seed (`data.holdout_test`). Files without an image extension are not
read; an image file that cannot be read is named on stderr and the run stops once all were tried.

Every image is decoded as predict decodes one (`trainer.predict.reading`: EXIF orientation, transparency,
16-bit and palette images) and resized with `images.to_model_pixels` to one size: `--image-size`, else the
most common size among the files. The images are grey (uint8 [N, H, W]) when every one has R == G == B,
else colour ([N, H, W, 3]). `scan_folder` needs no image decoding and no TensorFlow: the trainer calls it
before TensorFlow loads, so a badly laid out folder fails at once.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from trainer.errors import TrainerError
from trainer.images import MAX_SIDE, MIN_SIDE

PROGRESS_SECONDS = 10  # reading a large folder prints how far it is this often
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_NAMES = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class FolderLayout:
    """The image files of a folder: `files[split]` is a list of (path, class index); `split` is "all" when
    the folder has no train/test subfolders of its own."""

    folder: str
    class_names: Tuple[str, ...]
    files: Dict[str, List[Tuple[str, int]]]


def _subfolders(folder: str) -> List[str]:
    try:
        entries = sorted(os.listdir(folder))
    except OSError as error:
        raise TrainerError(f"--dataset folder:{folder}: cannot list it ({error.strerror or error})") from None
    return [name for name in entries if not name.startswith(".") and os.path.isdir(os.path.join(folder, name))]


def _image_files(folder: str) -> List[str]:
    """Every file with an image extension below `folder` (hidden files and folders left out), sorted."""
    found: List[str] = []
    for root, folders, files in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        found.extend(os.path.join(root, name) for name in sorted(files)
                     if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS))
    return found


def _class_files(folder: str, shown: str, class_names: Optional[Sequence[str]] = None) -> Tuple[Tuple[str, ...],
                                                                                            List[Tuple[str, int]]]:
    """The class subfolders of `folder` and their image files; with `class_names`, the subfolders must be
    among them (a split's classes are the training split's)."""
    names = _subfolders(folder)
    if not names:
        raise TrainerError(f"--dataset folder:{shown}: holds no class subfolders; put each class's images in a "
                           "subfolder named after the class (DIR/CLASS/image.png)")
    if class_names is None:
        if len(names) < 2:
            raise TrainerError(f"--dataset folder:{shown}: holds one class subfolder ({names[0]}); a classifier "
                               "needs at least 2 classes")
        class_names = names
    else:
        unknown = [name for name in names if name not in class_names]
        if unknown:
            raise TrainerError(f"--dataset folder:{shown}: class subfolder {unknown[0]} is not among the training "
                               f"split's classes ({', '.join(class_names)})")
    files: List[Tuple[str, int]] = []
    for name in names:
        found = _image_files(os.path.join(folder, name))
        if not found:
            raise TrainerError(f"--dataset folder:{shown}: class subfolder {name} holds no image files "
                               f"({', '.join(IMAGE_EXTENSIONS)})")
        label = list(class_names).index(name)
        files.extend((path, label) for path in found)
    return tuple(class_names), files


def scan_folder(folder: str) -> FolderLayout:
    """The folder's classes and image files (no image is opened); a TrainerError for a folder that is
    missing, empty, has fewer than 2 classes or a class without images."""
    if not os.path.isdir(folder):
        what = "not a folder" if os.path.exists(folder) else "no such folder"
        raise TrainerError(f"--dataset folder:{folder}: {what}")
    subfolders = _subfolders(folder)
    if "train" in subfolders and "test" in subfolders:
        class_names, train = _class_files(os.path.join(folder, "train"), os.path.join(folder, "train"))
        files = {"train": train}
        for split in ("validation", "test"):
            if split in subfolders:
                shown = os.path.join(folder, split)
                files[split] = _class_files(shown, shown, class_names)[1]
        return FolderLayout(folder, class_names, files)
    class_names, found = _class_files(folder, folder)
    return FolderLayout(folder, class_names, {"all": found})


def _stored_size(path: str) -> Optional[Tuple[int, int]]:
    """(height, width) of an image file as it shows upright, from its header; None when it cannot be read
    (reading it properly will say why)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientation: a quarter turn
    except Exception:  # Pillow reports unreadable headers in many types; the full read names the fault
        return None
    return (width, height) if turned else (height, width)


def common_size(paths: Sequence[str]) -> Tuple[int, int]:
    """The most common (height, width) among the files (the larger one on a tie)."""
    counts = collections.Counter(size for size in map(_stored_size, paths) if size is not None)
    if not counts:
        return (0, 0)
    return max(counts, key=lambda size: (counts[size], size))


def read_images(paths: Sequence[str], size: Tuple[int, int]) -> Tuple[np.ndarray, List[str]]:
    """uint8 [N, H, W] when every image is grey, else [N, H, W, 3], and the fault lines of the files that
    could not be read (their rows stay zero)."""
    from trainer.images import to_model_pixels
    from trainer.predict.reading import image_to_rgb, open_image

    height, width = size
    pixels = np.zeros((len(paths), height, width, 3), dtype=np.uint8)
    faults: List[str] = []
    grey = True
    next_report = time.monotonic() + PROGRESS_SECONDS
    for index, path in enumerate(paths):
        if time.monotonic() >= next_report:  # a large folder takes minutes: say how far it is
            print(f"reading images: {index:,} of {len(paths):,} files", flush=True)
            next_report = time.monotonic() + PROGRESS_SECONDS
        try:
            rgb = image_to_rgb(open_image(path))
        except TrainerError as error:
            faults.append(str(error))
            continue
        except Exception as error:  # a decoder fault past open_image's checks
            faults.append(f"{path}: not a readable image ({type(error).__name__}: {error})")
            continue
        grey = grey and bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))
        pixels[index] = to_model_pixels(rgb, height, width, 3)
    # a grey image's three channels resize alike, so channel 0 is to_model_pixels(rgb, height, width, 1)
    return (pixels[..., 0].copy() if grey else pixels), faults


def load_image_folder(folder: str, image_size: Optional[Tuple[int, int]] = None) -> Tuple[dict, Tuple[str, ...]]:
    """The folder's arrays and class names: train_*, test_* and validation_* (images, labels) for the splits
    the folder has, or all_* when it has none of its own."""
    layout = scan_folder(folder)
    every = [path for files in layout.files.values() for path, _ in files]
    size = (int(image_size[0]), int(image_size[1])) if image_size else common_size(every)
    if all(size) and not all(MIN_SIDE <= side <= MAX_SIDE for side in size):
        raise TrainerError(f"--dataset folder:{folder}: its most common image size is {size[0]}x{size[1]}; give "
                           f"--image-size with sides of {MIN_SIDE} to {MAX_SIDE} pixels")
    # when no header reads, every file fails below and the size does not matter
    images, faults = read_images(every, size if all(size) else (MIN_SIDE, MIN_SIDE))
    for line in faults:
        print(f"error: {line}", file=sys.stderr)
    if faults:
        raise TrainerError(f"--dataset folder:{folder}: {len(faults)} of {len(every)} image files cannot be read "
                           "(each named above); repair or remove them, or move them out of the folder")
    labels = np.array([label for files in layout.files.values() for _, label in files], dtype=np.int64)
    arrays, start = {}, 0
    for split, files in layout.files.items():
        arrays[split] = (images[start:start + len(files)], labels[start:start + len(files)])
        start += len(files)
    return {f"{split}_{kind}": array for split, (images_, labels_) in arrays.items()
            for kind, array in (("images", images_), ("labels", labels_))}, layout.class_names
