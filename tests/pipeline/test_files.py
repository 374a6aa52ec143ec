"""Atomic, durable writes: the file is fsynced before the rename, the folder after it, and a
failed write leaves the old file and no temporary one."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from latticequant.pipeline import files


@pytest.fixture
def fsyncs(monkeypatch):
    """Record what each fsync was of: ('file', path) or ('dir', path), in order."""
    calls = []
    real = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        calls.append(("dir" if os.path.isdir(path) else "file", os.path.basename(path)))
        return real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    return calls


def test_json_is_fsynced_then_renamed_then_its_folder_fsynced(tmp_path, fsyncs, monkeypatch):
    events = []
    real_replace = os.replace
    monkeypatch.setattr(
        files.os,
        "replace",
        lambda a, b: (events.append(("rename", len(fsyncs))), real_replace(a, b)),
    )
    files.write_json({"a": [1, 2]}, tmp_path / "x.json")
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1, 2]}
    kinds = [k for k, _ in fsyncs]
    assert kinds == ["file", "dir"]
    assert fsyncs[0][1].startswith(".x.json.tmp-")  # the temporary file, before its rename
    assert fsyncs[1][1] == tmp_path.name
    assert events == [("rename", 1)]  # renamed after the file's fsync, before the folder's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_safetensors_are_durable_too(tmp_path, fsyncs):
    t = {"w": torch.arange(6.0).reshape(2, 3)}
    n = files.save_tensors(t, tmp_path / "t.safetensors", metadata={"k": "v"})
    assert n == 24 and torch.equal(load_file(str(tmp_path / "t.safetensors"))["w"], t["w"])
    assert [k for k, _ in fsyncs] == ["file", "dir"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "x.json"
    files.write_json({"old": True}, target)
    with pytest.raises(TypeError):
        _failing_write(target)
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def _failing_write(target):
    with files.atomic_write(target) as tmp, open(tmp, "w") as fh:
        fh.write("{half")
        raise TypeError("interrupted")


def test_new_files_get_ordinary_permissions(tmp_path):
    files.write_json({}, tmp_path / "p.json")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "p.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_replace_folder_swaps_whole_folders(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "new").write_text("new")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "old").write_text("old")
    files.replace_folder(tmp_path / "work", tmp_path / "final")
    assert [p.name for p in (tmp_path / "final").iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_unreadable_index_is_one_clear_error(tmp_path):
    assert files.read_weight_map(tmp_path) is None
    (tmp_path / files.INDEX_FILE).write_text("[1]")
    with pytest.raises(ValueError, match="not a safetensors index"):
        files.read_weight_map(tmp_path)


def test_tensor_sums_by_chunks(monkeypatch):
    from latticequant.pipeline import files

    monkeypatch.setattr(files, "SUM_CHUNK", 1000)
    t = torch.randn(37, 101, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    total, absolute = files.tensor_sums(t)
    t64 = t.double()
    assert abs(total - float(t64.sum())) <= 1e-9 * float(t64.abs().sum())
    assert abs(absolute - float(t64.abs().sum())) <= 1e-9 * float(t64.abs().sum())
    assert files.tensor_sums(torch.zeros(0)) == (0.0, 0.0)
