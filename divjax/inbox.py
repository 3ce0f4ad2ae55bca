"""A bounded inbox: at most K copies of each fragment reach one aggregation.

Robust aggregation rules (divjax.robust) need every received copy of a coordinate, not a
sum, so they read the due copies as a (N, F, K, L) block. K is static. When more than K
copies of one fragment are due at a receiver's round end, K of them are kept, chosen by a
seeded random priority of (receiver, its round, fragment, sender): an unbiased choice that
the reference simulator recomputes copy by copy. The others end as OVERFLOW, a counted fate
(received, payload unused), never silently dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from divjax import sampling


def _mix(x):
  """murmur3's 32-bit finalizer: a bijective scramble of uint32."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def seed(run_key) -> jax.Array:
  """The run's priority seed (a uint32 scalar) from its own stream."""
  return jax.random.bits(sampling.stream(run_key, sampling.STREAM_INBOX), (), jnp.uint32)


@jax.jit
def priority(seed_u32, dst, round_, frag, src):
  """uint32 priority of a copy; the K lowest (then the lowest sender) of a bucket are kept."""
  u = lambda a: jnp.asarray(a).astype(jnp.uint32)
  h = _mix(u(seed_u32) ^ u(dst))
  h = _mix(h + u(round_))
  h = _mix(h ^ u(frag))
  return _mix(h + u(src) * jnp.uint32(0x9E3779B9))


def ranks(bucket, prio, src, live, n_buckets: int):
  """Each live record's place in its bucket in (priority, sender) order; dead records: n.

  Args: flat arrays of one length; bucket in [0, n_buckets).
  """
  key = jnp.where(live, bucket, n_buckets)
  order = jnp.lexsort((src, prio, key))
  sk = key[order]
  first = jnp.searchsorted(sk, sk, side="left")
  rank_sorted = jnp.arange(sk.shape[0]) - first
  rank = jnp.zeros_like(rank_sorted).at[order].set(rank_sorted)
  return jnp.where(live, rank, sk.shape[0])


def overflow(copies, rounds, seed_u32, n_frags: int, k: int):
  """(N, D, M) bool: the due records beyond the K kept per (receiver, fragment). `copies` may
  be a tuple of Copies (pushes and AD-PSGD's replies), ranked together: then a tuple of masks."""
  single = hasattr(copies, "due")   # one Copies (itself a NamedTuple), or a tuple of them
  group = (copies,) if single else copies
  n = rounds.shape[0]
  cat = lambda field: jnp.concatenate([getattr(c, field).reshape(-1) for c in group])
  dst, frag, src, due = cat("dst"), cat("frag"), cat("src"), cat("due")
  prio = priority(seed_u32, dst, rounds[dst], frag, src)
  over = due & (ranks(dst * n_frags + frag, prio, src, due, n * n_frags) >= k)
  sizes = np.cumsum([c.due.size for c in group])[:-1]
  out = tuple(o.reshape(c.due.shape) for o, c in zip(jnp.split(over, sizes), group))
  return out[0] if single else out


def gather(ring, copies: tuple, k: int, received=None):
  """The due copies as blocks: values (N, F, K, L) float32 and valid (N, F, K) bool.

  Every (receiver, fragment) must have at most K due copies (the engine's overflow step
  makes sure); their order inside a block carries no meaning.
  """
  _, n, f, width = ring.shape
  cat = lambda field: jnp.concatenate([getattr(c, field).reshape(-1) for c in copies])
  due, src, slot, dst, frag = (cat(a) for a in ("due", "src", "slot", "dst", "frag"))
  total = due.shape[0]
  bucket = dst * f + frag
  rank = ranks(bucket, jnp.zeros_like(src, jnp.uint32), src, due, n * f)
  ok = due & (rank < k)
  row = jnp.where(ok, bucket, n * f)   # a spare row takes the rest
  idx = jnp.full((n * f + 1, k), total, jnp.int32).at[row, jnp.where(ok, rank, 0)].set(
      jnp.arange(total, dtype=jnp.int32))[:-1]                                                 # (N*F, K)
  valid = idx < total
  pad = lambda a: jnp.concatenate([a, jnp.zeros((1,), a.dtype)])[idx]
  frag_of_row = jnp.broadcast_to((jnp.arange(n * f) % f)[:, None], idx.shape)
  vals = ring[pad(slot), pad(src), frag_of_row].astype(jnp.float32)                          # (N*F, K, L)
  if received is not None:  # what each receiver gets instead (a per-recipient payload)
    rows = jnp.broadcast_to((jnp.arange(n * f) // f)[:, None], idx.shape)
    vals = received(vals, pad(src), rows, frag_of_row)
  vals = jnp.where(valid[..., None], vals, 0.0)
  return vals.reshape(n, f, k, width), valid.reshape(n, f, k)


def reference_keep(received: list, seed_u32: int, dst: int, round_: int, k: int) -> tuple[list, list]:
  """The reference's choice: (kept, overflowed) among one receiver's copies (Received-like,
  with .src and .frag), K per fragment, by the same priority."""
  kept, over = [], []
  by_frag: dict = {}
  for c in received:
    by_frag.setdefault(c.frag, []).append(c)
  for frag, group in by_frag.items():
    prio = [int(priority(np.uint32(seed_u32), dst, round_, frag, c.src)) for c in group]
    order = sorted(range(len(group)), key=lambda j: (prio[j], group[j].src))
    kept += [group[j] for j in order[:k]]
    over += [group[j] for j in order[k:]]
  return kept, over
