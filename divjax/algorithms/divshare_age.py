"""DivShare with age-weighted aggregation: fresher fragments count more.

Everything is DivShare's (divjax.algorithms.divshare: fragments, J recipients per fragment,
flushed FIFO queue) except step 4, the aggregation. A copy received a rounds after its
snapshot was taken (a = age in ticks / H, in rounds of a normal-speed node) gets weight
w = 1 / (1 + a); the node's own post-training value keeps weight 1:
    x[k] <- (x^{t+1/2}[k] + sum_{copies c containing k} w_c c[k]) / (1 + sum_c w_c).
With fast links every copy is one round old (w = 1/2), so this mixes more slowly than
DivShare; with stragglers and slow links it discounts stale copies. An example of a new
aggregation rule written as one file (docs/ALGORITHMS.md), not a result from the literature.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from divjax.algorithms import divshare
from divjax.algorithms.base import AsyncAlgorithm, Properties

PROPERTIES = Properties(default_fragments=8, uses_fragments=True, uses_recipients=True)


def divshare_age(*, n_nodes: int, fragments: int, recipients: int, local_steps: int) -> AsyncAlgorithm:
  h = np.float32(local_steps)

  def weight(age):  # the same float32 arithmetic in the engine and the reference
    return np.float32(1.0) / (np.float32(1.0) + age / h)

  def aggregate(x, inbox, state):
    sums, weights = inbox.sum(lambda c: weight(c.age.astype(jnp.float32)))
    return (x + sums) / (1.0 + weights)[..., None], state

  def reference_rule(i, own, received, state, sparse=False):
    total, norm = own.astype(np.float32).copy(), np.zeros_like(own)
    for c in received:
      here = ~np.isnan(c.payload) if sparse else np.ones(c.payload.shape, bool)   # compressed: what it holds
      w = weight(np.float32(c.age))
      total[c.coords[here]] += w * c.payload[here]
      norm[c.coords[here]] += w
    return (total / (np.float32(1.0) + norm)).astype(np.float32), state

  def reference_aggregate(i, own, received, state):
    return reference_rule(i, own, received, state)

  def reference_sparse(i, own, received, state):
    return reference_rule(i, own, received, state, sparse=True)

  def sparse_aggregate(x, inbox, state):   # the same, copies weighed where they hold a value
    sums, weights = inbox.sum(lambda c: weight(c.age.astype(jnp.float32)), per_coordinate=True)
    return (x + sums) / (1.0 + weights), state

  return divshare.divshare(n_nodes=n_nodes, fragments=fragments, recipients=recipients)._replace(
      name="divshare_age", aggregate=aggregate, reference_aggregate=reference_aggregate,
      sparse_rule=(sparse_aggregate, reference_sparse), averages_copies=True)


def make(cfg) -> AsyncAlgorithm:
  return divshare_age(n_nodes=cfg.n_nodes, fragments=cfg.fragments, recipients=cfg.recipients,
                      local_steps=cfg.local_steps)
