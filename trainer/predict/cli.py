"""The command: `python -m trainer.predict --model-dir DIR image.png ...` (also `mnist-predict`), one line
per image on stdout, `PATH<TAB>INDEX (NAME)<TAB>PROBABILITY`, each bad image one `error:` line on stderr.
`--show PATH` writes the 28x28 inputs the model saw as one PNG, captioned with the model's class names.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, NamedTuple, Optional, Sequence

import numpy as np

from trainer.errors import TrainerError
from trainer.images import IMAGE_SIZE
from trainer.predict.loading import classify, missing_bucket, open_model
from trainer.predict.preprocess import load_image


class Result(NamedTuple):
    """One image's outcome: what the model saw and said, or why it could not look."""

    path: str
    pixels: Optional[np.ndarray] = None  # uint8 [28, 28], the model's input
    error: Optional[TrainerError] = None
    class_index: int = -1
    name: str = ""
    probability: float = 0.0


def predict(model_dir: str, paths: Sequence[str]) -> List[Result]:
    """One Result per path, in order; a bad image is a Result with its error, the others are still classified."""
    model = open_model(model_dir)
    loaded = []
    for path in paths:
        try:
            loaded.append(Result(path, pixels=load_image(path, model.training)))
        except TrainerError as error:
            loaded.append(Result(path, error=error))
    good = [result.pixels for result in loaded if result.pixels is not None]
    answers = iter(classify(model.serving(), model.class_names, np.stack(good), model.shown) if good else [])
    results = []
    for result in loaded:
        if result.pixels is not None:
            class_index, name, probability = next(answers)
            result = result._replace(class_index=class_index, name=name, probability=probability)
        results.append(result)
    return results


def write_show(path: str, images: np.ndarray, captions: Sequence[str], zoom: int = 4, per_row: int = 10) -> None:
    """The 28x28 inputs as the model saw them, zoomed, in a grid, each captioned, as one PNG."""
    from PIL import Image, ImageDraw

    tile, caption_height, gap = IMAGE_SIZE * zoom, 14, 4
    rows = -(-len(images) // per_row)
    columns = min(len(images), per_row)
    sheet = Image.new("L", (columns * (tile + gap) + gap, rows * (tile + caption_height + gap) + gap), 96)
    draw = ImageDraw.Draw(sheet)
    for i, (pixels, caption) in enumerate(zip(images, captions, strict=True)):
        left = gap + (i % per_row) * (tile + gap)
        top = gap + (i // per_row) * (tile + caption_height + gap)
        sheet.paste(Image.fromarray(pixels).resize((tile, tile), Image.Resampling.NEAREST), (left, top))
        draw.text((left + 1, top + tile + 1), caption, fill=255)
    try:
        sheet.save(path, format="PNG")
    except (OSError, ValueError) as error:
        raise TrainerError(f"--show {path}: cannot write it ({error})") from None


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.predict",
        description="Classify images with a model exported by trainer.task: images like its training data go to "
                    "it as they are; others (photos, scans, canvas exports, any size, colour or polarity) are "
                    "cleaned up and framed as its training images are (see the model's training_images.json).")
    parser.add_argument("--model-dir", required=True,
                        help="a run's model/ folder (SavedModel), local or gs://BUCKET/.../model")
    parser.add_argument("--show", metavar="PNG",
                        help="also write the 28x28 inputs the model saw (one tile per readable image, in order, "
                             "captioned 'number: class name probability') to this PNG file")
    parser.add_argument("images", nargs="+",
                        help="image files (PNG, JPEG, ...), or an image through a pipe (<(cat x.png), /dev/stdin)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    problem = missing_bucket(args.model_dir)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        if args.show and not os.path.isdir(os.path.dirname(os.path.abspath(args.show))):
            raise TrainerError(f"--show {args.show}: its folder does not exist")
        results = predict(args.model_dir, args.images)
    except TrainerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        from trainer.errors import unexpected_line

        print(unexpected_line(error, None, "predict"), file=sys.stderr)
        return 1
    for result in results:
        if result.error:
            print(f"error: {result.error}", file=sys.stderr, flush=True)
        else:
            index = result.class_index
            label = f"{index} ({result.name})" if result.name != str(index) else str(index)
            print(f"{result.path}\t{label}\t{result.probability:.4f}", flush=True)
    seen = [(number, result, result.pixels) for number, result in enumerate(results, start=1)
            if result.pixels is not None]
    if args.show and seen:
        try:
            write_show(args.show, np.stack([pixels for _, _, pixels in seen]),
                       [f"{number}: {result.name[:12]} {result.probability:.0%}" for number, result, _ in seen])
        except TrainerError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    return 0 if len(seen) == len(results) else 1
