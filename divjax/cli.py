"""`divjax run CONFIG [--set key=value ...] [--out DIR | --resume DIR]`: one simulation, outputs in DIR.

DIR receives config.yaml (fully resolved), label_histograms.csv (classification tasks),
metrics.jsonl (one record per evaluation, the
first at time 0), summary.json, metrics.png, checkpoints/ (divjax.checkpoint) and the marker
and lock file .divjax-run (divjax.rundir). Bad input (config, --set, data, output or
checkpoint directories, a run too big for the device's memory) fails before anything is
compiled or written; an existing, non-empty DIR is refused unless --force is given, and
--force replaces only a directory divjax created (one holding .divjax-run). A directory
another run is using (locked) is refused.

Long runs: `--resume DIR` continues a run stopped at any moment (Ctrl-C, SIGTERM, SIGKILL, a
crash) from its newest intact checkpoint and ends with the same metrics.jsonl as an
uninterrupted run; a corrupt checkpoint (failing its checksums) is reported and the previous
one used. A first Ctrl-C or SIGTERM stops at the next evaluation boundary and writes
a checkpoint; a second one aborts at once. `--resume DIR --set duration_s=T` with a longer T
extends a run (finished or not) to T simulated seconds, ending exactly as a run started with T.
Resuming a run that has completed changes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import sys
import traceback
from pathlib import Path

from typing import Optional

from divjax import rundir

SWEEP_DOC = """Run a grid of configs: every point is CONFIG + --set + its --grid values, validated before
anything is compiled or written. Points of one static structure (n_nodes, fragments,
recipients, model, algorithm, ...) share one compiled program, since seed, lr, momentum, link
speeds, latencies, stragglers and data.seed are traced parameters. DIR/points/<i>_<values>/
holds each point's config.yaml, metrics.jsonl, summary.json and metrics.png, as `divjax run`
writes them; DIR holds sweep.csv, sweep.jsonl, sweep.png and sweep_summary.json.
`--resume DIR` runs only the points not finished yet, each from its newest checkpoint if it
has one (--checkpoint-wall)."""

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_DIVERGED = 0, 1, 2, 3

EXIT_CODES = """\
exit codes:
  0    completed (also: --resume of a run that had already completed, which changes nothing)
  1    failed during the run, e.g. a checkpoint could not be written on a full disk
       (summary.json says why; the records so far are kept)
  2    bad input, refused before anything is compiled or written: config or --set, data,
       an output path that is a file, under a file or not writable, a non-empty --out without
       --force, --force on a directory divjax did not create, a run directory another run
       holds (locked), a --resume whose config.yaml differs from its checkpoints', or
       whose checkpoints are all corrupt, a run too big for memory
  3    diverged (NaN/Inf in parameters or training loss; summary.json says where)
  130  interrupted by Ctrl-C (SIGINT); 143 by SIGTERM (128 + the signal number)
