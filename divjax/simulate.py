"""The driver: a jitted `lax.scan` of the tick in chunks, evaluation between chunks.

Only the chunk loop runs on the host. Randomness depends on (node, step) and (node, round),
never on the chunk, so the evaluation interval, the checkpoint interval and resuming from a
checkpoint do not change any simulated number. Between chunks the driver also checks for
divergence (non-finite parameters or training loss), writes checkpoints (through a callback:
divjax.checkpoint does the writing) and polls a stop request (Ctrl-C, SIGTERM). Before
compiling it checks the memory estimate (divjax.memory).

Metric records hold simulated quantities only (no wall-clock field), so the same config and
seed give byte-identical metrics.jsonl; wall-clock numbers go to the summary only.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from divjax import algorithms, byzantine, churn, engine as engine_lib, fates, sharding, sync, tasks, versions
from divjax.config import Config


class Simulation(NamedTuple):
  cfg: Config
  task: tasks.Task
  engine: engine_lib.Engine
  run_key: jax.Array
  params: engine_lib.Params            # the traced part: run key, lr, momentum, links, data
  mesh: Optional[jax.sharding.Mesh]  # the node axis over `devices` devices; None for one
  evaluate_nodes: Callable            # (params (N, P), test) -> per-node metrics, sharded like them
  counts: Callable                    # state -> message counts on the device (engine.counts, jitted)
  objective: Optional[Callable] = None  # xbar -> (f(xbar), ||grad f||^2) with observe.grad_norm


def build(cfg: Config, task: Optional[tasks.Task] = None, *, communicate: bool = True) -> Simulation:
  task = task if task is not None else tasks.build(cfg)
  eng = make_engine(cfg, task, communicate=communicate)
  mesh = sharding.node_mesh(sharding.device_count(cfg.devices, cfg.n_nodes))
  # the data, whole on every device, placed once (not moved again at every chunk)
  task = task._replace(test=sharding.gather(task.test, mesh))
  params = eng.params(cfg, sharding.gather(task.train_data, mesh))
  evaluate_nodes = jax.jit(sharding.over_nodes(task.eval_fn, mesh, (True, False)))
  return Simulation(cfg, task, eng, params.key, params, mesh, evaluate_nodes, jax.jit(eng.counts),
                    objective_for(cfg, task))


def objective_for(cfg: Config, task: tasks.Task) -> Optional[Callable]:
  """observe.grad_norm: xbar -> (f(xbar), ||grad f(xbar)||^2) on task's training set."""
  if not cfg.observe.grad_norm:
    return None
  from divjax import objective
  fn = objective.make(task)
  w = jnp.asarray(objective.sample_weights(task.parts, task.counts, task.x_train.shape[0]))
  return lambda xbar: fn(xbar, task.x_train, task.y_train, w)


def make_engine(cfg: Config, task: tasks.Task, *, communicate: bool = True) -> engine_lib.Engine:
  """The engine of cfg's algorithm: the round engine (divjax.sync) or the asynchronous one."""
  alg = algorithms.make(cfg)
  if algorithms.PROPERTIES[cfg.algorithm].synchronous:
    return sync.make(cfg, task, alg)
  return engine_lib.make(cfg, task, alg, communicate=communicate)


def consensus_distance(params) -> jax.Array:
  """(1/N) sum_i ||x_i - xbar||^2."""
  return jnp.mean(jnp.sum((params - params.mean(0, keepdims=True)) ** 2, axis=1))


_consensus = jax.jit(consensus_distance)


def eval_node_ids(cfg: Config) -> Optional[np.ndarray]:
  """The nodes whose test metrics are recorded: None for all, else eval.nodes of them, a fixed
  sorted draw from the data seed (the same at every evaluation and in every run of the seed)."""
  k = cfg.eval.nodes
  if k is None or k == cfg.n_nodes:
    return None
  return np.sort(np.random.default_rng([cfg.data_seed, 0xE7A1]).choice(cfg.n_nodes, k, replace=False))


def _node_metrics(sim: Simulation, state, whole) -> Optional[dict]:
  ids = eval_node_ids(sim.cfg)
  if ids is None:
    return sharding.to_host(sim.evaluate_nodes(state.params, sim.task.test))
  return sharding.to_host(sim.task.evaluate(whole[ids])) if ids.size else None


def _n_test(task: tasks.Task) -> int:
  return int(np.sum(sharding.to_host(task.test[-1])))   # the test set's validity mask


