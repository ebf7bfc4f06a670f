"""Temporary files for write-then-rename, created with the mode an ordinary file gets.

`tempfile.mkstemp` creates 0600 files, and a rename keeps the mode: every model file, manifest and marker
would end up readable by its writer alone, so a serving process running as another user could not read a
pulled model or a shared local store. These are created like `open(path, "w")` would: 0666 less the umask.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def temp_beside(target: Path, mark: str = ".") -> tuple[int, str]:
    """An open descriptor and the path of a new, empty file in target's directory, named `.<name><mark><random>`
    (hidden, so listings and globs skip it until it is renamed over target)."""
    for _ in range(100):
        path = target.parent / f".{target.name}{mark}{secrets.token_hex(4)}"
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), str(path)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {target}")


def temp_dir_beside(target: Path, mark: str = ".partial-") -> Path:
    """A new, empty directory in target's directory, to be renamed to target once complete; 0777 less the
    umask, where `tempfile.mkdtemp` would give 0700 and keep other users out of the renamed directory."""
    for _ in range(100):
        path = target.parent / f".{target.name}{mark}{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {target}")
