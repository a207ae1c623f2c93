"""One error boundary for every entry point (the methods, eval/evaluate.py, the scripts users run).

    if __name__ == "__main__":
        with error_boundary():
            main(parse(Args))

An expected failure prints ONE line `prog: error: <what, where, the fix>` on stderr (rank 0 only under a
launcher) and exits with status 2; anything else is a bug and keeps its traceback (status 1).
STABLE_OPD_TRACEBACK=1 shows the traceback of an expected failure too (then status 1, as Python exits).

Expected failures are known by their kind, not listed case by case (`explain`):
  - `BadInput` and its subclasses: our own checks, whose messages name the flag / file / row and the fix
    (common/cli.py ConfigError and RunDirError, common/data.py DataError, common/models.py ModelLoadError,
    common/checkpoint.py CheckpointError, eval's errors, ...);
  - the environment: an OSError (a missing, unreadable or read-only path, a file where a folder belongs, a full
    disk), a UnicodeError (a file that is not UTF-8 text), the hub / HTTP libraries' errors (no network, offline
    mode), safetensors' errors (a truncated or corrupt weights file): translated with the path the error carries.
Sources that know more (the data file and line of a bad byte, the model folder of a torn safetensors file)
raise a BadInput themselves; the translation here is the net under them.
"""

import contextlib
import errno
import os
import sys
from pathlib import Path

TRACEBACK_ENV = "STABLE_OPD_TRACEBACK"
EXIT_BAD_INPUT = 2  # argparse's status for a usage error; every expected failure exits with it


class BadInput(Exception):
    """An expected failure whose message says what is wrong, where (flag, file, row) and how to fix it. A mixin:
    each subclass keeps its own base too (ConfigError is a ValueError, CheckpointError a RuntimeError, ...)."""


def unique_keys(pairs: list, error) -> dict:
    """A JSON object's (key, value) pairs as a dict; `error(key)` is raised for a key given twice (json.loads alone
    keeps the last value silently). The object_pairs_hook of both strict JSON readers: configs (common/cli.py) and
    dataset rows (common/data.py)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise error(key)
        out[key] = value
    return out


_NETWORK_MODULES = ("huggingface_hub", "requests", "httpx", "httpcore", "urllib3")


def _os_message(e: OSError) -> str:
    """An OSError as one line naming the path and the fix."""
    path = e.filename if e.filename is not None else ""
    what = e.strerror or " ".join(str(e).split())
    if isinstance(e, PermissionError):
        fix = "check its permissions (ls -l), or choose a path you may read and write"
    elif e.errno == errno.EROFS:
        fix = "the file system is read-only: choose a writable folder (--run_dir / --output_dir)"
    elif isinstance(e, NotADirectoryError):
        fix = "a file is in the way of a folder: a --run_dir / --output_dir must be a folder (or not exist yet)"
    elif isinstance(e, IsADirectoryError):
        fix = "a folder was given where a file is expected"
    elif isinstance(e, FileNotFoundError):
        fix = "check the path"
    elif isinstance(e, FileExistsError):
        fix = "move it away or choose another path"
    else:
        fix = ""
    where = f"{path}: " if path else ""
    if e.filename2:
        where = f"{path} -> {e.filename2}: "
    return f"{where}{what}" + (f" ({fix})" if fix else "")


_DISK_FULL_TEXT = ("no space left", "unexpected pos", "file write failed", "storagefull", "code: 28", "disk quota")


def is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC / EDQUOT, or torch's and safetensors' wordings of a short write, anywhere in the exception chain."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(e).lower() for t in _DISK_FULL_TEXT):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def explain(e: BaseException) -> str | None:
    """The one-line message of an expected failure, or None for a bug (which keeps its traceback)."""
    if isinstance(e, BadInput):
        return str(e)
    if is_disk_full(e):
        return (f"disk full ({' '.join(str(e).split())[:200]}); complete checkpoints are kept, partial files removed: "
                "free space (df -h) and rerun the same command")
    if isinstance(e, UnicodeError):
        return (f"a file is not UTF-8 text ({e}); re-save it as UTF-8 (STABLE_OPD_TRACEBACK=1 shows which read "
                "it)")
    module = type(e).__module__ or ""
    if module.split(".")[0] in _NETWORK_MODULES or type(e).__name__ in ("OfflineModeIsEnabled", "ConnectionError"):
        offline = " (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        return (f"network or hub error{offline}: {type(e).__name__}: {' '.join(str(e).split())[:300]}; download "
                "what it needs first (hf download ...) and pass local paths, or check the connection / the name")
    if type(e).__name__ == "SafetensorError":
        return (f"a safetensors file is corrupt or truncated ({e}); re-download or re-save the model "
                "(STABLE_OPD_TRACEBACK=1 shows which)")
    if isinstance(e, OSError):
        return _os_message(e)
    return None


def _prog() -> str:
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"


def print_error(message: str, prog: str | None = None) -> None:
    """ONE line `prog: error: message` on stderr, from rank 0 only under a launcher (common.cli.fail, `report`)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{prog or _prog()}: error: {message}", file=sys.stderr, flush=True)


def first_line(e: BaseException, limit: int = 200) -> str:
    """`Kind: text` of an exception on one line, its text cut to `limit` characters (for messages that wrap it)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}" if text else type(e).__name__


def report(e: BaseException, prog: str | None = None) -> bool:
    """Print `e` as one `error:` line if it is an expected failure (and no traceback was asked for); True if so."""
    text = explain(e)
    if text is None or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        return False
    _end_progress_bars()
    print_error(" ".join(text.split()), prog)
    return True


def _end_progress_bars() -> None:
    """Close the tqdm bars the failure left open, so the error line starts a line of its own."""
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", [])):
        with contextlib.suppress(Exception):  # a bar that cannot close must not hide the error line
            bar.close()


@contextlib.contextmanager
def error_boundary(prog: str | None = None):
    """Around an entry point's work: an expected failure becomes one `error:` line and exit status 2 (`explain`);
    SystemExit (e.g. common.cli.fail's) and KeyboardInterrupt pass through; a bug keeps its traceback."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 -- sorted by `explain`: what it does not know is re-raised unchanged
        if not report(e, prog):
            raise
        raise SystemExit(EXIT_BAD_INPUT) from None
