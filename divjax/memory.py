"""Memory guard: estimate what a run needs on its device, and refuse what cannot fit.

One formula (`parts`) turns a run's shapes (`Shapes`: Python ints only) into bytes. The shapes
come from the resolved config alone (`shapes(cfg)`, used by `precheck` before any data,
network table or array is built, so that n_nodes = 5,000,000 or latency_ms = 1e9 is refused
in milliseconds) or, once the run is built, from its arrays (`shapes(cfg, sim)`, used by
`check`: the same numbers, with the data sizes read instead of predicted). The parts:

  state        params (N, P), optimizer state, ring (D, N, F, L) float32, message tables
               (N, D, M) int32 (pings and replies), stored neighbour copies (N, K, L) for
               original SWIFT, per-node counters; `check` reads them off engine.init
               (jax.eval_shape), `precheck` predicts them (tests compare the two);
  data         training set, partition (N, L) and the test set;
  training     one local step: gradients and updates (2 x params), the optimizer's new
               state, the gathered batch, and the activations: the two largest values
               (an operation's input and output) of one node's traced gradient, x N;
  routing      the payloads gathered per routing step (engine.route: C x N x L floats);
  tables_work  the round end's (N, D, M) temporaries (sorting, masks): 4 tables' worth;
  mixing       synchronous algorithms gather one model per edge of a round (E x P floats);
  evaluation   the models evaluated together (unravelled copies), plus the two largest
               values of one model's traced evaluation step times the models run side by
               side (all 64 of a group, or the model's own group size: GN-LeNet on a CPU).

Traced values skip what XLA does not materialise: a call's results (its body's are counted),
reshapes, and elementwise values read only by reductions (fused into them).

total = state + data + the larger of stepping (training + routing + tables_work
+ mixing) and evaluation, which never run at the same time. Against XLA's memory analysis of
the compiled chunk and evaluation (argument + output - aliased + temporaries) it measured
0.97x-1.14x on CPU for MLP tasks across all eight algorithms, ring depths set and automatic
(latencies up to 300 ms), N from 6 to 512 and P from 122 to 32,000; 1.06x-1.11x for MovieLens
matrix factorisation (N 60 and 943, P up to 207,000); 1.09x-1.18x for GN-LeNet (N 16-64).
tests/test_memory_estimate.py holds it to 0.75x-1.5x. It is meant to catch what is clearly too big before minutes
of compiling end in an out-of-memory crash. The limit is `memory_limit_gb` when set, else
what the device reports: `memory_stats()` on a GPU, the available host RAM on a CPU.

A refusal names the largest part and the config key that drives it: the key whose default
value would shrink that part the most (`drivers`), e.g. network.latency_ms when a huge
latency makes the automatic ring_depth deep, or fragments when many fragments pad the ring.
"""

from __future__ import annotations

import math
import os
import types
from typing import Any, NamedTuple, Optional

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from divjax.config import Config, ConfigError

GB = 1e9
_ROUTE_FLOATS = 1 << 22  # engine.route gathers at most about this many payload floats per step


class TooLarge(ConfigError):
  """The run's memory estimate exceeds the device's memory (or memory_limit_gb)."""


# Shapes of the known data sets (divjax.data), so nothing is loaded to size a run:
# images: (training samples, test samples, sample shape); ratings: (ratings, users, items,
# most ratings of one user), the last to bound a node's padded share (data.split_movielens).
_IMAGES = {"cifar10": (50000, 10000, (32, 32, 3)), "mnist": (60000, 10000, (28, 28, 1))}
_RATINGS = {"movielens-latest-small": (100836, 610, 9724, 2698),
            "movielens-100k": (100000, 943, 1682, 737)}
_TRAIN_FRAC = 0.7        # data.split_movielens


