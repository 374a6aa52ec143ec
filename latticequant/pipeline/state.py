"""The run's state on disk: what makes a run resumable, and the output folder's life cycle.

After each block its quantized tensors, statistics and the next block's inputs are written to
``OUT.partial/state``; a rerun with the same settings (the same fingerprint) resumes after the
last finished block. The checkpoint is written into ``OUT.partial`` and renamed to ``OUT`` only
when complete, so ``OUT`` never holds a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from latticequant.methods.registry import Method, config_to_dict
from latticequant.pipeline.checkpoint import QuantizedLayer
from latticequant.pipeline.files import replace_folder, save_tensors, tensor_sums, write_json
from latticequant.pipeline.offload import store_of

log = logging.getLogger(__name__)

__all__ = [
    "OutputExistsError",
    "OutputLockedError",
    "output_lock",
    "lock_file",
    "ResumeMismatchError",
    "RunState",
    "fingerprint",
    "prepare_output",
    "finish_output",
    "partial_folder",
]

STATE_DIR = "state"
PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
HIDDEN_FILE = "hidden.safetensors"


class OutputExistsError(ValueError):
    """The output folder exists and overwriting was not asked for."""


class OutputLockedError(ValueError):
    """Another run, still alive, holds the lock on the output folder."""


class ResumeMismatchError(ValueError):
    """Saved per-block state was made with other settings than the current run."""


def partial_folder(out_dir: str | Path) -> Path:
    """Where a run writes ``out_dir`` until it is complete (and keeps its state to resume)."""
    final = Path(out_dir)
    return final.with_name(final.name + PARTIAL_SUFFIX)


def fingerprint(model, method: Method, config, overrides, calib_ids, attention_mask, extra):
    store = store_of(model)
    if store is not None:  # blocks on disk: their files' headers stand for their values
        extra = {**extra, "block_files": store.fingerprint()}
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "method": method.name,
                "config": config_to_dict(config),
                "overrides": [dataclasses.asdict(o) for o in overrides],
                # Shapes and a cheap checksum of every tensor: another model or other weights.
                "model": {
                    k: [list(v.shape), tensor_sums(v)[0]]
                    for k, v in model.state_dict().items()
                    if v.device.type != "meta"
                },
                "model_config": getattr(getattr(model, "config", None), "to_json_string", str)(),
                "extra": extra,
            },
            sort_keys=True,
            default=str,
        ).encode()
    )
    h.update(calib_ids.cpu().numpy().tobytes())
    if attention_mask is not None:
        h.update(attention_mask.cpu().numpy().tobytes())
    return h.hexdigest()


class RunState:
    """Per-block state in ``OUT.partial/state``: finished blocks and the next block's inputs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def block_paths(self, index: int) -> tuple[Path, Path]:
        return (
            self.folder / f"block_{index:04d}.safetensors",
            self.folder / f"block_{index:04d}.json",
        )

    def save_block(
        self, index, layers: dict[str, QuantizedLayer], Qs, hidden, source: float | None = None
    ) -> None:
        """``source``: checksum of the block's weights as read from disk (blocks kept there)."""
        tensors, entries = {}, {}
        for name, layer in layers.items():
            for key, t in layer.tensors.items():
                tensors[f"{name}.{key}"] = t.cpu()
            tensors[f"{name}.__Q__"] = Qs[name].cpu()
            entries[name] = {
                "format": layer.format,
                "stats": layer.stats,
                "config": layer.config,
                "keys": sorted(layer.tensors),
                "desc_act": layer.desc_act,
            }
        tpath, jpath = self.block_paths(index)
        save_tensors(tensors, tpath)
        write_json({"layers": entries, "source": source}, jpath)
        # Written last: it names the block it feeds, so it marks everything before as done.
        save_tensors(
            {f"hidden.{i}": h.cpu() for i, h in enumerate(hidden)},
            self.folder / HIDDEN_FILE,
            metadata={"next_block": str(index + 1)},
        )

    def next_block(self) -> int:
        path = self.folder / HIDDEN_FILE
        if not path.exists():
            return 0
        with safe_open(str(path), "pt") as f:
            nxt = int(f.metadata()["next_block"])
        if not all(p.exists() for i in range(nxt) for p in self.block_paths(i)):
            return 0
        return nxt

    def source_checksum(self, index: int) -> float | None:
        with open(self.block_paths(index)[1]) as fh:
            return json.load(fh)["source"]

    def load_hidden(self) -> list[torch.Tensor]:
        data = load_file(str(self.folder / HIDDEN_FILE))
        return [data[f"hidden.{i}"] for i in range(len(data))]

    def load_block(self, index) -> tuple[dict[str, QuantizedLayer], dict[str, torch.Tensor]]:
        tpath, jpath = self.block_paths(index)
        tensors = load_file(str(tpath))
        with open(jpath) as fh:
            entries = json.load(fh)["layers"]
        layers, Qs = {}, {}
        for name, e in entries.items():
            layers[name] = QuantizedLayer(
                name,
                e["format"],
                {k: tensors[f"{name}.{k}"] for k in e["keys"]},
                e["stats"],
                e["config"],
            )
            Qs[name] = tensors[f"{name}.__Q__"]
        return layers, Qs