def evaluate(sim: Simulation, state) -> dict:
  """Test metrics of every node (or of cfg.eval's subset) and of the network-average model,
  plus message counts."""
  # reductions over nodes on one whole copy: the summation order of an unsharded run
  whole = sharding.gather(state.params, sim.mesh)
  ev = _node_metrics(sim, state, whole)
  avg = sharding.to_host(sim.task.evaluate(whole.mean(0, keepdims=True)))
  tick = int(state.tick)
  per_node = lambda f, k: None if ev is None else float(f(ev[k]))
  rec = {
      "tick": tick,
      "time_s": tick * sim.cfg.dt_us / 1e6,
      "round_mean": float(np.mean(sharding.to_host(state.rounds))),
      "acc_mean": per_node(np.mean, "acc"),
      "acc_min": per_node(np.min, "acc"),
      "acc_max": per_node(np.max, "acc"),
      "loss_mean": per_node(np.mean, "loss"),
      "acc_avg_model": float(avg["acc"][0]),
      "consensus": float(_consensus(whole)),
  }
  av = getattr(sim.params, "availability", None)
  if isinstance(av, churn.Intervals):  # synchronous: the share online when the next round starts
    rec["online_fraction"] = float(jnp.mean(churn.online_at(av, jnp.asarray(sharding.to_host(state.time_us)))))
  elif av is not None:  # churn: the share of nodes online in their current round
    rounds = jnp.asarray(sharding.to_host(state.rounds))
    rec["online_fraction"] = float(jnp.mean(churn.online_in(av, jnp.arange(rounds.shape[0]), rounds)))
  byz = byzantine.mask(sim.cfg)
  if byz.any():  # honest and Byzantine nodes apart: the attackers' own accuracy means nothing
    rec.update(_honest_metrics(sim, ev, whole, byz))
  if sim.cfg.eval.test_subsample is not None:  # say what was evaluated, only when it is not all
    rec["eval_test"] = int(min(sim.cfg.eval.test_subsample, _n_test(sim.task)))
  if sim.cfg.eval.nodes is not None:
    rec["eval_nodes"] = int(sim.cfg.eval.nodes)
  rec.update(fates.to_host(sim.counts(state)))
  count = int(state.age_count)
  rec["staleness_s"] = float(state.age_sum) / count * sim.cfg.dt_us / 1e6 if count else None
  if sim.objective is not None:  # the theorem's quantity (divjax.objective)
    value, g2 = sharding.to_host(sim.objective(whole.mean(0)))
    rec["objective"], rec["grad_norm_sq"] = float(value), float(g2)
  if sim.cfg.observe.versions != "off":  # per-pair version ages, in rounds (divjax.versions)
    rec["version_age_mean"], rec["version_age_max"] = versions.staleness(state.versions.known)
  return rec


def _honest_metrics(sim: Simulation, ev: Optional[dict], whole, byz: np.ndarray) -> dict:
  """acc_mean/acc_min/loss_mean of the honest nodes evaluated, acc_mean of the Byzantine ones,
  and the honest nodes' average model's accuracy."""
  ids = eval_node_ids(sim.cfg)
  b = byz if ids is None else byz[ids]
  pick = lambda f, k, m: None if ev is None or not m.any() else float(f(np.asarray(ev[k])[m]))
  honest_avg = sharding.to_host(sim.task.evaluate(whole[np.flatnonzero(~byz)].mean(0, keepdims=True)))
  return {"acc_mean_honest": pick(np.mean, "acc", ~b), "acc_min_honest": pick(np.min, "acc", ~b),
          "loss_mean_honest": pick(np.mean, "loss", ~b), "acc_mean_byzantine": pick(np.mean, "acc", b),
          "acc_avg_model_honest": float(honest_avg["acc"][0])}


def finite(x) -> bool:
  return x is not None and math.isfinite(x)


def checkpoint_every_ticks(cfg: Config) -> int:
  """Checkpoint interval in ticks: a whole number (>= 1) of evaluation intervals, or 0 (no
  periodic checkpoints). `checkpoint_every_s` None means about 5% of the duration."""
  seconds = cfg.duration_s / 20 if cfg.checkpoint_every_s is None else cfg.checkpoint_every_s
  if seconds == 0:
    return 0
  every = cfg.eval_every_ticks
  return every * max(1, round(seconds * 1e6 / (cfg.dt_us * every)))


_nonfinite_rows = jax.jit(lambda p: ~jnp.all(jnp.isfinite(p), axis=tuple(range(1, p.ndim))))


def find_divergence(sim: Simulation, state, train_loss: np.ndarray) -> Optional[dict]:
  """None if every parameter and training loss is finite; else where and what diverged."""
  bad_params = np.flatnonzero(sharding.to_host(_nonfinite_rows(state.params)))
  bad_loss = not np.all(np.isfinite(train_loss))
  if not bad_params.size and not bad_loss:
    return None
  nodes = bad_params
  if not nodes.size:  # the chunk's loss is a mean over nodes: find them by their test loss
    nodes = np.flatnonzero(~np.isfinite(sharding.to_host(sim.evaluate_nodes(state.params, sim.task.test)["loss"])))
  tick = int(state.tick)
  return {"tick": tick, "time_s": tick * sim.cfg.dt_us / 1e6, "nodes": nodes.tolist(),
          "metrics": [m for m, bad in (("params", bad_params.size), ("train_loss", bad_loss)) if bad]}


