"""Output locations: a local folder or a pyarrow filesystem URI (``file://``, ``s3://``, ``gs://``).

Workers and the driver address the same files through a :class:`Location`: it pickles as its URI,
so each Ray worker rebuilds the filesystem itself (credentials come from that worker's
environment, as pyarrow resolves them). Relative paths read from manifests are data: they must
stay inside the location.

Writes are atomic: on a local filesystem to a unique temporary name, then renamed; on an object
store an object appears only when its upload completes, so the final name is written directly.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs


def inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing absolute paths and ``..`` that leave ``root`` (a manifest
    is data: a crafted one must not make us read or overwrite files elsewhere)."""
    rel = Path(relative)
    path = (root / rel).resolve()
    if rel.is_absolute() or not path.is_relative_to(root.resolve()):
        raise ValueError(f"path {relative!r} escapes {root}")
    return path


def child_uri(uri: str, relative: str) -> str:
    """``uri`` + ``/relative``, keeping a URI's query (``?endpoint_override=...&scheme=http``) last."""
    if "?" not in uri:
        return uri.rstrip("/") + "/" + relative.strip("/")
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + relative.strip("/")))


class Location:
    """A folder on some filesystem; ``path(rel)`` gives the filesystem path of a file inside it."""

    def __init__(self, uri: str | Path):
        text = str(uri)
        if "://" in text:
            self.fs, base = pafs.FileSystem.from_uri(text)
            self.uri = text
        else:
            self.fs, base = pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
            self.uri = base
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        if self.local:
            base = str(Path(base).resolve())
        self.base = base.rstrip("/") or "/"

    def __reduce__(self):
        return (Location, (self.uri,))

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def path(self, relative: str) -> str:
        """Filesystem path of ``relative``, refusing absolute paths and ``..`` that leave the folder."""
        rel = str(relative)
        if self.local:
            return str(inside(Path(self.base), rel))
        norm = posixpath.normpath(rel)
        if rel.startswith("/") or norm == ".." or norm.startswith("../"):
            raise ValueError(f"path {relative!r} escapes {self.uri}")
        return f"{self.base}/{norm}"

    def child(self, relative: str) -> Location:
        """The sub-folder ``relative`` as a Location of its own (sharing this filesystem object)."""
        sub = object.__new__(Location)
        sub.fs, sub.local = self.fs, self.local
        sub.base = self.path(relative).rstrip("/")  # same escape check
        sub.uri = child_uri(self.uri, relative)
        return sub

    def local_path(self, relative: str = "") -> Path:
        if not self.local:
            raise ValueError(f"{self.uri} is not on the local filesystem")
        return Path(self.path(relative)) if relative else Path(self.base)

    def mkdir(self, relative: str = "") -> None:
        self.fs.create_dir(self.path(relative) if relative else self.base, recursive=True)

    def is_file(self, relative: str) -> bool:
        try:
            return self.fs.get_file_info(self.path(relative)).type == pafs.FileType.File
        except ValueError:
            return False

    def size(self, relative: str) -> int:
        return self.fs.get_file_info(self.path(relative)).size

    def list(self, relative: str = "") -> list[str]:
        """Names of the files directly inside the sub-folder ``relative`` (empty if it is absent)."""
        folder = self.path(relative) if relative else self.base
        infos = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File)

    def delete(self, relative: str) -> None:
        if self.is_file(relative):
            self.fs.delete_file(self.path(relative))

    def delete_folder(self, relative: str) -> None:
        """Remove the sub-folder ``relative`` and everything in it (nothing when it is absent)."""
        path = self.path(relative)
        if self.fs.get_file_info(path).type == pafs.FileType.Directory:
            self.fs.delete_dir(path)

    def open_input(self, relative: str):
        """A random-access file (what ``pyarrow.parquet`` reads from)."""
        return self.fs.open_input_file(self.path(relative))

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative)) as fh:
            return fh.read()

    def read_json(self, relative: str) -> Any:
        return json.loads(self.read_bytes(relative))

    def sha256(self, relative: str) -> str:
        h = hashlib.sha256()
        with self.fs.open_input_stream(self.path(relative)) as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    @contextmanager
    def open_atomic(self, relative: str) -> Iterator[Any]:
        """An output stream whose file appears under ``relative`` only once the block exits cleanly."""
        final = self.path(relative)
        self.fs.create_dir(posixpath.dirname(final), recursive=True)
        target = f"{final}.tmp-{uuid.uuid4().hex[:12]}" if self.local else final
        stream = self.fs.open_output_stream(target)
        try:
            yield stream
            stream.close()
            if target != final:
                self.fs.move(target, final)
        except BaseException:
            if not stream.closed:
                stream.close()
            if target != final:
                self.fs.delete_file(target)
            raise

    def write_bytes(self, relative: str, data: bytes) -> None:
        with self.open_atomic(relative) as fh:
            fh.write(data)

    def write_json(self, relative: str, obj: Any) -> None:
        self.write_bytes(relative, json.dumps(obj, indent=2).encode())


def check_output(uri: str | Path) -> Location:
    """The output location ``uri``, refused up front (before any cluster starts) when its filesystem
    cannot be opened or reached, it names a file, or a local folder could not be created there."""
    import os

    try:
        loc = Location(uri)
        info = loc.fs.get_file_info(loc.base)
    except (OSError, ValueError) as e:  # pyarrow: unknown scheme, bad URI, unreachable store
        raise ValueError(f"output location {str(uri)!r}: {e}") from e
    if info.type == pafs.FileType.File:
        raise ValueError(f"output location {loc.uri}: is a file, not a folder")
    if loc.local:
        parent = Path(loc.base)
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"output location {loc.uri}: cannot create it inside {parent}")
    return loc
