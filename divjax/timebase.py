"""Integer simulated time on a 32-bit device: narrow times that saturate, wide times that don't.

The engine keeps time in int32 microseconds (int64 is off by default in JAX and slow on
GPUs), which used to wrap around on slow links: a queue of 20 messages of 111 s each summed
past 2**31 us and came back negative, "delivered" (issue 18). Two representations fix that.

Narrow (int32, microseconds relative to some instant). Every per-message decision (flushed,
consumed at which round end, expired) compares a time with a horizon of a few rounds, so a
narrow time only has to be exact below the horizon: it saturates at CAP_US, and the engine
refuses (engine.check_horizon) a run whose horizon, rounds x ring depth + latency, is not
well below CAP_US. Saturated values are all "too late", which they are.

Wide (a pair of int32 words, value = hi * 2**20 + lo with 0 <= lo < 2**20), saturating at
WIDE_MAX_US = 2**49 us (17.8 years). A send queue's backlog is carried from round to round
and must stay exact however far behind the queue is: a node whose link needs a year per
message keeps every later message waiting a year, never "a saturated 18 minutes". Config
bounds a run's duration below 2**48 us, so a saturated wide time is after the end of any
run (plus its horizon) and all such times are alike. Per-message service times are clamped
to WIDE_MAX_US on the host (network.service_us): a message that takes longer than that
takes "forever" in the engine and the reference simulator alike.

All wide arithmetic saturates at the value level, min(exact, WIDE_MAX_US) for the
non-negative sums that occur, which keeps the scans below associative.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from divjax.config import MAX_TICKS  # noqa: F401  (t + a horizon in ticks stays below 2**31)

CAP_US = (1 << 30) - 1          # narrow times saturate here (17.9 simulated minutes)
LO_BITS = 20
_LO_MASK = (1 << LO_BITS) - 1
_HI_MAX = 1 << 29
WIDE_MAX_US = _HI_MAX << LO_BITS  # 2**49


class Wide(NamedTuple):
  """A time of up to 2**49 us as two int32 arrays of equal shape (a pytree: scans carry it)."""
  hi: jax.Array
  lo: jax.Array


def wide(x) -> Wide:
  """From int32 microseconds (negative allowed): arithmetic shift = floor division."""
  x = jnp.asarray(x, jnp.int32)
  return Wide(x >> LO_BITS, x & _LO_MASK)


def wide_from_host(us) -> Wide:
  """From host int64 microseconds, clamped to [0, WIDE_MAX_US] (service-time tables)."""
  import numpy as np
  us = np.minimum(np.asarray(us, np.int64), WIDE_MAX_US)
  return Wide(jnp.asarray(us >> LO_BITS, jnp.int32), jnp.asarray(us & _LO_MASK, jnp.int32))


def _saturate(hi, lo) -> Wide:
  top = hi >= _HI_MAX
  return Wide(jnp.where(top, _HI_MAX, hi), jnp.where(top, 0, lo))


def add(a: Wide, b: Wide) -> Wide:
  lo = a.lo + b.lo                   # < 2**21: no overflow
  return _saturate(a.hi + b.hi + (lo >> LO_BITS), lo & _LO_MASK)


def sub(a: Wide, b: Wide) -> Wide:
  """a - b, unsaturated (used where a saturated b only has to stay very negative)."""
  lo = a.lo - b.lo                   # in (-2**20, 2**20): the borrow is an arithmetic shift
  return Wide(a.hi - b.hi + (lo >> LO_BITS), lo & _LO_MASK)


def sub_narrow(a: Wide, x) -> Wide:
  """a - x for an int32 x (|x| < 2**31 - 2**20)."""
  lo = a.lo - x                      # floor-normalised below: the borrow is an arithmetic shift
  return Wide(a.hi + (lo >> LO_BITS), lo & _LO_MASK)


def greater_equal(a: Wide, b: Wide) -> jax.Array:
  return (a.hi > b.hi) | ((a.hi == b.hi) & (a.lo >= b.lo))


def where(c, a: Wide, b: Wide) -> Wide:
  return Wide(jnp.where(c, a.hi, b.hi), jnp.where(c, a.lo, b.lo))


def maximum(a: Wide, b: Wide) -> Wide:
  return where(greater_equal(a, b), a, b)


def narrow(a: Wide, cap: int = CAP_US) -> jax.Array:
  """int32 min(a, cap) for a >= -2**30 (exact below cap, cap < 2**31)."""
  big = a.hi > (cap >> LO_BITS)      # hi * 2**20 alone could overflow int32 here
  hi = jnp.where(big, 0, a.hi)
  return jnp.where(big, cap, jnp.minimum((hi << LO_BITS) + a.lo, cap))


def gather(a: Wide, *idx) -> Wide:
  return Wide(a.hi[idx], a.lo[idx])


def cumsum(a: Wide, axis: int) -> Wide:
  """Saturating running sum of non-negative wide times along `axis`."""
  return jax.lax.associative_scan(add, a, axis=axis)


def segment_max(a: Wide, live, segment_ids, num_segments: int, floor: Wide) -> Wide:
  """Per-segment max of the live entries; `floor` for segments with none."""
  none = jnp.iinfo(jnp.int32).min
  hi = jax.ops.segment_max(jnp.where(live, a.hi, none), segment_ids, num_segments=num_segments)
  top = live & (a.hi == hi[segment_ids])
  lo = jax.ops.segment_max(jnp.where(top, a.lo, -1), segment_ids, num_segments=num_segments)
  return maximum(Wide(hi, jnp.maximum(lo, 0)), floor)


def sat_add(a, b, cap: int):
  """int32 min(a + b, cap) for 0 <= a, b <= cap (no intermediate overflow)."""
  return jnp.where(a > cap - b, cap, a + b)


def sat_segmented_cumsum(x, first, cap: int):
  """Saturating running sums of non-negative int32 x, restarting where `first` is set."""
  def combine(p, q):
    (v1, s1), (v2, s2) = p, q
    return jnp.where(s2, v2, sat_add(v1, v2, cap)), s1 | s2
  return jax.lax.associative_scan(combine, (x, first))[0]
