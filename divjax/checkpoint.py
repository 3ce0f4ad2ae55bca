"""Checkpoints of a whole run: the engine state plus the metric records written so far.

A run directory holds its checkpoints in RUN/checkpoints/<tick>/, written with
orbax-checkpoint's CheckpointManager, one step per checkpoint tick, with two items:

  state     every array of the engine state (params, optimizer state, ring, message tables,
            counters, tick) as a flat dict {field path: array}, e.g. "params", "opt_state_0_trace";
  records   {"tick": T, "records": [...]}, the metrics.jsonl records up to tick T.

The state and the config are everything: the state holds no PRNG key, because every random
choice is derived from cfg.seed per (node, step) or (node, round) (divjax.sampling).

Atomicity: orbax writes a step into `<tick>.orbax-checkpoint-tmp...` and renames it to
`<tick>` only once everything is on disk, so a write killed at any moment (SIGKILL included)
leaves the previous checkpoint intact; unfinished temporary directories are never listed as
checkpoints and are removed by the next writer. Writes are synchronous (no background
thread), so a checkpoint is complete when `save` returns.

Integrity: the records item also holds `checksums`: a SHA-256 of every stored array (over its
dtype, shape and bytes), of the records, and of the run's resolved configuration (the dict
written as RUN/config.yaml) together with that configuration. `restore` and `read` recompute
them: a checkpoint that orbax cannot read or whose contents differ from what was written (one
flipped bit) raises CorruptCheckpoint, naming it, and an older intact checkpoint can be used
instead. A Checkpointer given the run's configuration refuses (ConfigMismatch, listing the
dotted keys) a checkpoint written with another one, except for a longer `duration_s` (a run
extended with `--resume DIR --set duration_s=T`). Checkpoints written before checksums existed
have none: they are restored unverified, and their ticks are listed in `unverified`.

Why a flat dict rather than the state itself: orbax refuses zero-size arrays, and
algorithms without replies have empty (N, D, 0) reply tables (the synchronous engine an
empty ring). Those leaves are not stored; restore rebuilds them from a template of the run's
state. Plain string keys also make a checkpoint readable without divjax (`read`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from divjax import sharding

SUBDIR = "checkpoints"
CORRUPT_SUBDIR = "checkpoints-corrupt"  # where a resume moves corrupt checkpoints it skipped
FORMAT = 1  # of `checksums`


class CheckpointError(ValueError):
  """A checkpoint directory is missing, unreadable, or does not match the run's config."""


class CorruptCheckpoint(CheckpointError):
  """A checkpoint that orbax cannot read or that fails its checksums: an older one may be intact."""


class ConfigMismatch(CheckpointError):
  """The run's configuration differs from the one its checkpoint was written with."""


class CheckpointWriteError(CheckpointError):
  """A checkpoint could not be written (a full disk, a read-only file system, ...)."""


def _leaf_names(tree) -> list[str]:
  paths = [jax.tree_util.keystr(p, simple=True, separator=".")
           for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  names = [re.sub(r"[^A-Za-z0-9]+", "_", p).strip("_") for p in paths]
  assert len(set(names)) == len(names), names
  return names


def flatten(state) -> dict[str, np.ndarray]:
  """The state's non-empty arrays on the host, by name: what a checkpoint stores."""
  leaves = jax.tree.leaves(sharding.to_host(state))
  return {k: np.asarray(v) for k, v in zip(_leaf_names(state), leaves) if np.size(v)}


def _digest_json(obj) -> str:
  text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=lambda x: x.item())
  return hashlib.sha256(text.encode()).hexdigest()


def _digest_array(a: np.ndarray) -> str:
  h = hashlib.sha256(f"{a.dtype.str} {tuple(a.shape)}".encode())
  h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
  return h.hexdigest()


def _checksums(arrays: dict, records: list, config: Optional[dict]) -> Optional[dict]:
  """What a checkpoint stores to be verified on restore (see the module docstring)."""
  return {"format": FORMAT, "arrays": {k: _digest_array(v) for k, v in arrays.items()},
          "records": _digest_json(records), "config": config,
          "config_sha256": None if config is None else _digest_json(config)}


