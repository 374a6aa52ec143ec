"""The lock on an output folder: one run at a time, a dead owner's lock taken over, always
released."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from latticequant.pipeline.state import OutputLockedError, lock_file, output_lock


def _exited_pid() -> int:
    """The pid of a process that has exited (and been waited for)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(out, pid, host=None):
    path = lock_file(out)
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))
    return path


def test_the_lock_names_its_owner_and_is_released(tmp_path):
    out = tmp_path / "runs" / "deeper" / "out"  # missing parents are made
    with output_lock(out) as path:
        assert path == tmp_path / "runs" / "deeper" / "out.lock"
        owner = json.loads(path.read_text())
        assert owner == {"pid": os.getpid(), "host": socket.gethostname()}
        assert not out.exists()  # the lock makes only the parents
    assert not path.exists()
    assert sorted(p.name for p in (tmp_path / "runs" / "deeper").iterdir()) == []


def test_a_live_owner_refuses_a_second_run(tmp_path):
    out = tmp_path / "out"
    path = _write_lock(out, os.getpid())  # this process is alive
    before = path.read_text()
    with pytest.raises(OutputLockedError, match=rf"another run \(pid {os.getpid()}\) is writing"):
        with output_lock(out):
            raise AssertionError("the lock was taken")
    assert path.read_text() == before  # the owner's lock stays


def test_nested_locks_of_one_process_refuse(tmp_path):
    with output_lock(tmp_path / "out"):
        with pytest.raises(OutputLockedError):
            with output_lock(tmp_path / "out"):
                pass
        assert lock_file(tmp_path / "out").exists()


def test_the_lock_of_an_exited_run_is_taken_over(tmp_path):
    out = tmp_path / "out"
    dead = _exited_pid()
    assert dead != os.getpid()
    path = _write_lock(out, dead)
    with output_lock(out):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    out = tmp_path / "out"
    _write_lock(out, _exited_pid(), host="elsewhere.invalid")
    with pytest.raises(OutputLockedError, match="on elsewhere.invalid"):
        with output_lock(out):
            pass


def test_a_file_that_is_no_lock_is_refused_with_what_to_do(tmp_path):
    lock_file(tmp_path / "out").write_text("garbage")
    with pytest.raises(OutputLockedError, match="not a lock file.*delete it"):
        with output_lock(tmp_path / "out"):
            pass


@pytest.mark.parametrize("error", [RuntimeError("failed"), KeyboardInterrupt()])
def test_the_lock_is_released_on_error_and_interrupt(tmp_path, error):
    with pytest.raises(type(error)):
        with output_lock(tmp_path / "out"):
            raise error
    assert not lock_file(tmp_path / "out").exists()
    with output_lock(tmp_path / "out"):  # free again
        pass


def test_a_lock_taken_over_meanwhile_is_not_removed(tmp_path):
    """A run whose stale-looking lock another run took over leaves that run's lock alone."""
    out = tmp_path / "out"
    with output_lock(out) as path:
        path.write_text(json.dumps({"pid": 1, "host": socket.gethostname()}))
    assert json.loads(path.read_text())["pid"] == 1
