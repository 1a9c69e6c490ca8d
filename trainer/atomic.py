"""Files that appear whole or not at all: written under a temporary name beside their destination, then
renamed over it, so a reader (or a crash) never sees half of one. `read_regular_file` is the matching
read: it refuses anything but a regular file (a named pipe would block the reader forever)."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from typing import Optional

from trainer.errors import TrainerError

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def read_regular_file(path: str, what: str, limit: Optional[int] = None) -> bytes:
    """The bytes of the regular file `path` (at most `limit` of them), or TrainerError('WHAT: is a named
    pipe, not a regular file') for anything else, found without blocking: the file is opened non-blocking
    (so a pipe with no writer opens at once) and checked by its descriptor before one byte is read. A
    missing or unreadable file raises OSError as open() does. `what` names the file for the user, e.g.
    '--hparams-file best.json'."""
    handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(handle).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "a special file")
            raise TrainerError(f"{what}: is {kind}, not a regular file")
        os.set_blocking(handle, True)
        with os.fdopen(handle, "rb", closefd=False) as stream:
            return stream.read() if limit is None else stream.read(limit)
    finally:
        os.close(handle)


def make_readable(path: str, directory: bool = False) -> None:
    """mkstemp/mkdtemp make owner-only files; give finished outputs the usual umask-based mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def write_bytes(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, staged = tempfile.mkstemp(prefix=".partial-", dir=folder)
    with os.fdopen(handle, "wb") as out:
        out.write(data)
    make_readable(staged)
    os.replace(staged, path)


def write_json(path: str, payload: object) -> None:
    """`payload` as indented JSON with sorted keys and a final newline."""
    write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())
