"""AD-PSGD as Lian et al. defined it (ICML 2018; PAPER.md 2.2): atomic pairwise averaging.

Each node trains without waiting. At the end of every round of H local steps (H = 1 is the
original per-minibatch loop), node i picks one neighbour j uniformly at random (`topology`,
fully connected by default) and starts an exchange: its model goes to j through i's FIFO
send queue, j answers at once with its own model through j's queue (behind j's backlog),
and when that reply reaches i (at i's first round end after its arrival) both models are
replaced by their average, as they are at that instant: x_i, x_j <- (x_i + x_j) / 2. Local
training goes on meanwhile, so gradients are computed at models that are stale by the
exchange's duration, as in the paper's analysis. Every exchange is a doubly stochastic
pairwise averaging, so with lr = 0 the network mean is kept exactly.

Simulation choices: exchanges never block training (the engine's schedules are fixed), so
on slow links they queue up in the FIFO; exchanges completing at the same instant are
applied one after the other, by pinger id then reply arrival. About 2 models per node per
round (DivShare with J = 6 sends about 6).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from divjax import sampling, topology
from divjax.algorithms.base import AsyncAlgorithm, Properties, QueuePolicy, ReplyPolicy

PROPERTIES = Properties(doubly_stochastic=True, needs_graph=True, fixed_graph=True)


def check(cfg) -> None:
  # on the complete graph it picks any other node without building the graph
  topology.check_config(cfg, "adpsgd_pairwise", fixed_only=True, build=cfg.topology != "complete")


def keep(x, inbox, state):
  """Nothing is averaged at round ends: the exchanges (divjax.replies.exchange) do the mixing."""
  return x, state


def reference_keep(i, own, received, state):
  return own, state


def adpsgd_pairwise(*, n_nodes: int, pick) -> AsyncAlgorithm:
  """pick(key, node) -> (1,) int32: the neighbour the node starts an exchange with."""
  def plan(key, node, round_):
    return pick(sampling.node_key(key, node, round_), node), jnp.zeros((1,), jnp.int32)

  return AsyncAlgorithm(name="adpsgd_pairwise", fragments=1, messages=1, plan=plan, aggregate=keep,
                        reference_aggregate=reference_keep, queue=QueuePolicy(flush=False),
                        replies=ReplyPolicy(pairwise=True))


def make(cfg) -> AsyncAlgorithm:
  n = cfg.n_nodes
  if cfg.topology == "complete":  # any other node, without building n^2 edges
    def pick(key, node):
      v = jax.random.randint(key, (1,), 0, n - 1)
      return (v + (v >= node)).astype(jnp.int32)
  else:
    edges = topology.fixed(cfg.topology, n, degree=cfg.topology_degree, seed=cfg.data_seed,
                           edge_list=cfg.topology_edges)
    order = jnp.asarray(edges.src.argsort(kind="stable"))
    nbr = jnp.asarray(edges.dst)[order]                                  # neighbours, grouped by node
    deg = jnp.bincount(jnp.asarray(edges.src), length=n)
    first = jnp.cumsum(deg) - deg

    def pick(key, node):
      k = jax.random.randint(key, (1,), 0, deg[node])
      return nbr[first[node] + k].astype(jnp.int32)

  return adpsgd_pairwise(n_nodes=n, pick=pick)
