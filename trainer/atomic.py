"""Files that appear whole or not at all: written under a temporary name beside their destination, then
renamed over it, so a reader (or a crash) never sees half of one."""

from __future__ import annotations

import json
import os
import tempfile


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