def run(cfg: Config, *, on_eval: Optional[Callable[[dict], None]] = None,
        progress: bool = False, sim: Optional[Simulation] = None,
        resume: Optional[tuple] = None,
        on_checkpoint: Optional[Callable[[Any, list], None]] = None,
        should_stop: Optional[Callable[[], bool]] = None,
        memory_info: Optional[dict] = None,
        compiled: Optional[dict] = None):
  """Runs a whole simulation, or continues one; calls `on_eval(record)` after every evaluation.

  Args:
    resume: (state, records) of a checkpoint: the run continues at state.tick; `records` are
      the evaluations made so far (not passed to `on_eval` again). The result is identical to
      that of an uninterrupted run.
    on_checkpoint: called as on_checkpoint(state, records) every checkpoint_every_ticks(cfg),
      at the end of a completed run, and when stopped by `should_stop`.
    should_stop: polled after every chunk (evaluation boundary); True ends the run there with
      status "interrupted" (Ctrl-C handling lives with the caller).
    memory_info: the result of divjax.memory.check if the caller already made it; otherwise
      the check is made here, before compiling (raises memory.TooLarge).
    compiled: chunk length -> compiled chunk, shared between runs of one structure (sweeps).

  Returns:
    (summary dict, last state). summary["status"] is "completed", "interrupted" or
    "diverged": non-finite parameters or training loss stop the run at the evaluation boundary
    where they are seen, summary["divergence"] says where, and the returned state is the
    diverged one (its record is not emitted).
  """
  from divjax import memory
  sim = sim if sim is not None else build(cfg)
  memory_info = memory_info if memory_info is not None else memory.check(sim)
  total, every = cfg.n_ticks, cfg.eval_every_ticks
  ckpt_every = checkpoint_every_ticks(cfg)

  records = []

  def emit(rec):
    records.append(rec)
    if on_eval is not None:
      on_eval(rec)

  if resume is None:
    state = place(sim, sim.engine.init(sim.run_key))
    emit(evaluate(sim, state) | {"train_loss": None})
  else:
    state, done = resume
    state = place(sim, state)
    records = list(done)
    t = int(state.tick)
    # chunks start on multiples of H; a finished run (t == total) has nothing left to simulate
    if not records or records[-1]["tick"] != t or (t % cfg.local_steps and t != total):
      raise ValueError(f"cannot resume at tick {t}: chunks start on multiples of "
                       f"local_steps = {cfg.local_steps}, after the record of that tick")
  tick = int(state.tick)
  steps0 = steps_done = int(np.sum(sharding.to_host(state.steps)))

  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=round(total * cfg.dt_us / 1e6, 3), initial=round(tick * cfg.dt_us / 1e6, 3),
               unit="sim-s", dynamic_ncols=True)

  compile_s, run_s = 0.0, 0.0
  cache = new_cache_stats()
  chunk_speeds = []  # node-steps per wall second of each chunk: shows a host's slow stretches
  # chunk length -> compiled chunk; a sweep passes one dict to every point of a group: the
  # program takes the point's Params as an argument, so it is compiled once for them all
  compiled = {} if compiled is None else compiled
  t0_wall = time.perf_counter()
  status, divergence = "completed", None
  while tick < total:
    # up to the next evaluation boundary: a run resumed between two (a round boundary) gets
    # back onto the same evaluation ticks as an uninterrupted run
    length = min(every - tick % every, total - tick)
    if length not in compiled:
      compiled[length], seconds = compile_counted(lambda: compile_chunk(sim, state, length), cache)
      compile_s += seconds
    c1 = time.perf_counter()
    state, metrics = compiled[length](state, sim.params)
    jax.block_until_ready(state.params)
    chunk_s = time.perf_counter() - c1
    run_s += chunk_s
    steps_now = int(np.sum(sharding.to_host(state.steps)))
    chunk_speeds.append(round((steps_now - steps_done) / chunk_s, 2) if chunk_s > 0 else None)
    steps_done = steps_now
    tick += length
    train_loss = np.asarray(sharding.to_host(metrics["train_loss"]))
    divergence = find_divergence(sim, state, train_loss)
    if divergence is not None:
      status = "diverged"
      break
    rec = evaluate(sim, state)
    rec["train_loss"] = float(np.mean(train_loss))
    emit(rec)
    if bar is not None:
      bar.update(round(length * cfg.dt_us / 1e6, 3))
      bar.set_postfix(acc=f"{rec[headline(records)]:.3f}", rounds=f"{rec['round_mean']:.0f}")
    stop = tick < total and should_stop is not None and should_stop()
    if on_checkpoint is not None and (stop or tick == total or (ckpt_every and tick % ckpt_every == 0)):
      on_checkpoint(state, records)
    if stop:
      status = "interrupted"
      break
  if bar is not None:
    bar.close()

  steps = steps_done - steps0
  summary = run_summary(sim, records, status, divergence, memory_info=memory_info,
                        wall_s=time.perf_counter() - t0_wall, compile_s=compile_s, cache=cache,
                        node_steps_per_s=steps / run_s if run_s > 0 else None,
                        chunk_node_steps_per_s=chunk_speeds)
  return summary, state


