"""Epidemic Learning, EL-Local (de Vos et al., NeurIPS 2023); registered as `el_local` and `el`.

Each round every node runs H local SGD steps, sends its model to s = `recipients` distinct
peers it draws uniformly afresh, independently of the other nodes, and replaces its model by
the uniform average of its own model and every model it received this round:
x_j <- (x_j + sum_{i -> j} x_i) / (1 + in_j). The number of models a node receives, in_j,
varies (EL-Oracle, algorithms/el_oracle.py, fixes it at s). Row-stochastic but not doubly
stochastic (the mean drifts, preserved in expectation).
(Earlier divjax versions called this algorithm `el` and described it as EL-Oracle; `el` is
kept as an alias, with the same results.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from divjax import sampling
from divjax.config import Config
from divjax.algorithms.base import Properties, SyncProtocol

PROPERTIES = Properties(synchronous=True, uses_recipients=True)


def make(cfg: Config) -> SyncProtocol:
  n, s = cfg.n_nodes, cfg.recipients
  nodes = jnp.arange(n, dtype=jnp.int32)

  def mixing(key, round_):
    keys = jax.vmap(lambda i: sampling.node_key(key, i, round_))(nodes)
    dst = jax.vmap(lambda k, i: sampling.distinct_peers(k, i, n, s))(keys, nodes).reshape(-1)
    src = jnp.repeat(nodes, s)
    indeg = jax.ops.segment_sum(jnp.ones_like(dst, jnp.float32), dst, num_segments=n)
    weight = 1.0 / (1.0 + indeg)
    return src, dst, weight[dst], weight

  return SyncProtocol("el_local", mixing)