def _verify(where: str, sums: dict, arrays: dict, records: list) -> None:
  """Raises CorruptCheckpoint unless the arrays, records and config match their checksums."""
  if not isinstance(sums, dict) or sums.get("format") != FORMAT:
    raise CorruptCheckpoint(f"{where} is corrupt: its checksums are unreadable")
  want = sums.get("arrays") or {}
  bad = sorted(set(want) ^ set(arrays)) + [k for k in sorted(set(want) & set(arrays))
                                           if _digest_array(arrays[k]) != want[k]]
  if _digest_json(records) != sums.get("records"):
    bad.append("records")
  cfg = sums.get("config")
  if cfg is not None and _digest_json(cfg) != sums.get("config_sha256"):
    bad.append("config")
  if bad:
    raise CorruptCheckpoint(f"{where} is corrupt: {', '.join(bad)} differ from the checksums written "
                            f"with it")


def _config_differences(was, now, prefix="") -> list[str]:
  """Dotted keys where two resolved config dicts differ, with both values."""
  if isinstance(was, dict) and isinstance(now, dict):
    return [d for k in sorted(set(was) | set(now), key=str)
            for d in _config_differences(was.get(k), now.get(k), f"{prefix}{k}.")]
  return [] if was == now else [f"{prefix[:-1]} (checkpoint: {was!r}, config.yaml: {now!r})"]


def _with_defaults(was, defaults):
  """`was` with the keys it lacks taken from `defaults`: a checkpoint written before a config
  key existed was run as that key's default."""
  if not (isinstance(was, dict) and isinstance(defaults, dict)):
    return was
  return {**defaults, **{k: _with_defaults(v, defaults.get(k)) for k, v in was.items()}}


def _check_config(where: str, was: dict, now: dict) -> None:
  from divjax import config as config_lib
  was = _with_defaults(was, config_lib.to_dict(config_lib.Config()))
  # A longer duration_s only moves the end of the run (`divjax run --resume DIR --set
  # duration_s=T`): nothing simulated up to the checkpoint depends on it.
  if isinstance(was.get("duration_s"), (int, float)) and now.get("duration_s", 0) >= was["duration_s"]:
    was = {**was, "duration_s": now["duration_s"]}
  diff = _config_differences(was, now)
  if diff:
    raise ConfigMismatch(
        f"{where}: the run's config.yaml differs from the configuration this checkpoint was written "
        f"with, at {'; '.join(diff)}: the checkpoint belongs to a different configuration (only a "
        f"longer duration_s, which extends the run, is accepted); restore config.yaml, or start a "
        f"new run (--out)")


# orbax reports a failed write or read twice more besides the exception it raises: ERROR logs
# with tracebacks from its writer threads, and "Event loop is closed" tracebacks of tensorstore
# callbacks that arrive after its event loop has ended, some of them after the call returned,
# and, when two concurrent writes fail, asyncio's "Task exception was never retrieved".
# The exception says it all (the caller reports it), so from the first orbax call on these are
# dropped, and only those: a full disk reads as one line.
class _DropOrbaxErrors(logging.Filter):
  def filter(self, record):
    return not (record.levelno >= logging.ERROR and "orbax" in (record.pathname or ""))


class _DropOrbaxTaskErrors(logging.Filter):
  """asyncio's "Task exception was never retrieved" for one of orbax's writer tasks: when two
  concurrent writes fail, the second task's exception is reported by asyncio (timing decides)."""
  def filter(self, record):
    return not (record.levelno >= logging.ERROR and "orbax" in record.getMessage())


def _quiet_orbax() -> None:
  """Installs the filters once per process (idempotent)."""
  absl = logging.getLogger("absl")
  if not any(isinstance(f, _DropOrbaxErrors) for f in absl.filters):
    absl.addFilter(_DropOrbaxErrors())
  loop_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _DropOrbaxTaskErrors) for f in loop_log.filters):
    loop_log.addFilter(_DropOrbaxTaskErrors())
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loop", False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
      previous(unraisable)
  hook._drops_closed_loop = True
  sys.unraisablehook = hook


