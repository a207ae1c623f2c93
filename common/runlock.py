"""A run folder belongs to one live process: an exclusive flock on run_dir/.run.lock.

`common.run.resume_run` takes it (`lock_run_dir`: the main process; the other ranks learn the outcome from it) and
`export_final` / the exit-130 paths give it back (`release_run_dir`: the file is deleted); the OS drops it on any
exit, kill -9 included, so a lock file left by a crash never blocks. A second start on a held folder exits with status
2 and one line naming the holder's PID, having written nothing: at start-up (`check_run_lock`, read-only) if the
folder is already held, else in `resume_run` before any write. Below common.run and common.preflight (both use it).
"""

import atexit
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from common.cli import fail
from common.rundir import RunDirError

LOCK_FILE = ".run.lock"  # in the run folder while a run holds it: {"pid", "host", "since", "command"}
_HELD: dict[str, int] = {}  # resolved run folder -> the open, flock-ed lock file of this process


def _key(run_dir) -> str:
    return str(Path(run_dir).resolve())


def _holder(fd: int) -> str:
    """Who holds the lock, from the holder's lock file (written just after it took the lock: read a few times)."""
    for _ in range(20):
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4096)
        try:
            info = json.loads(data)
            break
        except ValueError:
            time.sleep(0.01)
    else:
        return "another process (it has not written its PID yet)"
    where = f" on host {info.get('host')}" if info.get("host") != socket.gethostname() else ""
    script = str(info.get("command") or "?").split(" ", 1)[0]
    return f"PID {info.get('pid')}{where} ({script}, running since {info.get('since')})"


def _held_message(run_dir, holder: str) -> str:
    return (f"--run_dir {run_dir} is in use by {holder}; one run folder belongs to one live process: wait for that run "
            f"to end, stop it, or choose another --run_dir (the lock is {Path(run_dir) / LOCK_FILE}; the OS releases "
            "it when that process exits, even after kill -9)")


def check_run_lock(run_dir) -> None:
    """Read-only: raise RunDirError naming the holder's PID if a live process holds `run_dir` (writes nothing: a
    shared flock on an existing lock file, released at once). A lock file left by a crashed run is not held: the
    OS drops a process's flocks when it exits however it exits, so a stale file never blocks."""
    if _key(run_dir) in _HELD:
        return  # this process holds it: an earlier run in this process (in-process tests) ended without releasing
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return  # no lock file (nothing holds the folder), or not readable: the folder checks report that
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunDirError(_held_message(run_dir, _holder(fd))) from None
    finally:
        os.close(fd)  # also drops the shared flock


def _acquire(run_dir: Path) -> int | str:
    """The open lock file, flock-ed exclusively and holding this process's PID; or a message naming the holder.
    A holder deletes the file before it closes it, so after taking the flock the path must still be that file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    for attempt in range(50):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if attempt < 10:  # perhaps another start's check_run_lock, which holds it for microseconds
                os.close(fd)
                time.sleep(0.05)
                continue
            message = _held_message(run_dir, _holder(fd))
            os.close(fd)
            return message
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder deleted it as we opened it: take the new one
            os.close(fd)
            continue
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv else "python"}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        return fd
    return _held_message(run_dir, "another process (its lock file kept changing)")


def lock_run_dir(accelerator, run_dir) -> bool:
    """Take `run_dir` for this run (the main process holds the lock; the other ranks learn the outcome from it): else
    every rank exits with status 2 and one line naming the holder's PID, having written nothing. Released by
    `release_run_dir` at the end of the run, and by the OS on any exit. Returns whether this process holds it."""
    message = None
    if accelerator.is_main_process and _key(run_dir) not in _HELD:
        got = _acquire(Path(run_dir))
        if isinstance(got, str):
            message = got
        else:
            _HELD[_key(run_dir)] = got
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([message], from_process=0)[0]
    if message:
        fail(message)
    return accelerator.is_main_process


def release_run_dir(run_dir) -> None:
    """Give the folder back: delete the lock file (while still holding it), then close it."""
    fd = _HELD.pop(_key(run_dir), None)
    if fd is None:
        return
    try:
        path = Path(run_dir) / LOCK_FILE
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            path.unlink()
    except OSError:
        pass
    finally:
        os.close(fd)


@atexit.register
def _release_all() -> None:
    for key in list(_HELD):
        release_run_dir(key)
