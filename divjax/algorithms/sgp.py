"""Stochastic Gradient Push (SGP; Assran, Loizou, Ballas and Rabbat, ICML 2019), asynchronous.

Push-sum gossip over a time-varying directed exponential graph: at its r-th round end node
i sends to peer (i + 2^(r mod K)) mod n, K = floor(log2(n - 1)) + 1, one message per round.
Each node carries a push-sum weight w_i (the algorithm's state, 1 at the start) next to its
de-biased model z_i (what it trains and is evaluated on). At each round end node i
  1. keeps half its weight and pushes the other half with its post-training model z_i: the
     message carries (z_i, m = w_i / 2);
  2. absorbs the pushes that reached it since its last round end (copies c with masses m_c):
         z_i <- (w_i / 2 * z_i + sum_c m_c z_c) / (w_i / 2 + sum_c m_c),
         w_i <- w_i / 2 + sum_c m_c,
which is push-sum on the numerators x = w z. Weight in flight is not lost, so the weighted
mean of the models is kept (exactly with lr = 0, up to float32 rounding), as the paper's
column-stochastic mixing does.

Simulation choices: the send queue is never flushed (messages are late, not lost); a payload
that expires from the delay ring (ring_depth) loses its mass. Local SGD steps update the
de-biased model z directly, with the optimizer of every other algorithm (SGP's update of the
numerator, x <- x - lr * grad f(z), is the same step scaled by the node's weight). The mass of
each message lives in a per-slot table (N, D) of the state, like the payload in the delay ring.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from divjax.algorithms.base import AsyncAlgorithm, Properties, QueuePolicy

PROPERTIES = Properties()


def exponential_peer(node, round_, n: int):
  """The directed exponential graph's peer of `node` in round `round_`."""
  k = int(math.floor(math.log2(n - 1))) + 1
  return (node + jnp.left_shift(1, round_ % k)) % n


def sgp(*, n_nodes: int) -> AsyncAlgorithm:
  n = n_nodes

  def plan(key, node, round_):
    return exponential_peer(node, round_, n).astype(jnp.int32)[None], jnp.zeros((1,), jnp.int32)

  def init(x0, dims):  # (weight (N,), mass sent with each ring slot's message (N, D))
    return jnp.ones((n,), jnp.float32), jnp.zeros((n, dims.depth), jnp.float32)

  def aggregate(z, inbox, state):
    weight, sent = state
    half = weight / 2.0
    sums, mass = inbox.sum(lambda c: sent[c.src, c.slot])            # sum m_c z_c, sum m_c
    z = (half[:, None, None] * z + sums) / (half[:, None] + mass)[..., None]
    nodes = jnp.arange(n)
    sent = sent.at[nodes, inbox.slot].set(jnp.where(inbox.ends, half, sent[nodes, inbox.slot]))
    return z, (jnp.where(inbox.ends, half + mass[:, 0], weight), sent)

  def reference_aggregate(i, own, received, state):
    half = np.float32(state["weight"] / np.float32(2.0))
    total, mass = half * own.astype(np.float32), np.float32(0.0)
    for c in received:
      total[c.coords] += c.info * c.payload
      mass += c.info
    state = {"weight": half + mass, "send": half}
    return (total / (half + mass)).astype(np.float32), state

  return AsyncAlgorithm(name="sgp", fragments=1, messages=1, plan=plan, aggregate=aggregate,
                        reference_aggregate=reference_aggregate, init=init,
                        reference_init=lambda x0: {"weight": np.float32(1.0), "send": None},
                        reference_message=lambda state: state["send"],
                        queue=QueuePolicy(flush=False))


def make(cfg) -> AsyncAlgorithm:
  return sgp(n_nodes=cfg.n_nodes)