def _write_error_reason(e: BaseException) -> str:
  """The operating system's reason for a failed write, e.g. 'No space left on device'."""
  for x in (e, e.__cause__, e.__context__):
    if isinstance(x, OSError) and x.strerror:
      return x.strerror
  m = re.search(r"os_error_code='?(\d+)", str(e))
  if m:
    return os.strerror(int(m.group(1)))
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _manager(directory: Path, writer: bool = True, keep: Optional[int] = 2):
  import orbax.checkpoint as ocp  # heavy import, only when checkpoints are used
  # A reader neither creates, deletes nor cleans up anything (orbax's read_only mode does the
  # same, with warnings).
  # In a multi-process run (divjax.multihost) each process has a manager of its own, over
  # itself only: process 0 writes the gathered state alone, the others only read on --resume,
  # and neither waits for the other inside orbax.
  alone = {}
  if jax.process_count() > 1:
    me = jax.process_index()
    alone = dict(multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}))
    if writer:  # orbax does not create it for a manager over a subset of the processes
      directory.mkdir(parents=True, exist_ok=True)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep if writer else None, create=writer and not alone,
      enable_async_checkpointing=False, cleanup_tmp_directories=writer, **alone)
  return ocp.CheckpointManager(directory.absolute(), options=options)


# Arrays added to the state after checkpoints existed, and their value in an older checkpoint:
# the engine's pending snapshots (engine.Fresh), which older engines wrote into the ring at
# once, so an older checkpoint has none pending.
_ADDED = {
    "fresh_x": lambda shape, dtype: np.zeros(shape, dtype),
    "fresh_slot": lambda shape, dtype: np.full(shape, -1, dtype),
    "overflow": lambda shape, dtype: np.zeros(shape, dtype),   # synchronous runs' robust inbox
    "lost": lambda shape, dtype: np.zeros(shape, dtype),       # synchronous runs' churn
}

# Arrays that grew: the fate counts gained OVERFLOW (divjax.inbox), zero in an older checkpoint.
_WIDENED = {
    "counters_retired": lambda got, shape: np.concatenate(
        [got, np.zeros((shape[0] - got.shape[0],), got.dtype)]) if got.shape[0] < shape[0] else got,
}


class Checkpointer:
  """Saves and restores the checkpoints of one run directory.

  `template` is the run's initial state, or its shapes (jax.eval_shape of engine.init): it
  fixes the pytree structure and the shapes a restored checkpoint must have. The newest
  `keep` checkpoints are kept (None: all). `config`, the run's resolved configuration as a
  dict (config.to_dict), is stored with every checkpoint and compared on restore.
  """

  def __init__(self, run_dir: str | Path, template: Any, keep: Optional[int] = 2,
               config: Optional[dict] = None, writer: bool = True):
    self.directory = Path(run_dir) / SUBDIR
    self.template = template
    self.names = _leaf_names(template)
    self.config = config
    self.writer = writer  # False: `save` only gathers the state (another process writes it)
    self.unverified: set[int] = set()  # restored ticks that had no checksums (older divjax)
    self._mgr = _manager(self.directory, writer=writer, keep=keep)

  def ticks(self) -> list[int]:
    """Ticks of the complete checkpoints, oldest first."""
    return sorted(self._mgr.all_steps())

  def latest_tick(self) -> Optional[int]:
    """Tick of the newest complete checkpoint, or None."""
    return self._mgr.latest_step()

  def save(self, state, records: list[dict]) -> int:
    """Writes a checkpoint at the state's tick (atomically); returns the tick."""
    import orbax.checkpoint as ocp
    tick = int(state.tick)
    if records and records[-1]["tick"] != tick:
      raise ValueError(f"the last record is at tick {records[-1]['tick']}, the state at {tick}")
    # gathered first, on every process alike: in a multi-process run this is a collective
    arrays = flatten(state)
    if not self.writer or tick in self._mgr.all_steps():  # already there: a resumed run
      return tick                                           # reaching its own checkpoint
    item = {"tick": tick, "records": records, "checksums": _checksums(arrays, records, self.config)}
    _quiet_orbax()
    try:
      self._mgr.save(tick, args=ocp.args.Composite(
          state=ocp.args.StandardSave(arrays), records=ocp.args.JsonSave(item)))
      self._mgr.wait_until_finished()
    except Exception as e:  # orbax wraps the OS error (e.g. a full disk) in its own exceptions
      raise CheckpointWriteError(f"could not write the checkpoint at tick {tick} into {self.directory}: "
                                 f"{_write_error_reason(e)} (checkpoints written before it are intact)") from None
    return tick

  def restore(self, tick: Optional[int] = None):
    """The newest (or the given) complete checkpoint as (state, records), checked against
    the template.

    Raises:
      CorruptCheckpoint: unreadable, or its contents fail their checksums.
      ConfigMismatch: written with a configuration other than `config` (see the class).
      CheckpointError: no checkpoint, or one whose arrays do not fit this config.
    """
    tick = self.latest_tick() if tick is None else tick
    if tick is None or tick not in self._mgr.all_steps():
      raise CheckpointError(f"{self.directory}: no complete checkpoint"
                            + (f" at tick {tick}" if tick is not None else ""))
    _, arrays, records, sums = _read_step(self._mgr, self.directory, tick)
    if sums is None:
      self.unverified.add(tick)
    elif self.config is not None and sums.get("config") is not None:
      _check_config(f"{self.directory / str(tick)}", sums["config"], self.config)
    leaves = []
    for name, want in zip(self.names, jax.tree.leaves(self.template)):
      shape, dtype = tuple(np.shape(want)), np.dtype(want.dtype)
      if np.prod(shape, dtype=np.int64) == 0:
        leaves.append(jnp.zeros(shape, dtype))
        continue
      got = arrays.pop(name, None)
      if got is None and name in _ADDED:  # written before this array existed
        got = _ADDED[name](shape, dtype)
      if got is not None and name in _WIDENED and got.shape != shape:
        got = _WIDENED[name](got, shape)
      if got is None:
        raise CheckpointError(f"{self.directory / str(tick)}: array {name!r} is missing "
                              f"(written by a different algorithm or version?)")
      if got.shape != shape or got.dtype != dtype:
        raise CheckpointError(
            f"{self.directory / str(tick)}: array {name!r} has shape {got.shape} {got.dtype}, this "
            f"config needs {shape} {dtype}: the checkpoint belongs to a different configuration")
      leaves.append(jax.device_put(got))
    if arrays:
      raise CheckpointError(f"{self.directory / str(tick)}: unexpected arrays {sorted(arrays)}")
    state = jax.tree.unflatten(jax.tree.structure(self.template), leaves)
    if int(state.tick) != tick or (records and records[-1]["tick"] != tick):
      raise CheckpointError(f"{self.directory / str(tick)}: inconsistent ticks (directory {tick}, "
                            f"state {int(state.tick)}, last record {records[-1]['tick'] if records else None})")
    return state, records

  def set_aside(self, tick: int) -> Path:
    """Moves a (corrupt) checkpoint out of the way into RUN/checkpoints-corrupt/, so that the
    run writes that tick again; returns where it went."""
    target_dir = self.directory.parent / CORRUPT_SUBDIR
    target_dir.mkdir(exist_ok=True)
    target, n = target_dir / str(tick), 2
    while os.path.lexists(target):
      target, n = target_dir / f"{tick}-{n}", n + 1
    os.replace(self.directory / str(tick), target)
    self._mgr.reload()  # orbax caches the list of steps
    return target

  def close(self):
    self._mgr.close()


