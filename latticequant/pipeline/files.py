"""Writing files so that a crash never leaves a half-written one, and reading weight indexes.

Every file the package writes goes through :func:`atomic_write`: the content is written to a
temporary name in the same folder, flushed and fsynced, renamed over the target, and the folder
is fsynced so that the rename itself survives a power cut. A reader therefore sees either the
old file or the whole new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

__all__ = [
    "tensor_sums",
    "WEIGHTS_FILE",
    "INDEX_FILE",
    "atomic_write",
    "write_json",
    "save_tensors",
    "fsync_folder",
    "read_weight_map",
    "replace_folder",
]

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make the entries of ``folder`` (a rename, a new file) durable."""
    fd = os.open(str(folder), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ordinary_permissions(path: Path) -> None:
    """Give a file the permissions of an ordinary new file (temporary files may be 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends, make it ``path`` durably.

    The caller writes the whole file to the yielded path (by any means: ``open``, a library's
    save function). On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        _ordinary_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_folder(path.parent)


def write_json(obj, path: str | os.PathLike, indent: int = 2) -> None:
    """``obj`` as JSON at ``path``, atomically and durably."""
    text = json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n"
    with atomic_write(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)


def save_tensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> int:
    """A safetensors file at ``path``, atomically and durably; returns the bytes of tensor data."""
    from safetensors.torch import save_file

    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_write(path) as tmp:
        save_file(data, str(tmp), metadata=metadata)
    return sum(t.numel() * t.element_size() for t in data.values())


def replace_folder(work: Path, final: Path) -> None:
    """Rename the finished folder ``work`` to ``final``, replacing an older ``final`` whole."""
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(work, final)
    fsync_folder(final.parent)
    if old is not None:
        shutil.rmtree(old)


def read_weight_map(
    folder: Path, error: Callable[[str], Exception] = ValueError
) -> dict[str, str] | None:
    """Tensor name -> shard file from ``model.safetensors.index.json``; None without an index.

    ``error``: the exception class to raise for an unreadable index.
    """
    index = Path(folder) / INDEX_FILE
    if not index.is_file():
        return None
    try:
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise error(f"{index} is not a safetensors index: {exc}") from None
    return weight_map


#: Elements converted to float64 at a time by :func:`tensor_sums`.
SUM_CHUNK = 1 << 22


def tensor_sums(t: torch.Tensor) -> tuple[float, float]:
    """``(sum, sum of absolute values)`` of a tensor in float64, a chunk at a time: the cheap
    checksums that tell a resumed run whether its weights changed. Converting a whole
    embedding matrix to float64 at once would be 4.2 GB at Llama-3-8B's size."""
    flat = t.detach().reshape(-1)
    total = absolute = 0.0
    for a in range(0, flat.numel(), SUM_CHUNK):
        part = flat[a : a + SUM_CHUNK].double()
        total += float(part.sum())
        absolute += float(part.abs().sum())
    return total, absolute
