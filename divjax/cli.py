"""`divjax run CONFIG [--set key=value ...] [--out DIR | --resume DIR]`: one simulation, outputs in DIR.

DIR receives config.yaml (fully resolved), label_histograms.csv (classification tasks),
metrics.jsonl (one record per evaluation, the
first at time 0), summary.json, metrics.png and checkpoints/ (divjax.checkpoint). Bad input
(config, --set, data or checkpoint directories, a run too big for the device's memory)
fails before anything is compiled or written; an existing, non-empty DIR is refused unless
--force is given.

Long runs: `--resume DIR` continues a run stopped at any moment (Ctrl-C, SIGTERM, SIGKILL, a
crash) from its newest complete checkpoint and ends with the same metrics.jsonl as an
uninterrupted run. A first Ctrl-C or SIGTERM stops at the next evaluation boundary and writes
a checkpoint; a second one aborts at once. `--resume DIR --set duration_s=T` with a longer T
extends a run (finished or not) to T simulated seconds, ending exactly as a run started with T.

Exit codes: 0 completed, 1 failed (an exception; summary.json says which), 2 bad input,
3 diverged (NaN/Inf in parameters or training loss), 128 + signal number when interrupted
(130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path

from divjax import config as config_lib

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_DIVERGED = 0, 1, 2, 3


class BadInput(Exception):
  """Refused before anything is compiled or written (exit code 2)."""


def _out_dir(args, cfg_path: str | None) -> Path:
  if args.out:
    return Path(args.out)
  stem = Path(cfg_path).stem if cfg_path else "default"
  return Path("runs") / f"{stem}_{datetime.datetime.now():%Y%m%d-%H%M%S}"


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


def _load(path, overrides) -> config_lib.Config:
  try:
    return config_lib.load(path, overrides)
  except config_lib.ConfigError as e:
    raise BadInput(f"config error: {e}") from None


def _prepare(args) -> tuple[Path, config_lib.Config, bool, bool]:
  """(output dir, config, whether a run is there to continue, whether it is extended to a
  longer duration_s), all input checked."""
  if not args.resume:
    cfg = _load(args.config, args.set or [])
    out = _out_dir(args, args.config)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
      raise BadInput(f"error: output directory {out} exists and is not empty; choose another --out, "
                     f"pass --force to replace it, or --resume {out} to continue the run in it")
    return out, cfg, False, False

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
    if out.exists() and any(p.name != "config.yaml.tmp" for p in out.iterdir()):
      raise BadInput(f"error: --resume {out}: not a divjax run directory (no config.yaml, not empty)")
    return out, _load(args.config, args.set or []), False, False
  try:
    saved = config_lib.load(saved_path)
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
  return out, given if extend else saved, True, extend


class _StopOnSignal:
  """First SIGINT / SIGTERM: ask the driver to stop at the next evaluation boundary (it writes
  a checkpoint). A second one raises KeyboardInterrupt at once (the last checkpoint remains)."""

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
    print(f"\n{signal.Signals(signum).name}: stopping at the next evaluation boundary and writing "
          f"a checkpoint (send it again to abort at once)", file=sys.stderr, flush=True)

  def requested(self) -> bool:
    return self.signum is not None


def cmd_run(args) -> int:
  try:
    out, cfg, resuming, extend = _prepare(args)
  except BadInput as e:
    print(e, file=sys.stderr)
    return EXIT_BAD_INPUT

  import jax  # heavy imports only once the input is known good
  from divjax import checkpoint, memory, plots, sharding, simulate
  sharding.request_cpu_devices(cfg.devices, cfg.n_nodes)  # before anything starts the backend
  try:
    sim = simulate.build(cfg)
    mem = memory.check(sim)  # before compiling or writing anything
  except (config_lib.ConfigError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT

  if not resuming:
    if out.exists() and args.force:
      shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "config.yaml", config_lib.dump_yaml(cfg))
    if sim.task.label_hist is not None:  # who holds which classes: node, then one column per class
      hist = sim.task.label_hist
      rows = ["node," + ",".join(f"class_{c}" for c in range(hist.shape[1]))]
      rows += [f"{i}," + ",".join(str(int(v)) for v in row) for i, row in enumerate(hist)]
      _write_atomic(out / "label_histograms.csv", "\n".join(rows) + "\n")
  ckpt = checkpoint.Checkpointer(out, template=jax.eval_shape(sim.engine.init, sim.run_key))
  resume, records = None, []
  ticks = ckpt.ticks() if resuming else []
  if ticks:
    # Continue from an evaluation boundary (or the end): periodic checkpoints are there, and
    # the records before it are then exactly an uninterrupted run's. Only an extended run's old
    # end can lie elsewhere; it falls back to the checkpoint before.
    every = cfg.eval_every_ticks
    usable = [t for t in ticks if t % every == 0 or t == cfg.n_ticks]
    if not usable:
      ckpt.close()
      print(f"error: --resume {out}: its only checkpoint (tick {ticks[-1]}, the old end) is not on an "
            f"evaluation boundary (every {every} ticks), so the run cannot continue from it; "
            f"start a new run (--out) with the longer duration_s", file=sys.stderr)
      return EXIT_BAD_INPUT
    try:
      resume = ckpt.restore(usable[-1])
    except checkpoint.CheckpointError as e:
      print(f"error: --resume {out}: {e}", file=sys.stderr)
      return EXIT_BAD_INPUT
    records = list(resume[1])
    print(f"resuming {out} from tick {records[-1]['tick']} (t = {records[-1]['time_s']:g} s)",
          file=sys.stderr)
  if extend:  # only now, with everything checked: the run's config becomes the longer one
    print(f"extending {out} to duration_s = {cfg.duration_s:g}", file=sys.stderr)
    _write_atomic(out / "config.yaml", config_lib.dump_yaml(cfg))
  # metrics.jsonl holds exactly the records up to the checkpoint: later ones are recomputed
  _write_atomic(out / "metrics.jsonl", "".join(_record_line(r) for r in records))

  status, error, summary, signum = "completed", None, None, None
  with open(out / "metrics.jsonl", "a") as mf, _StopOnSignal() as stop:
    def on_eval(rec):
      records.append(rec)
      mf.write(_record_line(rec))
      mf.flush()

    try:
      summary, _ = simulate.run(cfg, sim=sim, on_eval=on_eval, progress=not args.quiet,
                                resume=resume, on_checkpoint=ckpt.save,
                                should_stop=stop.requested, memory_info=mem)
      status = summary["status"]
    except KeyboardInterrupt:
      status, error = "interrupted", "aborted by a second signal: resume from the last checkpoint"
    except Exception as e:  # keep what was written, record why it stopped
      status, error = "failed", "".join(traceback.format_exception_only(e)).strip()
    signum = stop.signum or (signal.SIGINT if status == "interrupted" else None)
  ckpt.close()
  if summary is None:
    summary = simulate.summarize(cfg, records, extra={"memory": mem}) if records else {}
    summary.update(status=status, error=error)
  _write_atomic(out / "summary.json", json.dumps(summary, indent=2, default=_json_default))
  if records:
    plots.plot_run(records, out / "metrics.png", title=f"{cfg.algorithm}, n={cfg.n_nodes}",
                   kind=sim.task.kind, baseline=sim.task.baseline)
  final = summary.get("final", {})
  print(f"{status}: {out}  acc_mean={final.get('acc_mean', float('nan')):.4f}  "
        f"time_to_target_s={summary.get('time_to_target_s')}")
  if error:
    print(error, file=sys.stderr)
  if status == "diverged":
    d = summary["divergence"]
    print(f"diverged at tick {d['tick']} (t = {d['time_s']:g} s): non-finite {', '.join(d['metrics'])}"
          f" at nodes {d['nodes'][:20]}{' ...' if len(d['nodes']) > 20 else ''}", file=sys.stderr)
  if status == "interrupted":
    print(f"resume with: divjax run --resume {out}", file=sys.stderr)
  return {"completed": EXIT_OK, "diverged": EXIT_DIVERGED,
          "interrupted": 128 + int(signum or signal.SIGINT)}.get(status, EXIT_FAILED)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="divjax", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("run", help="run one simulation (or continue one with --resume)")
  p.add_argument("config", nargs="?", help="YAML config file (defaults if omitted)")
  p.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE",
                 help="dotted overrides, e.g. --set n_nodes=32 network.upload_mbps=30")
  p.add_argument("--out", help="output directory (default runs/<config>_<timestamp>)")
  p.add_argument("--resume", metavar="DIR",
                 help="continue the run in DIR from its newest checkpoint; CONFIG / --set, if given, "
                      "must not change its config.yaml, except a longer duration_s, which extends the run "
                      "(a DIR without config.yaml is started afresh)")
  p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(func=cmd_run)
  args = parser.parse_args(argv)
  return args.func(args)


if __name__ == "__main__":
  sys.exit(main())
