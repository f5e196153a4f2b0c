"""One writer per run folder and per exported LoRA file.

A lock is a small file (`<run>/run.lock`, `<lora_dir>/.<name>.safetensors.lock`) that the owning process holds an
exclusive `flock` on for as long as it runs, and that names the owner (pid, the process's start time, host). The
kernel drops the flock when the process ends in any way, kill -9 included, so a lock file left by a dead process
is taken over without guessing; the start time in it tells a reused pid from the owner in the refusal message.
Where `fcntl` does not exist (Windows) the file's pid and start time decide whether its owner is still alive.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .config import ConfigError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class LockedError(ConfigError):
    """Another live process owns the folder or file; the message names it (pid, start time) and the way out."""


def process_start_ticks(pid: int) -> int | None:
    """When a process started, in clock ticks since boot (Linux /proc); None where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after its closing one.
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    now = process_start_ticks(pid)
    return start_ticks is None or now is None or now == start_ticks


def _owner_record(what: str) -> dict:
    return {"pid": os.getpid(), "start_ticks": process_start_ticks(os.getpid()), "started": time.time(),
            "host": socket.gethostname(), "what": what}


def describe(owner: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(owner.get("started", 0)))
    host = owner.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"pid {owner.get('pid', '?')}{where}, started {when}"


class Lock:
    """An exclusive lock on `path`, acquired at construction (LockedError if a live process holds it)."""

    def __init__(self, path: str | Path, what: str):
        self.path, self.what = Path(path), what
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd: int | None = None
        for _ in range(5):  # another process may unlink the file between our open and flock: try again
            if self._try_acquire():
                return
        raise LockedError(f"could not lock {self.path}; remove it if no training is running")

    def _try_acquire(self) -> bool:
        record = _owner_record(self.what)
        if fcntl is None:
            return self._acquire_by_pid(record)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise LockedError(self._refusal(_read_owner(self.path))) from None
        if os.fstat(fd).st_ino != _inode(self.path):  # released and unlinked by its owner meanwhile
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
        self.fd = fd
        return True

    def _acquire_by_pid(self, record: dict) -> bool:
        owner = _read_owner(self.path)
        if owner and pid_alive(int(owner.get("pid", 0)), owner.get("start_ticks")):
            raise LockedError(self._refusal(owner))
        self.path.unlink(missing_ok=True)  # a stale lock: its process is gone
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        os.write(fd, json.dumps(record).encode())
        os.close(fd)
        self.fd = -1
        return True

    def _refusal(self, owner: dict | None) -> str:
        who = describe(owner) if owner else "a process that is starting up"
        return (f"{self.what} is in use by another training ({who}); wait for it to finish or stop it, "
                f"or choose another name")

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # unlink while still holding it: see the inode check above
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _read_owner(path: Path) -> dict | None:
    for _ in range(3):  # the owner writes its record just after locking: an empty read means "a moment"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            return None
        if text:
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                return None
        time.sleep(0.05)
    return None


def run_lock(run_dir: Path) -> Lock:
    return Lock(Path(run_dir) / "run.lock", f"run folder {run_dir}")


def output_lock(lora_path: Path) -> Lock:
    lora_path = Path(lora_path)
    return Lock(lora_path.with_name(f".{lora_path.name}.lock"), f"output {lora_path}")
