"""Run directories: unique default names, the marker that says divjax created a directory,
the lock that gives a directory to one run at a time, and what `--force` may delete.

Every run directory holds the file `.divjax-run` (MARKER), created with the directory. It is
both the directory's marker and its lock:

  marker  `--force` replaces only a directory holding it, so a folder of other files (or the
          current directory, or a checkout) is never emptied by a mistyped --out;
  lock    a run holds an exclusive, non-blocking flock on it from before it writes anything
          until it ends (a resumed run too). A second run on the same directory is refused
          instead of mixing its records and checkpoints into the first's. The kernel drops the
          lock when the process ends however it ends (SIGKILL included), so no stale lock can
          block a resume.

Default names are `runs/<config>[_<--set keys and values>]_<YYYYmmdd-HHMMSS>`, created with
os.mkdir, which fails if the directory exists: a name taken by a run started in the same
second gets a suffix -2, -3, ... instead of being shared.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import os
import re
import shutil
from pathlib import Path

MARKER = ".divjax-run"
_MARKER_TEXT = ("This directory was created by `divjax run`; `divjax run --force` may replace it.\n"
                "A run using it holds a lock (flock) on this file.\n")
# What a run killed while writing its first file leaves behind: not content of its own
_SCRATCH = frozenset({MARKER, "config.yaml.tmp"})
_PACKAGE = Path(__file__).resolve().parent


class RunDirError(Exception):
  """The run directory cannot be used (exit code 2); the message names it."""


def _why(e: OSError) -> str:
  return e.strerror or str(e)


class Lock:
  """An exclusive flock on DIR/.divjax-run; closing the file descriptor drops it."""

  def __init__(self, directory: Path, fd: int):
    self.directory, self._fd = directory, fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def claim(directory: Path) -> Lock:
  """Locks an existing directory for this run (creating its marker) or raises RunDirError."""
  path = directory / MARKER
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise RunDirError(f"error: cannot write into {directory}: {_why(e)}") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if os.fstat(fd).st_size == 0:  # written once: a resume leaves the run's files as they were
      os.write(fd, _MARKER_TEXT.encode())
  except OSError as e:
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise RunDirError(_held_message(directory)) from None
    raise RunDirError(f"error: cannot lock {path}: {_why(e)}") from None
  return Lock(directory, fd)


def _held_message(directory: Path) -> str:
  return (f"error: {directory}: another divjax run holds this run directory (it has the lock on "
          f"{directory / MARKER}); wait until that run ends, or choose another --out")


def is_locked(directory: Path) -> bool:
  """Whether a run holds the directory now (a probe: takes and drops a shared lock)."""
  try:
    fd = os.open(directory / MARKER, os.O_RDONLY)
  except OSError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return False
  except OSError:
    return True
  finally:
    os.close(fd)  # also drops the probe's own lock


def contents(directory: Path) -> list[Path]:
  """The directory's entries, without the marker and a killed run's scratch file."""
  return [p for p in directory.iterdir() if p.name not in _SCRATCH]


def default_name(stem: str, overrides: list[str], timestamp: str, limit: int = 48) -> str:
  """`<stem>[_<overrides>]_<timestamp>`: the --set keys (last dotted part) and values, made
  safe for a file name and cut to `limit` characters (plus a hash of the whole when cut, so
  that different overrides keep different names)."""
  def safe(x):
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", x).strip("-._")

  pieces = []
  for item in overrides:
    key, _, value = item.partition("=")
    pieces.append(f"{safe(key.rsplit('.', 1)[-1])}-{safe(value)}")
  text = "_".join(pieces)
  if len(text) > limit:
    text = text[:limit - 7].rstrip("-._") + "-" + hashlib.sha1(text.encode()).hexdigest()[:6]
  return "_".join(p for p in (stem, text, timestamp) if p)


def _nearest_existing(path: Path) -> Path:
  p = path.absolute()
  while not os.path.lexists(p) and p != p.parent:
    p = p.parent
  return p


def check_target(out: Path, force: bool, option: str = "--out") -> None:
  """Refuses, before anything is built or written, an output path that cannot become this
  run's directory: a file, a path under a file or in a read-only directory, a directory that
  another run holds, or a non-empty one (unless --force and it is a divjax run directory)."""
  if os.path.lexists(out) and not out.is_dir():
    what = "a file" if out.exists() else "a broken symbolic link"
    raise RunDirError(f"error: {option} {out} is {what}, not a directory"
                      + ("; --force replaces only a run directory divjax created, so it was left untouched"
                         if force else ""))
  if not out.exists():
    parent = _nearest_existing(out)
    if not parent.is_dir():
      raise RunDirError(f"error: cannot create the run directory {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
      raise RunDirError(f"error: cannot create the run directory {out}: {parent} is not writable")
    return
  if not os.access(out, os.W_OK | os.X_OK):
    raise RunDirError(f"error: {option} {out}: the directory is not writable")
  if is_locked(out):
    raise RunDirError(_held_message(out))
  if not contents(out):
    return
  if not force:
    raise RunDirError(f"error: output directory {out} exists and is not empty; choose another --out, "
                      f"pass --force to replace it (a divjax run directory only), or --resume {out} "
                      f"to continue the run in it")
  _check_replaceable(out)


def _check_replaceable(out: Path) -> None:
  """What --force may delete: a directory holding the marker, and never one that contains the
  current directory, the home directory, a git checkout or divjax itself."""
  real, cwd = out.resolve(), Path.cwd().resolve()
  if real == cwd or real in cwd.parents:
    raise RunDirError(f"error: --force refused: {out} is the current directory or contains it; "
                      f"nothing was deleted")
  if (real == Path.home().resolve() or real == Path(real.anchor) or (real / ".git").exists()
      or real == _PACKAGE or real in _PACKAGE.parents):
    raise RunDirError(f"error: --force refused: {out} is a home, root or source directory; "
                      f"nothing was deleted")
  if not (out / MARKER).is_file():
    raise RunDirError(f"error: --force refused: {out} was not created by divjax (it holds no {MARKER} "
                      f"marker), so it was left untouched; remove it yourself or choose another --out")


def _clear(out: Path) -> None:
  """Empties a run directory that --force replaces, keeping the (held) lock file."""
  for p in contents(out) + [out / "config.yaml.tmp"]:
    if p.is_dir() and not p.is_symlink():
      shutil.rmtree(p)
    elif os.path.lexists(p):
      p.unlink()


def _mkdir_unique(base: Path) -> Path:
  """Creates base, or base-2, base-3, ...: os.mkdir is atomic, so two runs never get one name."""
  try:
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
      path = base if n == 1 else base.with_name(f"{base.name}-{n}")
      try:
        os.mkdir(path)
        return path
      except FileExistsError:
        continue
  except OSError as e:
    raise RunDirError(f"error: cannot create the run directory {base}: {_why(e)}") from None


def create(out: Path, *, force: bool, unique: bool) -> tuple[Path, Lock]:
  """Creates (or, with --force, replaces) the run directory and locks it: (directory, lock).

  `unique`: `out` is a default name, made unique with a suffix. Otherwise the checks of
  check_target are made again under the lock, since the directory may have changed since.
  """
  if unique:
    out = _mkdir_unique(out)
    return out, claim(out)
  check_target(out, force)
  marked = (out / MARKER).is_file()
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise RunDirError(f"error: cannot create the run directory {out}: {_why(e)}") from None
  lock = claim(out)
  try:
    if contents(out):  # filled meanwhile by another run (which has ended, as the lock is ours)
      if not (force and marked):
        raise RunDirError(f"error: output directory {out} was filled by another run meanwhile; "
                          f"choose another --out")
      _clear(out)
  except OSError as e:
    lock.release()
    raise RunDirError(f"error: --force: cannot empty {out}: {_why(e)}") from None
  except BaseException:
    lock.release()
    raise
  return out, lock
