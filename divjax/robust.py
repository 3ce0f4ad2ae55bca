"""Robust aggregation: a wrapper that replaces an averaging rule with a Byzantine-robust one.

A receiver ending a round combines, fragment by fragment, its own post-training model x and
the copies y_1..y_c it received (at most K of them: divjax.inbox), m = c + 1 values per
coordinate:

  median               the coordinate-wise median of the m values
  trimmed_mean         the mean after dropping the b largest and b smallest values,
                       b = min(trim, (m - 1) // 2)
  self_centered_clip   x + (1/m) sum_j clip(y_j - x, tau)          (He, Karimireddy & Jaggi
                       2022, "Byzantine-robust decentralized learning via ClippedGossip",
                       uniform weights over the node and its copies)
  centered_clip        v <- v + (1/m) sum_{all m values} clip(y - v, tau), clip_iters times,
                       from v = the node's previous aggregate (Karimireddy, He & Jaggi 2021,
                       "Learning from history": the center is the last round's result)

with clip(z, tau) = z min(1, tau / ||z||), the norm over one fragment's coordinates. A
fragment with no copy keeps the own value (m = 1), as a uniform mean does. The engine reads
the copies as a (N, F, K, L) block (Inbox.gather); `reference_aggregate` is the same rule
for one node in numpy.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from divjax.algorithms.base import AsyncAlgorithm, lift, uniform_mean

MEANS = [uniform_mean]   # the rules a robust rule may replace (divjax.compression adds its own)

RULES = ("median", "trimmed_mean", "centered_clip", "self_centered_clip")


def _values(x, vals, valid):
  """The own value and every copy (N, F, K+1, L), and which are there: a copy's NaN
  coordinates were not sent (sparsified payloads, divjax.compression)."""
  allv = jnp.concatenate([x[:, :, None], vals], axis=2)
  ok = jnp.concatenate([jnp.ones(valid.shape[:2] + (1,), bool), valid], axis=2)[..., None] & ~jnp.isnan(allv)
  return jnp.where(ok, allv, 0.0), ok


def _sorted(x, vals, valid):
  """The m values of each coordinate, sorted, missing ones last (+inf); and m (N, F, L)."""
  allv, ok = _values(x, vals, valid)
  return jnp.sort(jnp.where(ok, allv, jnp.inf), axis=2), jnp.sum(ok, axis=2)


def median(x, vals, valid):
  srt, m = _sorted(x, vals, valid)
  take = lambda j: jnp.take_along_axis(srt, j[:, :, None, :], axis=2)[:, :, 0]
  return (take((m - 1) // 2) + take(m // 2)) / 2


def trimmed_mean(x, vals, valid, trim: int):
  srt, m = _sorted(x, vals, valid)
  b = jnp.minimum(trim, (m - 1) // 2)                                                        # (N, F, L)
  j = jnp.arange(srt.shape[2])[None, None, :, None]
  keep = (j >= b[:, :, None]) & (j < (m - b)[:, :, None])
  return jnp.sum(jnp.where(keep, srt, 0.0), axis=2) / jnp.sum(keep, axis=2)


def _clipped(y, center, ok, tau):
  """clip(y - center, tau) of every value (N, F, K', L), the norm over a copy's present coordinates."""
  d = jnp.where(ok, y - center[:, :, None], 0.0)
  norm = jnp.sqrt(jnp.sum(d * d, axis=-1, keepdims=True))
  return d * jnp.minimum(1.0, tau / jnp.maximum(norm, 1e-30))


def self_centered_clip(x, vals, valid, tau: float):
  allv, ok = _values(x, vals, valid)
  return x + jnp.sum(_clipped(allv, x, ok, tau), axis=2) / jnp.sum(ok, axis=2)


def centered_clip(x, vals, valid, center, tau: float, iters: int):
  allv, ok = _values(x, vals, valid)
  m = jnp.sum(ok, axis=2)
  v = center
  for _ in range(iters):
    v = v + jnp.sum(_clipped(allv, v, ok, tau), axis=2) / m
  return jnp.where(m > 1, v, x)  # a coordinate with no copy keeps the own value


def apply(rule: str, x, vals, valid, center, trim: int, tau: float, iters: int):
  """`rule` over own values x (N, F, L) and copies vals (N, F, K, L), valid (N, F, K);
  center (N, F, L): centered clipping's start (unused by the others)."""
  if rule == "median":
    return median(x, vals, valid)
  if rule == "trimmed_mean":
    return trimmed_mean(x, vals, valid, trim)
  if rule == "self_centered_clip":
    return self_centered_clip(x, vals, valid, tau)
  return centered_clip(x, vals, valid, center, tau, iters)


# ---- the same rules, one node, one fragment, numpy: values (m, len), own first; NaN: not sent


def _np_clip(d, tau):
  d = np.nan_to_num(d, nan=0.0)
  norm = np.sqrt(np.sum(d.astype(np.float64) ** 2))
  return d * min(1.0, tau / max(norm, 1e-30))


def reference_rule(rule: str, values: np.ndarray, center, trim: int, tau: float, iters: int) -> np.ndarray:
  m = np.sum(~np.isnan(values), axis=0)            # values per coordinate
  if rule == "median":
    return np.nanmedian(values, axis=0)
  if rule == "trimmed_mean":
    out = np.empty(values.shape[1], np.float32)
    for j in range(values.shape[1]):
      col = np.sort(values[~np.isnan(values[:, j]), j])
      b = min(trim, (col.size - 1) // 2)
      out[j] = col[b:col.size - b].mean()
    return out
  x = values[0]
  if rule == "self_centered_clip":
    return x + sum(_np_clip(y - x, tau) for y in values[1:]) / m
  v = center.astype(np.float64)
  for _ in range(iters):
    v = v + sum(_np_clip(y - v, tau) for y in values) / m
  return np.where(m > 1, v, x)


def with_robust_aggregation(alg: AsyncAlgorithm, rule: str, k: int, *, trim: int = 1, tau: float = 1.0,
                            iters: int = 3) -> AsyncAlgorithm:
  """`alg`, whose rule must be the uniform mean, aggregating with `rule` over at most `k`
  copies per fragment."""
  if rule not in RULES:
    raise ValueError(f"aggregation.rule: must be mean or one of {', '.join(RULES)} (got {rule!r})")
  if (alg.aggregate not in MEANS and not alg.averages_copies) or (alg.replies is not None and alg.replies.pairwise):
    raise ValueError(f"aggregation.rule: {rule} replaces a uniform mean over received copies; algorithm "
                     f"{alg.name!r} has its own rule or pairwise exchanges (use divshare, divshare_age, swift, adpsgd)")
  centered = rule == "centered_clip"
  copies, ref_copies = alg.copies, alg.reference_copies
  # state: (the algorithm's, the centers of centered clipping: the last aggregate, or nothing)
  alg = lift(alg, (lambda x0, dims: x0) if centered else (lambda x0, dims: ()),
             (lambda x0: x0.astype(np.float32).copy()) if centered else (lambda x0: None))

  def aggregate(x, inbox, state):
    if copies is None:
      (vals, valid), inner = inbox.gather(k), state[0]
    else:   # the copies the algorithm combines (e.g. stored ones), and its state after reading them
      vals, valid, inner = copies(x, inbox, state[0])
    out = apply(rule, x, vals, valid, state[1] if centered else None, trim, tau, iters)
    if not centered:
      return out, (inner, state[1])
    return out, (inner, jnp.where(inbox.ends[:, None, None], out, state[1]))   # the next round's center

  def reference_aggregate(i, own, received, state):
    inner = state[0]
    if ref_copies is not None:
      received, inner = ref_copies(i, own, received, inner)
    out = own.astype(np.float32).copy()
    by_frag: dict = {}
    for c in received:
      by_frag.setdefault(int(c.coords[0]), []).append(c)
    for group in by_frag.values():
      coords = group[0].coords
      values = np.stack([own[coords]] + [c.payload for c in group]).astype(np.float32)
      center = state[1][coords] if centered else None
      out[coords] = reference_rule(rule, values, center, trim, tau, iters)
    return out.astype(np.float32), ((inner, out.copy()) if centered else (inner, state[1]))

  return alg._replace(aggregate=aggregate, reference_aggregate=reference_aggregate, inbox=k)


def with_bounded_inbox(alg: AsyncAlgorithm, k: int) -> AsyncAlgorithm:
  """`alg`'s own rule over at most `k` copies per fragment (the rest overflow)."""
  return alg._replace(inbox=k)
