"""Memory guard: estimate what a run needs on its device, and refuse what cannot fit.

The estimate is made before anything is compiled or allocated, from shapes only:

  state        the EngineState, exactly (jax.eval_shape of engine.init): params, optimizer
               state, ring (D, N, F, L) float32, message tables (N, D, M) int32, stored
               neighbour copies (N, K, P) for original SWIFT, counters;
  chunk copy   one more state: a chunk's output is written while its input is alive (donation
               is not always possible, e.g. on CPU), and a checkpoint copies it to the host;
  training     one local step: gradients, updates and new parameters (3 x params) plus the
               activations of a batch (the largest value in the traced gradient, x 3);
  routing      the payload gathered per routing step (at most 4M floats, engine.route) x 2;
  data         training set, partitions, and the test set (the constants captured by the
               traced evaluation);
  evaluation   the activations of one evaluation batch for all N models (the largest value in
               the traced evaluation, x 3).

The total is state + data + the larger of stepping (chunk copy + training + routing) and
evaluation, which never run at the same time. Against XLA's own memory analysis of the
compiled chunk and evaluation it errs high by 0-40% on the MLP tasks we checked (synthetic,
MNIST). It is rough (XLA may fuse temporaries away or keep more alive), and meant to catch
what is clearly too big before minutes of compiling end in an out-of-memory crash. The limit is
`memory_limit_gb` when set, else what the device reports: `memory_stats()` on a GPU, the
available host RAM on a CPU.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from divjax.config import ConfigError

GB = 1e9
_ROUTE_FLOATS = 1 << 22  # engine.route gathers at most about this many payload floats per step
_LIVE = 3                # rough number of live values of the largest size in a traced step


class TooLarge(ConfigError):
  """The run's memory estimate exceeds the device's memory (or memory_limit_gb)."""


def _nbytes(x) -> int:
  return int(np.prod(np.shape(x), dtype=np.int64)) * np.dtype(x.dtype).itemsize


def _tree_bytes(tree) -> int:
  return sum(_nbytes(x) for x in jax.tree.leaves(tree))


def _scan(closed) -> tuple[int, int]:
  """(bytes of the largest intermediate value, bytes of the captured constants) of a traced
  function, sub-jaxprs (jit, scan, map, cond) included."""
  consts = {id(c): _nbytes(c) for c in closed.consts if hasattr(c, "dtype")}
  largest = 0

  def walk(jaxpr):
    nonlocal largest
    for eqn in jaxpr.eqns:
      for v in eqn.outvars:
        if hasattr(v.aval, "shape"):
          largest = max(largest, _nbytes(v.aval))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else [param]:
          consts.update({id(c): _nbytes(c) for c in getattr(sub, "consts", ()) if hasattr(c, "dtype")})
          inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
          if hasattr(inner, "eqns"):
            walk(inner)

  walk(closed.jaxpr)
  return largest, sum(consts.values())


def estimate(sim) -> dict[str, int]:
  """Bytes per part (see the module docstring) for a built simulation, and the 'total':
  state + data + the larger of stepping (chunk copy, training, routing) and evaluation."""
  cfg, task = sim.cfg, sim.task
  state = jax.eval_shape(sim.engine.init, sim.run_key)
  n, p = state.params.shape
  tables = sum(_tree_bytes(getattr(state, k)) for k in state._fields
               if k.startswith(("msg_", "pong_", "slot_")))
  parts = {
      "params": _tree_bytes(state.params),
      "optimizer": _tree_bytes(state.opt_state),
      "ring": _tree_bytes(state.ring),
      "messages": tables,
      "stored_copies": _tree_bytes(getattr(state, "store", ())),  # original SWIFT: N x K x P
  }
  parts["other_state"] = _tree_bytes(state) - sum(parts.values())
  parts["chunk_copy"] = _tree_bytes(state)

  params = jax.ShapeDtypeStruct((n, p), jnp.float32)
  sample = task.x_train.shape[1:]
  x = jax.ShapeDtypeStruct((n, cfg.batch_size) + sample, task.x_train.dtype)
  y = jax.ShapeDtypeStruct((n, cfg.batch_size), task.y_train.dtype)
  grad = jax.grad(lambda q, xb, yb: task.loss_stacked(q, xb, yb).sum())
  peak, _ = _scan(jax.make_jaxpr(grad)(params, x, y))
  parts["training"] = 3 * parts["params"] + _LIVE * peak
  width = getattr(getattr(sim.engine, "frags", None), "width", 0)
  parts["routing"] = 2 * 4 * min(_ROUTE_FLOATS, n * width) if width else 0

  peak, captured = _scan(jax.make_jaxpr(task.eval_fn)(params, task.test))
  parts["data"] = _tree_bytes(task.train_data) + _tree_bytes(task.test) + captured
  parts["evaluation"] = _LIVE * peak
  # chunks and evaluations alternate: their temporaries are never alive together
  stepping = parts["chunk_copy"] + parts["training"] + parts["routing"]
  parts["total"] = _tree_bytes(state) + parts["data"] + max(stepping, parts["evaluation"])
  return parts


def device_limit(device=None) -> tuple[Optional[int], str]:
  """(bytes the run may use, where that number comes from); None when unknown."""
  device = device or jax.devices()[0]
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # some backends do not implement it
    pass
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"free on {device.device_kind}"
  if device.platform == "cpu":
    try:
      import psutil
      return int(psutil.virtual_memory().available), "available host RAM"
    except ImportError:
      pass
    try:
      return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free host RAM"
    except (ValueError, OSError, AttributeError):
      pass
  return None, "unknown"


def _gb(b: int) -> str:
  return f"{b / GB:.3g} GB"


def check(sim, device=None) -> dict[str, Any]:
  """Estimates the run's memory and compares it with the limit.

  Returns:
    {"estimate_bytes", "parts", "limit_bytes", "limit_source"} (recorded in summary.json).
  Raises:
    TooLarge: the estimate exceeds the limit; the message names the big parts and the knobs.
  """
  cfg = sim.cfg
  parts = estimate(sim)
  total = parts.pop("total")
  if cfg.memory_limit_gb is not None:
    limit, source = int(cfg.memory_limit_gb * GB), "memory_limit_gb"
  else:
    limit, source = device_limit(device)
  info = {"estimate_bytes": total, "parts": parts, "limit_bytes": limit, "limit_source": source}
  if limit is not None and total > limit:
    state = parts["params"] + parts["optimizer"] + parts["ring"] + parts["messages"] + parts["stored_copies"]
    big = ", ".join(f"{k} {_gb(v)}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v)
    raise TooLarge(
        f"memory: this run needs about {_gb(total)} ({big}), more than the {_gb(limit)} allowed "
        f"({source}). The state ({_gb(state)}) grows with n_nodes = {cfg.n_nodes} and, for the ring "
        f"(D x N x model floats) and message tables, with ring_depth (D = {sim.engine.depth}); "
        f"evaluation grows with eval_batch = {cfg.eval_batch} x min(n_nodes, 64) models evaluated together. Reduce ring_depth, "
        f"n_nodes or eval_batch (or batch_size), or set memory_limit_gb to override the limit.")
  return info
