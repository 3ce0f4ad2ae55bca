"""Sweeps: a grid of configs, one compiled program per static structure.

    divjax sweep CONFIG --grid lr=0.01,0.02,0.05 --grid seed=0..3 [--zip] [--set ...] [--out DIR]

Every point is a full config (CONFIG, then --set, then the point's values), validated before
anything is compiled or written. Points are grouped by their static structure
(engine.static_key: what fixes shapes and the program, e.g. n_nodes, fragments, recipients,
the model, the algorithm); everything else (seed, lr, momentum, link speeds, latency,
stragglers, data.seed) is a traced engine.Params, so all points of a group run one compiled
program, one after the other: one compile per group and chunk length. Each point's outputs
are those of `divjax run` with the same config (config.yaml, metrics.jsonl, summary.json,
metrics.png, byte-identical metrics.jsonl), in DIR/points/<index>_<values>/; DIR gets
sweep.csv, sweep.jsonl (one row per point) and sweep.png.

With `--batch B` (divjax.batched), B points of one group and schedule are stepped together
as one vmapped program instead (message counts identical, floats to float32 rounding);
`--batch auto` does so only off a CPU, where it measured no faster.

A point that diverges is marked so and the others go on (they are separate runs of the same
program: nothing is shared but the compiled code). A point run on its own checkpoints itself
(divjax.checkpoint) at its config's checkpoint boundaries, at most once per `checkpoint_wall_s`
of wall time (a short point then writes none) and when the sweep is stopped by a signal; a
finished point's checkpoints are deleted. `--resume DIR` skips the points that have a
summary.json with a final status and continues the others from their newest intact
checkpoint, or from the start without one (a batched point, a point killed before its first
checkpoint). Either way its results equal an uninterrupted sweep's.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import yaml

from divjax import configure
from divjax.config import Config, ConfigError

RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
FINAL = ("completed", "diverged")


class Point(NamedTuple):
  index: int
  values: dict          # swept key -> value
  cfg: Config

  @property
  def name(self) -> str:
    parts = [f"{k.split('.')[-1]}={v}" for k, v in self.values.items()]
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", f"{self.index:03d}_" + "_".join(parts))[:120]


def parse_grid(grids: list[str], zip_: bool = False) -> list[dict]:
  """['lr=0.1,0.2', 'seed=0..2'] -> the points' values, the product (or with zip_, pairs).

  Raises ConfigError naming the key for an empty list, a bad range or unequal zip lengths.
  """
  axes = {}
  for g in grids:
    key, sep, rest = g.partition("=")
    key = key.strip()
    if not sep or not key:
      raise ConfigError(f"--grid {g!r}: expected KEY=V1,V2,... or KEY=A..B")
    if key in axes:
      raise ConfigError(f"--grid {key}: given twice")
    m = RANGE.match(rest.strip())
    if m:
      lo, hi = int(m.group(1)), int(m.group(2))
      if hi < lo:
        raise ConfigError(f"--grid {key}: empty range {rest.strip()}")
      values = list(range(lo, hi + 1))
    else:
      items = [s.strip() for s in rest.split(",")] if rest.strip() else []
      if not items or any(s == "" for s in items):
        raise ConfigError(f"--grid {key}: expected a non-empty list of values (got {rest!r})")
      values = [yaml.safe_load(s) for s in items]
    axes[key] = values
  if not axes:
    raise ConfigError("--grid: at least one KEY=V1,V2,... is needed")
  keys = list(axes)
  if zip_:
    lengths = {k: len(v) for k, v in axes.items()}
    if len(set(lengths.values())) != 1:
      raise ConfigError(f"--zip: every --grid needs as many values ({lengths})")
    combos = zip(*axes.values())
  else:
    combos = itertools.product(*axes.values())
  return [dict(zip(keys, c)) for c in combos]


def points(config: Optional[str], overrides: list[str], grid: list[dict]) -> list[Point]:
  """Every point's validated config; a bad one is a ConfigError naming the point and the key."""
  out = []
  for i, values in enumerate(grid):
    sets = [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) or v is None else v}" for k, v in values.items()]
    try:
      cfg = configure.load(config, list(overrides) + sets)
    except ConfigError as e:
      raise ConfigError(f"{e} (sweep point {i}: {', '.join(sets)})") from None
    out.append(Point(i, values, cfg))
  return out


