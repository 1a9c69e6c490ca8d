"""Reading an image file: what the path is (a regular file, an image arriving through a pipe, or something
refused at once), the decompression-bomb limit, the decode, EXIF orientation, 16-bit grey, transparency.

Only regular files are opened by name: a named pipe, a device, a socket or a folder given as an image is
refused before anything is read (a named pipe with no writer would wait for ever). An image arriving
through a pipe the command inherited (`<(cat x.png)`, `/dev/fd/N`, `/dev/stdin`) is read once into memory,
up to PIPE_BYTES, giving up after PIPE_WAIT seconds without a byte.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import select
import stat
import time
from typing import Union

import numpy as np

from trainer.errors import TrainerError
from trainer.predict.cleanup import LUMA

WORK_SIDE = 512  # photos are reduced to this many pixels a side at most before the object is looked for
# Pillow's own limit, here applied to the pixels decoded (a JPEG decodes at down to 1/8 scale, so a 200-megapixel
# photo is read): 9000x9000 RGBA, 81M pixels, decodes in about 1.3 s and at most 0.7 GB
MAX_DECODED_PIXELS = 89_478_485
PIPE_BYTES = 256 * 2**20  # an image arriving through a pipe is held in memory: at most this many bytes
PIPE_WAIT = 10.0  # seconds a pipe may stay silent before it is given up
_INHERITED = re.compile(r"^/(dev/fd|proc/(self|\d+)/fd)/\d+$|^/dev/std(in|out|err)$")

Source = Union[str, io.BytesIO]


# ------------------------------------------------------------------------------ what the path is

def _read_pipe(path: str) -> io.BytesIO:
    """The bytes arriving through an inherited pipe, to its end. Read without blocking: a reader that opened
    the pipe after its writer is not told by select() when the writer closes it, only by read()."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    chunks, size = [], 0
    last_byte = time.monotonic()
    try:
        while True:
            try:
                chunk = os.read(descriptor, 1 << 20)
            except BlockingIOError:  # the writer is there but has sent nothing yet
                if time.monotonic() - last_byte > PIPE_WAIT:
                    raise TrainerError(f"{path}: a pipe that sent nothing for {PIPE_WAIT:.0f} s, so given up") from None
                select.select([descriptor], [], [], 0.1)
                continue
            if not chunk:
                break
            last_byte = time.monotonic()
            size += len(chunk)
            if size > PIPE_BYTES:
                raise TrainerError(f"{path}: refused: more than {PIPE_BYTES // 2**20} MB through the pipe")
            chunks.append(chunk)
    finally:
        os.close(descriptor)
    if not size:
        raise TrainerError(f"{path}: a pipe that ended without sending anything, so no image")
    return io.BytesIO(b"".join(chunks))


