"""The round clock: when nodes step, when rounds end, when an arrival is consumed.

A tick lasts dt microseconds (one local step of a normal-speed node). Node i takes a local
step in every tick t with (t + 1) % period_i == 0 and ends a round after every H-th step, so
its round r ends at tick (r + 1) * R_i - 1 with R_i = H * period_i: every schedule is known
in advance, which is what lets a message's whole fate be computed when it is sent.
All functions work on numpy and jax integer arrays alike.
"""

from __future__ import annotations

import jax.numpy as jnp


def steps_now(t, period):
  """(N,) bool: the nodes whose local step completes in tick t."""
  return (t + 1) % period == 0


def round_ends(t, period, h: int):
  """(N,) bool: the nodes whose round slot ends in tick t: their H-th step slot of the round
  (a node offline in that round (divjax.churn) took no steps, but its slot ends all the same)."""
  return steps_now(t, period) & (((t + 1) // period) % h == 0)


def arrival_tick(t, arrival_us, dt_us: int):
  """The tick during which something arrives `arrival_us` after the end of tick t (an arrival
  exactly at a tick's end belongs to that tick)."""
  return t + -(-arrival_us // dt_us)


def consume_tick(t, arrival_us, round_ticks_dst, dt_us: int):
  """Tick of the receiver's first round end at or after an arrival.

  `arrival_us` is measured from the end of tick t; the message is in the receiver's buffer
  at the end of the tick during which it arrives, and is averaged at the first round end
  (a tick (k + 1) * R - 1) from then on.
  """
  u = arrival_tick(t, arrival_us, dt_us)
  return (-(-(u + 1) // round_ticks_dst)) * round_ticks_dst - 1


def since_send_us(slot_tick, t, dt_us: int, age_cap: int):
  """(N, D, 1) microseconds from each table slot's send instant to the end of tick t.

  Ages are capped at `age_cap` ticks (timebase.CAP_US // dt): anything older lies past every
  message horizon (engine.check_horizon), and the cap keeps the product in int32.
  """
  return (jnp.minimum(t - slot_tick, age_cap) * dt_us)[..., None]


def rounds_finished_before(t, arrive_us, round_ticks, dt_us: int):
  """Rounds a node finished strictly before an instant `arrive_us` (<= 0) after the end of tick t.

  The instant must lie within one round before the end of tick t (replies are made for the
  arrivals of the last block of H ticks, and a round is at least H ticks long).
  """
  base = (t + 1) // round_ticks
  return jnp.where(base >= 1, base - 1 + ((base * round_ticks - t - 1) * dt_us < arrive_us), 0)