def structure(cfg: Config) -> str:
  """The static structure of a point: points with equal keys share one compiled program."""
  from divjax import algorithms, engine, network
  alg = algorithms.make(cfg)
  depth = 0 if algorithms.PROPERTIES[cfg.algorithm].synchronous else engine.ring_depth(cfg, alg, network.build(cfg))
  return engine.static_key(cfg, depth)


def _task_key(cfg: Config) -> str:
  """What the task (data, partitions, test set, evaluation) depends on."""
  return json.dumps([cfg.task, cfg.model, cfg.hidden, cfg.mf_dim, cfg.mf_offset, cfg.n_nodes,
                     cfg.data_seed, cfg.eval_batch, cfg.data.model_dump(), cfg.eval.test_subsample, cfg.devices],
                    sort_keys=True)


class Group:
  """The shared parts of a group's points: engine, compiled chunks, tasks by data."""

  def __init__(self, first: Config):
    from divjax import simulate
    self.sim = simulate.build(first)
    self.tasks = {_task_key(first): (self.sim.task, self.sim.evaluate_nodes, self.sim.objective)}
    self.compiled: dict = {}          # chunk length -> compiled chunk of one point
    self.batch_compiled: dict = {}    # batch size -> {chunk length -> compiled vmapped chunk}

  def simulation(self, cfg: Config):
    """The point's Simulation: the group's engine with the point's Params and task."""
    import jax
    from divjax import sharding, simulate, tasks
    key = _task_key(cfg)
    if key not in self.tasks:
      task = tasks.build(cfg)
      task = task._replace(test=sharding.gather(task.test, self.sim.mesh))
      ev = jax.jit(sharding.over_nodes(task.eval_fn, self.sim.mesh, (True, False)))
      self.tasks[key] = (task, ev, simulate.objective_for(cfg, task))
    task, ev, objective = self.tasks[key]
    params = self.sim.engine.params(cfg, sharding.gather(task.train_data, self.sim.mesh))
    return self.sim._replace(cfg=cfg, task=task, run_key=params.key, params=params, evaluate_nodes=ev,
                             objective=objective)


def _write(path: Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def _record_line(rec: dict) -> str:
  return json.dumps(rec) + "\n"


class PointOutput:
  """A point's directory as `divjax run` writes it: config.yaml, then metrics.jsonl record by
  record, then summary.json (only with a final status: --resume runs the others again) and
  metrics.png."""

  def __init__(self, point: Point, out: Path, records: tuple = ()):
    """records: those of a checkpoint the point resumes from (written first; later ones, from
    before it was killed, are dropped and recomputed)."""
    from divjax import config as config_lib
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "config.yaml", config_lib.dump_yaml(point.cfg))
    self.cfg, self.out, self.records = point.cfg, out, list(records)
    _write(out / "metrics.jsonl", "".join(map(_record_line, self.records)))
    self.file = open(out / "metrics.jsonl", "a")

  def on_eval(self, rec: dict) -> None:
    self.records.append(rec)
    self.file.write(_record_line(rec))
    self.file.flush()

  def finish(self, summary: dict, task) -> dict:
    from divjax import plots
    self.file.close()
    if summary["status"] in FINAL:
      _write(self.out / "summary.json", json.dumps(summary, indent=2, default=str))
    plots.plot_run(self.records, self.out / "metrics.png", title=f"{self.cfg.algorithm}, n={self.cfg.n_nodes}",
                   kind=task.kind, baseline=task.baseline)
    return summary


CHECKPOINT_WALL_S = 60.0


def _resume_point(ckpt, cfg: Config) -> Optional[tuple]:
  """(state, records) of the point's newest intact checkpoint on an evaluation boundary, or
  None (none there, or none usable: the point then starts again, with the same result)."""
  from divjax import checkpoint
  for tick in reversed([t for t in ckpt.ticks() if t % cfg.eval_every_ticks == 0 and t < cfg.n_ticks]):
    try:
      return ckpt.restore(tick)
    except checkpoint.CheckpointError:
      continue
  return None


def throttled(save: Callable, should_stop: Callable[[], bool], every_s: float, end_tick: int,
              clock: Callable[[], float] = time.perf_counter) -> Callable:
  """on_checkpoint for a sweep point: `save` at most once per `every_s` wall seconds, and
  always when the sweep is being stopped; never at the end (summary.json marks a point done)."""
  last = [clock()]

  def on_checkpoint(state, records):
    if int(state.tick) < end_tick and (should_stop() or clock() - last[0] >= every_s):
      save(state, records)
      last[0] = clock()
  return on_checkpoint


