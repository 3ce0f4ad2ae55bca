"""Several runs of one structure stepped together: one program `jax.vmap`ped over a point axis.

A sweep's points that share a static structure (and a schedule: duration, evaluation
interval, H) differ only in their traced `engine.Params` and initial state, so B of them can
be stacked along a new leading axis and advanced by one compiled, vmapped chunk. Between
chunks each point is checked and evaluated on its own, exactly as `simulate.run` would (the
same `evaluate`, the same divergence check), and its records go to its own callback.

What is shared: the training set is passed once when all points read the same one (the
usual case: `data.seed` changes only the partition, an index array that is stacked); only
points whose data differ (e.g. the synthetic task, drawn from `data.seed`) get a stacked copy.

Exactness: message counts and every integer in the state are identical to single runs;
parameters agree to float32 rounding, not bit for bit, because XLA picks other kernels (e.g.
for the batched dots) in the larger program. Points are independent under vmap: a diverged
point's NaNs never reach another; it is frozen (no longer evaluated) at the boundary where
it is seen, and its slot is still computed with the others until the batch ends.

On 2 CPU cores a vmapped batch of 8 cost 1.10x the CPU time of the same points one after
the other (BENCHMARKS.md), so `divjax sweep` batches only where asked (`--batch`) or, with
`--batch auto`, on accelerators.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from divjax import simulate


def _same(a, b) -> bool:
  return a is b or (a.shape == b.shape and a.dtype == b.dtype and bool(jnp.array_equal(a, b)))


def stack_params(params: Sequence):
  """(stacked Params, vmap in_axes): the training set (data.x, data.y) passed once when every
  point reads the same one, the rest (partitions, keys, links, ...) stacked along axis 0."""
  data = params[0].data
  shared = all(_same(p.data.x, data.x) and _same(p.data.y, data.y) for p in params[1:])
  if not shared:
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *params)
    return stacked, jax.tree.map(lambda _: 0, params[0])
  rest = jax.tree.map(lambda *a: jnp.stack(a), *[p._replace(data=p.data._replace(x=None, y=None)) for p in params])
  stacked = rest._replace(data=rest.data._replace(x=data.x, y=data.y))
  axes = jax.tree.map(lambda _: 0, params[0])
  return stacked, axes._replace(data=axes.data._replace(x=None, y=None))


def unstack(tree, i: int):
  return jax.tree.map(lambda a: a[i], tree)


def shared_bytes(sim) -> int:
  """Bytes a batch holds once whatever its size: the training and test sets."""
  leaves = jax.tree.leaves((sim.params.data.x, sim.params.data.y, sim.task.test))
  return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in leaves)


def size(requested: Optional[int], n_points: int, memory_info: dict, shared: int) -> int:
  """Points per batch: `requested` (None: as many as fit), at most n_points, at least 1,
  and no more than the memory guard allows: a point's estimate less the shared data, times
  the batch, plus the data once, within the limit."""
  b = n_points if requested is None else max(1, min(requested, n_points))
  limit = memory_info.get("limit_bytes")
  if limit is None:
    return b
  per_point = max(1, memory_info["estimate_bytes"] - shared)
  return max(1, min(b, (limit - shared) // per_point))


def compile_chunk(sims: Sequence, state, params, axes, length: int):
  """The vmapped chunk of `length` ticks, compiled ahead of time for these shapes."""
  engine = sims[0].engine
  chunk = jax.vmap(lambda s, p: engine.advance(s, p, length), in_axes=(0, axes))
  return jax.jit(chunk, donate_argnums=0).lower(state, params).compile()


def run(sims: Sequence, *, on_evals: Sequence[Callable[[dict], None]],
        memory_infos: Sequence[dict], should_stop: Callable[[], bool] = lambda: False,
        compiled: Optional[dict] = None) -> list[dict]:
  """Runs the simulations `sims` (one structure, one schedule) as one vmapped program.

  Calls on_evals[i](record) after each evaluation of point i, as simulate.run's on_eval.
  Returns each point's summary (simulate.run_summary), with "batch": {"size", "index"}.
  `compiled` maps chunk length -> compiled batch chunk, shared between batches of one size.
  """
  cfg = sims[0].cfg
  total, every = cfg.n_ticks, cfg.eval_every_ticks
  b = len(sims)
  t0_wall = time.perf_counter()
  records: list[list] = [[] for _ in sims]

  def emit(i, rec):
    records[i].append(rec)
    on_evals[i](rec)

  states = [simulate.place(sim, sim.engine.init(sim.run_key)) for sim in sims]
  for i, (sim, s) in enumerate(zip(sims, states)):
    emit(i, simulate.evaluate(sim, s) | {"train_loss": None})
  state = jax.tree.map(lambda *a: jnp.stack(a), *states)
  del states
  params, axes = stack_params([sim.params for sim in sims])

  compiled = {} if compiled is None else compiled
  cache = simulate.new_cache_stats()
  compile_s = run_s = 0.0
  status, divergence = ["completed"] * b, [None] * b
  live = list(range(b))
  tick = 0
  while tick < total and live:
    length = min(every - tick % every, total - tick)
    if length not in compiled:
      compiled[length], seconds = simulate.compile_counted(
          lambda: compile_chunk(sims, state, params, axes, length), cache)
      compile_s += seconds
    c1 = time.perf_counter()
    state, metrics = compiled[length](state, params)
    jax.block_until_ready(state.params)
    run_s += time.perf_counter() - c1
    tick += length
    train_loss = np.asarray(jax.device_get(metrics["train_loss"]))                        # (B, length)
    for i in list(live):
      s = unstack(state, i)
      divergence[i] = simulate.find_divergence(sims[i], s, train_loss[i])
      if divergence[i] is not None:
        status[i] = "diverged"
        live.remove(i)
        continue
      emit(i, simulate.evaluate(sims[i], s) | {"train_loss": float(np.mean(train_loss[i]))})
    if tick < total and should_stop():
      for i in live:
        status[i] = "interrupted"
      break

  steps = int(np.sum(jax.device_get(state.steps)))
  wall_s = time.perf_counter() - t0_wall
  out = []
  for i, sim in enumerate(sims):
    summary = simulate.run_summary(
        sim, records[i], status[i], divergence[i], memory_info=memory_infos[i], wall_s=wall_s,
        compile_s=compile_s, cache=cache,
        node_steps_per_s=steps / run_s if run_s > 0 else None)   # of the whole batch
    summary["batch"] = {"size": b, "index": i}
    out.append(summary)
  return out
