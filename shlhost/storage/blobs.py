"""Blob storage behind one small interface. Writes are atomic: a reader sees all or nothing.

Keys are relative POSIX paths made by shlhost (``links/<link>/<file>-<n>.jwe``), never
taken from user input.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

_KEY = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


def check_key(key: str) -> str:
    if not _KEY.fullmatch(key) or {".", ".."} & set(key.split("/")):
        raise ValueError(f"invalid blob key {key!r}")
    return key


class BlobStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def delete(self, key: str) -> None: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> Iterator[tuple[str, datetime]]:
        """Every key under ``prefix`` with its last-modified time (for ``shlhost gc``)."""
        ...

    def ping(self) -> None:
        """Raise if the store cannot be reached (for ``/readyz``)."""
        ...


class LocalBlobStore:
    """Files under one directory; written to a temporary file, fsynced, then renamed."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[tuple[str, datetime]]:
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key, datetime.fromtimestamp(full.stat().st_mtime, UTC)

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise OSError(f"blob directory {self.root} is not writable")


def make_blob_store(config: dict[str, Any]) -> BlobStore:
    backend = config["BLOB_BACKEND"]
    if backend == "local":
        return LocalBlobStore(config["BLOB_PATH"])
    raise ValueError(f"unknown blob backend {backend!r}")