def run_point(point: Point, group: Group, out: Path, should_stop: Callable[[], bool] = lambda: False,
              checkpoint_wall_s: float = CHECKPOINT_WALL_S) -> dict:
  """Runs one point into `out` as `divjax run` would, continuing from its checkpoint if it has
  one; returns its summary (with "resumed_from_tick" when it continued)."""
  import jax
  from divjax import checkpoint, config as config_lib, simulate
  sim = group.simulation(point.cfg)
  ckpt = checkpoint.Checkpointer(out, template=jax.eval_shape(sim.engine.init, sim.run_key), keep=1,
                                 config=config_lib.to_dict(point.cfg))
  try:
    resume = _resume_point(ckpt, point.cfg)
    po = PointOutput(point, out, records=resume[1] if resume else ())
    save = throttled(ckpt.save, should_stop, checkpoint_wall_s, point.cfg.n_ticks)
    try:
      summary, _ = simulate.run(point.cfg, sim=sim, on_eval=po.on_eval, compiled=group.compiled,
                                should_stop=should_stop, resume=resume, on_checkpoint=save)
    finally:
      po.file.close()
  finally:
    ckpt.close()
  if resume is not None:
    summary["resumed_from_tick"] = resume[1][-1]["tick"]
  if summary["status"] in FINAL:
    shutil.rmtree(out / checkpoint.SUBDIR, ignore_errors=True)
  return po.finish(summary, sim.task)


def run_batch(batch: list[Point], group: Group, out: Path, should_stop: Callable[[], bool]) -> list[dict]:
  """Runs points of one group as one vmapped program (divjax.batched); returns their summaries."""
  from divjax import batched, memory
  sims = [group.simulation(p.cfg) for p in batch]
  outs = [PointOutput(p, out / "points" / p.name) for p in batch]
  try:
    summaries = batched.run(sims, on_evals=[o.on_eval for o in outs],
                            memory_infos=[memory.check(s) for s in sims], should_stop=should_stop,
                            compiled=group.batch_compiled.setdefault(len(batch), {}))
  finally:
    for o in outs:
      o.file.close()
  return [o.finish(s, sim.task) for o, s, sim in zip(outs, summaries, sims)]


def batch_size(batch: Optional[int], group: Group, n_points: int) -> int:
  """Points per vmapped batch for a group: `batch` (None: auto, i.e. one at a time on a CPU,
  where sequential points measured faster, and as many as memory allows elsewhere); always 1
  when the nodes are split over several devices."""
  import jax
  from divjax import batched, memory
  if group.sim.mesh is not None or batch == 1 or n_points == 1:
    return 1
  if batch is None and jax.devices()[0].platform == "cpu":
    return 1
  return batched.size(batch, n_points, memory.check(group.sim), batched.shared_bytes(group.sim))


ROW_KEYS = ("acc_mean", "acc_min", "loss_mean", "acc_avg_model", "consensus", "msgs_sent",
            "msgs_delivered", "msgs_flushed", "msgs_expired", "staleness_s", "train_loss")
HONEST_KEYS = ("acc_mean_honest", "acc_min_honest", "acc_avg_model_honest", "acc_mean_byzantine", "msgs_overflow")


def row(point: Point, summary: dict, group: int) -> dict:
  final = summary.get("final", {})
  r: dict[str, Any] = {"index": point.index, "point": point.name, "group": group}
  r.update(point.values)
  r.update(status=summary.get("status"), best_acc_mean=summary.get("best_acc_mean"),
           time_to_target_s=summary.get("time_to_target_s"), wall_s=summary.get("wall_s"),
           compile_s=summary.get("compile_s"), batch=summary.get("batch", {}).get("size", 1))
  r.update({f"final_{k}": final.get(k) for k in ROW_KEYS})
  r.update({f"final_{k}": final[k] for k in HONEST_KEYS if k in final})   # runs with Byzantine nodes
  return r


