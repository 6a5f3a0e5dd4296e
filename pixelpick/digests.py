"""Content digests of files and folders: what a step's freshness and cache key are computed from.

A file's digest is its md5, the hash DVC records for it, so a step record, an MLflow tag and `dvc.lock` can be
compared by eye. A folder's digest is the md5 of its sorted (relative path, file md5) list. Each file is hashed
once per process while its size and modification time stay the same (datasets are hashed by every step).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20
_memo: dict[tuple[str, int, int, int], str] = {}


def file_md5(path: str | os.PathLike) -> str:
    """The md5 of a file's bytes."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _memo:
        digest = hashlib.md5()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        _memo[key] = digest.hexdigest()
    return _memo[key]


def tree_md5(path: str | os.PathLike) -> str:
    """The md5 of a file, or of a folder's files (names and contents, hidden files and byte-code excluded)."""
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    listing = hashlib.md5()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not _ignored(p.relative_to(path))):
        listing.update(f"{file.relative_to(path).as_posix()}\0{file_md5(file)}\n".encode())
    return listing.hexdigest()


def _ignored(relative: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in relative.parts)


def value_digest(value: Any) -> str:
    """A digest of a JSON-able value (settings, keys): the same value gives the same digest in any process."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]
