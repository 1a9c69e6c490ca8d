"""The command: `python -m trainer.predict --model-dir DIR image.png ...` (also `mnist-predict`), one line
per image on stdout, `PATH<TAB>INDEX (NAME)<TAB>PROBABILITY` (`--top N`: N such pairs, most probable first),
each bad image one `error:` line on stderr.
`--show PATH` writes the inputs the model saw (its size, grey or colour) as one PNG, captioned with the
model's class names.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from trainer import storage
from trainer.config import bucket_problem
from trainer.errors import TrainerError
from trainer.predict.loading import Answer, classify_top, missing_bucket, open_model
from trainer.predict.preprocess import load_image


class Result(NamedTuple):
    """One image's outcome: what the model saw and said, or why it could not look."""

    path: str
    pixels: Optional[np.ndarray] = None  # the model's input: uint8 [H, W] (grey) or [H, W, 3] (colour)
    error: Optional[TrainerError] = None
    class_index: int = -1
    name: str = ""
    probability: float = 0.0
    runners_up: Tuple[Answer, ...] = ()  # with top > 1: the next most probable classes, in order


def predict(model_dir: str, paths: Sequence[str], top: int = 1) -> List[Result]:
    """One Result per path, in order; a bad image is a Result with its error, the others are still classified
    (each with its `top` most probable classes: the answer, then `runners_up`)."""
    model = open_model(model_dir)
    loaded = []
    for path in paths:
        try:
            loaded.append(Result(path, pixels=load_image(path, model.training)))
        except TrainerError as error:
            loaded.append(Result(path, error=error))
        except (ValueError, ArithmeticError, IndexError, MemoryError) as error:  # an image no check foresaw
            loaded.append(Result(path, error=TrainerError(
                f"{shown_path(path)}: cannot prepare it for the model ({type(error).__name__}: {error})")))
    good = [result.pixels for result in loaded if result.pixels is not None]
    answers = iter(classify_top(model.serving(), model.class_names, np.stack(good), model.shown, top) if good else [])
    results = []
    for result in loaded:
        if result.pixels is not None:
            (class_index, name, probability), *runners_up = next(answers)
            result = result._replace(class_index=class_index, name=name, probability=probability,
                                     runners_up=tuple(runners_up))
        results.append(result)
    return results


SHOW_TILE = 112  # pixels: each input is zoomed by a whole factor to about this size (28x28 by 4)


def write_show(path: str, images: np.ndarray, captions: Sequence[str], zoom: Optional[int] = None,
               per_row: int = 10) -> None:
    """The inputs as the model saw them (uint8 [N, H, W] grey or [N, H, W, 3] colour), zoomed by a whole
    factor (by default the one nearest to SHOW_TILE pixels a side), in a grid, each captioned, as one PNG."""
    from PIL import Image, ImageDraw

    height, width = images.shape[1:3]
    zoom = zoom or max(1, round(SHOW_TILE / max(height, width)))
    colour = images.ndim == 4
    tile_height, tile_width, caption_height, gap = height * zoom, width * zoom, 14, 4
    rows = -(-len(images) // per_row)
    columns = min(len(images), per_row)
    size = (columns * (tile_width + gap) + gap, rows * (tile_height + caption_height + gap) + gap)
    sheet = Image.new("RGB", size, (96, 96, 96)) if colour else Image.new("L", size, 96)
    draw = ImageDraw.Draw(sheet)
    for i, (pixels, caption) in enumerate(zip(images, captions, strict=True)):
        left = gap + (i % per_row) * (tile_width + gap)
        top = gap + (i // per_row) * (tile_height + caption_height + gap)
        sheet.paste(Image.fromarray(pixels).resize((tile_width, tile_height), Image.Resampling.NEAREST), (left, top))
        draw.text((left + 1, top + tile_height + 1), caption, fill=(255, 255, 255) if colour else 255)
    try:
        sheet.save(path, format="PNG")
    except (OSError, ValueError) as error:
        raise TrainerError(f"--show {path}: cannot write it ({error})") from None


def top_count(text: str) -> int:
    """--top's value: a whole number, 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return value


def shown_path(text: str) -> str:
    """`text` on one line: a tab, newline or other control character in a path or class name is written as
    its escape (\\n, \\t, \\x1b), so that every image stays one line of output."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def output_line(result: Result) -> str:
    """`PATH<TAB>INDEX (NAME)<TAB>PROBABILITY`, and a pair more for each runner-up; the name is left out
    where it is the index itself (digits)."""
    fields = [shown_path(result.path)]
    for index, name, probability in ((result.class_index, result.name, result.probability), *result.runners_up):
        fields += [f"{index} ({shown_path(name)})" if name != str(index) else str(index), f"{probability:.4f}"]
    return "\t".join(fields)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.predict",
        description="Classify images with a model exported by trainer.task. A colour model, or one trained on "
                    "resized image files, gets each image resized whole to its size. A grey model gets images "
                    "like its training data as they are; others (photos, scans, canvas exports, any size, colour "
                    "or polarity) are cleaned up and framed as its training images are (see the model's "
                    "training_images.json).")
    parser.add_argument("--model-dir", required=True,
                        help="a run's model/ folder (SavedModel), local or gs://BUCKET/.../model")
    parser.add_argument("--show", metavar="PNG",
                        help="also write the inputs the model saw, at its size (one tile per readable image, in "
                             "order, captioned 'number: class name probability') to this PNG file")
    parser.add_argument("--top", type=top_count, default=1, metavar="N",
                        help="print each image's N most probable classes, each with its probability, most "
                             "probable first (default 1; at most the model's number of classes)")
    parser.add_argument("images", nargs="+",
                        help="image files (PNG, JPEG, ...), or an image through a pipe (<(cat x.png), /dev/stdin)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    command = parser()
    args = command.parse_args(argv)
    problem = missing_bucket(args.model_dir)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if storage.is_gcs(args.model_dir) and bucket_problem(args.model_dir):
        command.error(f"--model-dir {args.model_dir}: {bucket_problem(args.model_dir)}")
    if args.show is not None:
        if not args.show.strip():
            command.error("--show: an empty path (name the PNG file to write)")
        inputs = {os.path.realpath(path) for path in args.images if not path.startswith("/dev/")}
        if os.path.realpath(args.show) in inputs:
            command.error(f"--show {args.show}: is also one of the images to classify; it would be overwritten "
                          "(name another file)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        if args.show and not os.path.isdir(os.path.dirname(os.path.abspath(args.show))):
            raise TrainerError(f"--show {args.show}: its folder does not exist")
        results = predict(args.model_dir, args.images, args.top)
    except TrainerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        from trainer.errors import unexpected_line

        print(unexpected_line(error, None, "predict"), file=sys.stderr)
        return 1
    for result in results:
        if result.error:
            print(f"error: {shown_path(str(result.error))}", file=sys.stderr, flush=True)
        else:
            print(output_line(result), flush=True)
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