class Shapes(NamedTuple):
  """What the memory of a run depends on, as Python ints (no arrays: N may be huge)."""
  n: int            # nodes
  p: int            # parameters per model
  opt: int          # optimizer-state floats per node
  depth: int        # ring depth D (0: synchronous, no ring)
  frags: int        # F
  width: int        # L, the padded fragment size
  messages: int     # M, records per node and ring slot
  replies: int      # Mr, reply records (AD-PSGD pongs)
  store: int        # K, stored neighbour copies (original SWIFT)
  routes: int       # routing passes at a round end (0: no gather + segment_sum)
  edges: int        # synchronous: models gathered per round (E); 0 for asynchronous
  batch: int        # bytes of one gathered training batch of all nodes
  train_act: int    # live bytes of the traced training step of the nodes trained side by side
  eval_models: int  # models evaluated together
  eval_act: int     # live bytes of the traced evaluation step of the models run side by side
  train_data: int   # bytes of the training set and partition
  test_data: int    # bytes of the test set
  versions: int = 0  # observe.versions: slots holding N x N version vectors (D + 1), 0 when off
  ring_item: int = 4  # bytes per ring payload value (ring_dtype)
  gathered: int = 0   # copies per node a robust rule reads as a block (F x K, divjax.inbox), 0: none
  schedules: int = 0  # bytes of churn's availability and time-varying rates' tables (engine.Params)


# ------------------------------------------------------------------------------ the formula

_STATE = ("params", "optimizer", "ring", "messages", "stored_copies", "versions", "other_state", "schedules")
_STEPPING = ("training", "routing", "tables_work", "versions_work", "mixing")  # a chunk's temporaries


