"""What keeps a run directory whole: where it may go, one writer at a time, how it is put in
place, leftovers of killed runs, and writes that fail with one line instead of a traceback.

**Where.** :func:`check_out_dir` validates the destination before anything is written (a
ConfigError naming it): a usable name that fits the file system, not under /proc, /sys or /dev,
not a file, not a directory that holds something other than a run directory (never replaced),
an existing run directory only with ``--overwrite``, and a writable parent. Without ``--out`` a
run goes to ``runs/NAME`` (:func:`default_out`).

**One writer.** A run directory ``PARENT/NAME`` is written by the process that holds the lock
file ``PARENT/.NAME.lock`` (an exclusive ``fcntl.flock``, taken before anything else is written
and released, and the file removed, when the run ends; the kernel releases it when the process
dies, so a killed run never leaves a lock that blocks the next one). A second run into the same
directory (``gradsparse run``, ``--resume``, ``launch``, a sweep) is refused with one line naming
the process that holds it (:class:`RunDirectoryBusy`, exit 2) and touches nothing. ``gradsparse
launch`` takes the lock itself and tells its ranks so (environment ``GRADSPARSE_RUN_LOCK_PID``):
rank 0, which writes the directory, then runs under its launcher's lock.

**In place.** A run is written into ``.NAME.partial-PID`` (:func:`partial_dir`) and renamed into
place (:func:`install_run_dir`); ``--overwrite`` moves the old directory to ``.NAME.old-PID`` for
the moment of the swap, so the directory is whole or absent.

**Leftovers.** A process killed with SIGKILL (or a machine that lost power) leaves them. The
next run into ``NAME``, holding the lock, removes the ``.partial-PID`` of processes that no longer
run, moves an ``.old-PID`` back to ``NAME`` when the swap was cut between its two renames (so the
previous result is not lost), and removes it otherwise; each is said in one line on stderr. A
leftover whose process still runs is named and left alone.

**Storage errors.** Every file of a run directory is written through :func:`atomic_save` /
:func:`atomic_write_text` (a temporary name, flushed to disk, then renamed) or inside
:func:`storage`; a full disk (ENOSPC), an I/O error (EIO), a read-only file system (EROFS) or a
refused permission raise :class:`StorageError`, one line naming the file and the reason. A file
that was being replaced keeps its previous content.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from ..config import ConfigError, RunConfig

#: set by ``gradsparse launch`` for its ranks: the pid of the launcher, which holds the lock
LOCK_ENV = "GRADSPARSE_RUN_LOCK_PID"


#: the files that make a directory a run directory
RUN_FILES = ("config.yaml", "metrics.csv", "summary.json", "checkpoint.pt")
#: paths a run directory may not be written under
_FORBIDDEN_ROOTS = ("/proc", "/sys", "/dev")
#: the longest file name (bytes) on the usual file systems
_NAME_MAX = 255


class RunDirectoryBusy(ConfigError):
    """Another process is writing this run directory (CLI: one line, exit 2)."""


class StorageError(OSError):
    """A write of the run directory failed (disk full, I/O error, read-only): one line."""


def storage_reason(exc: BaseException) -> str:
    """What went wrong, in a few words: ``No space left on device (ENOSPC)`` or the first line of
    torch.save's error."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{exc.strerror or os.strerror(exc.errno)} ({name})"
    text = " ".join(str(exc).split())
    if isinstance(exc, RuntimeError):  # torch.save's writer: "[enforce fail at ...] unexpected pos ..."
        return f"the file could not be written ({text[:160]}; is the disk full?)"
    return text[:200] or type(exc).__name__