def _read_step(mgr, directory: Path, tick: int):
  """(tick, arrays, records, checksums or None), the checksums verified."""
  import orbax.checkpoint as ocp
  where = f"checkpoint {directory / str(tick)} (tick {tick})"
  _quiet_orbax()
  try:
    item = mgr.restore(tick, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), records=ocp.args.JsonRestore()))
    arrays = {k: np.asarray(v) for k, v in dict(item.state).items()}
    records = list(item.records["records"])
    sums = item.records.get("checksums")
  except Exception as e:  # anything orbax raises on a damaged directory
    text = str(e).strip().splitlines()
    raise CorruptCheckpoint(f"{where} is corrupt: unreadable ({type(e).__name__}: "
                            f"{text[0][:300] if text else ''})") from None
  if sums is not None:
    _verify(where, sums, arrays, records)
  return tick, arrays, records, sums


def read(run_dir: str | Path, tick: Optional[int] = None):
  """(tick, {name: numpy array}, records) of a run's newest (or given) checkpoint, without
  knowing its config: for analysis and tests. Zero-size arrays are not stored. Raises
  CorruptCheckpoint if it fails its checksums."""
  directory = Path(run_dir) / SUBDIR
  if not directory.is_dir():
    raise CheckpointError(f"{run_dir}: no {SUBDIR}/ directory")
  mgr = _manager(directory, writer=False)
  try:
    tick = mgr.latest_step() if tick is None else tick
    if tick is None or tick not in mgr.all_steps():
      raise CheckpointError(f"{directory}: no complete checkpoint" + (f" at tick {tick}" if tick is not None else ""))
    return _read_step(mgr, directory, tick)[:3]
  finally:
    mgr.close()