def image_source(path: str) -> Source:
    """`path` itself when it is a regular file; the bytes of an image arriving through an inherited pipe;
    otherwise a TrainerError naming the path and what it is."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise TrainerError(f"{path}: no such file") from None
    except OSError as error:  # a path through a file, a symbolic link loop, no permission to look
        raise TrainerError(f"{path}: cannot read it ({error.strerror or type(error).__name__})") from None
    if stat.S_ISREG(mode):
        return path
    if stat.S_ISDIR(mode):
        raise TrainerError(f"{path}: not a regular file (a folder), so not read as an image")
    if stat.S_ISFIFO(mode) and _INHERITED.match(os.path.abspath(path)):
        return _read_pipe(path)
    kind = ("a named pipe" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "something else")
    raise TrainerError(f"{path}: not a regular file ({kind}), so not read as an image")


# --------------------------------------------------------------------------------------- decoding

@contextlib.contextmanager
def _own_pixel_limit():
    """Pillow's decompression-bomb check off while an image is opened: `open_image` applies the same limit
    itself, to the pixels it will decode (a JPEG's after `draft`), and names the size. (Pillow's limit is a
    module global: this is for one thread at a time, as the command runs.)"""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _open_for_decoding(source: Source, path: str):
    """The image at `source`, opened (not decoded), a JPEG set to decode at 1/2, 1/4 or 1/8 scale when large;
    refused when what would be decoded is more than MAX_DECODED_PIXELS."""
    from PIL import Image

    if isinstance(source, io.BytesIO):
        source.seek(0)
    image = Image.open(source)
    factor = max(image.size) // WORK_SIDE
    if factor > 1:  # JPEG only: other formats decode whole, whatever is asked
        image.draft(image.mode, (image.size[0] // factor, image.size[1] // factor))
    width, height = image.size
    if width * height > MAX_DECODED_PIXELS:
        image.close()
        raise TrainerError(f"{path}: refused: {width:,}x{height:,} pixels to decode, more than the "
                           f"{MAX_DECODED_PIXELS:,} allowed (a decompression bomb?)")
    return image


def open_image(path: str):
    """The image file at `path`, decoded (a PIL image); any fault is a TrainerError naming the file."""
    from PIL import UnidentifiedImageError

    try:
        source = image_source(path)
        with _own_pixel_limit():
            with _open_for_decoding(source, path) as image:
                image.verify()  # every chunk's checksum, for PNG (decoding alone skips the pixel data's)
            image = _open_for_decoding(source, path)
            image.load()
            return image
    except TrainerError:  # refused by what the path is, or its size, already naming the file
        raise
    except FileNotFoundError:
        raise TrainerError(f"{path}: no such file") from None
    except PermissionError:
        raise TrainerError(f"{path}: cannot read it (permission denied)") from None
    except UnidentifiedImageError:
        raise TrainerError(f"{path}: not a readable image (an unknown format, or a corrupt header)") from None
    except MemoryError:
        raise TrainerError(f"{path}: too large to decode in memory") from None
    except Exception as error:  # Pillow reports corrupt data as OSError, SyntaxError, ValueError, zlib.error...
        raise TrainerError(f"{path}: not a readable image ({type(error).__name__}: {error})") from None


# ----------------------------------------------------------------------------------- to pixels

def _reduce(image):
    """Shrink a large image to at most WORK_SIDE a side (a JPEG already decodes smaller: see `_open_for_decoding`)."""
    if image.mode in ("P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGBA" if _has_alpha(image) else "RGB")
    elif image.mode.startswith("I;16"):
        image = image.convert("I")
    factor = -(-max(image.size) // WORK_SIDE)
    return image.reduce(factor) if factor > 1 else image


def _upright_turn(image):
    """The transpose that shows `image` upright by its EXIF orientation tag (how the camera was held), or None."""
    from PIL import ExifTags, Image

    turns = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}
    return turns.get(image.getexif().get(ExifTags.Base.Orientation, 1))


def _has_alpha(image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Put transparent pixels on a background that contrasts with the ink (white under dark ink)."""
    weight = alpha.sum()
    if weight == 0:
        return np.full_like(rgb, 255.0)  # nothing opaque: nothing to see
    ink_luma = float((rgb @ LUMA * alpha).sum() / weight)
    background = 255.0 if ink_luma < 128 else 0.0
    return rgb * alpha[..., None] + background * (1.0 - alpha[..., None])


def image_to_rgb(image) -> np.ndarray:
    """A PIL image -> float32 [H, W, 3] in 0..255, opaque, at most WORK_SIDE a side."""
    turn = _upright_turn(image)
    image = _reduce(image)  # first: ImageOps.exif_transpose copied the whole image, turned or not
    if turn is not None:
        image = image.transpose(turn)
    if image.mode in ("I", "F"):
        gray = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        if gray.max() > 255:
            gray = gray * (255.0 / 65535.0)  # 16-bit samples
        elif image.mode == "F" and gray.max() <= 1.0:
            gray = gray * 255.0
        return np.repeat(np.clip(gray, 0, 255)[..., None], 3, axis=2)
    if _has_alpha(image):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        return _composite(rgba[..., :3], rgba[..., 3] / 255.0)
    return np.asarray(image.convert("RGB"), dtype=np.float32)

