"""SWIFT as Bornstein et al. defined it (ICLR 2023; PAPER.md 2.4), not the DivShare artifact's.

A fixed neighbour graph (`topology`, which must be regular). At the end of every round of H
local steps (H = 1 is the original "average after every step"), node i
  1. broadcasts its post-training model to all K neighbours through its FIFO send queue,
     wait-free: nothing is ever flushed, a slow link only makes what arrives older;
  2. stores the newest model received from each neighbour since its last round end, keeping
     the stored copy of a neighbour that sent nothing new (copies start as the common
     initial model);
  3. sets x_i <- (x_i + sum_k stored_ik) / (K + 1): uniform 1/(deg+1) weights.
The stored copies are this algorithm's state; they cost N*K*P floats. A compressed copy
(divjax.compression) updates the stored one only at the coordinates it holds; a robust rule
(divjax.robust) combines the own model and the K stored copies.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from divjax import topology
from divjax.algorithms.base import AsyncAlgorithm, Properties, QueuePolicy, Received

PROPERTIES = Properties(needs_graph=True, fixed_graph=True)


def check(cfg) -> None:
  topology.check_config(cfg, "swift_original", fixed_only=True, regular=True)


def swift_original(*, neighbours: np.ndarray) -> AsyncAlgorithm:
  """neighbours: (N, K) int32, each node's K fixed neighbours (a regular graph)."""
  n, k = neighbours.shape
  table = jnp.asarray(neighbours)
  # the message of neighbour s = nb[i, c] that goes to i is s's message number fwd[i, c]
  fwd = jnp.asarray(np.argmax(neighbours[neighbours] == np.arange(n)[:, None, None], axis=2).astype(np.int32))
  index = {(i, int(s)): c for i in range(n) for c, s in enumerate(neighbours[i])}

  def plan(key, node, round_):
    return table[node], jnp.zeros((k,), jnp.int32)

  def init(x0, dims):
    # every stored copy starts as the node's own initial model, (N, K, L): the common model,
    # or with init.spread (distinct initial models) what a node assumes of a neighbour it
    # has not heard from yet
    return jnp.broadcast_to(x0[:, 0][:, None, :], (n, k, x0.shape[-1]))

  def stored(inbox, store, sparse=False):
    """The stored copies after this round end's arrivals, (N, K, L); sparse: a compressed copy
    replaces the stored one only where it holds a value (not NaN)."""
    pushes = inbox.copies[0]
    # at most one due copy per (sender, receiver): newer copies supersede older ones
    due = pushes.due[table, :, fwd]                                                       # (N, K, D)
    slot = jnp.argmax(due, axis=-1)
    new = inbox.ring[slot, table, 0].astype(jnp.float32)
    if inbox.received is not None:   # a per-recipient payload (divjax.byzantine)
      rows = jnp.broadcast_to(jnp.arange(n)[:, None], table.shape)
      new = inbox.received(new, table, rows, jnp.zeros_like(table))
    here = due.any(-1)[..., None] & (~jnp.isnan(new) if sparse else True)
    return jnp.where(here, new.astype(store.dtype), store)

  def rule(x, store):
    return ((x[:, 0] + store.sum(axis=1)) / (1.0 + k))[:, None], store

  def aggregate(x, inbox, store):
    return rule(x, stored(inbox, store))

  def sparse_aggregate(x, inbox, store):
    return rule(x, stored(inbox, store, sparse=True))

  def copies(x, inbox, store):   # robust rules: over the own model and the stored copies
    store = stored(inbox, store, sparse=True)   # (no NaN in an uncompressed copy: the same)
    return store[:, None], jnp.ones((n, 1, k), bool), store

  def reference_stored(i, received, store, sparse=False):
    store = list(store)
    for c in received:  # replace the stored copy of each neighbour that sent something
      j = index[(i, c.src)]
      store[j] = np.where(np.isnan(c.payload), store[j], c.payload).astype(np.float32) if sparse else c.payload
    return store

  def reference_rule(own, store):
    total = own.astype(np.float32).copy()
    for copy in store:
      total += copy
    return (total / np.float32(1 + k)).astype(np.float32), store

  def reference_aggregate(i, own, received, store):
    return reference_rule(own, reference_stored(i, received, store))

  def reference_sparse(i, own, received, store):
    return reference_rule(own, reference_stored(i, received, store, sparse=True))

  def reference_copies(i, own, received, store):
    store = reference_stored(i, received, store, sparse=True)
    everything = np.arange(own.size)
    return [Received(int(s), everything, c, 0) for s, c in zip(neighbours[i], store)], store

  return AsyncAlgorithm(name="swift_original", fragments=1, messages=k, plan=plan, aggregate=aggregate,
                        reference_aggregate=reference_aggregate, init=init,
                        reference_init=lambda x0: [x0.copy() for _ in range(k)],
                        queue=QueuePolicy(flush=False), sparse_rule=(sparse_aggregate, reference_sparse),
                        averages_copies=True, copies=copies, reference_copies=reference_copies)


def make(cfg) -> AsyncAlgorithm:
  edges = topology.fixed(cfg.topology, cfg.n_nodes, degree=cfg.topology_degree, seed=cfg.data_seed,
                         edge_list=cfg.topology_edges)
  return swift_original(neighbours=topology.neighbour_lists(edges, cfg.n_nodes, cfg.topology))
