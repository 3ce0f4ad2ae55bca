"""Epidemic Learning, EL-Oracle (de Vos et al., NeurIPS 2023): every node receives exactly J models.

Each round every node runs H local SGD steps; then the round's communication graph is a fresh
random directed J-regular graph (J = `recipients`): every node sends its model to J others
and receives exactly J models, no node sends to itself or twice to the same node. Each node
replaces its model by the uniform average of its own and the J received ones:
    x_j <- (x_j + sum_{i -> j} x_i) / (1 + J),
a doubly stochastic mixing (in- and out-degree J everywhere), so the network mean is kept.
(EL-Local, algorithms/el_local.py, lets every node pick its J recipients independently, so
the number a node receives varies.)

The graph sampled here: a uniformly random relabelling pi of the nodes, and J distinct
offsets s_1..s_J drawn uniformly from 1..n-1; node pi[k] sends to pi[(k + s_l) mod n]. It is
J-regular with no self-loops or repeated edges by construction, and every node is equally
likely to send to every other, but it is a random relabelled circulant, not a uniform draw
from all J-regular digraphs (which the paper's oracle assumes and which has no cheap exact
sampler with static shapes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from divjax import sampling
from divjax.algorithms.base import Properties, SyncProtocol

PROPERTIES = Properties(synchronous=True, doubly_stochastic=True, uses_recipients=True)


def regular_graph(key, n: int, j: int):
  """(src, dst) of a random directed j-regular graph on n nodes, each (n * j,)."""
  k_perm, k_off = jax.random.split(key)
  pi = jax.random.permutation(k_perm, n).astype(jnp.int32)
  offsets = 1 + sampling.distinct_peers(k_off, n - 1, n, j)   # j distinct values in 1..n-1
  k = jnp.arange(n, dtype=jnp.int32)
  src = jnp.repeat(pi, j)
  dst = pi[(k[:, None] + offsets[None, :]) % n].reshape(-1)
  return src, dst


def el_oracle(*, n_nodes: int, recipients: int) -> SyncProtocol:
  n, j = n_nodes, recipients
  w = 1.0 / (1.0 + j)

  def mixing(key, round_):
    src, dst = regular_graph(sampling.node_key(key, 0, round_), n, j)
    return src, dst, jnp.full(src.shape, w, jnp.float32), jnp.full((n,), w, jnp.float32)

  return SyncProtocol("el_oracle", mixing)


def make(cfg) -> SyncProtocol:
  return el_oracle(n_nodes=cfg.n_nodes, recipients=cfg.recipients)