def run_summary(sim: Simulation, records: list[dict], status: str, divergence: Optional[dict], *,
                memory_info: dict, wall_s: float, compile_s: float, cache: dict, **speeds) -> dict:
  """summary.json of a run: final and best metrics, sizes, timings, status."""
  summary = summarize(sim.cfg, records, extra={
      "n_params": sim.task.n_params,
      "ring_depth": sim.engine.depth,
      "ring_bytes": sim.engine.ring_bytes,
      # every fragment is sent equally often by the registered algorithms: bits = messages x mean size
      "message_bits": sim.engine.message_bits,
      "bits_sent": sim.engine.message_bits * records[-1]["msgs_sent"] if records else None,
      "memory": memory_info,
      "wall_s": wall_s,
      "compile_s": compile_s,
      "compile_cache": cache,
      **speeds,
      "device": jax.devices()[0].device_kind,
      "device_peak_bytes": device_peak_bytes(),
      "devices": sim.mesh.size if sim.mesh is not None else 1,  # `devices: auto` resolved
  })
  if sim.task.baseline is not None:  # e.g. MovieLens: the RMSE a run has to beat
    summary["baseline"] = sim.task.baseline
  summary["status"] = status
  if divergence is not None:
    summary["divergence"] = divergence
  return summary


def device_peak_bytes() -> Optional[int]:
  """The accelerator's own peak of allocated bytes in this process (None where the device
  reports none, as on a CPU: the process's resident memory is the measure there)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def new_cache_stats() -> dict:
  """Counts of compiles read from / written to JAX's persistent cache (summary.json)."""
  return {"dir": _cache_dir(), "hits": 0, "misses": 0}


def compile_counted(compile_fn: Callable, cache: dict):
  """(compile_fn(), seconds), counting in `cache` whether the persistent cache had it."""
  c0, entries = time.perf_counter(), _cache_entries(cache["dir"])
  out = compile_fn()
  if cache["dir"] is not None:  # a compile that wrote no new entry was read from the cache
    cache["misses" if _cache_entries(cache["dir"]) > entries else "hits"] += 1
  return out, time.perf_counter() - c0


def compile_chunk(sim: Simulation, state, length: int):
  """Ahead-of-time compile of one chunk length (so compile time is measured separately).

  A chunk must start on a multiple of H ticks (every chunk but the last is whole rounds).
  """
  def chunk(s, params):
    s, metrics = sim.engine.advance(s, params, length)
    return sharding.constrain(s, sim.mesh, sim.engine.node_axes(s)), metrics
  return jax.jit(chunk, donate_argnums=0).lower(state, sim.params).compile()


def place(sim: Simulation, state):
  """A state on the simulation's devices, split along its node axes."""
  return sharding.place(state, sim.mesh, sim.engine.node_axes(state))


def _cache_dir() -> Optional[str]:
  return jax.config.jax_compilation_cache_dir or None


def _cache_entries(where: Optional[str]) -> int:
  import os
  try:
    return len(os.listdir(where)) if where else 0
  except OSError:
    return 0


def headline(records: list[dict]) -> str:
  """The accuracy the target and the best value read: acc_mean, or acc_avg_model when only the
  average model was evaluated (eval.nodes = 0); the honest nodes' when some are Byzantine."""
  suffix = "_honest" if records and "acc_mean_honest" in records[0] else ""
  return ("acc_avg_model" if records and records[0]["acc_mean"] is None else "acc_mean") + suffix


def time_to_target(records: list[dict], target: Optional[float], key: Optional[str] = None) -> Optional[float]:
  if target is None:
    return None
  key = key or headline(records)
  for r in records:
    if r[key] is not None and r[key] >= target:
      return r["time_s"]
  return None


def summarize(cfg: Config, records: list[dict], extra: dict) -> dict:
  final = records[-1]
  return {
      "status": "completed",
      "final": final,
      "best_acc_mean": max(r[headline(records)] for r in records),
      "time_to_target_s": time_to_target(records, cfg.target),
      "target": cfg.target,
      **extra,
  }
