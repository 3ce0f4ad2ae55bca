"""Churn: nodes that go offline and come back, on a schedule drawn before the run.

A node's rounds are slots of simulated time (round r of node i is ticks [r R_i, (r+1) R_i)).
Node i is *online in round r* unless it is offline at the slot's start, by
  * a seeded exponential on/off process per node (mean online and offline durations, in
    simulated seconds; each node starts online with probability mean_on / (mean_on + mean_off),
    the process's stationary share), or
  * a trace: a CSV file of offline intervals, `node,start_s,end_s`, one row per interval.
An offline node does not train, aggregate, send or receive. Messages that reach it while it is
offline, and messages in its send queue not uploaded when it leaves (the end of its last
online round), end as LOST. A flushing algorithm flushes its queue at the round end where the
node leaves, as usual, and the new round's messages, which cannot be uploaded, are lost.
AD-PSGD's replies (divjax.replies): a replier answers with the snapshot of its last online
round, unless that round's ring slot is gone (round + ring_depth has ended); a reply is lost
like any message when its replier leaves before uploading it or its pinger is offline.

Because the schedule is known in advance, a message's fate is still decided when it is sent
(divjax.fates): the engine reads two (N, rounds) tables, which round slots are online and the
next offline round after each.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from divjax.config import ConfigError

NEVER = 1 << 20   # "no offline round ahead", in rounds: far beyond any ring depth


class Availability(NamedTuple):
  online: jnp.ndarray      # (N, R) bool: online in round r (rounds beyond R: online)
  next_off: jnp.ndarray    # (N, R) int32: the first offline round > r (NEVER if none)
  last_on: jnp.ndarray     # (N, R) int32: the last online round <= r (-1 if none): whose snapshot a reply sends


def enabled(cfg) -> bool:
  c = cfg.churn
  return c.trace is not None or c.mean_online_s is not None or crashes(cfg)


def crashes(cfg) -> bool:
  """Byzantine nodes that crash (attack `crash`): offline from byzantine.crash_at_s on."""
  from divjax import byzantine  # noqa: PLC0415  (it imports the algorithms)
  return cfg.byzantine.attack == "crash" and byzantine.ids(cfg).size > 0


def read_trace(path: str, n_nodes: int) -> list[list[tuple[float, float]]]:
  """Offline intervals per node from `node,start_s,end_s` rows; refuses bad ones, naming churn.trace."""
  where = f"churn.trace: {path}"
  try:
    rows = list(csv.reader(Path(path).read_text().splitlines()))
  except OSError as e:
    raise ConfigError(f"{where}: cannot be read ({e.strerror})") from None
  if rows and rows[0] and not _is_number(rows[0][0]):
    rows = rows[1:]   # a header
  out: list[list[tuple[float, float]]] = [[] for _ in range(n_nodes)]
  for k, row in enumerate(rows, 1):
    if not row:
      continue
    try:
      node, start, end = int(row[0]), float(row[1]), float(row[2])
    except (ValueError, IndexError):
      raise ConfigError(f"{where}: row {k} must be node,start_s,end_s (got {','.join(row)})") from None
    if not 0 <= node < n_nodes:
      raise ConfigError(f"{where}: row {k}: node must be in 0..{n_nodes - 1} (got {node})")
    if not (np.isfinite(start) and np.isfinite(end)) or start < 0 or end <= start:
      raise ConfigError(f"{where}: row {k}: times must be finite with 0 <= start_s < end_s (got {start}, {end})")
    if out[node] and start < out[node][-1][1]:
      raise ConfigError(f"{where}: row {k}: node {node}'s intervals must be sorted and disjoint "
                        f"(starts at {start} before the previous ends at {out[node][-1][1]})")
    out[node].append((start, end))
  return out


def _is_number(s: str) -> bool:
  try:
    float(s)
    return True
  except ValueError:
    return False


def _exponential(rng: np.random.Generator, mean_on: float, mean_off: float, horizon_s: float):
  """Offline intervals of one node's on/off process up to the horizon."""
  t, out = 0.0, []
  online = rng.random() < mean_on / (mean_on + mean_off)
  while t < horizon_s:
    d = rng.exponential(mean_on if online else mean_off)
    if not online:
      out.append((t, t + d))
    t += d
    online = not online
  return out


def offline_intervals(cfg, horizon_s: float) -> list[list[tuple[float, float]]]:
  c = cfg.churn
  if c.trace is not None:
    out = read_trace(c.trace, cfg.n_nodes)
  elif c.mean_online_s is not None:
    # each node its own stream, so a longer horizon extends the same schedule (resume)
    out = [_exponential(np.random.default_rng([cfg.data_seed, 0xC4, i]), c.mean_online_s, c.mean_offline_s,
                        horizon_s) for i in range(cfg.n_nodes)]
  else:
    out = [[] for _ in range(cfg.n_nodes)]
  if crashes(cfg):
    from divjax import byzantine  # noqa: PLC0415
    for i in byzantine.ids(cfg):
      out[i] = out[i] + [(cfg.byzantine.crash_at_s, np.inf)]
  return out


