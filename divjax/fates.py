"""What becomes of a message, decided when it is sent.

Schedules and link times are known in advance, so a message's fate follows from its upload
completion (queue.enqueue) and its link latency:
  flushed    if the queue is flushed and the upload is not done by the sender's next round end,
  expired    if the receiver consumes it only after the sender's round r + D ends (the ring
             slot holding its payload is reused then),
  delivered  otherwise, at the receiver's first round end at or after the arrival, and
  superseded if a newer copy of the same (sender, fragment) is consumed by the same
             aggregation at the same receiver (counted as delivered, payload unused),
  overflow   if the algorithm's inbox holds K copies per fragment and more are due at one
             aggregation (divjax.inbox; decided at that round end; counted as delivered,
             payload unused),
  lost       with churn (divjax.churn): not uploaded when its sender went offline, or arriving
             while its receiver is offline.
Every record ends as exactly one of these (or is still in flight), so the counts add up.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from divjax import clock

NONE, DELIVERED, SUPERSEDED, FLUSHED, EXPIRED, OVERFLOW, LOST = 0, 1, 2, 3, 4, 5, 6
FATES = ("none", "delivered", "superseded", "flushed", "expired", "overflow", "lost")


def at_send(t, completion, arrival, round_ticks, round_ticks_dst, depth: int, dt_us: int, flush: bool,
            leave_us=None, receiver_online=None):
  """Fates and fate ticks (N, M) of the messages sent at the end of tick t.

  Args:
    completion, arrival: (N, M) us after the end of tick t (saturating int32).
    round_ticks: (N,) the senders' round lengths; round_ticks_dst: (N, M) the receivers'.
    leave_us: churn only: (N,) when each sender goes offline, us after the end of tick t.
    receiver_online: churn only: u (N, M) -> whether the receiver is online in tick u.
  """
  round_us = round_ticks * dt_us
  expire = t + depth * round_ticks                                                         # (N,)
  # arrivals past the expiry are all alike: capping keeps the tick arithmetic in int32
  arrival = jnp.minimum(arrival, (depth * round_us + dt_us)[:, None])
  consume = clock.consume_tick(t, arrival, round_ticks_dst, dt_us)
  flushed = (completion > round_us[:, None]) if flush else jnp.zeros_like(completion, bool)
  lost = jnp.zeros_like(flushed)
  lost_tick = consume
  if leave_us is not None:
    # not uploaded when the sender leaves; a flush at that same instant comes first, and an
    # expiry (the round end r + D) too
    left = ((completion > leave_us[:, None]) & (leave_us < depth * round_us)[:, None]
            & ((leave_us < round_us)[:, None] if flush else True))
    arrive = clock.arrival_tick(t, arrival, dt_us)
    # it reaches an offline receiver before its payload expires
    absent = ~flushed & ~left & ~receiver_online(arrive) & (arrive <= expire[:, None])
    flushed, lost = flushed & ~left, left | absent
    lost_tick = jnp.where(left, t + leave_us[:, None] // dt_us, arrive)
  expired = ~flushed & ~lost & (consume > expire[:, None])
  fate = jnp.where(flushed, FLUSHED, jnp.where(lost, LOST, jnp.where(expired, EXPIRED, DELIVERED)))
  tick = jnp.where(flushed, (t + round_ticks)[:, None],
                   jnp.where(lost, lost_tick, jnp.where(expired, expire[:, None], consume)))
  return fate, tick


def supersede(old_key, old_tick, pending, new_key, new_tick, new_live):
  """(N, D, M) bool: pending records that a new message replaces.

  A record is replaced when a new one of the same sender row has the same key
  (receiver * F + fragment) and is consumed at the same tick. The (N, D, M, M) comparison is
  reduced over the new records as it is computed (XLA fuses the compare into the reduction;
  nothing of that size is stored): one pass, where a scan over the M new records made M
  passes over the table (50x slower at N = 4,096, M = 24).

  Args:
    old_key, old_tick, pending: (N, D, M) the table; new_key, new_tick, new_live: (N, M).
  """
  new = lambda a: a[:, None, None, :]                                                       # (N, 1, 1, M)
  same = (old_key[..., None] == new(new_key)) & (old_tick[..., None] == new(new_tick)) & new(new_live)
  return jnp.any(same, axis=-1) & pending


def newest_per_sender(recv, sender, done, n: int):
  """(K,) bool: copies replaced by a later arrival from the same sender at the same receiver.

  A node's messages share its FIFO queue, so the later arrival is the later upload
  completion `done`. Entries with recv == n take no part.
  """
  order = jnp.lexsort((done, sender, recv))
  r_s, s_s = recv[order], sender[order]
  replaced_sorted = (r_s[:-1] < n) & (r_s[1:] == r_s[:-1]) & (s_s[1:] == s_s[:-1])
  return jnp.zeros_like(recv, bool).at[order[:-1]].set(replaced_sorted)


def retire(retired, old_fates, ends):
  """Adds the fates (N, K) of the records in the reused table slots of nodes that `ends`."""
  return retired + jnp.sum(jax.nn.one_hot(old_fates, len(FATES), dtype=jnp.int32) * ends[:, None, None],
                           axis=(0, 1))


def counts(fate, tick, retired, sent, now) -> dict:
  """Cumulative message counts (int32 scalars; jittable, so they can stay on the device) from
  live records (any shape, fates and fate ticks) and the fates of retired records."""
  happened = tick < now
  by = [retired[i] + jnp.sum((fate == i) & happened, dtype=jnp.int32) for i in range(len(FATES))]
  return {
      "msgs_sent": jnp.asarray(sent, jnp.int32),
      "msgs_delivered": by[DELIVERED] + by[SUPERSEDED] + by[OVERFLOW],
      "msgs_superseded": by[SUPERSEDED],
      "msgs_overflow": by[OVERFLOW],
      "msgs_flushed": by[FLUSHED],
      "msgs_expired": by[EXPIRED],
      "msgs_lost": by[LOST],
      "msgs_in_flight": jnp.sum((fate != NONE) & ~happened, dtype=jnp.int32),
  }


COUNT_KEYS = ("msgs_sent", "msgs_delivered", "msgs_superseded", "msgs_overflow", "msgs_flushed",
              "msgs_expired", "msgs_lost", "msgs_in_flight")


def to_host(counts: dict) -> dict:
  """Device counts as host ints, in COUNT_KEYS order (a dict out of jit comes back key-sorted)."""
  host = jax.device_get(counts)
  return {k: int(host[k]) for k in COUNT_KEYS}
