"""Version vectors: how stale each node's knowledge of every other node's model is.

An optional observer of the asynchronous engine (`observe.versions`), after Mitra & Ulukus
(PAPER.md 5): node j's model version is the number of rounds of local training it has
completed, and known[i, j] is the newest version of node j's model that has reached node i,
directly or through mixing. At a round end (round r) of node i, in the engine's order:

  1. own:   known[i, i] = r + 1 (its pre-averaging model holds round r's training);
  2. merge: for every copy i aggregates now (any fragment of it), known[i] = max(known[i], v)
            with v the vector its sender attached (relay); or only known[i, s] = max(known[i, s],
            v[s]) for sender s (direct: information is not relayed through mixing);
  3. send:  the snapshot written to the ring (the pre-averaging model) carries known[i] as it
            was before the merge of step 2, like the model it describes.

The staleness of the ordered pair (i, j), i != j, is known[j, j] - known[i, j]: how many
versions of j's model i has not seen yet. Memory: (D + 1) N^2 int32 (the vectors attached to
the D ring slots, and `known`), plus a gather of N D M x N at each round end; divjax.memory
counts it. The reference simulator implements the same rules as a plain loop.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from divjax import sharding


class Versions(NamedTuple):
  known: jax.Array   # (N, N) int32: known[i, j], the newest version of j's model that reached i
  sent: jax.Array    # (D, N, N) int32: the vector attached to ring slot d of each sender


def init(n: int, depth: int) -> Versions:
  """Everyone starts knowing version 0 (the initial models) of everyone."""
  return Versions(jnp.zeros((n, n), jnp.int32), jnp.zeros((depth, n, n), jnp.int32))


def round_end(v: Versions, ends, rounds, slot, copies, relay: bool = True) -> Versions:
  """Steps 1-3 of the module docstring for the nodes that `ends` (N,) bool.

  rounds: (N,) rounds completed before this one; slot: (N,) ring slot written now;
  copies: the ring.Copies aggregated now (due, src, slot, dst, all (N, D, M)).
  """
  n = v.known.shape[0]
  nodes = jnp.arange(n)
  own = v.known.at[nodes, nodes].set(jnp.where(ends, rounds + 1, jnp.diagonal(v.known)))
  known = own
  for c in copies:
    due, src, sl, dst = (a.reshape(-1) for a in (c.due, c.src, c.slot, c.dst))
    vec = v.sent[sl, src]                                                                  # (K, N)
    if not relay:  # only the sender's own entry
      vec = jnp.where(nodes[None, :] == src[:, None], vec, 0)
    known = known.at[dst].max(jnp.where(due[:, None], vec, 0))
  sent = v.sent.at[slot, nodes].set(jnp.where(ends[:, None], own, v.sent[slot, nodes]))
  return Versions(known, sent)


def staleness(known) -> tuple[float, int]:
  """(mean, max) over ordered pairs i != j of known[j, j] - known[i, j], from the host."""
  k = np.asarray(sharding.to_host(known), np.int64)
  age = np.diagonal(k)[None, :] - k
  off = ~np.eye(k.shape[0], dtype=bool)
  return float(age[off].mean()), int(age[off].max())