"""

class BadInput(Exception):
  """Refused before anything is compiled or written (exit code 2)."""


def _refused(e: Exception) -> int:
  """Reports bad input (a config error, a bad option, an unusable directory) in one line: exit 2."""
  from divjax.config import ConfigError
  print(f"config error: {e}" if isinstance(e, ConfigError) else e, file=sys.stderr)
  return EXIT_BAD_INPUT


def _timestamp() -> str:
  return f"{datetime.datetime.now():%Y%m%d-%H%M%S}"


def _out_dir(args, cfg_path: str | None, prefix: str = "", extra: tuple = ()) -> tuple[Path, bool]:
  """(output directory, whether it is a default name, to be made unique when created)."""
  if args.out:
    return Path(args.out), False
  stem = prefix + (Path(cfg_path).stem if cfg_path else "default")
  return Path("runs") / rundir.default_name(stem, list(args.set or []) + list(extra), _timestamp()), True


def _json_default(x):
  try:
    return x.item()
  except AttributeError:
    return str(x)


def _record_line(rec: dict) -> str:
  return json.dumps(rec, default=_json_default) + "\n"


def _write_atomic(path: Path, text: str) -> None:
  """Writes a whole file or nothing: a kill mid-write leaves the old file (or none)."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def _differences(a, b, prefix="") -> list[str]:
  """Dotted keys where two resolved config dicts differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    return [d for k in sorted(set(a) | set(b), key=str)
            for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
  return [] if a == b else [f"{prefix[:-1]} (run: {a!r}, given: {b!r})"]


def _load(path, overrides):
  from divjax import config as config_lib, configure  # imported here: a Ctrl-C at start-up exits cleanly (main)
  try:
    return configure.load(path, overrides)
  except config_lib.ConfigError as e:
    raise BadInput(f"config error: {e}") from None


def _prepare(args, hold: contextlib.ExitStack, primary: bool = True):
  """(output dir, config, whether a run is there to continue, whether it is extended to a
  longer duration_s, whether the dir is a default name), all input checked. A run directory
  to continue is locked here (the lock goes into `hold`). Only the primary process of a
  multi-process run checks and locks the directory: the others never write into it."""
  from divjax import config as config_lib, configure
  if not args.resume:
    cfg = _load(args.config, args.set or [])
    out, unique = _out_dir(args, args.config)
    if not unique and primary:
      rundir.check_target(out, args.force)
    return out, cfg, False, False, unique

  out = Path(args.resume)
  if args.force:
    raise BadInput("error: --force and --resume exclude each other")
  if args.out and Path(args.out).absolute() != out.absolute():
    raise BadInput(f"error: --resume {out} writes into {out}; drop --out {args.out}")
  if out.exists() and not out.is_dir():
    raise BadInput(f"error: --resume {out}: not a directory")
  if (out / "checkpoints").exists() and not (out / "checkpoints").is_dir():
    raise BadInput(f"error: --resume {out}: {out / 'checkpoints'} is not a directory")
  saved_path = out / "config.yaml"
  if not saved_path.is_file():
    # Killed before it wrote anything: the command that started it starts it again here.
    if not (args.config or args.set):
      raise BadInput(f"error: --resume {out}: no config.yaml there, so no run to continue "
                     f"(pass the run's CONFIG / --set to start it in {out})")
    if out.exists() and rundir.contents(out) and primary:
      raise BadInput(f"error: --resume {out}: not a divjax run directory (no config.yaml, not empty)")
    cfg = _load(args.config, args.set or [])
    if primary:
      rundir.check_target(out, force=False, option="--resume")
    return out, cfg, False, False, False
  # Before reading anything: no other run may change the directory from here on
  if primary:
    hold.enter_context(rundir.claim(out))
  try:
    saved = configure.load(saved_path)
  except config_lib.ConfigError as e:
    raise BadInput(f"error: --resume {out}: its config.yaml is invalid: {e}") from None
  if args.config:
    given = _load(args.config, args.set or [])
  else:
    given = _load(saved_path, args.set or [])  # --set alone: on top of the run's own config
  was, now = config_lib.to_dict(saved), config_lib.to_dict(given)
  # The one change a resumed run accepts: a longer duration_s, which only moves the end (and
  # the default checkpoint interval); nothing simulated before the old end depends on it.
  extend = now["duration_s"] > was["duration_s"]
  diff = _differences({**was, "duration_s": now["duration_s"]} if extend else was, now)
  if diff:
    raise BadInput(f"error: --resume {out}: the configuration differs from the run's config.yaml at "
                   f"{'; '.join(diff)}. A resumed run keeps its configuration (only a longer "
                   f"duration_s extends it); start a new run (--out) to change it")
  return out, given if extend else saved, True, extend, False


class _StopOnSignal:
  """First SIGINT / SIGTERM: ask the driver to stop at the next evaluation boundary (it writes
  a checkpoint), or, before the run loop, once the simulation is built (nothing written). A
  second one raises KeyboardInterrupt at once (the last checkpoint remains).

  Installed before the heavy imports: a KeyboardInterrupt raised by Python's own handler can
  land in a callback (jax's garbage-collection hook) that swallows it with a traceback, and
  the run would go on; a flag cannot be lost."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    try:
      self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals stay as they are
      self._old = {}
    return self

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)

  def _handle(self, signum, frame):
    if self.signum is not None:
      raise KeyboardInterrupt
    self.signum = signum
    print(f"\n{signal.Signals(signum).name}: stopping (once running: at the next evaluation boundary, "
          f"writing a checkpoint); send it again to abort at once", file=sys.stderr, flush=True)

  def requested(self) -> bool:
    return self.signum is not None


def _restore(ckpt, out: Path, cfg, primary: bool = True):
  """(tick, (state, records)) of the newest intact checkpoint on an evaluation boundary. A
  corrupt newer one is reported, and moved aside once an older one restored (the run then
  writes its tick again). Raises BadInput if none can be used."""
  from divjax import checkpoint
  # Continue from an evaluation boundary (or the end): periodic checkpoints are there, and
  # the records before it are then exactly an uninterrupted run's. Only an extended run's old
  # end can lie elsewhere; it falls back to the checkpoint before.
  ticks, every = ckpt.ticks(), cfg.eval_every_ticks
  usable = [t for t in ticks if t % every == 0 or t == cfg.n_ticks]
  if not usable:
    raise BadInput(f"error: --resume {out}: its only checkpoint (tick {ticks[-1]}, the old end) is not on an "
                   f"evaluation boundary (every {every} ticks), so the run cannot continue from it; "
                   f"start a new run (--out) with the longer duration_s")
  corrupt = []
  for tick in reversed(usable):
    try:
      resume = ckpt.restore(tick)
    except checkpoint.CorruptCheckpoint as e:
      print(f"warning: --resume {out}: {e}", file=sys.stderr)
      corrupt.append(tick)
      continue
    except checkpoint.CheckpointError as e:  # intact, but not this run's: no older one is
      raise BadInput(f"error: --resume {out}: {e}") from None
    if tick in ckpt.unverified:
      print(f"warning: --resume {out}: the checkpoint at tick {tick} has no checksums (written by an "
            f"older divjax): its contents and configuration are not verified", file=sys.stderr)
    for bad in corrupt if primary else ():
      where = ckpt.set_aside(bad)
      print(f"falling back to the intact checkpoint at tick {tick}; the corrupt one (tick {bad}) "
            f"was moved to {where}", file=sys.stderr)
    return tick, resume
  raise BadInput(f"error: --resume {out}: no intact checkpoint (corrupt at ticks "
                 f"{', '.join(map(str, corrupt))}), so the run cannot continue; start it again "
                 f"(--force replaces the run directory)")