# ---------------------------------------------------------------------------------------------


def prepare_output(out_dir, overwrite: bool, resume: bool, run_fingerprint: str):
    """``(final, work, state)``: a fresh work folder, or the one of an unfinished equal run."""
    final = Path(out_dir)
    if final.exists() and not overwrite:
        raise OutputExistsError(
            f"output folder {final} already exists; pass overwrite=True (--overwrite) to replace it"
        )
    work = partial_folder(final)
    state = work / STATE_DIR
    run_file = state / "run.json"
    if work.exists():
        saved = None
        if run_file.exists():
            with open(run_file) as fh:
                saved = json.load(fh).get("fingerprint")
        if resume and saved == run_fingerprint:
            log.info("resuming from %s", state)
            return final, work, RunState(state)
        if resume and saved is not None:
            raise ResumeMismatchError(
                f"{work} holds an unfinished run with other settings; delete it or pass "
                "resume=False (--no-resume) to start over"
            )
        shutil.rmtree(work)
    state.mkdir(parents=True)
    write_json({"fingerprint": run_fingerprint}, run_file)
    return final, work, RunState(state)


def finish_output(final: Path, work: Path) -> None:
    """Drop the run state and make the finished work folder the output folder."""
    shutil.rmtree(work / STATE_DIR)
    replace_folder(work, final)


# ---------------------------------------------------------------------------------------------


def lock_file(out_dir: str | Path) -> Path:
    """The lock of the run writing ``out_dir``: ``OUT.lock``, beside ``OUT`` and ``OUT.partial``
    (inside ``OUT.partial`` it would go with ``--no-resume``'s fresh start)."""
    final = Path(out_dir)
    return final.with_name(final.name + LOCK_SUFFIX)


def _owner(path: Path) -> dict | None:
    """The ``{"pid", "host"}`` a lock file names; None when it is gone or is not such a file."""
    try:
        with open(path) as fh:
            owner = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stale(owner: dict) -> bool:
    """A lock whose owner ran on this host and has exited: safe to take over."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if owner.get("host") != socket.gethostname():  # its process cannot be looked up here
        return False
    return pid != os.getpid() and not _alive(pid)


def _try_create(path: Path, owner: dict) -> bool:
    """Create ``path`` holding ``owner``, whole, unless it exists (True when created here).

    The content is written under a temporary name and hard-linked to ``path``: the link fails
    when ``path`` exists, like ``O_CREAT | O_EXCL``, and a reader never sees a half-written lock.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # this process's own name
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(owner, fh)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:  # a file system without hard links: create it exclusively
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as fh:
                json.dump(owner, fh)
        return True
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def output_lock(out_dir: str | Path) -> Iterator[Path]:
    """Hold ``OUT.lock`` while a run writes ``out_dir`` (and its ``OUT.partial``).

    The lock file names its owner's pid and host. A second run while the owner lives is refused
    with :class:`OutputLockedError` before it touches anything; a lock whose owner exited on
    this host (killed, power cut) is taken over. The lock is released when the block ends, by
    success, error or interrupt. The parent folders of ``out_dir`` are made when missing. Under
    ``torch.distributed`` only the rank that writes (rank 0) takes it.
    """
    path = lock_file(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):  # a stale lock is removed, then created again; a racing run may win
        if _try_create(path, me):
            break
        owner = _owner(path)
        if owner is None:  # released meanwhile
            continue
        if not owner.get("pid"):
            raise OutputLockedError(
                f"{path} is not a lock file latticequant wrote; delete it if no run is writing "
                f"{out_dir}"
            )
        if not _stale(owner):
            who = f"pid {owner.get('pid', '?')}"
            if owner.get("host") not in (None, socket.gethostname()):
                who += f" on {owner['host']}"
            raise OutputLockedError(
                f"another run ({who}) is writing {out_dir}; wait for it to finish, or if no run "
                f"is writing there, delete {path}"
            )
        log.info("taking over %s from exited run (pid %s)", path, owner.get("pid"))
        path.unlink(missing_ok=True)
    else:
        raise OutputLockedError(f"could not take the lock {path}; another run keeps taking it")
    try:
        yield path
    finally:
        if _owner(path) == me:  # never remove a lock that another run took over
            path.unlink(missing_ok=True)
