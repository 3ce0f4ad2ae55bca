"""Synchronous D-PSGD (Lian et al., NeurIPS 2017) with Metropolis-Hastings weights.

Each round every node runs H local SGD steps, then all nodes mix with their neighbours in
the round's graph: x_i <- sum_j W_ij x_j, W_ij = 1 / (1 + max(deg_i, deg_j)) for each edge,
W_ii = 1 - sum_j W_ij (symmetric, doubly stochastic, so the network mean is preserved).
The graph is fixed (`topology`: ring, torus, regular, complete, edges) or a fresh random
ring every round (`random_ring`). The round lasts as long as its slowest participant.
"""

from __future__ import annotations

import jax.numpy as jnp

from divjax import topology
from divjax.config import Config
from divjax.algorithms.base import Properties, SyncProtocol

PROPERTIES = Properties(synchronous=True, doubly_stochastic=True, needs_graph=True)


def check(cfg) -> None:
  topology.check_config(cfg, "dpsgd", fixed_only=False)


def make(cfg: Config) -> SyncProtocol:
  n = cfg.n_nodes
  if cfg.topology in topology.RANDOM:
    def mixing(key, round_):
      from divjax import sampling
      src, dst = topology.random_ring(sampling.node_key(key, 0, round_), n)
      w, self_w = topology.metropolis_weights(src, dst, n)
      return src, dst, w, self_w
    return SyncProtocol("dpsgd", mixing)

  edges = topology.fixed(cfg.topology, n, degree=cfg.topology_degree, seed=cfg.data_seed,
                         edge_list=cfg.topology_edges)
  src, dst = jnp.asarray(edges.src), jnp.asarray(edges.dst)
  w, self_w = topology.metropolis_weights(src, dst, n)
  return SyncProtocol("dpsgd", lambda key, round_: (src, dst, w, self_w))
