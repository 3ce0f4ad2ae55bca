"""Loading a run's config: the schema (divjax.config) plus what the algorithms and models know.

divjax.config validates types, ranges and relations between keys and imports nothing from
divjax. Here, in this order:
  1. the algorithm must be registered (divjax.algorithms);
  2. a key the chosen algorithm ignores is refused when it is set to anything but its
     default (`fragments` for an algorithm that sends whole models, `recipients` for one that
     sends to its graph neighbours, the `topology` keys for one without a graph, `server`
     for one without a server), so that no setting is silently dropped;
  3. the algorithm checks the keys it uses (its module's `check`: graphs are built and
     checked for connectivity here, before anything is compiled);
  4. `fragments` left out becomes the algorithm's default, and must be at most the model's
     largest tensor (models are traced for their shapes, the JAX backend is not started).
Every error is a config.ConfigError naming the key.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Optional

from divjax import algorithms, config
from divjax.config import Config, ConfigError


def load(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
  """config.load, then the checks above: the config a run uses."""
  return resolve(config.load(path, overrides))


def from_dict(raw: Any) -> Config:
  return resolve(config.from_dict(raw))


def load_for(algorithm: str, path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
  """The config for `algorithm` in a comparison of algorithms on one file: the keys this
  algorithm ignores (as _refuse_ignored lists them) are dropped instead of refused, since
  they are meant for the other algorithms compared."""
  cfg = config.load(path, list(overrides or []) + [f"algorithm={algorithm}"])
  if algorithm not in algorithms.REGISTRY:
    return resolve(cfg)
  props, default = algorithms.PROPERTIES[algorithm], Config()
  keep = {k: getattr(cfg, k) for k in ("fragments", "recipients", "topology", "topology_degree",
                                         "topology_edges", "server")}
  if not props.uses_fragments:
    keep["fragments"] = None
  if not props.uses_recipients:
    keep["recipients"] = default.recipients
  if not props.needs_graph:
    keep.update(topology=default.topology, topology_degree=default.topology_degree, topology_edges=None)
  if not props.uses_server:
    keep["server"] = default.server
  return resolve(cfg.model_copy(update=keep))


def resolve(cfg: Config) -> Config:
  if cfg.algorithm not in algorithms.REGISTRY:
    raise ConfigError(
        f"algorithm: unknown {cfg.algorithm!r} (registered: {', '.join(sorted(algorithms.REGISTRY))})")
  _refuse_ignored(cfg)
  check = getattr(algorithms.MODULES[cfg.algorithm], "check", None)
  if check is not None:
    try:
      check(cfg)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  if cfg.observe.versions != "off" and (algorithms.PROPERTIES[cfg.algorithm].synchronous
                                       or cfg.algorithm == "adpsgd_pairwise"):
    raise ConfigError(f"observe.versions: tracked by the asynchronous engine's aggregation, not for "
                      f"algorithm {cfg.algorithm!r} (synchronous, or pairwise exchanges): leave it 'off'")
  if cfg.fragments is None:
    cfg = cfg.model_copy(update={"fragments": algorithms.PROPERTIES[cfg.algorithm].default_fragments})
  _check_fragments(cfg)
  _check_wrappers(cfg)
  return cfg


def _check_wrappers(cfg: Config) -> None:
  """The byzantine, aggregation and compression sections wrap any algorithm's messages
  (divjax.byzantine, divjax.robust, divjax.compression; divjax.sync_wrap for the synchronous
  ones); on an asynchronous algorithm a robust rule and compression replace a uniform mean.
  """
  default = Config()
  sync = algorithms.PROPERTIES[cfg.algorithm].synchronous
  if sync:
    _check_sync_wrappers(cfg, default)
  if cfg.byzantine.per_recipient and cfg.algorithm == "adpsgd_pairwise":
    # its exchanges average two live models: no payload is read
    raise ConfigError(f"byzantine.per_recipient: algorithm {cfg.algorithm!r} averages two live models per "
                      f"exchange and reads no payload; use any other algorithm")
  if cfg.network.bandwidth != default.network.bandwidth and cfg.network.bandwidth.trace is not None:
    from divjax import bandwidth  # noqa: PLC0415
    bandwidth.read_trace(cfg.network.bandwidth.trace, cfg.n_nodes)   # refused here, naming the key
  crash = cfg.byzantine.attack == "crash" and cfg.byzantine != default.byzantine
  if (cfg.churn != default.churn or crash) and cfg.churn.trace is not None:
    from divjax import churn  # noqa: PLC0415
    churn.read_trace(cfg.churn.trace, cfg.n_nodes)   # bad rows are refused here, naming churn.trace
  if not sync and (cfg.aggregation != default.aggregation or cfg.compression.kind != "none"):
    try:
      algorithms.make(cfg).check()
    except ValueError as e:
      raise ConfigError(str(e)) from None


def _check_sync_wrappers(cfg: Config, default: Config) -> None:
  """What a synchronous round (divjax.sync_wrap) cannot express, refused naming the key."""
  a = cfg.algorithm
  if cfg.byzantine.per_recipient and algorithms.PROPERTIES[a].uses_server:
    raise ConfigError(f"byzantine.per_recipient: algorithm {a!r}'s clients send to the server only: "
                      f"leave it false")
  if cfg.aggregation.inbox is not None and (cfg.aggregation.rule == "mean" or algorithms.PROPERTIES[a].uses_server):
    raise ConfigError(f"aggregation.inbox: bounds the copies a robust rule reads; algorithm {a!r} "
                      + ("has a server that reads every upload" if algorithms.PROPERTIES[a].uses_server else
                         "mixes every copy with its weights: set aggregation.rule too")
                      + f": leave it out (got {cfg.aggregation.inbox})")


def _refuse_ignored(cfg: Config) -> None:
  a, props = cfg.algorithm, algorithms.PROPERTIES[cfg.algorithm]
  default = Config()
  if not props.uses_fragments and cfg.fragments not in (None, 1):
    raise ConfigError(f"fragments: algorithm {a!r} sends whole models and ignores it: leave it out "
                      f"or set 1 (got {cfg.fragments})")
  if not props.uses_recipients and cfg.recipients != default.recipients:
    raise ConfigError(f"recipients: algorithm {a!r} does not use it (its peers come from "
                      f"{'the topology' if props.needs_graph else 'its own plan'}): leave it out or set "
                      f"{default.recipients} (got {cfg.recipients})")
  if not props.needs_graph:
    for key in ("topology", "topology_degree", "topology_edges"):
      if getattr(cfg, key) != getattr(default, key):
        raise ConfigError(f"{key}: algorithm {a!r} uses no graph and ignores it: leave it out "
                          f"(got {getattr(cfg, key)!r})")
  if not props.uses_server and cfg.server != default.server:
    changed = [k for k in type(cfg.server).model_fields if getattr(cfg.server, k) != getattr(default.server, k)]
    raise ConfigError(f"server.{changed[0]}: algorithm {a!r} has no server (only fedavg does): "
                      f"leave the server section out")


def _check_fragments(cfg: Config) -> None:
  """At most as many fragments as the model's largest tensor has entries.

  Every tensor is cut into the F fragments separately (divjax.fragments), so F larger than
  the largest tensor leaves fragments 0..F-2 empty: messages that carry nothing. The model's
  shapes come from tracing its init (nothing is compiled or run, the backend is not started).
  MovieLens models are sized by the data: checked here when data.dir holds the file (its
  n_users, n_items), not for data that tensorflow-datasets would download.
  """
  if cfg.fragments <= 1:
    return
  shape = _model_shape(cfg)
  sizes = _tensor_sizes(*shape) if shape is not None else None
  if not sizes:
    return  # a task/model pair the task builder refuses, or sized by the data
  hi = max(sizes)
  if cfg.fragments > hi:
    raise ConfigError(
        f"fragments: must be in 1..{hi} for this model ({shape[0]}, {sum(sizes)} parameters; its "
        f"largest tensor has {hi} entries, and every tensor is cut into the fragments, so more "
        f"fragments than that would be empty) (got {cfg.fragments})")


def _model_shape(cfg: Config) -> Optional[tuple]:
  """(model name, input shape, hidden, n_classes) of the model divjax.tasks builds, or None;
  for matrix factorisation ("mf", (n_users, n_items), (), mf_dim) (see `_tensor_sizes`)."""
  from divjax import data as data_lib
  if cfg.task.startswith("movielens"):
    counts = data_lib.rating_counts(cfg.task, cfg.data.dir)
    return ("mf", counts, (), cfg.mf_dim) if counts and cfg.model in ("auto", "mf") else None
  if cfg.task == "synthetic":
    return ("mlp" if cfg.model == "auto" else cfg.model, (cfg.data.dim,), tuple(cfg.hidden),
            cfg.data.n_classes)
  if cfg.task == "lsq":
    return ("linear", (cfg.data.dim,), (), 1)
  shape = data_lib.image_shape(cfg.task)
  if shape is None:
    return None
  default = "gn_lenet" if cfg.task == "cifar10" else "mlp"
  return (default if cfg.model == "auto" else cfg.model, shape, tuple(cfg.hidden), 10)


@functools.lru_cache(maxsize=256)
def _tensor_sizes(name: str, input_shape: tuple, hidden: tuple, n_classes: int) -> Optional[tuple]:
  """Entries of each of the model's tensors (flat order), or None if it cannot be built."""
  import jax
  from divjax import models
  try:
    if name == "mf":
      model = models.make_model("mf", n_users=input_shape[0], n_items=input_shape[1], dim=n_classes)
    else:  # impl "auto" would ask for the backend, which must not start before the run sets it up
      model = models.make_model(name, input_shape=input_shape, hidden=hidden, n_classes=n_classes,
                                impl="vmap")
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0)))
  except Exception:  # e.g. gn_lenet on flat inputs: the task builder reports it
    return None
  return tuple(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
