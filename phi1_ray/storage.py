"""Where files live: local paths and URIs (``s3://``, ``gs://``, ``file://``, any filesystem pyarrow reaches).

The one module that knows URIs: telling a URI from a path, the filesystem behind either, whether a path exists,
a local copy of a remote directory (cached in ``$PHI1_CACHE`` by content), uploads, removal, and atomic writes of
small files (markers and manifests: a reader sees the old file or the new one, never a torn one). Everything else
hands paths to these functions and never parses a scheme itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from phi1_ray.errors import StorageError

SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "file")
"""The URI schemes of pyarrow's filesystems."""
CACHE_ENV = "PHI1_CACHE"
"""Where local copies of remote directories go (default ``~/.cache/phi1_ray``)."""


def is_uri(path: str | Path) -> bool:
    """Whether ``path`` is a URI (``scheme://...``) rather than a local path."""
    return "://" in str(path)


def scheme(path: str | Path) -> str | None:
    """The URI scheme of ``path`` (``s3``), None for a local path."""
    return str(path).split("://", 1)[0] if is_uri(path) else None


def check_scheme(path: str, what: str) -> None:
    """A :class:`StorageError` naming ``what`` and the schemes that work when ``path`` is a URI of an unknown
    scheme (checked without contacting the storage)."""
    if is_uri(path) and scheme(path) not in SCHEMES:
        schemes = ", ".join(f"{s}://" for s in SCHEMES)
        raise StorageError(f"{what}={path}: unknown scheme (use {schemes} or a directory)")


def resolve(path: str | Path) -> str:
    """A URI as it is; a local path made absolute (``~`` expanded), so it means the same in any process."""
    return str(path) if is_uri(path) else str(Path(path).expanduser().resolve())


def absolute_if_local(value: str) -> str:
    """A relative path that exists here made absolute (a process with another working directory, a Tune trial or
    a Ray worker, finds it too); URIs, hub ids and paths that do not exist stay as they are."""
    if is_uri(value) or not Path(value).expanduser().exists():
        return value
    return str(Path(value).expanduser().resolve())


def join(root: str | Path, *parts: str) -> str:
    """``root/part/...`` for a URI or a local path."""
    return "/".join([str(root).rstrip("/"), *parts])


def name_of(path: str | Path) -> str:
    """The last component of a path or URI (``s3://b/runs/export/`` -> ``export``)."""
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def filesystem_of(path: str | Path) -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) for a local path or a URI."""
    from pyarrow import fs

    if is_uri(path):
        return fs.FileSystem.from_uri(str(path))
    return fs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def with_scheme(root: str, path: str) -> str:
    """A path listed on ``root``'s filesystem as a full URI again (``bucket/key`` -> ``s3://bucket/key``); local
    paths stay plain."""
    if is_uri(root) and not is_uri(path):
        return f"{scheme(root)}://{path}"
    return path


def exists(path: str | Path) -> bool:
    """Whether a file or directory exists, locally or on object storage."""
    from pyarrow import fs

    filesystem, root = filesystem_of(path)
    return filesystem.get_file_info(root).type != fs.FileType.NotFound


def read_bytes(path: str | Path) -> bytes:
    """The bytes of a file, local or remote (``FileNotFoundError`` when there is none)."""
    filesystem, root = filesystem_of(path)
    with filesystem.open_input_stream(root) as stream:
        return stream.read()


def read_json(path: str | Path) -> Any | None:
    """A small JSON file (a marker or manifest), None when it does not exist; a :class:`StorageError` naming the
    file when it is not valid JSON."""
    try:
        data = read_bytes(path)
    except (FileNotFoundError, IsADirectoryError):
        return None
    except OSError as exc:
        if exists(path):
            raise StorageError(f"{path}: cannot read ({exc})") from None
        return None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StorageError(f"{path}: not valid JSON ({exc}); delete it to start that step again") from None


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write a small file so that a reader sees the old content or the new, never part of it: locally a
    temporary file beside it, flushed and renamed over it; on object storage one PUT (objects appear whole)."""
    payload = data.encode() if isinstance(data, str) else data
    if is_uri(path):
        filesystem, root = filesystem_of(path)
        filesystem.create_dir(root.rsplit("/", 1)[0], recursive=True)
        with filesystem.open_output_stream(root) as stream:
            stream.write(payload)
        return
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, value: Any) -> None:
    """:func:`write_atomic` of ``value`` as indented JSON."""
    write_atomic(path, json.dumps(value, indent=2, default=str) + "\n")


def upload(local: str | Path, uri: str) -> None:
    """Copy a local directory to ``uri`` (object storage, or a directory given as a URI), creating it first."""
    from pyarrow import fs

    filesystem, root = filesystem_of(uri)
    filesystem.create_dir(root, recursive=True)
    fs.copy_files(str(local), root, source_filesystem=fs.LocalFileSystem(), destination_filesystem=filesystem)


def remove(path: str | Path) -> None:
    """Delete a file or a directory tree, local or remote; nothing when it does not exist."""
    from pyarrow import fs

    filesystem, root = filesystem_of(path)
    kind = filesystem.get_file_info(root).type
    if kind == fs.FileType.Directory:
        filesystem.delete_dir(root)
    elif kind == fs.FileType.File:
        filesystem.delete_file(root)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, "~/.cache/phi1_ray")).expanduser()


def localize(path: str | Path) -> str:
    """A local directory for ``path``: itself when local; for a URI a copy in ``$PHI1_CACHE/checkpoints`` made once
    per content (names, sizes and times of its files), so a changed directory at the same URI is copied again."""
    path = str(path)
    if not is_uri(path):
        return path
    from pyarrow import fs

    try:
        filesystem, root = fs.FileSystem.from_uri(path)
        files = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    except (OSError, ValueError) as exc:
        raise StorageError(f"{path}: cannot list the directory ({exc})") from None
    files = [f for f in files if f.type == fs.FileType.File]
    if not files:
        raise StorageError(f"{path}: no files there")
    listing = sorted((f.path, f.size, str(f.mtime_ns)) for f in files)
    key = hashlib.sha256(json.dumps([path, listing]).encode()).hexdigest()[:16]
    local = cache_root() / "checkpoints" / f"{Path(root.rstrip('/')).name}-{key}"
    if (local / ".complete").is_file():
        return str(local)
    partial = local.with_name(local.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    fs.copy_files(root, str(partial), source_filesystem=filesystem, destination_filesystem=fs.LocalFileSystem())
    (partial / ".complete").touch()
    shutil.rmtree(local, ignore_errors=True)
    partial.rename(local)
    return str(local)
