"""AD-PSGD as the DivShare paper ran it (artifact `node/ADPSGD.py`, PAPER.md 2.1).

Per round of H local steps, node i:
  1. snapshots its post-training model as latest_i;
  2. sends floor(J/2) PINGs carrying latest_i, each to a uniformly random other node
     (drawn with replacement), through its FIFO send queue, never flushed;
  3. averages uniformly, per coordinate, its model and the newest model received from each
     sender since its last round end (pings and replies alike).
On receiving a PING from s, a node that has finished at least one round enqueues a PONG
carrying its own latest snapshot back to s at once (same FIFO queue, so on slow links the
replies queue behind the backlog and grow stale too). About 6 full models per node per
round with J = 6: the volume of DivShare with J = 6. This is not the original atomic
pairwise AD-PSGD of Lian et al. (2018).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from divjax import sampling
from divjax.algorithms.base import AsyncAlgorithm, Properties, QueuePolicy, ReplyPolicy

PROPERTIES = Properties(uses_recipients=True)   # floor(J / 2) pings per round


def ping_plan(key, node, round_, n: int, pings: int):
  """`pings` uniform random other nodes, with replacement, in queue order."""
  v = jax.random.randint(sampling.node_key(key, node, round_), (pings,), 0, n - 1)
  dst = (v + (v >= node)).astype(jnp.int32)
  return dst, jnp.zeros((pings,), jnp.int32)


def adpsgd(*, n_nodes: int, pings: int) -> AsyncAlgorithm:
  """Push-pull: `pings` pings per round, each answered with the receiver's latest snapshot."""
  plan = functools.partial(ping_plan, n=n_nodes, pings=pings)
  return AsyncAlgorithm(name="adpsgd", fragments=1, messages=pings, plan=plan,
                        queue=QueuePolicy(flush=False), replies=ReplyPolicy(pairwise=False))


def make(cfg) -> AsyncAlgorithm:
  return adpsgd(n_nodes=cfg.n_nodes, pings=max(1, cfg.recipients // 2))
