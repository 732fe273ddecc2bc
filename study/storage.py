"""Storage anywhere: a local path, a shared filesystem, or an object-store URI (``s3://``, ``gs://``,
``file://``, anything ``pyarrow.fs`` resolves), behind one small interface.

Writes are atomic on every backend: the bytes go to a unique temporary name first and are then
moved into place (a rename on filesystems; on object stores a single object appears whole).
Callers that publish a set of files write them first and a manifest naming them last, so that a
reader who trusts only a complete manifest never sees a half-written set.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow.fs as pafs


class Location:
    """A folder or file on some filesystem, addressed by a URI or a local path."""

    def __init__(self, filesystem: pafs.FileSystem, path: str, uri: str):
        self.filesystem, self.path, self.uri = filesystem, path.rstrip("/") or "/", uri.rstrip("/")

    @classmethod
    def of(cls, spec: str | Path) -> Location:
        """``spec``: a local path (made absolute) or a URI such as ``s3://bucket/prefix`` or ``file:///abs``."""
        text = str(spec)
        if "://" in text:
            filesystem, path = pafs.FileSystem.from_uri(text)
            return cls(filesystem, path, text)
        absolute = str(Path(text).expanduser().resolve())
        return cls(pafs.LocalFileSystem(), absolute, absolute)

    @property
    def is_local(self) -> bool:
        """True where the path is a plain local path (file locks and ``Path`` work on it)."""
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def __truediv__(self, part: str) -> Location:
        return Location(self.filesystem, f"{self.path}/{part}", f"{self.uri}/{part}")

    def __str__(self) -> str:
        return self.uri

    def exists(self) -> bool:
        return self.filesystem.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.filesystem.get_file_info(self.path).type == pafs.FileType.File

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Atomically: readers see the old object or the whole new one, never a part."""
        parent = self.path.rsplit("/", 1)[0]
        self.filesystem.create_dir(parent, recursive=True)
        partial = f"{parent}/.{self.name}.{uuid.uuid4().hex}.partial"
        with self.filesystem.open_output_stream(partial) as stream:
            stream.write(data)
        self.filesystem.move(partial, self.path)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def file_sizes(self) -> dict[str, int]:
        """Every file below this folder (its path relative to the folder) -> bytes: one listing, which an
        object store answers a thousand keys per request, instead of a metadata call per file."""
        infos = self.filesystem.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        start = len(self.path) + 1
        return {info.path[start:]: info.size for info in infos if info.type == pafs.FileType.File}

    def children(self) -> list[Location]:
        """Entries directly inside this folder (none if it does not exist)."""
        if not self.exists():
            return []
        infos = self.filesystem.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return [self / info.base_name for info in infos]

    def upload_folder(self, local_folder: Path) -> None:
        """Copy a local folder's files here (the report, for instance)."""
        if self.is_local and Path(self.path) == Path(local_folder).resolve():
            return
        self.filesystem.create_dir(self.path, recursive=True)
        pafs.copy_files(
            str(Path(local_folder).resolve()),
            self.path,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self.filesystem,
        )
