"""Compressed messages: a wrapper that sparsifies or quantizes every payload.

What a node sends at a round end, fragment by fragment (size m coordinates, k = ceil(fraction m)):

  top_k     the model's values at the k coordinates that changed most since they were last
            sent: score |x - r| with r each coordinate's value when it was last sent (the
            change of unsent coordinates accumulates, so each is sent eventually: the error
            feedback of sparsified model sharing, as decentralizepy's PartialModel sharing
            with accumulation). Without error_feedback r is the last round end's model: the
            coordinates that changed most in this round.
  random_k  the model's values at k coordinates drawn uniformly per (node, round, fragment).
  qsgd      every coordinate of v = x + e stochastically rounded to `levels` levels of the
            fragment's norm, q = ||v|| sign(v) (l + [u < p]) / s (Alistarh et al. 2017); with
            error_feedback the rounding error e = v - q is kept per node and added to the next
            round's payload (Seide et al. 2014; Karimireddy et al. 2019), else e = 0.

Sparsified payloads mark unsent coordinates NaN; receivers average each coordinate over the
copies that hold it: x[k] <- (x[k] + sum of copies holding k) / (1 + their number).
Message size, in bits per fragment: top_k / random_k k (32 + ceil(log2 m)) (values and
indices), or 32 m when that is less (sent dense: fraction 1 is exactly the uncompressed run);
qsgd 32 + m (1 + ceil(log2(levels + 1))) (the norm, a sign and a level per coordinate). The
network model serves messages of that size, so upload times, flushes and delivery follow.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from divjax import robust, sampling
from divjax.algorithms import base
from divjax.algorithms.base import AsyncAlgorithm, lift, uniform_mean

KINDS = ("top_k", "random_k", "qsgd")


def kept(sizes: np.ndarray, fraction: float) -> np.ndarray:
  """k per fragment: ceil(fraction * size), at least 1."""
  return np.maximum(1, np.ceil(np.asarray(sizes) * fraction - 1e-9)).astype(np.int64)


def payload_bits(kind: str, sizes: np.ndarray, fraction: float, levels: int) -> np.ndarray:
  sizes = np.asarray(sizes, np.int64)
  dense = 32 * sizes
  if kind == "qsgd":
    return 32 + sizes * (1 + math.ceil(math.log2(levels + 1)))
  index = np.ceil(np.log2(np.maximum(sizes, 2))).astype(np.int64)
  return np.minimum(dense, kept(sizes, fraction) * (32 + index))


def per_coordinate_mean(x, inbox, state):
  """uniform_mean where a copy may hold only some coordinates (NaN elsewhere)."""
  sums, counts = inbox.sum(per_coordinate=True)
  return (x + sums) / (1.0 + counts), state


def reference_per_coordinate_mean(i: int, own: np.ndarray, received: list, state):
  total, count = own.astype(np.float32).copy(), np.zeros_like(own)
  for c in received:
    here = ~np.isnan(c.payload)
    total[c.coords[here]] += c.payload[here]
    count[c.coords[here]] += 1
  return (total / (1.0 + count)).astype(np.float32), state


robust.MEANS.append(per_coordinate_mean)   # robust rules read sparsified copies per coordinate


def _top(scores, k):
  """(F, L) bool: the k[f] highest scores of each row, ties to the lower index."""
  order = jnp.argsort(-scores, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True)
  return rank < k[:, None]


def _np_top(scores: np.ndarray, k: int) -> np.ndarray:
  order = np.argsort(-scores, kind="stable")
  chosen = np.zeros(scores.size, bool)
  chosen[order[:k]] = True
  return chosen


def _uniform(key, node, round_, shape):
  return jax.random.uniform(sampling.node_key(key, node, round_), shape, jnp.float32)


def with_compression(alg: AsyncAlgorithm, kind: str, *, fraction: float = 0.01, levels: int = 16,
                     error_feedback: bool = True) -> AsyncAlgorithm:
  """`alg`, whose rule must be the uniform mean, sending compressed payloads."""
  if kind not in KINDS:
    raise ValueError(f"compression.kind: must be none or one of {', '.join(KINDS)} (got {kind!r})")
  if alg.aggregate is uniform_mean:
    rule = (per_coordinate_mean, reference_per_coordinate_mean)
  elif alg.sparse_rule is not None:
    rule = alg.sparse_rule
  else:
    raise ValueError(f"compression.kind: algorithm {alg.name!r}'s rule cannot read copies that hold only some "
                     f"coordinates ({SPARSE_REFUSED.get(alg.name, 'it has no per-coordinate version')})")
  inner, inner_ref = alg.snapshot, alg.reference_snapshot   # composed after this wrapper's own
  # state: (the algorithm's, r: each coordinate's value when last sent (top_k) or the rounding
  # error carried to the next round (qsgd))
  memory = kind == "top_k" or (kind == "qsgd" and error_feedback)
  alg = lift(alg, (lambda x0, dims: x0 if kind == "top_k" else jnp.zeros_like(x0)) if memory
             else (lambda x0, dims: ()),
             (lambda x0: (x0 if kind == "top_k" else np.zeros_like(x0)).astype(np.float32).copy()) if memory
             else (lambda x0: None))

  def compress(x, real, key, rounds, ends, mine):
    sizes = jnp.sum(real, axis=-1)
    k = jnp.maximum(1, jnp.ceil(sizes * fraction - 1e-9)).astype(jnp.int32)
    nodes = jnp.arange(x.shape[0])
    if kind == "qsgd":
      v = x + mine if error_feedback else x
      norm = jnp.sqrt(jnp.sum(jnp.where(real, v * v, 0.0), axis=-1, keepdims=True))
      level = jnp.abs(v) / jnp.maximum(norm, 1e-30) * levels
      low = jnp.floor(level)
      u = jax.vmap(_uniform, in_axes=(None, 0, 0, None))(key, nodes, rounds, x.shape[1:])
      q = norm * jnp.sign(v) * (low + (u < level - low)) / levels
      q = jnp.where(real, q, 0.0)
      return q, (jnp.where(ends[:, None, None], v - q, mine) if error_feedback else mine)
    if kind == "top_k":
      scores = jnp.abs(x - mine)
    else:
      scores = jax.vmap(_uniform, in_axes=(None, 0, 0, None))(key, nodes, rounds, x.shape[1:])
    chosen = jax.vmap(_top, in_axes=(0, None))(jnp.where(real, scores, -jnp.inf), k)
    sent = jnp.where(chosen, x, jnp.where(real, jnp.nan, 0.0))
    if kind == "top_k":   # r: the value sent (error feedback) or this round's model
      new = jnp.where(chosen, x, mine) if error_feedback else x
      mine = jnp.where(ends[:, None, None], new, mine)
    return sent, mine

  def snapshot(x, real, key, rounds, ends, state):
    sent, mine = compress(x, real, key, rounds, ends, state[1])
    if inner is None:
      return sent, (state[0], mine)
    sent, inner_state = inner(sent, real, key, rounds, ends, state[0])
    return sent, (inner_state, mine)

  def reference_compress(i, own, coords, key, round_, mine):
    width = max(c.size for c in coords)
    sent = np.full_like(own, np.nan)
    if kind == "qsgd":
      v = own + mine if error_feedback else own
      u = np.asarray(_uniform(key, i, round_, (len(coords), width)))
      for f, c in enumerate(coords):
        norm = np.float32(np.sqrt(np.sum(v[c] * v[c], dtype=np.float32)))
        level = np.abs(v[c]) / max(norm, np.float32(1e-30)) * np.float32(levels)
        low = np.floor(level)
        sent[c] = norm * np.sign(v[c]) * (low + (u[f, :c.size] < level - low)) / np.float32(levels)
      return sent, ((v - sent).astype(np.float32) if error_feedback else mine)
    k = kept(np.array([c.size for c in coords]), fraction)
    r = np.asarray(_uniform(key, i, round_, (len(coords), width))) if kind == "random_k" else None
    new = own.copy() if kind == "top_k" and not error_feedback else (None if mine is None else mine.copy())
    for f, c in enumerate(coords):
      chosen = _np_top(np.abs(own[c] - mine[c]) if kind == "top_k" else r[f, :c.size], int(k[f]))
      sent[c[chosen]] = own[c[chosen]]
      if kind == "top_k" and error_feedback:
        new[c[chosen]] = own[c[chosen]]
    return sent, new

  def reference_snapshot(i, models, coords, key, round_, state):
    sent, mine = reference_compress(i, models[i], coords, key, round_, state[1])
    if inner_ref is None:
      return sent, (state[0], mine)
    models = np.concatenate([models[:i], sent[None], models[i + 1:]])
    sent, inner_state = inner_ref(i, models, coords, key, round_, state[0])
    return sent, (inner_state, mine)

  aggregate, reference_aggregate = lift_rule(*rule)
  return alg._replace(snapshot=snapshot, reference_snapshot=reference_snapshot, aggregate=aggregate,
                      reference_aggregate=reference_aggregate,
                      payload_bits=lambda sizes: payload_bits(kind, sizes, fraction, levels))


def lift_rule(aggregate, reference_aggregate):
  """An algorithm's rule (reading its own state) over the state lifted by this wrapper; the
  per-coordinate mean stays the same function, which robust rules recognize (robust.MEANS)."""
  if aggregate is per_coordinate_mean:
    return per_coordinate_mean, lambda i, own, received, state: (
        reference_per_coordinate_mean(i, own, received, None)[0], state)
  return base.lift_rule(aggregate), base.lift_reference_rule(reference_aggregate)


# Why an algorithm's rule has no per-coordinate version.
SPARSE_REFUSED = {
    "sgp": "push-sum divides by the received mass, which a partial copy does not carry per coordinate",
    "adpsgd_pairwise": "its exchanges average two live models, not payloads",
}
