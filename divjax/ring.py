"""The delay ring and routing: payloads are written once and gathered where they are due.

A node's post-training snapshot of round r sits in slot r % D of a (D, N, F, L) ring until
its round r + D. Messages never copy payloads: at aggregation the receiver gathers
ring[slot, src, frag] for every record due now and sums with jax.ops.segment_sum.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from divjax import inbox as inbox_lib

ROUTE_FLOATS = 1 << 22  # a routing step gathers at most about this many payload floats


def write(ring, slot, x, ends):
  """Writes snapshot x (N, F, L) into ring slot `slot` (N,) of the nodes that `ends`."""
  # the nodes not writing are pointed past the ring and dropped: no read of the old slot.
  # Not rows.put: the ring is replicated over devices (engine.node_axes), and written vmapped
  # over its node axis XLA split it instead and all-gathered the whole ring at each chunk end.
  nodes = jnp.arange(x.shape[0])
  return ring.at[jnp.where(ends, slot, ring.shape[0]), nodes].set(x.astype(ring.dtype), mode="drop")


def columns_per_step(m: int, n: int, width: int) -> int:
  """Message columns routed together: about ROUTE_FLOATS payload floats per step."""
  return int(max(1, min(m, ROUTE_FLOATS // max(1, n * width))))


def route(ring, due, src, slot, dst, frag, weight=None, per_coordinate: bool = False, received=None):
  """Sums due payloads ring[slot, src, frag] into receivers dst: gather + segment_sum.

  The records are (N, D, M) arrays. They are routed one table slot at a time, split further
  so that a step gathers at most about ROUTE_FLOATS floats, and a step with nothing due is
  skipped: at a round end almost everything due comes from the newest slot.

  Args:
    weight: optional (N, D, M) float32 weight of each copy (default 1).
    per_coordinate: payloads may hold only some coordinates (NaN elsewhere: sparsified,
      divjax.compression); counts are then per coordinate.
    received: optional (payloads (C, N, L), src, dst, frag) -> payloads: what each receiver
      gets instead (a per-recipient payload, Inbox.received).

  Returns:
    sums (N, F, L) and counts (N, F), or (N, F, L) per coordinate (summed weights), of the
    payloads due now.
  """
  d, n, f, width = ring.shape
  m = due.shape[2]
  cols_per_step = columns_per_step(m, n, width)
  steps_per_slot = -(-m // cols_per_step)
  pad = steps_per_slot * cols_per_step - m

  def cols(a):  # (N, D, M) -> (D * steps_per_slot, C, N); padding columns are never due
    a = jnp.pad(a.transpose(1, 2, 0), ((0, 0), (0, pad), (0, 0)))
    return a.reshape(d * steps_per_slot, cols_per_step, n)

  def add(acc, slot_c, src_c, dst_c, frag_c, due_c, w_c):
    got = ring[slot_c, src_c, frag_c].astype(jnp.float32)  # summed in float32 (ring_dtype)
    if received is not None:
      got = received(got, src_c, dst_c, frag_c)
    if w_c is None:
      payload = jnp.where(due_c[..., None], got, 0.0)                                       # (C, N, L)
      c = due_c.astype(jnp.float32)
    else:
      c = jnp.where(due_c, w_c, 0.0)
      payload = c[..., None] * got
    if per_coordinate:  # a copy counts where it holds a value
      here = ~jnp.isnan(got)
      payload = jnp.where(here, payload, 0.0)
      c = jnp.where(here, c[..., None], 0.0)                                               # (C, N, L)
    seg = (dst_c * f + frag_c).reshape(-1)
    s = acc[0] + jax.ops.segment_sum(payload.reshape(-1, width), seg, num_segments=n * f)
    c = acc[1] + jax.ops.segment_sum(c.reshape((-1,) + c.shape[2:]), seg, num_segments=n * f)
    return s, c

  def body(acc, col):
    slot_c, src_c, dst_c, frag_c, due_c, w_c = col
    acc = jax.lax.cond(jnp.any(due_c), lambda a: add(a, slot_c, src_c, dst_c, frag_c, due_c, w_c),
                       lambda a: a, acc)
    return acc, None

  acc0 = (jnp.zeros((n * f, width), jnp.float32),
          jnp.zeros((n * f, width) if per_coordinate else (n * f,), jnp.float32))
  xs = (cols(slot), cols(src), cols(dst), cols(frag), cols(due),
        None if weight is None else cols(weight))
  (sums, counts), _ = jax.lax.scan(body, acc0, xs)
  return sums.reshape(n, f, width), counts.reshape((n, f) + counts.shape[1:])


class Copies(NamedTuple):
  """Message records (all (N, D, M)) whose payloads ring[slot, src, frag] reach dst now."""
  due: jax.Array    # bool: consumed at this round end (newest copy per sender and fragment)
  src: jax.Array
  slot: jax.Array
  dst: jax.Array
  frag: jax.Array
  age: jax.Array    # ticks since the payload's snapshot was taken


class Inbox(NamedTuple):
  """What the receivers ending a round now have received: a view, routed on demand.

  `sum()` gives the uniform per-coordinate sums and counts an averaging rule needs; a rule
  that weighs copies passes weight(copies) -> (N, D, M) float32; a rule that needs each copy
  (stored neighbour copies, robust aggregation) reads `copies` and `ring` itself.
  """
  ring: jax.Array
  copies: tuple     # of Copies: the round's pushes, then (push-pull) the replies
  ends: Optional[jax.Array] = None   # (N,) bool, the nodes ending a round now
  slot: Optional[jax.Array] = None   # (N,) int32, the ring slot their new snapshot goes to
  # (payloads, src, dst, frag) -> what each receiver gets (AsyncAlgorithm.received), or None
  received: Optional[callable] = None

  def gather(self, k: int):
    """Every due copy: values (N, F, K, L) float32 and valid (N, F, K) (divjax.inbox)."""
    return inbox_lib.gather(self.ring, self.copies, k, self.received)

  def sum(self, weight: Optional[callable] = None, per_coordinate: bool = False):
    sums = counts = None
    for c in self.copies:
      s, k = route(self.ring, c.due, c.src, c.slot, c.dst, c.frag,
                   None if weight is None else weight(c), per_coordinate, self.received)
      sums, counts = (s, k) if sums is None else (sums + s, counts + k)
    return sums, counts