def write_tables(out: Path, rows: list[dict]) -> None:
  rows = sorted(rows, key=lambda r: r["index"])
  _write(out / "sweep.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
  keys = list(dict.fromkeys(k for r in rows for k in r))
  tmp = out / "sweep.csv.tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
  tmp.replace(out / "sweep.csv")


def plot(out: Path, rows: list[dict], swept: list[str], metric: str = "final_acc_mean") -> None:
  """`metric` against each swept key: the mean over the other keys' values, min-max band."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  fig, axes = plt.subplots(1, len(swept), figsize=(4 * len(swept), 3.2), squeeze=False)
  for ax, key in zip(axes[0], swept):
    # null (a key's default) first; strings and nulls are labels, not positions
    values = sorted({r[key] for r in rows}, key=lambda v: (v is not None, isinstance(v, str), "" if v is None else v))
    ys = [[r[metric] for r in rows if r[key] == v and r[metric] is not None] for v in values]
    labels = any(isinstance(v, str) or v is None for v in values)
    xs = np.arange(len(values)) if labels else np.asarray(values, float)
    ok = [i for i, y in enumerate(ys) if y]
    mean = [float(np.mean(ys[i])) for i in ok]
    lo, hi = [min(ys[i]) for i in ok], [max(ys[i]) for i in ok]
    if key.split(".")[-1] == "seed":  # seeds are labels, not a quantity: no line between them
      ax.errorbar(xs[ok], mean, yerr=[np.subtract(mean, lo), np.subtract(hi, mean)], fmt="o", capsize=4)
    else:
      ax.plot(xs[ok], mean, "o-")
      ax.fill_between(xs[ok], lo, hi, alpha=0.25)
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    if labels or key.split(".")[-1] == "seed":
      ax.set_xticks(xs, [str(v) for v in values])
  fig.tight_layout()
  fig.savefig(out / "sweep.png", dpi=110)
  plt.close(fig)


def run(pts: list[Point], out: Path, *, progress: bool = True,
        should_stop: Callable[[], bool] = lambda: False,
        batch: Optional[int] = 1, checkpoint_wall_s: float = CHECKPOINT_WALL_S) -> tuple[list[dict], dict]:
  """Runs every point not finished yet; returns (rows, info: groups, batches, timings, and the
  points continued from a checkpoint, by name: the tick).

  batch: points per vmapped program (1: one after the other; None: automatic, see batch_size).
  Points are batched with others of their group and schedule (duration, evaluation interval).
  checkpoint_wall_s: a point run on its own checkpoints at most this often (see the module).
  """
  keys = [structure(p.cfg) for p in pts]   # builds each point's algorithm once (graphs can be big)
  groups: dict[str, int] = {}
  for k in keys:
    groups.setdefault(k, len(groups))
  summaries = {p.index: _finished(out / "points" / p.name) for p in pts}
  pending: dict[tuple, list[Point]] = {}
  for p, g in zip(pts, keys):
    if summaries[p.index] is None:
      pending.setdefault((g, p.cfg.n_ticks, p.cfg.eval_every_ticks), []).append(p)
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(pts), initial=len(pts) - sum(map(len, pending.values())), unit="point",
               dynamic_ncols=True)
  # a group's schedules one after the other, and the group (its data, its compiled programs)
  # let go before the next is built: memory holds one group, not every group of the sweep
  # (a reproduce grid has dozens, each with its own copy of the data)
  pending = dict(sorted(pending.items(), key=lambda kv: groups[kv[0][0]]))
  group, current, n_built, sizes, resumed, t0 = None, None, 0, [], {}, time.perf_counter()
  for (g, *_), todo in pending.items():
    if should_stop():
      break
    if g != current:
      group = None
      group, current, n_built = Group(todo[0].cfg), g, n_built + 1
    b = batch_size(batch, group, len(todo))
    for start in range(0, len(todo), b):
      if should_stop():
        break
      chunk = todo[start:start + b]
      if bar is not None:
        bar.set_postfix_str(f"group {groups[g] + 1}/{len(groups)}, {len(chunk)} point(s) at once, "
                            f"{chunk[0].cfg.duration_s:g} sim-s each")
      if len(chunk) == 1:
        done = [run_point(chunk[0], group, out / "points" / chunk[0].name, should_stop, checkpoint_wall_s)]
        if "resumed_from_tick" in done[0]:
          resumed[chunk[0].name] = done[0]["resumed_from_tick"]
      else:
        done = run_batch(chunk, group, out, should_stop)
      sizes.append(len(chunk))
      for p, s in zip(chunk, done):
        summaries[p.index] = s if s.get("status") in FINAL else None
      if bar is not None:
        bar.update(len(chunk))
  if bar is not None:
    bar.close()
  rows = [row(p, summaries[p.index], groups[g]) for p, g in zip(pts, keys) if summaries[p.index] is not None]
  info = {"points": len(pts), "groups": len(groups), "groups_built": n_built,
          "batches": sizes, "resumed": resumed, "wall_s": round(time.perf_counter() - t0, 3)}
  return rows, info


def _finished(d: Path) -> Optional[dict]:
  try:
    s = json.loads((d / "summary.json").read_text())
  except (OSError, ValueError):
    return None
  return s if s.get("status") in FINAL else None
