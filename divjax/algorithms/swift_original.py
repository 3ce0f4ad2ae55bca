"""SWIFT as Bornstein et al. defined it (ICLR 2023; PAPER.md 2.4), not the DivShare artifact's.

A fixed neighbour graph (`topology`, which must be regular). At the end of every round of H
local steps (H = 1 is the original "average after every step"), node i
  1. broadcasts its post-training model to all K neighbours through its FIFO send queue,
     wait-free: nothing is ever flushed, a slow link only makes what arrives older;
  2. stores the newest model received from each neighbour since its last round end, keeping
     the stored copy of a neighbour that sent nothing new (copies start as the common
     initial model);
  3. sets x_i <- (x_i + sum_k stored_ik) / (K + 1): uniform 1/(deg+1) weights.
The engine keeps the stored copies (divjax.engine, `neighbours`); they cost N*K*P floats.
"""

from __future__ import annotations

import jax.numpy as jnp

from divjax import topology
from divjax.algorithms.base import Protocol
from divjax.config import Config


def make(cfg: Config) -> Protocol:
  n = cfg.n_nodes
  edges = topology.fixed(cfg.topology, n, degree=cfg.topology_degree, seed=cfg.seed,
                         edge_list=cfg.topology_edges)
  nbrs = topology.neighbour_lists(edges, n, cfg.topology)
  table = jnp.asarray(nbrs)
  k = nbrs.shape[1]

  def plan(key, node, round_):
    return table[node], jnp.zeros((k,), jnp.int32)

  return Protocol(name="swift_original", fragments=1, messages=k, flush=False, plan=plan,
                  neighbours=nbrs)