@contextlib.contextmanager
def storage(what: str, path: str | Path):
    """Turn an OSError raised inside into a :class:`StorageError` naming ``what`` and ``path``."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(exc.errno, f"cannot write {what} {str(path)!r}: {storage_reason(exc)}") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_durably(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:  # the bytes reach the disk before the name points at them
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_save(obj, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` via a temporary file: ``path`` holds its previous content
    or the whole new one, never a part. Raises :class:`StorageError` (torch.save reports a full
    disk as a RuntimeError, other writes as OSError)."""
    import torch

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        _replace_durably(tmp, path)
    except (OSError, RuntimeError) as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(getattr(exc, "errno", None), f"cannot write {path.name} in {str(path.parent)!r}: "
                           f"{storage_reason(exc)}") from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file (see :func:`atomic_save`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        _replace_durably(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(exc.errno, f"cannot write {path.name} in {str(path.parent)!r}: {storage_reason(exc)}") from None


# ---- the lock ---------------------------------------------------------------------------------


def lock_path(run_dir: str | Path) -> Path:
    run_dir = Path(os.path.abspath(run_dir))
    return run_dir.with_name(f".{run_dir.name}.lock")


def _holder_text(path: Path) -> dict:
    try:
        data = json.loads(path.read_text() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe_holder(info: dict) -> str:
    if not info.get("pid"):
        return "another process (it has not written its details yet)"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"])) if info.get("started") else "?"
    cmd = info.get("command") or "?"
    if len(cmd) > 160:
        cmd = cmd[:157] + "..."
    host = f" on {info['host']}" if info.get("host") and info.get("host") != os.uname().nodename else ""
    return f"process {info['pid']}{host} ({cmd}; started {when})"


class RunLock:
    """The lock of one run directory (see the module docstring). ``acquire()`` raises
    :class:`RunDirectoryBusy`; ``release()`` removes the lock file. A context manager too."""

    def __init__(self, run_dir: str | Path, *, key: str = "--out") -> None:
        self.run_dir = Path(os.path.abspath(run_dir))
        self.path = lock_path(self.run_dir)
        self.key = key
        self.fd: int | None = None
        self.inherited = False  # held by our launcher (gradsparse launch), not by this process
        self.created: list[Path] = []  # parent folders this lock created (removed again if empty)

    def acquire(self) -> "RunLock":
        parent = self.path.parent
        missing = []
        p = parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        with storage("the folder", parent):
            parent.mkdir(parents=True, exist_ok=True)
        self.created = list(missing)
        try:
            self._take()
        except BaseException:
            self._remove_created()
            raise
        return self

    def _take(self) -> None:
        for _ in range(100):
            with storage("the lock file", self.path):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                    # a file system without locks (some network mounts): run, but say it is unguarded
                    print(f"gradsparse: note: {self.path.parent} does not support file locks "
                          f"({storage_reason(exc)}): a second writer of {self.run_dir.name} would not be refused",
                          file=sys.stderr)
                    self.fd = fd
                    return
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise StorageError(exc.errno, f"cannot lock {str(self.path)!r}: {storage_reason(exc)}") from None
                info = _holder_text(self.path)
                launcher = os.environ.get(LOCK_ENV)
                if launcher and info.get("pid") is not None and str(info.get("pid")) == launcher:
                    self.inherited = True  # gradsparse launch holds it for this rank
                    return
                raise RunDirectoryBusy(
                    f"{self.key} {str(self.run_dir)!r} is being written by {_describe_holder(info)}; wait for it "
                    f"to end or choose another {self.key} (one writer per run directory; lock {self.path})"
                ) from None
            # the holder before us may have removed the file after we opened it: lock the file
            # that the name points at now
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self.fd = fd
            info = {"pid": os.getpid(), "host": os.uname().nodename, "started": time.time(),
                    "command": " ".join(sys.argv)}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode(), 0)
            except OSError as exc:
                self.release()
                raise StorageError(exc.errno, f"cannot write the lock file {str(self.path)!r}: {storage_reason(exc)}") from None
            return
        raise StorageError(None, f"cannot take the lock {str(self.path)!r}: it keeps being replaced")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for p in self.created:  # innermost first; only folders left empty
            with contextlib.suppress(OSError):
                p.rmdir()
        self.created = []

    def keep_created(self) -> None:
        """The run wrote into the folders the lock created: they stay."""
        self.created = []

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- leftovers of killed runs -------------------------------------------------------------------


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(run_dir: str | Path, *, say=None) -> list[str]:
    """Under the run directory's lock: remove the ``.NAME.partial-PID`` / ``.NAME.old-PID`` of
    processes that no longer run (an ``.old-PID`` goes back to ``NAME`` when ``NAME`` is missing:
    its swap was cut between the two renames). Returns the lines said (via ``say``, default
    stderr)."""
    run_dir = Path(os.path.abspath(run_dir))
    say = say or (lambda line: print(f"gradsparse: note: {line}", file=sys.stderr))
    pattern = re.compile(rf"^\.{re.escape(run_dir.name)}\.(partial|old)-(\d+)$")
    lines = []
    try:
        entries = sorted(run_dir.parent.iterdir())
    except OSError:
        return lines
    for p in entries:
        m = pattern.match(p.name)
        if not m:
            continue
        kind, pid = m.group(1), int(m.group(2))
        if pid == os.getpid():
            continue
        if process_alive(pid):
            lines.append(f"{p} was left by process {pid}, which still runs: left alone")
        elif kind == "old" and not (run_dir.exists() or run_dir.is_symlink()):
            os.replace(p, run_dir)
            lines.append(f"{p}: the previous run directory, left mid-swap by process {pid} (no longer running), "
                         f"moved back to {run_dir}")
        else:
            if p.is_symlink() or not p.is_dir():
                p.unlink()
            else:
                shutil.rmtree(p)
            what = "the unfinished run directory" if kind == "partial" else "the replaced run directory"
            lines.append(f"removed {p}: {what} of process {pid}, which no longer runs (killed?)")
    for line in lines:
        say(line)
    return lines


# ---- where a run directory goes ------------------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in RUN_FILES)


def check_out_dir(path: Path, *, overwrite: bool = False, key: str = "--out") -> Path:
    """Validate where a run directory will go, before anything is written (ConfigError)."""
    text = str(path)
    if not text or "\x00" in text:
        raise ConfigError(f"{key} {text!r}: not a usable path")
    resolved = Path(os.path.abspath(path))
    if resolved.name in ("", ".", ".."):
        raise ConfigError(f"{key} {text!r}: a run directory needs a name (not the filesystem root)")
    # names longer than the filesystem's (255 bytes; the run directory's temporary sibling
    # .NAME.partial-PID needs 24 more) fail with ENAMETOOLONG even in exists()
    for part in resolved.parts:
        limit = _NAME_MAX - 24 if part is resolved.parts[-1] else _NAME_MAX
        if len(os.fsencode(part)) > limit:
            raise ConfigError(f"{key} {text[:60]!r}...: the name {part[:40]!r}... is {len(os.fsencode(part))} bytes; "
                              f"a run directory's name is at most {_NAME_MAX - 24} bytes (a folder's {_NAME_MAX})")
    for root in _FORBIDDEN_ROOTS:
        if str(resolved) == root or str(resolved).startswith(root + "/"):
            raise ConfigError(f"{key} {text!r}: a run directory cannot be written under {root}")
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise ConfigError(f"{key} {text!r} exists and is not a directory")
        if is_run_dir(path):
            if not overwrite:
                raise ConfigError(
                    f"{key} {text!r} is an existing run directory; continue it with --resume {text} "
                    "or replace it with --overwrite"
                )
        elif any(path.iterdir()):  # never replaced, even with --overwrite: it is not ours
            raise ConfigError(f"{key} {text!r} is a non-empty directory that is not a run directory; "
                              "choose another --out (--overwrite replaces run directories only)")
    parent = resolved.parent
    while not parent.exists():
        if parent.is_symlink():
            raise ConfigError(f"{key} {text!r}: {parent} is a dangling link")
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{key} {text!r}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} {text!r}: {parent} is not writable")
    return path


def default_out(cfg: RunConfig) -> Path:
    return Path("runs") / cfg.name


# ---- putting it in place -------------------------------------------------------------------------


def partial_dir(final: Path) -> Path:
    """The temporary sibling ``.NAME.partial-PID`` this process writes the run directory into."""
    return final.with_name(f".{final.name}.partial-{os.getpid()}")


def install_run_dir(tmp: Path, final: Path) -> None:
    """Rename the finished temporary directory into place (replacing an older one)."""
    with storage("the run directory", final):
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            if old.is_symlink():
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