def parts(s: Shapes, state: Optional[dict[str, int]] = None) -> dict[str, int]:
  """Bytes per part (see the module docstring) and the 'total'. `state`: the state's parts
  measured on a built engine, replacing the predicted ones."""
  n, f4 = s.n, 4
  tables = n * s.depth * (5 * (s.messages + s.replies) + 1) * f4   # msg_* and pong_* x 5, slot_tick
  out = {
      "params": n * s.p * f4,
      "optimizer": n * s.opt * f4,
      # D slots, and the last round end's snapshots waiting for the next (engine.Fresh)
      "ring": (s.depth + 1) * n * s.frags * s.width * s.ring_item + 4 * n if s.depth else 0,
      "messages": tables,
      "stored_copies": n * s.store * s.width * f4,
      # steps, rounds (+ backlog_us, two words) per node; retired (5), sent, age_sum, age_count, tick
      "other_state": (4 * n + 9 if s.depth else 2 * n + 5) * f4,
      "versions": s.versions * n * n * f4,
      "data": s.train_data + s.test_data,
      "schedules": s.schedules,
  }
  out.update(state or {})
  tables = out["messages"]
  # routing gathers C columns of N payloads at a time, C as in engine.route
  cols = max(1, min(s.messages, _ROUTE_FLOATS // max(1, n * s.width)))
  out["training"] = 2 * out["params"] + out["optimizer"] + s.batch + s.train_act
  # a robust rule reads every copy as one block (F x K per node) instead of routing sums
  out["routing"] = s.routes * cols * n * s.width * f4 + out["stored_copies"] + n * s.gathered * s.width * f4
  out["tables_work"] = 4 * (tables // 5)
  # the version vectors gathered for every record at a round end (N D M x N), and a copy
  out["versions_work"] = (n * s.depth * (s.messages + s.replies) * n * f4 + 2 * out["versions"]
                          if s.versions else 0)
  out["mixing"] = s.edges * s.p * f4
  out["evaluation"] = s.eval_models * s.p * f4 + s.eval_act
  state = sum(out[k] for k in _STATE)
  # chunks and evaluations alternate: their temporaries are never alive together
  stepping = sum(out[k] for k in _STEPPING)
  out["total"] = state + out["data"] + max(stepping, out["evaluation"])
  return out


# ----------------------------------------------------------------- shapes from the config

def _directed_degree(cfg: Config) -> tuple[int, int]:
  """(neighbours per node, directed edges) of the config's fixed graph, without building it
  (topology.fixed); for an explicit edge list, from the (small) list itself."""
  n, name = cfg.n_nodes, cfg.topology
  if name == "random_ring":  # topology.random_ring: 2n edges, whatever n
    return 2, 2 * n
  if name == "ring":
    return (2, 2 * n) if n > 2 else (1, 2)
  if name == "torus":
    from divjax import topology
    a, b = topology.torus_shape(n)
    k = (2 if b > 2 else b - 1) + (2 if a > 2 else a - 1)
    return k, k * n
  if name == "complete":
    return n - 1, n * (n - 1)
  if name == "regular":
    return cfg.topology_degree, cfg.topology_degree * n
  pairs = np.sort(np.asarray(cfg.topology_edges or [[0, 0]], np.int64).reshape(-1, 2), axis=1)
  pairs = np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0)
  deg = np.bincount(pairs.reshape(-1), minlength=1)
  return int(deg.max(initial=0)), 2 * len(pairs)


def _protocol(cfg: Config) -> dict:
  """What the algorithm puts in the state (divjax.algorithms), without making it: making
  some of them builds N-sized graphs."""
  a, j, f = cfg.algorithm, cfg.recipients, cfg.fragments or 1
  base = dict(flush=False, frags=1, messages=0, replies=0, store=0, routes=1, edges=0, sync=False, gathered=0)
  if a in ("divshare", "swift"):
    robust = cfg.aggregation.rule != "mean"
    k = cfg.aggregation.inbox or 4 * j
    return base | dict(flush=a == "divshare", frags=f, messages=f * j, gathered=f * k if robust else 0,
                       routes=0 if robust else 1,
                       # centered clipping's centers, compression's last-sent values or errors
                       store=f * ((cfg.aggregation.rule == "centered_clip") + (cfg.compression.kind != "none")))
  if a == "adpsgd":
    m = max(1, j // 2)
    return base | dict(messages=m, replies=m, routes=2)
  if a == "adpsgd_pairwise":
    return base | dict(messages=1, replies=1, routes=0)
  if a == "swift_original":
    k = _directed_degree(cfg)[0]
    return base | dict(messages=k, store=k, routes=0)
  if a in ("dpsgd", "el", "el_local", "el_oracle", "fedavg"):
    edges = {"dpsgd": lambda: _directed_degree(cfg)[1], "el": lambda: cfg.n_nodes * j,
             "el_local": lambda: cfg.n_nodes * j, "el_oracle": lambda: cfg.n_nodes * j,
             "fedavg": lambda: cfg.server.cohort or cfg.n_nodes}[a]()
    return base | dict(routes=0, edges=edges, sync=True)
  from divjax import algorithms  # an algorithm registered later: ask it
  if algorithms.PROPERTIES[a].synchronous:
    return base | dict(routes=0, edges=cfg.n_nodes, sync=True)
  alg = algorithms.make(cfg)
  reply = alg.replies is not None
  return base | dict(flush=alg.queue.flush, frags=alg.fragments, messages=alg.messages,
                     replies=alg.messages if reply else 0,
                     routes=0 if reply and alg.replies.pairwise else 1 + reply)


def ring_depth(cfg: Config, flush: bool) -> int:
  """engine.ring_depth without building the network: its automatic depth reads only the
  largest and smallest round length and the largest latency, which need just the distinct
  per-node values (normal nodes, compute stragglers)."""
  from divjax import engine, network
  n, s = cfg.n_nodes, cfg.network.stragglers
  slow = len(set(s.nodes)) if s.nodes is not None else int(round(s.fraction * n))
  periods = ([1] if slow < n else []) + ([max(1, int(round(s.slowdown)))
                                          if s.kind in ("compute", "both") else 1] if slow else [])
  net = types.SimpleNamespace(period=np.array(periods, np.int64), dt_us=cfg.dt_us,
                              latency_us=np.array([int(round(cfg.network.latency_ms * 1e3))], np.int64))
  alg = types.SimpleNamespace(queue=types.SimpleNamespace(flush=flush))
  try:
    return int(engine.ring_depth(cfg, alg, net))
  except AttributeError:  # engine.ring_depth reads more of the network than this: build it
    return int(engine.ring_depth(cfg, alg, network.build(cfg)))


def _model(cfg: Config):
  """(models.Model, loss kind, sample shape, sample dtype) of the config's task, as
  divjax.tasks makes it, from the known data set shapes."""
  from divjax import models, tasks
  if cfg.task == "lsq":
    return models.make_model("linear", input_shape=(cfg.data.dim,)), "regression", (cfg.data.dim,), jnp.float32
  if cfg.task == "synthetic":
    shape = (cfg.data.dim,)
    model = tasks.make_classifier(cfg, input_shape=shape, n_classes=cfg.data.n_classes)
  elif cfg.task in _IMAGES:
    shape = _IMAGES[cfg.task][2]
    model = tasks.make_classifier(cfg, input_shape=shape, n_classes=10,
                                  default="gn_lenet" if cfg.task == "cifar10" else "mlp")
  else:
    if cfg.model not in ("auto", "mf"):
      raise ValueError(f"model: {cfg.task} needs model 'mf' or 'auto' (got {cfg.model!r})")
    _, users, items, _ = _RATINGS[cfg.task]
    return models.make_model("mf", n_users=users, n_items=items, dim=cfg.mf_dim), "regression", (2,), jnp.int32
  return model, "classification", shape, jnp.float32


# Values that are not new buffers: a call's results are its body's (counted there); a
# reshape is a view.
_NOT_NEW = ("pjit", "jit", "closed_call", "core_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
            "custom_jvp_call", "remat", "checkpoint", "cond", "while", "reshape", "squeeze", "expand_dims")


_ELEMENTWISE = ("add", "sub", "mul", "div", "neg", "square", "integer_pow", "pow", "sqrt", "rsqrt",
                "exp", "log", "abs", "max", "min", "select_n", "convert_element_type", "tanh", "logistic")


def _live(fn, *args) -> int:
  """Bytes of the two largest values in the traced fn (sub-jaxprs included): what one
  operation keeps alive at its peak, its input and its output. Abstract args only."""
  top = [0, 0]

  def walk(jaxpr):
    # an elementwise value read only by reductions is fused into them (never a buffer)
    readers: dict = {}
    for eqn in jaxpr.eqns:
      for v in eqn.invars:
        if not isinstance(v, jax.extend.core.Literal):
          readers.setdefault(v, []).append(eqn.primitive.name)
    for eqn in jaxpr.eqns:
      fused = eqn.primitive.name in _ELEMENTWISE and all(
          r.startswith("reduce_") for v in eqn.outvars for r in readers.get(v, ["?"]))
      for v in eqn.outvars if eqn.primitive.name not in _NOT_NEW and not fused else ():
        if hasattr(v.aval, "shape"):
          top[:] = sorted(top + [math.prod(v.aval.shape) * np.dtype(v.aval.dtype).itemsize])[-2:]
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else [param]:
          inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
          if hasattr(inner, "eqns"):
            walk(inner)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return sum(top)


# Traces of one node's step, by what they depend on: a refusal tries many variants of a
# config, and the traces are the only part of an estimate that is not arithmetic.
_MODELS: dict = {}
_TRACES: dict = {}


def _model_shapes(cfg: Config):
  """(model, loss kind, sample shape, sample dtype, parameter template), cached."""
  from divjax import sharding
  auto = {"cifar10": "gn_lenet"}.get(cfg.task, "mf" if cfg.task in _RATINGS else "mlp")
  name = auto if cfg.model == "auto" else cfg.model
  # only what the model depends on, so that trying other values of unrelated keys (drivers)
  # reuses the traces; gn_lenet: tasks.make_classifier's unroll depends on the devices
  key = (cfg.task, name, cfg.data.n_classes if cfg.task == "synthetic" else None,
         cfg.data.dim if cfg.task in ("synthetic", "lsq") else None, tuple(cfg.hidden) if name == "mlp" else None,
         cfg.mf_dim if name == "mf" else None,
         name == "gn_lenet" and sharding.device_count(cfg.devices, cfg.n_nodes) > 1,
         cfg.model_impl if name == "gn_lenet" else None)
  if key not in _MODELS:
    model, kind, sample, dtype = _model(cfg)
    _MODELS[key] = (model, kind, sample, dtype, jax.eval_shape(lambda: model.init(jax.random.key(0))))
  return key, _MODELS[key]


def _traced(cfg: Config, eval_rows: int) -> tuple[int, list, Optional[int], int, int]:
  """(P, tensor sizes, nodes differentiated together (None: all), live bytes of one node's
  training step, live bytes of one model's evaluation step), from abstract shapes."""
  from divjax import models
  key, (model, kind, sample, dtype, template) = _model_shapes(cfg)
  one = jax.tree.map(lambda t: jax.ShapeDtypeStruct((1,) + t.shape, t.dtype), template)
  b = cfg.batch_size
  if (key, "train", b) not in _TRACES:
    def loss(tree, x, y):  # as tasks.Task.loss_tree
      out = model.apply_stacked(tree, x)
      if kind == "regression":
        return jnp.mean((out - y) ** 2)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), y[..., None], axis=-1))

    x = jax.ShapeDtypeStruct((1, b) + sample, dtype)
    y = jax.ShapeDtypeStruct((1, b), jnp.float32 if kind == "regression" else jnp.int32)
    _TRACES[key, "train", b] = _live(jax.grad(loss), one, x, y)
  if (key, "eval", eval_rows) not in _TRACES:
    # classification: models side by side on a shared test chunk (tasks.classification_task);
    # MovieLens: each model on its own test ratings
    xe = jax.ShapeDtypeStruct((eval_rows,) + sample, dtype)
    fn = ((lambda t, x: models.apply_shared(model, t, x)) if kind == "classification"
          else (lambda t, x: jax.vmap(model.apply)(t, x[None])))
    _TRACES[key, "eval", eval_rows] = _live(fn, one, xe)
  sizes = [math.prod(t.shape) for t in jax.tree.leaves(template)]
  return sum(sizes), sizes, model.group, _TRACES[key, "train", b], _TRACES[key, "eval", eval_rows]


