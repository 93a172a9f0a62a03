"""One run per run directory: the lock, its holder record, and stale locks, with real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curation.runlock import LOCK_NAME, RunLock, RunLocked, read_holder

PROJECT = Path(__file__).resolve().parents[1]

# Takes the lock, says so, then holds it until stdin closes; "clean" releases before exiting,
# "fork" leaves a forked child holding the inherited descriptor while the parent exits at once.
HOLDER = """
import os, sys, time
from curation.runlock import RunLock
run_dir, mode = sys.argv[1], sys.argv[2]
lock = RunLock(run_dir, command="curate run --out " + run_dir).acquire()
if mode == "fork":
    child = os.fork()
    if child == 0:
        time.sleep(60)
        os._exit(0)
    print(f"held {child}", flush=True)
    os._exit(0)
print("held", flush=True)
sys.stdin.read()
if mode == "clean":
    lock.release()
"""


def start_holder(run_dir: Path, mode: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline().strip()
    assert line.startswith("held"), line
    return proc, line


def test_a_second_acquirer_is_refused_at_once_naming_the_holder(tmp_path):
    proc, _ = start_holder(tmp_path, "clean")
    try:
        t0 = time.monotonic()
        with pytest.raises(RunLocked) as e:
            RunLock(tmp_path).acquire()
        assert time.monotonic() - t0 < 2.0  # never waits for the holder
        holder = e.value.holder
        assert holder.pid == proc.pid and holder.host == socket.gethostname() and holder.alive()
        message = str(e.value)
        assert f"another run is using {tmp_path}" in message
        assert f"pid {proc.pid} on {socket.gethostname()}" in message and f"curate run --out {tmp_path}" in message
        assert "choose another --out" in message
        assert read_holder(tmp_path).pid == proc.pid
    finally:
        proc.stdin.close()
        proc.wait(10)


def test_a_clean_release_leaves_no_stale_record(tmp_path):
    proc, _ = start_holder(tmp_path, "clean")
    proc.stdin.close()
    assert proc.wait(10) == 0
    assert read_holder(tmp_path) is None
    with RunLock(tmp_path, command="second") as lock:
        assert lock.took_over is None and lock.holder.pid == os.getpid()
        assert read_holder(tmp_path).command == "second"
    assert read_holder(tmp_path) is None and (tmp_path / LOCK_NAME).exists()


def test_the_lock_of_a_killed_run_is_taken_over_and_reported(tmp_path):
    proc, _ = start_holder(tmp_path, "dirty")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    with RunLock(tmp_path) as lock:
        stale = lock.took_over
        assert stale is not None and stale.pid == proc.pid and stale.alive() is False
        assert stale.command == f"curate run --out {tmp_path}"


def test_a_descendant_still_holding_the_lock_keeps_it_and_is_named(tmp_path):
    proc, line = start_holder(tmp_path, "fork")
    child = int(line.split()[1])
    proc.wait(10)  # the recorded holder is gone; its forked child holds the descriptor
    try:
        with pytest.raises(RunLocked, match=rf"pid {proc.pid} .*That process is gone, but a process it started still holds the lock"):
            RunLock(tmp_path).acquire()
    finally:
        os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:  # the child is reparented, not ours to wait for: poll until its lock drops
        try:
            lock = RunLock(tmp_path).acquire()
            break
        except RunLocked:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert lock.took_over.pid == proc.pid
    lock.release()


def test_one_process_cannot_take_the_lock_twice(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()  # released on leaving the block


def test_the_lock_creates_the_run_directory(tmp_path):
    with RunLock(tmp_path / "new" / "run") as lock:
        assert lock.held and (tmp_path / "new" / "run" / LOCK_NAME).exists()
    assert not lock.held