def _close_quietly(ckpt) -> None:
  try:  # after a failed write (a full disk) orbax may fail again here; the run has reported it
    ckpt.close()
  except Exception:
    pass


def _completed(out: Path) -> dict | None:
  """The run's summary if it says the run completed."""
  try:
    summary = json.loads((out / "summary.json").read_text())
  except (OSError, ValueError):
    return None
  return summary if isinstance(summary, dict) and summary.get("status") == "completed" else None


def _status_line(status: str, out: Path, summary: dict) -> str:
  from divjax import simulate
  final = summary.get("final", {})
  key = simulate.headline([final]) if final else "acc_mean"
  return (f"{status}: {out}  {key}={final.get(key, float('nan')):.4f}  "
          f"time_to_target_s={summary.get('time_to_target_s')}")


def cmd_run(args) -> int:
  # the signal handler from the start (the config may import jax); the run directory's lock,
  # released however this ends
  with contextlib.ExitStack() as hold:
    stop = hold.enter_context(_StopOnSignal())
    try:
      proc = _distributed(args)
      out, cfg, resuming, extend, unique = _prepare(args, hold, proc.primary)
      if proc.count > 1 and cfg.devices != "auto" and cfg.devices % proc.count:
        raise BadInput(f"config error: devices: with --distributed over {proc.count} processes it must be "
                       f"'auto' or a multiple of {proc.count} (the devices of all hosts; got {cfg.devices})")
    except (BadInput, rundir.RunDirError) as e:
      print(e, file=sys.stderr)
      return EXIT_BAD_INPUT
    return _run(args, hold, stop, out, cfg, resuming, extend, unique, proc)


def _distributed(args):
  """This process's place in a multi-process run (--distributed), or the single process."""
  from divjax import multihost
  if not args.distributed:
    if args.coordinator or args.num_processes is not None or args.process_id is not None:
      raise BadInput("error: --coordinator, --num-processes and --process-id need --distributed")
    return multihost.SINGLE
  if not (args.out or args.resume):  # a default name has a timestamp: processes would disagree
    raise BadInput("error: --distributed needs --out DIR (or --resume DIR): every process must name the same directory")
  try:
    return multihost.initialize(args.coordinator, args.num_processes, args.process_id)
  except ValueError as e:
    raise BadInput(f"error: {e}") from None


