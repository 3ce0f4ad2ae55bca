"""Every random choice of a run, as pure functions of (run key, node, counter).

Keys are derived per node and per counter (local step or round), never per tick, so a
node's batches and recipients do not depend on the tick granularity, chunk size, resume
point or sharding; the reference simulator replays exactly the same plan by calling the
same functions for one node at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Independent streams derived from the run key.
STREAM_BATCH, STREAM_PLAN, STREAM_INIT, STREAM_SNAPSHOT, STREAM_INBOX, STREAM_RECEIVED = 1, 2, 3, 4, 5, 6


def stream(run_key: jax.Array, which: int) -> jax.Array:
  return jax.random.fold_in(run_key, which)


def node_key(key: jax.Array, node, counter) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(key, node), counter)


def batch_indices(key, node, step, parts, counts, batch_size: int) -> jax.Array:
  """Indices into the training set of node's minibatch at its local step `step` (with replacement)."""
  k = node_key(key, node, step)
  pos = jax.random.randint(k, (batch_size,), 0, counts[node])
  return parts[node, pos]


def distinct_peers(key, self_id, n: int, k: int) -> jax.Array:
  """k distinct nodes drawn uniformly from the n - 1 nodes other than self_id, shape (k,).

  Floyd's algorithm (O(k^2), independent of n) for small k, a random top-k otherwise.
  Both give a uniformly random k-subset; the order inside the subset carries no meaning.
  """
  m = n - 1  # candidates 0..m-1, mapped past self_id at the end
  if k > 32:
    scores = jax.random.uniform(key, (m,))
    v = jax.lax.top_k(scores, k)[1]
  else:
    keys = jax.random.split(key, k)
    v = jnp.zeros((k,), jnp.int32)
    for j in range(k):
      hi = m - k + j  # draw t in [0, hi]; if taken, take hi itself (never taken yet)
      t = jax.random.randint(keys[j], (), 0, hi + 1)
      taken = jnp.any((v == t) & (jnp.arange(k) < j))
      v = v.at[j].set(jnp.where(taken, hi, t))
  return (v + (v >= self_id)).astype(jnp.int32)


def fragment_fanout_plan(key, node, round_, n: int, n_fragments: int, recipients: int):
  """DivShare's send plan of one node for one round (PAPER.md 1.3, 1.5).

  For every fragment, `recipients` distinct peers drawn afresh; the F*J (peer, fragment)
  pairs are then shuffled uniformly into queue order.

  Returns:
    dst, frag: (F*J,) int32 each, in the order the send queue serves them.
  """
  k = node_key(key, node, round_)
  k_peers, k_order = jax.random.split(k)
  peer_keys = jax.random.split(k_peers, n_fragments)
  dst = jax.vmap(lambda kk: distinct_peers(kk, node, n, recipients))(peer_keys)  # (F, J)
  frag = jnp.broadcast_to(jnp.arange(n_fragments, dtype=jnp.int32)[:, None], dst.shape)
  order = permutation(k_order, n_fragments * recipients)
  return dst.reshape(-1)[order], frag.reshape(-1)[order]


# Ranks cost m^2 comparisons: on the CPU (1,024 rows, JAX 0.10.2) 10x faster than the sort at
# m = 24, 5.6x at 60, 1.5x slower at 120.
RANKED_UP_TO = 64


def permutation(key, m: int) -> jax.Array:
  """jax.random.permutation(key, m), bit for bit, without a sort for m <= RANKED_UP_TO.

  For m below about 1,600, JAX draws one 32-bit sort key per element and sorts stably by it,
  once (jax._src.random's _shuffle). Sorting N rows of 24 (DivShare's send plan) was one of
  the round end's costliest ops on XLA:CPU (benchmarks/op_profile.py); the same order comes
  from ranks, comparisons that fuse into one pass. This follows JAX's private _shuffle;
  tests/test_fragments_and_sampling.py checks it against the installed JAX's permutation.
  """
  rounds = np.ceil(3 * np.log(max(1, m)) / np.log(np.iinfo(np.uint32).max))  # as _shuffle decides
  if rounds != 1 or m > RANKED_UP_TO:
    return jax.random.permutation(key, m)
  return stable_order(jax.random.bits(jax.random.split(key)[1], (m,), jnp.uint32))


def stable_order(keys: jax.Array) -> jax.Array:
  """The indices that sort 1-D `keys` stably (jnp.argsort(keys, stable=True)), from ranks."""
  i = jnp.arange(keys.shape[0], dtype=jnp.int32)
  before = (keys[None, :] < keys[:, None]) | ((keys[None, :] == keys[:, None]) & (i[None, :] < i[:, None]))
  rank = jnp.sum(before, axis=1, dtype=jnp.int32)                 # where element i goes
  return jnp.sum(jnp.where(rank[None, :] == i[:, None], i[None, :], 0), axis=1, dtype=jnp.int32)
