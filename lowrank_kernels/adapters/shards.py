"""Safetensors files written tensor by tensor, never half-visible at their final path.

`ShardWriter` streams each added tensor's bytes to an unnamed temporary file (``O_TMPFILE``) in
the output directory, so memory holds one tensor at a time; `ShardWriter.commit` writes the
final file (header, then the data copied from the temporary file) into a second unnamed file,
syncs it and links it at its final path in one step. A killed process leaves no file behind:
unnamed files vanish with it. On file systems without ``O_TMPFILE`` a hidden ``.<name>.tmp-<pid>``
is used instead and removed on any exception.

The file layout is a function of the tensors only (keys sorted by descending dtype size, then
name, as safetensors orders them; the header's metadata keys sorted), so the same tensors give
the same bytes in any process.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from lowrank_kernels.adapters.sources import SAFETENSORS_DTYPES

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_CHUNK = 1 << 24  # bytes copied at a time


def _tmpfile(directory: str, name: str) -> tuple[int, str | None]:
    """A read-write file descriptor in ``directory`` with no name (None), or with a hidden
    temporary name where the file system cannot do unnamed files. Honours the umask."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o666), None
    except (OSError, AttributeError):
        path = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
        return os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666), path


def _publish(fd: int, temp_path: str | None, path: str) -> None:
    """Makes the synced file ``fd`` appear at ``path`` (replacing what is there) atomically."""
    os.fsync(fd)
    if temp_path is not None:
        os.replace(temp_path, path)
        return
    staging = f"{path}.link-{os.getpid()}"  # link() cannot replace; rename() can, atomically
    _link_fd(fd, staging)
    os.replace(staging, path)


@contextmanager
def _atomic_file(path: str) -> Iterator[int]:
    """A file descriptor whose file appears at ``path``, synced and whole, when the block ends;
    if the block raises, nothing appears and no temporary file is left."""
    fd, temp = _tmpfile(os.path.dirname(path) or ".", os.path.basename(path))
    try:
        yield fd
        _publish(fd, temp, path)
    except BaseException:
        if temp is not None and os.path.exists(temp):
            os.unlink(temp)
        raise
    finally:
        os.close(fd)


def _link_fd(fd: int, path: str) -> None:
    """Gives the unnamed file ``fd`` the name ``path``: linkat(2) of /proc/self/fd/N with
    AT_SYMLINK_FOLLOW (Python's os.link calls link(2) there, which would link the symlink)."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, at_symlink_follow = -100, 0x400
    if libc.linkat(at_fdcwd, f"/proc/self/fd/{fd}".encode(), at_fdcwd, os.fsencode(path), at_symlink_follow) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """One safetensors file at ``path``, built from `add`-ed tensors; nothing exists at
    ``path`` until `commit`. Use as a context manager: leaving it by an exception discards it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd, self._temp = _tmpfile(os.path.dirname(path) or ".", os.path.basename(path) + ".data")
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}  # key -> dtype, shape, start, end
        self._size = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            if self._temp is not None and os.path.exists(self._temp):
                os.unlink(self._temp)

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Appends ``tensor`` (CPU, any dtype of `SAFETENSORS_DTYPES`) under ``key``."""
        if key in self._entries:
            raise ValueError(f"{self.path}: tensor {key!r} added twice")
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(
                f"{self.path}: tensor {key!r} has dtype {tensor.dtype}, which safetensors cannot store here"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        while view:  # os.write may write less than asked
            view = view[os.write(self._fd, view[:_CHUNK]) :]
        self._entries[key] = (tensor.dtype, tuple(tensor.shape), self._size, self._size + data.nbytes)
        self._size += data.nbytes

    def keys(self) -> list[str]:
        return list(self._entries)

    def _read(self, start: int, end: int) -> Iterator[bytes]:
        while start < end:
            chunk = os.pread(self._fd, min(_CHUNK, end - start), start)
            if not chunk:
                raise OSError(f"{self.path}: temporary data ended early")
            start += len(chunk)
            yield chunk

    def digest(self, prefix: bytes = b"") -> str:
        """SHA-256 of ``prefix`` then, per key in sorted order, ``key|dtype|shape|`` and the
        tensor's bytes: `checkpoint._digest` of these tensors, computed from the disk."""
        h = hashlib.sha256(prefix)
        for key in sorted(self._entries):
            dtype, shape, start, end = self._entries[key]
            h.update(f"{key}|{dtype}|{shape}|".encode())
            for chunk in self._read(start, end):
                h.update(chunk)
        return h.hexdigest()

    def commit(self, metadata: dict[str, str] | Callable[[ShardWriter], dict[str, str]]) -> str:
        """Writes the file with ``metadata`` (or ``metadata(self)``) in its header and links it at
        ``path``. Returns the SHA-256 of the file's bytes."""
        metadata = metadata(self) if callable(metadata) else metadata
        order = sorted(self._entries, key=lambda key: (-self._entries[key][0].itemsize, key))
        header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
        offset = 0
        for key in order:
            dtype, shape, start, end = self._entries[key]
            header[key] = {
                "dtype": _DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + end - start],
            }
            offset += end - start
        text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        h = hashlib.sha256()
        with _atomic_file(self.path) as fd, os.fdopen(os.dup(fd), "wb", buffering=_CHUNK) as out:
            for piece in (len(text).to_bytes(8, "little"), text):
                out.write(piece)
                h.update(piece)
            for key in order:
                for chunk in self._read(*self._entries[key][2:]):
                    out.write(chunk)
                    h.update(chunk)
        self.close()
        return h.hexdigest()


def write_json(path: str, content: object) -> None:
    """``content`` as indented JSON at ``path``, atomically (temporary file, sync, rename)."""
    with _atomic_file(path) as fd:
        os.write(fd, (json.dumps(content, indent=2, sort_keys=True) + "\n").encode())