def tables(cfg, round_ticks: np.ndarray, dt_us: int, n_ticks: int) -> tuple[np.ndarray, np.ndarray]:
  """(online (N, R) bool, next_off (N, R) int32) for the rounds that start within the run
  (last_online gives the third table)."""
  n_rounds = int(n_ticks // int(round_ticks.min())) + 2
  intervals = offline_intervals(cfg, n_rounds * int(round_ticks.max()) * dt_us / 1e6)
  online = np.ones((cfg.n_nodes, n_rounds), bool)
  for i, iv in enumerate(intervals):
    starts = np.arange(n_rounds) * int(round_ticks[i]) * dt_us / 1e6   # each round slot's start
    for a, b in iv:
      online[i] &= ~((starts >= a) & (starts < b))
  next_off = np.full((cfg.n_nodes, n_rounds), NEVER, np.int64)
  following = np.full(cfg.n_nodes, NEVER, np.int64)
  for r in range(n_rounds - 1, -1, -1):
    next_off[:, r] = following
    following = np.where(~online[:, r], r, following)
  return online, next_off.astype(np.int32)


def last_online(online: np.ndarray) -> np.ndarray:
  """(N, R) int32: the last online round <= r of each node, -1 if none."""
  r = np.where(online, np.arange(online.shape[1])[None, :], -1)
  return np.maximum.accumulate(r, axis=1).astype(np.int32)


def make(cfg, round_ticks: np.ndarray, dt_us: int, n_ticks: int) -> Optional[Availability]:
  if not enabled(cfg):
    return None
  online, next_off = tables(cfg, round_ticks, dt_us, n_ticks)
  return Availability(jnp.asarray(online), jnp.asarray(next_off), jnp.asarray(last_online(online)))


def online_in(av: Availability, nodes, rounds):
  """Whether each node is online in round `rounds` (rounds past the table: online)."""
  r = jnp.minimum(rounds, av.online.shape[1] - 1)
  return jnp.where(rounds < av.online.shape[1], av.online[nodes, r], True)


def next_offline(av: Availability, nodes, rounds):
  r = jnp.minimum(rounds, av.online.shape[1] - 1)
  return jnp.where(rounds < av.online.shape[1], av.next_off[nodes, r], NEVER)


def last_online_in(av: Availability, nodes, rounds):
  """The last online round <= `rounds` (-1: none); rounds past the table are online."""
  r = jnp.clip(rounds, 0, av.online.shape[1] - 1)
  return jnp.where(rounds < av.online.shape[1], jnp.where(rounds < 0, -1, av.last_on[nodes, r]), rounds)


class Intervals(NamedTuple):
  """Offline intervals as integer microseconds, for the synchronous engine (divjax.sync): node i
  is offline at time t when start[i, m] <= t < end[i, m] for some m; padding is empty."""
  start: jnp.ndarray       # (N, M) int32
  end: jnp.ndarray         # (N, M) int32


def intervals_us(cfg, horizon_s: float, limit_us: int) -> Optional[Intervals]:
  """The schedule's offline intervals up to the horizon, in microseconds (ceil, so that t is
  inside exactly when t / 1e6 is), saturating at limit_us; None without churn. M is fixed by
  the config's structure, not by the draw (points of a sweep stack their schedules)."""
  if not enabled(cfg):
    return None
  iv = offline_intervals(cfg, horizon_s)
  m = _max_intervals(cfg, horizon_s)
  if max(len(x) for x in iv) > m:   # a draw beyond 2x its mean + 20: never seen in practice
    raise ConfigError(f"churn.mean_online_s: node schedules with more than {m} offline intervals in "
                      f"{horizon_s:g} s; lengthen the mean durations")
  start, end = np.full((cfg.n_nodes, m), limit_us, np.int64), np.full((cfg.n_nodes, m), limit_us, np.int64)
  for i, rows in enumerate(iv):
    for k, (a, b) in enumerate(rows):
      start[i, k] = min(limit_us, np.ceil(a * 1e6))
      end[i, k] = min(limit_us, np.ceil(b * 1e6)) if np.isfinite(b) else limit_us
  return Intervals(jnp.asarray(start, jnp.int32), jnp.asarray(end, jnp.int32))


def _max_intervals(cfg, horizon_s: float) -> int:
  c, m = cfg.churn, 1 if crashes(cfg) else 0
  if c.trace is not None:
    m += max(len(x) for x in read_trace(c.trace, cfg.n_nodes))
  elif c.mean_online_s is not None:
    m += int(np.ceil(2 * horizon_s / (c.mean_online_s + c.mean_offline_s))) + 20
  return max(1, m)


def online_at(iv: Optional[Intervals], t):
  """(N,) bool: which nodes are online at time t (microseconds); everyone without churn."""
  if iv is None:
    return None
  return ~jnp.any((t >= iv.start) & (t < iv.end), axis=1)


class Reference:
  """The same schedule for the reference simulator, node by node."""

  def __init__(self, cfg, round_ticks: np.ndarray, dt_us: int, n_ticks: int):
    self.on = None
    if enabled(cfg):
      self.on, _ = tables(cfg, round_ticks, dt_us, n_ticks)

  def online(self, i: int, r: int) -> bool:
    return self.on is None or r >= self.on.shape[1] or bool(self.on[i, r])
