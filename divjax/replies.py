"""Replies to pings (AD-PSGD): push-pull snapshots and atomic pairwise exchanges.

A reply is the one thing not decided at send time: it enters the replier's FIFO queue at
the instant its ping arrives, behind whatever that queue holds then. So replies are made at
the end of each block of H ticks, for the pings that reached their receiver in it. A reply
record lives in its ping's table position (N, D, M): row = the pinger, who receives it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from divjax import churn, clock, fates, queue
from divjax import timebase as tb


class Replies(NamedTuple):
  """Reply records (N, D, M), to the ping in the same position, sent by the ping's receiver."""
  fate: jax.Array   # int32, fates.NONE..EXPIRED
  tick: jax.Array   # int32, tick at which the fate happens
  slot: jax.Array   # int32, ring slot of the replier's snapshot
  done: jax.Array   # int32, upload completion, us after the ping's send instant
  made: jax.Array   # int32, tick at which the replier's snapshot was taken


def empty(n: int, d: int, m: int) -> Replies:
  return Replies(*(jnp.zeros((n, d, m), jnp.int32) for _ in Replies._fields))  # distinct buffers (donated)


def make(replies: Replies, msg_dst, msg_fate, msg_done, slot_tick, t, busy: tb.Wide, *,
         lat_us, round_ticks, service, depth: int, dt_us: int, block_us: int, age_cap: int,
         pairwise: bool, availability=None, rounds=None):
  """Replies to the pings that reached their receiver during the block of H ticks ending at t.

  A reply is enqueued at its ping's arrival instant in the replier's FIFO queue, so the
  replies of one node are served in arrival order, all before the node's own next pings.
  In a push-pull exchange only a replier that has finished a round answers (with its
  latest snapshot); in a pairwise exchange every ping is answered.

  Args:
    msg_*: the ping tables (N, D, M); slot_tick (N, D); busy (N,) queue idle times, us after
    the end of tick t. Keyword arguments: the run's static structure and link parameters.
    availability, rounds: churn (divjax.churn) and every node's current round: a lost ping
    gets no reply, a push-pull reply sends the replier's last online round's snapshot, and a
    reply is lost if its replier leaves before uploading it or its pinger is offline when it
    arrives.

  Returns:
    (replies, busy, number of replies made).
  """
  n, d, m = msg_dst.shape
  rows = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None, None], (n, d, m))
  since = clock.since_send_us(slot_tick, t, dt_us, age_cap)
  j = msg_dst                                                                               # replier
  lat = (lat_us[rows] + lat_us[j]) // 2
  arrive = msg_done + lat - since                                          # us after end of tick t
  round_us = round_ticks * dt_us
  in_block = (msg_fate != fates.NONE) & (msg_fate != fates.LOST) & (arrive > -block_us) & (arrive <= 0)
  in_block &= (msg_done + lat) <= (depth * round_us)[:, None, None]      # arrived before it expired
  r_j = round_ticks[j]
  finished = clock.rounds_finished_before(t, arrive, r_j, dt_us)
  latest = finished - 1
  if availability is not None:  # the last round it was there to take a snapshot in
    latest = churn.last_online_in(availability, j, latest)
  # a snapshot whose ring slot was reused (round latest + D has ended: possible after churn's
  # offline rounds) is not sent
  live = in_block if pairwise else in_block & (latest >= 0) & (finished <= latest + depth)
  svc = tb.where(live, service(j, rows, jnp.zeros_like(j)), tb.wide(jnp.zeros_like(j)))
  enqueue = jnp.where(live, arrive, -block_us)

  # ties as the reference: by the ping's upload completion, then by pinger
  flat = lambda a: a.reshape(-1)
  done, busy = queue.serve(flat(j), flat(enqueue), jax.tree.map(flat, svc), busy, flat(live),
                           ties=(flat(rows), flat(msg_done - since)))
  done = tb.narrow(done).reshape(n, d, m)              # us after end of tick t, saturating (too late)

  # arrival at the pinger; any arrival past the ring horizon expires alike (keeps ticks int32)
  back = jnp.minimum(done + lat, (depth * round_us + dt_us)[rows])
  consume = clock.consume_tick(t, back, round_ticks[rows], dt_us)
  # the record lives in the ping's table slot; a push-pull reply's payload also in the replier's ring
  expire = jnp.broadcast_to((slot_tick + depth * round_ticks[:, None])[..., None], live.shape)
  if not pairwise:
    expire = jnp.minimum((latest + depth + 1) * r_j - 1, expire)
  fate = jnp.where(consume > expire, fates.EXPIRED, fates.DELIVERED)
  tick = jnp.where(fate == fates.EXPIRED, expire, consume)
  if availability is not None:
    # not uploaded when the replier leaves (at the start of its next offline round)
    leave = churn.next_offline(availability, j, rounds[j])
    leave_us = (jnp.minimum(leave * r_j, t + 1 + (depth + 2) * r_j) - (t + 1)) * dt_us
    # (when its payload expires at that same round end or before, it expired first)
    left = (done > leave_us) & (t + leave_us // dt_us < expire)
    # or reaching a pinger that is offline, before its payload expires
    back_tick = clock.arrival_tick(t, back, dt_us)
    absent = ~left & ~churn.online_in(availability, rows, back_tick // round_ticks[rows]) & (back_tick <= expire)
    fate = jnp.where(left | absent, fates.LOST, fate)
    tick = jnp.where(left, t + jnp.maximum(leave_us, 0) // dt_us, jnp.where(absent, back_tick, tick))
  keep = lambda new, old: jnp.where(live, new, old)
  replies = Replies(
      fate=keep(fate, replies.fate),
      tick=keep(tick, replies.tick),
      slot=keep(latest % depth, replies.slot),
      done=keep(jnp.minimum(done + since, tb.CAP_US), replies.done),
      made=keep((latest + 1) * r_j - 1, replies.made))
  return replies, busy, jnp.sum(live, dtype=jnp.int32)


def newest_only(msg_dst, msg_fate, msg_tick, msg_done, replies: Replies, slot_tick, t, *,
                dt_us: int, age_cap: int, pairwise: bool):
  """Marks pings and replies replaced by a later arrival from the same sender at the same receiver.

  Returns:
    (msg_fate, replies, due pings, due replies): the due masks of what is still to be used.
  """
  n, d, m = msg_dst.shape
  rows = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None, None], (n, d, m))
  due_ping = (msg_fate == fates.DELIVERED) & (msg_tick == t)
  due_pong = (replies.fate == fates.DELIVERED) & (replies.tick == t)
  since = clock.since_send_us(slot_tick, t, dt_us, age_cap)
  # the replies of pairwise exchanges are not averaged at round ends, so never replaced
  pong_recv = jnp.full_like(rows, n) if pairwise else jnp.where(due_pong, rows, n)
  recv = jnp.concatenate([jnp.where(due_ping, msg_dst, n).reshape(-1), pong_recv.reshape(-1)])
  sender = jnp.concatenate([rows.reshape(-1), msg_dst.reshape(-1)])
  done = jnp.concatenate([(msg_done - since).reshape(-1), (replies.done - since).reshape(-1)])
  replaced = fates.newest_per_sender(recv, sender, done, n)
  rep_ping, rep_pong = replaced[: n * d * m].reshape(n, d, m), replaced[n * d * m:].reshape(n, d, m)
  msg_fate = jnp.where(rep_ping, fates.SUPERSEDED, msg_fate)
  replies = replies._replace(fate=jnp.where(rep_pong, fates.SUPERSEDED, replies.fate))
  return msg_fate, replies, due_ping & ~rep_ping, due_pong & ~rep_pong


def exchange(params, msg_dst, replies: Replies, slot_tick, t, due_pong, *, lat_us, dt_us: int,
             age_cap: int, exchanged=None, rounds=None, key=None):
  """Atomic pairwise averages (original AD-PSGD) of the exchanges completed now.

  x_i, x_j <- (x_i + x_j) / 2 for each due reply, one exchange after the other, by pinger,
  then reply arrival (as the reference processes them): two rows updated in place, O(P) each.
  With `exchanged` (AsyncAlgorithm.exchanged: Byzantine nodes) each side averages its own
  model with what the other gives, from the models as they are at that exchange.
  """
  n, d, m = msg_dst.shape
  rows = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None, None], (n, d, m))
  since = clock.since_send_us(slot_tick, t, dt_us, age_cap)
  lat = (lat_us[rows] + lat_us[msg_dst]) // 2
  flat = lambda a: a.reshape(-1)
  done = flat(replies.done - since)
  order = jnp.lexsort((flat(msg_dst), done, done + flat(lat), flat(rows), ~flat(due_pong)))  # due first
  pinger, replier = flat(rows)[order], flat(msg_dst)[order]

  def one(k, p):
    a, b = pinger[k], replier[k]
    if exchanged is None:
      mean = (p[a] + p[b]) / 2.0
      return p.at[a].set(mean).at[b].set(mean)
    give_a, give_b = exchanged(p, a, b, rounds[a], key), exchanged(p, b, a, rounds[a], key)
    return p.at[a].set((p[a] + give_b) / 2.0).at[b].set((p[b] + give_a) / 2.0)

  return jax.lax.fori_loop(0, jnp.sum(due_pong), one, params)
