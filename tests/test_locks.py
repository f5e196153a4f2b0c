"""One writer per run folder and output file: a live owner refuses a second one by pid and start time; a lock
left by a dead process (kill -9) is taken over."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer import locks
from trainer.locks import Lock, LockedError, output_lock, run_lock

ROOT = Path(__file__).resolve().parent.parent

HOLD = """
import sys, time
from pathlib import Path
from trainer.locks import run_lock
lock = run_lock(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def hold_in_child(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout.readline().strip() == "locked"
    return proc


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_owner_refuses_a_second_run_naming_its_pid_and_start(tmp_path):
    proc = hold_in_child(tmp_path / "run")
    try:
        with pytest.raises(LockedError) as e:
            run_lock(tmp_path / "run")
        message = str(e.value)
        assert f"pid {proc.pid}" in message and "started 20" in message and "\n" not in message
    finally:
        proc.kill()
        proc.wait()
    # killed with SIGKILL: the kernel released its flock, the lock file it left is stale and is taken over
    assert json.loads((tmp_path / "run" / "run.lock").read_text())["pid"] == proc.pid
    lock = run_lock(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "run" / "run.lock").exists()


def test_two_locks_in_one_process_conflict_and_release_frees(tmp_path):
    out = tmp_path / "Lora" / "a.safetensors"
    first = output_lock(out)
    with pytest.raises(LockedError, match="a.safetensors is in use"):
        output_lock(out)
    first.release()
    with output_lock(out):
        pass


def test_stale_record_of_a_dead_pid_is_taken_over(tmp_path):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"pid": dead_pid(), "start_ticks": 1, "started": time.time()}))
    with Lock(path, "run folder x"):
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_without_flock_the_pid_and_its_start_time_decide(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "fcntl", None)  # Windows' path
    path = tmp_path / "run.lock"
    me = {"pid": os.getpid(), "start_ticks": locks.process_start_ticks(os.getpid()), "started": time.time()}
    path.write_text(json.dumps(me))
    with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
        Lock(path, "run folder x")
    # the same pid with another start time is a reused pid, not the owner: stale
    path.write_text(json.dumps({**me, "start_ticks": me["start_ticks"] + 1}))
    Lock(path, "run folder x").release()
    path.write_text(json.dumps({**me, "pid": dead_pid()}))
    lock = Lock(path, "run folder x")
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