def _run(args, hold, stop, out: Path, cfg, resuming: bool, extend: bool, unique: bool, proc) -> int:
  from divjax import config as config_lib
  import jax  # heavy imports only once the input is known good
  from divjax import checkpoint, memory, sharding, simulate
  # before anything starts the backend
  sharding.request_cpu_devices(cfg.devices, cfg.n_nodes, processes=proc.count)
  compilation_cache(args.no_cache)
  try:
    blocked = memory.blocked_if_needed(cfg)  # training too big for memory: nodes in blocks
    if blocked is not cfg:
      print(f"memory: training all {cfg.n_nodes} nodes at once does not fit; they are differentiated "
            f"{blocked.train_block} at a time (train_block={blocked.train_block}, same results)", file=sys.stderr)
      cfg = blocked
    memory.precheck(cfg)     # from the config alone: refuses a run too large before building data
    sim = simulate.build(cfg)
    mem = memory.check(sim)  # with the real data sizes, before compiling or writing anything
  except (config_lib.ConfigError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  if stop.requested():  # Ctrl-C / SIGTERM while importing or building
    print("interrupted before the run started; nothing was written", file=sys.stderr)
    return 128 + int(stop.signum)

  if not resuming and proc.primary:
    try:  # creates (or with --force replaces) and locks it; unique: a fresh default name
      out, lock = rundir.create(out, force=args.force, unique=unique)
    except rundir.RunDirError as e:
      print(e, file=sys.stderr)
      return EXIT_BAD_INPUT
    hold.enter_context(lock)
    _write_atomic(out / "config.yaml", config_lib.dump_yaml(cfg))
    if sim.task.label_hist is not None:  # who holds which classes: node, then one column per class
      hist = sim.task.label_hist
      rows = ["node," + ",".join(f"class_{c}" for c in range(hist.shape[1]))]
      rows += [f"{i}," + ",".join(str(int(v)) for v in row) for i, row in enumerate(hist)]
      _write_atomic(out / "label_histograms.csv", "\n".join(rows) + "\n")
  ckpt = checkpoint.Checkpointer(out, template=jax.eval_shape(sim.engine.init, sim.run_key),
                                 config=config_lib.to_dict(cfg), writer=proc.primary)
  hold.callback(_close_quietly, ckpt)
  resume, records = None, []
  if resuming and ckpt.ticks():
    try:
      tick, resume = _restore(ckpt, out, cfg, proc.primary)
    except BadInput as e:
      print(e, file=sys.stderr)
      return EXIT_BAD_INPUT
    done = _completed(out) if tick == cfg.n_ticks and not extend else None
    if done is not None:  # nothing to do: its files (summary timings included) stay as they are
      print(f"{out}: the run has already completed (tick {tick}); nothing was changed "
            f"(--set duration_s=T with a longer T extends it)", file=sys.stderr)
      print(_status_line("completed", out, done))
      return EXIT_OK
    records = list(resume[1])
    print(f"resuming {out} from tick {records[-1]['tick']} (t = {records[-1]['time_s']:g} s)",
          file=sys.stderr)
  if extend and proc.primary:  # only now, with everything checked: the run's config becomes the longer one
    print(f"extending {out} to duration_s = {cfg.duration_s:g}", file=sys.stderr)
    _write_atomic(out / "config.yaml", config_lib.dump_yaml(cfg))
  # metrics.jsonl holds exactly the records up to the checkpoint: later ones are recomputed
  if proc.primary:
    _write_atomic(out / "metrics.jsonl", "".join(_record_line(r) for r in records))

  status, error, summary, signum = "completed", None, None, None
  with open(out / "metrics.jsonl" if proc.primary else os.devnull, "a") as mf:
    def on_eval(rec):
      records.append(rec)
      mf.write(_record_line(rec))
      mf.flush()

    try:
      summary, _ = simulate.run(cfg, sim=sim, on_eval=on_eval, progress=not args.quiet and proc.primary,
                                resume=resume, on_checkpoint=ckpt.save,
                                should_stop=stop.requested, memory_info=mem)
      status = summary["status"]
    except KeyboardInterrupt:
      status, error = "interrupted", "aborted by a second signal: resume from the last checkpoint"
    except checkpoint.CheckpointWriteError as e:  # e.g. a full disk: one line, not orbax's tracebacks
      status, error = "failed", f"error: {e}"
    except Exception as e:  # keep what was written, record why it stopped
      status, error = "failed", "".join(traceback.format_exception_only(e)).strip()
    signum = stop.signum or (signal.SIGINT if status == "interrupted" else None)
  if summary is None:
    summary = simulate.summarize(cfg, records, extra={"memory": mem}) if records else {}
    summary.update(status=status, error=error)
  return _finish(out, cfg, sim, records, summary, status, error, signum, proc.primary)


def _finish(out: Path, cfg, sim, records, summary, status, error, signum, primary: bool = True) -> int:
  """Writes summary.json and the figure, reports, and returns the exit code. (A secondary
  process of a multi-process run only returns the exit code.)"""
  from divjax import plots
  if not primary:  # process 0 reports; another process only says why it stopped, if it failed
    if error:
      import jax
      print(f"process {jax.process_index()}: {error}", file=sys.stderr)
    return _exit_code(status, signum)
  try:
    _write_atomic(out / "summary.json", json.dumps(summary, indent=2, default=_json_default))
    if records:
      plots.plot_run(records, out / "metrics.png", title=f"{cfg.algorithm}, n={cfg.n_nodes}",
                     kind=sim.task.kind, baseline=sim.task.baseline)
  except OSError as e:  # a full disk: the records and checkpoints written so far remain
    print(f"error: cannot write into {out}: {e.strerror or e}", file=sys.stderr)
    status = "failed" if status == "completed" else status
  print(_status_line(status, out, summary))
  if error:
    print(error, file=sys.stderr)
  if status == "diverged":
    d = summary["divergence"]
    print(f"diverged at tick {d['tick']} (t = {d['time_s']:g} s): non-finite {', '.join(d['metrics'])}"
          f" at nodes {d['nodes'][:20]}{' ...' if len(d['nodes']) > 20 else ''}", file=sys.stderr)
  if status == "interrupted":
    print(f"resume with: divjax run --resume {out}", file=sys.stderr)
  return _exit_code(status, signum)


def _exit_code(status: str, signum) -> int:
  return {"completed": EXIT_OK, "diverged": EXIT_DIVERGED,
          "interrupted": 128 + int(signum or signal.SIGINT)}.get(status, EXIT_FAILED)


def compilation_cache(disabled: bool = False) -> Optional[str]:
  """Turns on JAX's persistent compilation cache (a second run of the same structure skips
  compiling): $DIVJAX_COMPILATION_CACHE, or ~/.cache/divjax/jax; "off" (or --no-cache) turns it
  off. Returns the directory, or None."""
  where = os.environ.get("DIVJAX_COMPILATION_CACHE", str(Path.home() / ".cache" / "divjax" / "jax"))
  if disabled or where.strip().lower() in ("off", "0", "none", ""):
    return None
  import jax
  jax.config.update("jax_compilation_cache_dir", where)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return where


def _batch_arg(text: str):
  """--batch: 'auto' (None) or a positive integer."""
  if text == "auto":
    return None
  try:
    b = int(text)
  except ValueError:
    b = 0
  if b < 1:
    raise BadInput(f"error: --batch: expected 'auto' or a whole number >= 1 (got {text!r})")
  return b


def cmd_sweep(args) -> int:
  """`divjax sweep`: a grid of configs, one compiled program per static structure (divjax.sweep)."""
  from divjax import config as config_lib, sweep
  with contextlib.ExitStack() as hold:
    stop = hold.enter_context(_StopOnSignal())
    try:
      if args.resume:
        out = Path(args.resume)
        if args.config or args.grid or args.set or args.out or args.force:
          raise BadInput(f"error: --resume {out} continues the sweep stored there; give no CONFIG, "
                         f"--grid, --set, --out or --force with it")
        if not (out / "sweep.yaml").is_file():
          raise BadInput(f"error: --resume {out}: no sweep.yaml there, so no sweep to continue")
        hold.enter_context(rundir.claim(out))
        spec = yaml_load(out / "sweep.yaml")
        base, overrides, grids, zip_ = out / "base.yaml", spec["set"], spec["grid"], spec["zip"]
      else:
        if not args.grid:
          raise BadInput("error: divjax sweep needs at least one --grid KEY=V1,V2,...")
        base, overrides, grids, zip_ = args.config, args.set or [], args.grid, args.zip
      batch = _batch_arg(args.batch)
      if not args.checkpoint_wall >= 0:
        raise BadInput(f"error: --checkpoint-wall: expected seconds >= 0 (got {args.checkpoint_wall})")
      pts = sweep.points(base, overrides, sweep.parse_grid(grids, zip_))
      if not args.resume:
        out, unique = _out_dir(args, args.config, prefix="sweep_", extra=grids)
        if not unique:
          rundir.check_target(out, args.force)
    except (config_lib.ConfigError, BadInput, rundir.RunDirError) as e:
      return _refused(e)
    from divjax import sharding
    sharding.request_cpu_devices(pts[0].cfg.devices, pts[0].cfg.n_nodes)
    compilation_cache(args.no_cache)
    if not args.resume:
      try:
        out, lock = rundir.create(out, force=args.force, unique=unique)
      except rundir.RunDirError as e:
        print(e, file=sys.stderr)
        return EXIT_BAD_INPUT
      hold.enter_context(lock)
      raw = yaml_load(Path(args.config)) if args.config else {}
      _write_atomic(out / "base.yaml", yaml_dump(raw))
      _write_atomic(out / "sweep.yaml", yaml_dump({"config": args.config, "set": overrides,
                                                   "grid": grids, "zip": zip_}))
    try:
      rows, info = sweep.run(pts, out, progress=not args.quiet, should_stop=stop.requested, batch=batch,
                             checkpoint_wall_s=args.checkpoint_wall)
    except (config_lib.ConfigError, ValueError) as e:  # e.g. a point too large for memory
      print(f"error: {e}", file=sys.stderr)
      return EXIT_BAD_INPUT
    if rows:
      sweep.write_tables(out, rows)
      swept = list(pts[0].values)
      sweep.plot(out, rows, swept)
    statuses = [r["status"] for r in rows]
    info.update({s: statuses.count(s) for s in sweep.FINAL}, not_run=len(pts) - len(rows))
    _write_atomic(out / "sweep_summary.json", json.dumps(info, indent=2))
    print(f"sweep {out}: {info['completed']} completed, {info['diverged']} diverged, "
          f"{info['not_run']} not run; {info['groups']} group(s) of one structure each")
    if stop.requested():
      print(f"resume with: divjax sweep --resume {out}", file=sys.stderr)
      return 128 + int(stop.signum)
    return EXIT_OK


def cmd_reproduce(args) -> int:
  """`divjax reproduce divshare-paper`: the paper's evaluation as sweeps, then the report."""
  from divjax import config as config_lib, report, reproduce
  with contextlib.ExitStack() as hold:
    stop = hold.enter_context(_StopOnSignal())
    data_dir = args.data_dir
    if data_dir is None and Path("../shared/data").is_dir():
      data_dir = "../shared/data"
    try:
      parts = reproduce.plan(args.scale, args.seeds, args.only, data_dir, args.networks)
      out = Path(args.out or f"runs/{reproduce.PAPER}-{args.scale}")
      seeds = args.seeds or reproduce.SEEDS[args.scale]
      spec = {"experiment": args.experiment, "scale": args.scale, "seeds": seeds, "data_dir": data_dir}
      reproduce.check_spec(out, spec)
      out.mkdir(parents=True, exist_ok=True)
      hold.enter_context(rundir.claim(out))
    except (config_lib.ConfigError, OSError, rundir.RunDirError) as e:
      return _refused(e)
    from divjax import sharding
    cfgs = [p.cfg for points in parts.values() for p in points]   # host devices: asked for once, before JAX starts
    first = next((c for c in cfgs if c.devices == "auto"), cfgs[0])
    sharding.request_cpu_devices(first.devices, first.n_nodes)
    compilation_cache(args.no_cache)
    import jax
    command = "divjax reproduce " + args.experiment + f" --scale {args.scale} --seeds {seeds} --out {out}" + \
        (f" --only {' '.join(args.only)}" if args.only else "") + \
        (f" --networks {' '.join(args.networks)}" if args.networks else "") + (f" --data-dir {data_dir}" if data_dir else "")
    old = json.loads((out / "reproduce.json").read_text()) if (out / "reproduce.json").is_file() else {}
    devices = sorted(set(old.get("devices", [])) | {f"{jax.devices()[0].device_kind} ({jax.default_backend()})"})
    _write_atomic(out / "reproduce.json", json.dumps({**spec, "command": command, "devices": devices,
                                                      "device": ", ".join(devices)}, indent=2))
    try:
      infos = reproduce.run(parts, out, progress=not args.quiet, should_stop=stop.requested,
                            say=lambda m: print(m, file=sys.stderr))
    except (config_lib.ConfigError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      return EXIT_BAD_INPUT
    path = report.write(out)
    done = sum(i["completed"] for i in infos.values())
    total = sum(len(p) for p in parts.values())
    print(f"reproduce {out}: {done} of {total} point(s) finished; report: {path}")
    if stop.requested():
      print(f"continue with the same command: {command}", file=sys.stderr)
      return 128 + int(stop.signum)
    return EXIT_OK


def cmd_report(args) -> int:
  """`divjax report DIR`: rewrites DIR/report/ from the finished points."""
  from divjax import report
  out = Path(args.dir)
  if not out.is_dir():
    print(f"error: report: {out} is not a directory", file=sys.stderr)
    return EXIT_BAD_INPUT
  if not any(out.glob("*/points/*/summary.json")):
    print(f"error: report: no finished points under {out} (expected {out}/<part>/points/*/summary.json, "
          f"as `divjax reproduce divshare-paper --out {out}` writes them)", file=sys.stderr)
    return EXIT_BAD_INPUT
  print(f"report: {report.write(out)}")
  return EXIT_OK


def cmd_theory(args) -> int:
  """`divjax theory contraction|staleness`: theory in numbers (divjax.theory, divjax.staleness)."""
  from divjax import config as config_lib, configure, staleness, theory
  name = args.experiment
  try:
    if name == "contraction" and args.rounds < 4:
      raise BadInput(f"error: --rounds: at least 4 rounds are needed for a steady rate (got {args.rounds})")
    if name == "contraction" and (args.seeds < 1 or args.trials < 100):
      raise BadInput("error: --seeds must be >= 1 and --trials >= 100")
    if name == "staleness" and (args.rounds < 4 or len(args.nodes) < 2 or min(args.nodes) < 3):
      raise BadInput("error: --rounds must be >= 4 and --nodes needs at least two sizes, each >= 3")
    cfg = configure.load(args.config, args.set or [])
    out, unique = _out_dir(args, args.config, prefix=f"{name}_")
    if not unique:
      rundir.check_target(out, args.force)
  except (config_lib.ConfigError, BadInput, rundir.RunDirError) as e:
    return _refused(e)
  compilation_cache(args.no_cache)
  try:
    if name == "contraction":
      result = theory.contraction(cfg, rounds=args.rounds, seeds=args.seeds, trials=args.trials)
      plot = theory.plot
    else:
      result = staleness.experiment(cfg, args.nodes, law=args.capacity, modes=args.modes, rounds=args.rounds)
      plot = staleness.plot
  except (config_lib.ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  try:
    out, lock = rundir.create(out, force=args.force, unique=unique)
  except rundir.RunDirError as e:
    print(e, file=sys.stderr)
    return EXIT_BAD_INPUT
  with lock:
    _write_atomic(out / "config.yaml", config_lib.dump_yaml(cfg))
    _write_atomic(out / f"{name}.json", json.dumps(result, indent=2))
    plot(result, out / f"{name}.png")
  print(json.dumps(result, indent=2))
  print(f"wrote {out / (name + '.json')} and {out / (name + '.png')}", file=sys.stderr)
  return EXIT_OK


def cmd_constants(args) -> int:
  """`divjax theory constants`: prints the least-squares task's constants as JSON."""
  from divjax import config as config_lib, configure, theory
  try:
    cfg = configure.load(args.config, args.set or [])
    if cfg.task != "lsq":
      raise config_lib.ConfigError(f"task: `divjax theory constants` needs task 'lsq' (got {cfg.task!r})")
  except config_lib.ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  print(json.dumps(theory.least_squares_constants(cfg), indent=2))
  return EXIT_OK


def constants_doc() -> str:
  from divjax import theory
  return theory.least_squares_constants.__doc__


def yaml_load(path: Path):
  import yaml
  return yaml.safe_load(Path(path).read_text()) or {}


def yaml_dump(obj) -> str:
  import yaml
  return yaml.safe_dump(obj, sort_keys=False)


def main(argv=None) -> int:
  try:
    return _main(argv)
  except KeyboardInterrupt:  # Ctrl-C before the run loop (imports, building, compiling)
    print("\ninterrupted (Ctrl-C)", file=sys.stderr)
    return 128 + signal.SIGINT
  except OSError as e:  # e.g. a full disk while writing a run's first files: one line, no traceback
    print(f"error: {e}", file=sys.stderr)
    return EXIT_FAILED


def _main(argv) -> int:
  parser = argparse.ArgumentParser(prog="divjax", description=__doc__.splitlines()[0],
                                   epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("run", help="run one simulation (or continue one with --resume)",
                     description="Run one simulation, or continue one with --resume.",
                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("config", nargs="?", help="YAML config file (defaults if omitted)")
  p.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE",
                 help="dotted overrides, e.g. --set n_nodes=32 network.upload_mbps=30")
  p.add_argument("--out", help="output directory (default runs/<config>_<--set keys>_<timestamp>, "
                               "with -2, -3, ... if that name is taken)")
  p.add_argument("--resume", metavar="DIR",
                 help="continue the run in DIR from its newest intact checkpoint; CONFIG / --set, if given, "
                      "must not change its config.yaml, except a longer duration_s, which extends the run "
                      "(a DIR without config.yaml is started afresh)")
  p.add_argument("--force", action="store_true",
                 help="replace a non-empty output directory, if divjax created it (it holds .divjax-run) "
                      "and no run is using it; never the current directory or one containing it")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.add_argument("--no-cache", action="store_true",
                 help="do not use JAX's persistent compilation cache ($DIVJAX_COMPILATION_CACHE, default "
                      "~/.cache/divjax/jax; 'off' there turns it off too)")
  d = p.add_argument_group("several processes (hosts), one run: start the same command on each "
                           "(README, 'Several machines')")
  d.add_argument("--distributed", action="store_true",
                 help="join a multi-process run (jax.distributed): the node axis spans every process's "
                      "devices, process 0 writes the outputs; needs --out or --resume")
  d.add_argument("--coordinator", metavar="HOST:PORT",
                 help="process 0's address (default: $JAX_COORDINATOR_ADDRESS, or found under Slurm / Open MPI)")
  d.add_argument("--num-processes", type=int, metavar="P", help="how many processes in all")
  d.add_argument("--process-id", type=int, metavar="I", help="this process, 0 .. P-1")
  p.set_defaults(func=cmd_run)

  s = sub.add_parser("sweep", help="run a grid of configs, one compiled program per structure",
                     description=SWEEP_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
  s.add_argument("config", nargs="?", help="YAML config file (defaults if omitted)")
  s.add_argument("--grid", action="append", metavar="KEY=V1,V2,...",
                 help="a swept key and its values (YAML each), or an integer range KEY=A..B (inclusive); "
                      "repeat for more keys")
  s.add_argument("--zip", action="store_true", help="pair the --grid values instead of taking their product")
  s.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE", help="overrides for every point")
  s.add_argument("--out", help="sweep directory (default runs/sweep_<config>_<grid keys>_<timestamp>)")
  s.add_argument("--resume", metavar="DIR", help="continue the sweep in DIR: finished points are not run again")
  s.add_argument("--force", action="store_true", help="replace a sweep directory divjax created")
  s.add_argument("--batch", default="auto", metavar="B|auto",
                 help="points of one structure stepped together as one vmapped program (1: one after "
                      "the other); auto (default): 1 on a CPU, where that measured faster, else as many "
                      "as the memory guard allows")
  s.add_argument("--checkpoint-wall", type=float, default=60.0, metavar="S",
                 help="a point run on its own writes a checkpoint at most every S wall seconds (at its "
                      "config's checkpoint boundaries; 0: at each), and when stopped; --resume continues "
                      "it from there (default 60)")
  s.add_argument("--quiet", action="store_true", help="no progress bar")
  s.add_argument("--no-cache", action="store_true", help="do not use JAX's persistent compilation cache")
  s.set_defaults(func=cmd_sweep)
  t = sub.add_parser("theory", help="theory in numbers: measure what convergence theory predicts",
                     description="Theory in numbers (divjax.theory).")
  tsub = t.add_subparsers(dest="experiment", required=True)
  c = tsub.add_parser("contraction", help="consensus contraction per round under pure averaging (lr = 0) "
                                          "against lambda_2 and the delayed-recursion prediction",
                      description=theory_doc())
  c.add_argument("config", nargs="?", help="YAML config file (defaults if omitted)")
  c.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE", help="dotted overrides")
  c.add_argument("--rounds", type=int, default=16, help="rounds simulated (default 16)")
  c.add_argument("--seeds", type=int, default=1, help="seeds averaged: seed, seed+1, ... (default 1)")
  c.add_argument("--trials", type=int, default=4000,
                 help="Monte Carlo trials (coordinates) of the predicted recursion (default 4000)")
  c.add_argument("--out", help="output directory (default runs/contraction_<config>_<--set keys>_<timestamp>)")
  c.add_argument("--force", action="store_true", help="replace an output directory divjax created")
  c.add_argument("--no-cache", action="store_true", help="do not use JAX's persistent compilation cache")
  c.set_defaults(func=cmd_theory)
  a = tsub.add_parser("staleness", help="version age over node pairs against n (Mitra & Ulukus), relay "
                                        "and direct, with ln n and n fits", description=staleness_doc())
  a.add_argument("config", nargs="?", help="YAML config file (defaults if omitted)")
  a.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE", help="dotted overrides")
  a.add_argument("--nodes", type=int, nargs="+", default=[16, 32, 64, 128], help="node counts")
  a.add_argument("--capacity", choices=["constant", "log", "linear"], default="constant",
                 help="recipients J as n grows: c, ceil(c ln n), ceil(c n / 10), c = recipients")
  a.add_argument("--modes", nargs="+", choices=["relay", "direct"], default=["relay", "direct"])
  a.add_argument("--rounds", type=int, default=40, help="rounds simulated per n (default 40)")
  a.add_argument("--out", help="output directory (default runs/staleness_<config>_<--set keys>_<timestamp>)")
  a.add_argument("--force", action="store_true", help="replace an output directory divjax created")
  a.add_argument("--no-cache", action="store_true", help="do not use JAX's persistent compilation cache")
  a.set_defaults(func=cmd_theory)
  k = tsub.add_parser("constants", help="the least-squares task's exact L, mu, zeta^2, sigma^2 (task: lsq)",
                      description=constants_doc(), formatter_class=argparse.RawDescriptionHelpFormatter)
  k.add_argument("config", nargs="?", help="YAML config file (defaults if omitted)")
  k.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE", help="dotted overrides")
  k.set_defaults(func=cmd_constants)
  r = sub.add_parser("reproduce", help="the DivShare paper's evaluation as sweeps, with a report",
                     description=_reproduce_doc(), formatter_class=argparse.RawDescriptionHelpFormatter)
  r.add_argument("experiment", choices=["divshare-paper"])
  r.add_argument("--scale", choices=["small", "full", "tiny"], default="small",
                 help="full: the paper's set-up (60 nodes, 800 simulated s); small: shrunk for 2 CPU cores "
                      "(about 50 minutes); tiny: a smoke test of the pipeline (default small)")
  r.add_argument("--seeds", type=int, help="seeds of the main grid (default 3 full, 2 small, 1 tiny)")
  r.add_argument("--only", nargs="+", metavar="PART", help="only these parts: cifar10 movielens omega j calibration")
  r.add_argument("--networks", nargs="+", metavar="NET", help="only these network settings in the cifar10 and "
                                                               "movielens parts: none stragglers diablo")
  r.add_argument("--out", help="output directory, continued if it exists (default runs/divshare-paper-<scale>)")
  r.add_argument("--data-dir", help="where cifar10.npz and the MovieLens files are (default ../shared/data "
                                    "if it exists, else tensorflow-datasets)")
  r.add_argument("--quiet", action="store_true", help="no progress bar")
  r.add_argument("--no-cache", action="store_true", help="do not use JAX's persistent compilation cache")
  r.set_defaults(func=cmd_reproduce)
  rp = sub.add_parser("report", help="rewrite a reproduction's report from its finished points",
                      description="Rewrite DIR/report/ (tables, figures, report.md) from DIR's finished points.")
  rp.add_argument("dir", metavar="DIR")
  rp.set_defaults(func=cmd_report)
  args = parser.parse_args(argv)
  return args.func(args)


def _reproduce_doc() -> str:
  from divjax import reproduce
  return reproduce.__doc__


def theory_doc() -> str:
  from divjax import theory
  return theory.__doc__


def staleness_doc() -> str:
  from divjax import staleness
  return staleness.__doc__


if __name__ == "__main__":
  sys.exit(main())