def _eval_models(n: int) -> int:
  """Models evaluated side by side (tasks.classification_task, EVAL_NODES = 64)."""
  from divjax import tasks
  groups = -(-n // min(n, tasks.EVAL_NODES))
  return -(-n // groups)


def _data_bytes(cfg: Config, sample_bytes: int) -> tuple[int, int, int]:
  """(training set + partition bytes, test set bytes, rows of one evaluation step), predicted
  from the data set's size and the partitioner (Dirichlet: the mean share, a lower bound)."""
  n, d = cfg.n_nodes, cfg.data
  if cfg.task in _RATINGS:
    ratings, _, _, most = _RATINGS[cfg.task]
    share = lambda frac: max(1, min(int(frac * ratings), math.ceil(frac * (ratings / n + most))))
    train, test = share(_TRAIN_FRAC), share(1 - _TRAIN_FRAC)
    # pairs (R, 2) int32 + ratings float32, parts (N, L) + counts; test: (N, T) pairs, ratings, mask
    return ratings * 12 + n * (train + 1) * 4, n * test * 13, test
  if cfg.task in ("synthetic", "lsq"):
    samples, n_test = n * d.samples_per_node, d.test_size
  else:
    samples, n_test = _IMAGES[cfg.task][:2]
  n_test = min(n_test, cfg.eval.test_subsample or n_test)
  if d.partition in ("kshard", "auto") and cfg.task != "synthetic" or d.partition == "kshard":
    last = samples - (n - 1) * (samples // n)         # data.partition_kshard: the last node's share
    share = d.shards * (last // d.shards)
  else:
    share = -(-samples // n)
  rows = min(cfg.eval_batch, n_test)
  test_rows = -(-n_test // rows) * rows              # padded to whole evaluation chunks
  return (samples * (sample_bytes + 4) + n * (max(1, share) + 1) * 4,
          test_rows * (sample_bytes + 5), rows)


def shapes(cfg: Config, sim=None) -> Shapes:
  """The run's shapes from the config alone, or, given the built simulation, from its arrays
  (data sizes, the state's dimensions); the two agree except for data-dependent partitions."""
  proto = _protocol(cfg)
  # images are stored as uint8 pixels (divjax.data) and reach the model as float32 batches
  stored = {"cifar10": 32 * 32 * 3, "mnist": 28 * 28}.get(cfg.task, 8 if cfg.task in _RATINGS else cfg.data.dim * 4)
  sample_bytes = stored * 4 if cfg.task in _IMAGES else stored
  train_data, test_data, eval_rows = _data_bytes(cfg, stored)
  if sim is not None:
    train_data, test_data = _tree_bytes(sim.task.train_data), _tree_bytes(sim.task.test)
    if cfg.task in _RATINGS:
      eval_rows = int(sim.task.test[0].shape[1])
  p, sizes, group, train_act, eval_act = _traced(cfg, eval_rows)
  n, f = cfg.n_nodes, proto["frags"]
  # fragments.partition: per tensor, fragments 0..F-2 take m // F coordinates, the last the rest
  width = max(1, sum(m - (f - 1) * (m // f) for m in sizes))
  depth = 0 if proto["sync"] else ring_depth(cfg, proto["flush"])
  if sim is not None and not proto["sync"]:
    depth, width = int(sim.engine.depth), int(sim.engine.frags.width)
  # Training keeps the activations of the nodes differentiated together alive: all N, or one
  # group of a model that sets a group size (models.map_groups' lax.map frees each group's
  # before the next; XLA:CPU's memory analysis of a GN-LeNet chunk, group 16, grows by about
  # 2.4 MB per node from N = 64 to 256, while one node's activations are 6.4 MB). Evaluation
  # runs `group` models side by side, or all it evaluates together.
  evaluated = n if cfg.task in _RATINGS else _eval_models(n)
  return Shapes(
      n=n, p=p, opt=p if cfg.momentum > 0 else 0, depth=depth, frags=0 if proto["sync"] else f,
      width=0 if proto["sync"] else width, messages=proto["messages"], replies=proto["replies"],
      store=proto["store"], routes=proto["routes"], edges=proto["edges"],
      batch=n * cfg.batch_size * (sample_bytes + 4), train_act=train_act * min(n, cfg.train_block or group or n),
      eval_models=evaluated, eval_act=eval_act * min(evaluated, group or evaluated),
      train_data=train_data, test_data=test_data,
      versions=depth + 1 if cfg.observe.versions != "off" and not proto["sync"] else 0,
      ring_item=np.dtype(jnp.dtype(cfg.ring_dtype)).itemsize, gathered=proto.get("gathered", 0),
      schedules=0 if proto["sync"] else _schedule_bytes(cfg, f))


def _schedule_bytes(cfg: Config, frags: int) -> int:
  """churn's (N, rounds) online and next-offline tables; time-varying rates' (N, blocks, F)
  service times (two int32 words each, for the upload and, with download_cap, the download)."""
  from divjax import bandwidth, churn
  blocks = int(cfg.n_ticks // cfg.local_steps) + 2
  out = cfg.n_nodes * blocks * 5 if churn.enabled(cfg) else 0
  if bandwidth.enabled(cfg):
    out += cfg.n_nodes * blocks * frags * 8 * (2 if cfg.network.download_cap else 1)
  return out


def _tree_bytes(tree) -> int:
  return sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _measured_state(sim) -> dict[str, int]:
  """The state's parts, read off the engine's own init (jax.eval_shape: nothing allocated)."""
  st = jax.eval_shape(sim.engine.init, sim.run_key)
  nodes = getattr(st, "nodes", st)   # the asynchronous engine nests its parts
  get = lambda k: _tree_bytes(getattr(st, k, ()))
  out = {"params": _tree_bytes(st.params), "optimizer": _tree_bytes(nodes.opt_state),
         "ring": get("ring") + get("fresh"),
         "messages": get("msgs") + get("replies"), "stored_copies": get("alg"), "versions": get("versions")}
  out["other_state"] = _tree_bytes(st) - sum(out.values())
  return out


def estimate(sim) -> dict[str, int]:
  """Bytes per part (module docstring) of a built simulation, and the 'total'."""
  return parts(shapes(sim.cfg, sim), _measured_state(sim))


# ------------------------------------------------------------------------------ the verdict

def device_limit(device=None) -> tuple[Optional[int], str]:
  """(bytes the run may use, where that number comes from); None when unknown."""
  device = device or jax.local_devices()[0]
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


# What each part is, for the message.
_PARTS = {
    "ring": "the delay ring (ring_depth x n_nodes x fragments x fragment width floats, plus one slot of snapshots waiting to be written)",
    "params": "the models (n_nodes x parameters)",
    "optimizer": "the optimizer state (momentum: n_nodes x parameters)",
    "messages": "the message tables (n_nodes x ring_depth x messages per round)",
    "stored_copies": "the stored neighbour copies (n_nodes x neighbours x model)",
    "other_state": "the per-node counters",
    "versions": "the version vectors of observe.versions ((ring_depth + 1) x n_nodes^2)",
    "versions_work": "the version vectors gathered at a round end (n_nodes^2 x ring_depth x messages)",
    "data": "the data (training set, partition, test set)",
    "training": "a local step (gradients, batch, activations of batch_size samples per node)",
    "routing": "the payloads gathered at round ends",
    "tables_work": "the round end's work on the message tables",
    "mixing": "the models gathered per synchronous round (edges x model)",
    "evaluation": "an evaluation step (eval_batch test samples x the models evaluated together)",
    "schedules": "churn's availability and the time-varying rates' tables",
}
# Keys whose value can make a part large, tried at their defaults to find the one that does.
_KNOBS = ("n_nodes", "observe.versions", "ring_depth", "network.latency_ms", "network.compute_s_per_step", "local_steps",
          "network.stragglers.slowdown", "fragments", "recipients", "hidden", "model", "mf_dim",
          "data.dim", "data.n_classes", "batch_size", "eval_batch", "momentum", "data.samples_per_node",
          "data.test_size", "topology", "topology_degree", "server.cohort")
_AUTO_DEPTH = ("network.latency_ms", "network.compute_s_per_step", "local_steps", "network.stragglers.slowdown")


def _largest_part(p: dict[str, int]) -> tuple[str, int]:
  """The biggest part counted in the total (evaluation and stepping alternate)."""
  grouped = {k: v for k, v in p.items() if k in _PARTS}
  stepping = sum(p[k] for k in _STEPPING)
  if p["evaluation"] >= stepping:
    grouped = {k: v for k, v in grouped.items() if k not in _STEPPING}
  else:
    grouped.pop("evaluation")
  return max(grouped.items(), key=lambda kv: kv[1])


def _get(cfg, key: str):
  for k in key.split("."):
    cfg = getattr(cfg, k)
  return cfg


def _default(cfg: Config, key: str):
  """The schema's default of a dotted key (fragments: the algorithm's, as configure.from_dict)."""
  if key == "fragments":
    from divjax import algorithms
    return algorithms.DEFAULT_FRAGMENTS.get(cfg.algorithm, 1)
  *sections, name = key.split(".")
  schema = Config
  for k in sections:
    schema = schema.model_fields[k].annotation
  return schema.model_fields[name].get_default(call_default_factory=True)


def _with(cfg, key: str, value):
  """cfg with one (dotted) key replaced; not validated (only its shapes are read)."""
  head, _, rest = key.partition(".")
  new = _with(getattr(cfg, head), rest, value) if rest else value
  return cfg.model_copy(update={head: new})


def drivers(cfg: Config, part: str) -> list[tuple[str, Any, Any, int]]:
  """(key, value, default, bytes of `part` with that key at its default) for the keys whose
  default would shrink `part`, the strongest first. Cheap: shapes only, traces are cached."""
  now = _part_bytes(parts(shapes(cfg)), part)
  found = []
  for key in _KNOBS:
    value, default = _get(cfg, key), _default(cfg, key)
    if value == default:
      continue
    try:
      then = _part_bytes(parts(shapes(_with(cfg, key, default))), part)
    except (ValueError, TypeError, KeyError, ZeroDivisionError):  # a combination that cannot run
      continue
    if then * 1.2 < now:
      found.append((key, value, default, then))
  return sorted(found, key=lambda d: d[3])


def _part_bytes(p: dict[str, int], part: str) -> int:
  return p[part]


def _limit(cfg: Config, device) -> tuple[Optional[int], str]:
  """(bytes the run may use, where that comes from): memory_limit_gb, else the device's."""
  if cfg.memory_limit_gb is not None:
    return int(cfg.memory_limit_gb * GB), "memory_limit_gb"
  return device_limit(device)


def _verdict(cfg: Config, p: dict[str, int], depth: int, device) -> dict[str, Any]:
  copy = checkpoint_copy(p, device)
  total = p.pop("total") + copy
  if copy:
    p["checkpoint_copy"] = copy
  limit, source = _limit(cfg, device)
  info = {"estimate_bytes": total, "parts": p, "limit_bytes": limit, "limit_source": source}
  if limit is None or total <= limit:
    return info
  part, size = _largest_part(p)
  big = ", ".join(f"{k} {_gb(v)}" for k, v in sorted(p.items(), key=lambda kv: -kv[1])[:4] if v)
  why = drivers(cfg, part)
  if why:
    key, value, default, then = why[0]
    cause = f"driven by {key} = {value!r} (at {default!r} it would be {_gb(then)})"
    if key in _AUTO_DEPTH and cfg.ring_depth == 0 and part in ("ring", "messages"):
      cause += (f", through the automatic ring_depth (D = {depth} rounds); a fixed ring_depth caps it "
                f"(messages delayed longer expire)")
    cause += "".join(f"; also {k} = {v!r}" for k, v, _, _ in why[1:3])
    advice = f"Reduce {key}"
  else:
    cause, advice = "with none of the keys that size it above its default", "Reduce n_nodes or the model"
  block = fitting_block(cfg, limit) if part == "training" else None
  if block is not None:
    advice = (f"Set train_block={block} (the nodes are differentiated {block} at a time, with the same "
              f"results; the estimate then fits)")
  raise TooLarge(
      f"memory: this run needs about {_gb(total)} ({big}), more than the {_gb(limit)} allowed ({source}). "
      f"The largest part is {_PARTS[part]}: {_gb(size)}, {cause}. {advice}, or set memory_limit_gb to "
      f"override the limit. (Sizes now: n_nodes = {cfg.n_nodes}, ring_depth D = {depth}"
      f"{' (automatic)' if cfg.ring_depth == 0 and depth else ''}, fragments = {cfg.fragments}, "
      f"eval_batch = {cfg.eval_batch}.)")


def checkpoint_copy(p: dict[str, int], device=None) -> int:
  """Bytes a checkpoint adds: it gathers the whole state into host memory, which on a CPU is
  the device's (measured, the largest runs' peak grew by about the state's size at a
  checkpoint: BENCHMARKS.md, "The largest N within 20 GB"); on an accelerator, nothing."""
  return sum(p[k] for k in _STATE) if (device or jax.local_devices()[0]).platform == "cpu" else 0


def fitting_block(cfg: Config, limit: int) -> Optional[int]:
  """The largest train_block (a power of two below the nodes trained together now) whose
  estimate fits in `limit` bytes, or None if none does."""
  now = min(cfg.n_nodes, cfg.train_block or _model_shapes(cfg)[1][0].group or cfg.n_nodes)
  block = 1 << max(0, (now - 1).bit_length() - 1)     # the largest power of two below `now`
  while block >= 1:
    p = parts(shapes(cfg.model_copy(update={"train_block": block})))
    if block < now and p["total"] + checkpoint_copy(p) <= limit:
      return block
    block //= 2
  return None


def blocked_if_needed(cfg: Config, device=None) -> Config:
  """`cfg`, or, when it sets no train_block and does not fit only because of its training
  activations, `cfg` with the largest train_block that fits (the same results; `divjax run`
  says so and writes it into config.yaml, so a resume trains the same way)."""
  if cfg.train_block is not None:
    return cfg
  limit, _ = _limit(cfg, device)
  p = parts(shapes(cfg))
  total = p.pop("total") + checkpoint_copy(p, device)
  if limit is None or total <= limit or _largest_part(p)[0] != "training":
    return cfg
  block = fitting_block(cfg, limit)
  return cfg if block is None else cfg.model_copy(update={"train_block": block})


def precheck(cfg: Config, device=None) -> dict[str, Any]:
  """The memory check from the config alone, before any data, table or array is built.

  Returns:
    {"estimate_bytes", "parts", "limit_bytes", "limit_source"}, as `check`.
  Raises:
    TooLarge (a ConfigError): the estimate exceeds the limit; the message names the largest
      part and the config key that drives it.
    ValueError: the config names a model the task cannot use (as tasks.build would).
  """
  s = shapes(cfg)
  return _verdict(cfg, parts(s), s.depth, device)


def check(sim, device=None) -> dict[str, Any]:
  """`precheck` for a built simulation: the same formula, with its data sizes read."""
  s = shapes(sim.cfg, sim)
  return _verdict(sim.cfg, parts(s, _measured_state(sim)), s.depth, device)
