"""The simulated network: per-node links, latencies, compute speeds and stragglers.

Simulated time is kept in integer microseconds. A tick lasts `dt_us`, one local step of a
normal-speed node; a compute straggler with slowdown s takes round(s) ticks per step. All
per-message times (upload service, latency) are integer microseconds computed once here on
the host in float64, so the vectorised engine and the reference simulator see exactly the
same event times and can never disagree on which of two events came first.

Link model (PAPER.md 1.5 and 6.4): each node serves one FIFO send queue at its upload rate;
message k of a queue takes size / min(upload_src, download_dst) (the receiver's download rate
caps each flow when `download_cap` is on) and arrives `latency` later, where the latency of
link (s, d) is the mean of the two nodes' latencies (a uniform `latency_ms` gives exactly
that latency).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from divjax import bandwidth, timebase
from divjax.config import Config


# Inter-region bandwidths (Mbit/s, symmetric) of the DivShare artifact's real-world topology
# (`example_topology_60n_diablo.xml`, PAPER.md 4.4); 6 nodes per region for 60 nodes.
DIABLO_REGIONS = ("Cape Town", "Tokyo", "Mumbai", "Sydney", "Stockholm", "Milan", "Bahrain",
                  "Sao Paulo", "Ohio", "Oregon")
_DIABLO_UPPER = [  # row r lists regions r+1.. in the order above
    [26, 36, 21, 60, 67, 34, 27, 44, 36],
    [89, 112, 42, 48, 67, 39, 86, 109],
    [76, 81, 103, 336, 31, 53, 49],
    [32, 42, 60, 31, 57, 81],
    [405, 82, 48, 95, 68],
    [106, 49, 105, 70],
    [30, 49, 39],
    [92, 61],
    [105],
]
# Intra-region links are not in the file; PAPER.md 6.15 recommends treating them as fast.
DIABLO_INTRA_MBPS = 1000.0


def diablo_matrix() -> np.ndarray:
  r = len(DIABLO_REGIONS)
  mat = np.full((r, r), DIABLO_INTRA_MBPS)
  for i, row in enumerate(_DIABLO_UPPER):
    for k, v in enumerate(row):
      mat[i, i + 1 + k] = mat[i + 1 + k, i] = v
  return mat


class Network(NamedTuple):
  """Per-node network and compute description of one run (host numpy arrays)."""
  upload_bps: np.ndarray    # (N,) float64
  download_bps: np.ndarray  # (N,) float64
  latency_us: np.ndarray    # (N,) int64, one-way
  period: np.ndarray        # (N,) int64, ticks per local step (1 = normal speed)
  straggler: np.ndarray     # (N,) bool
  dt_us: int                # tick length
  download_cap: bool
  region: np.ndarray        # (N,) int64, region of each node (all 0 without a preset)
  link_bps: np.ndarray      # (R, R) float64, region-to-region bandwidth cap (inf: none)
  # time-varying rates (divjax.bandwidth): (N, blocks of H ticks) float64, or None (fixed)
  upload_bps_t: Optional[np.ndarray] = None
  download_bps_t: Optional[np.ndarray] = None
  block_ticks: int = 1      # ticks per block of the tables (H)


def choose_nodes(cfg: Config, fraction: float, nodes, stream: int) -> np.ndarray:
  """Sorted node ids: explicit `nodes`, or round(fraction * n) drawn from the data seed on
  the host stream `stream` (its own, so that choices do not depend on each other)."""
  if nodes is not None:
    return np.array(sorted(set(nodes)), dtype=np.int64)
  k = int(round(fraction * cfg.n_nodes))
  rng = np.random.default_rng([cfg.data_seed, stream])
  return np.sort(rng.permutation(cfg.n_nodes)[:k]).astype(np.int64)


def straggler_ids(cfg: Config) -> np.ndarray:
  """Deterministic straggler choice: explicit ids, or round(fraction * n) drawn from the seed."""
  s = cfg.network.stragglers
  return choose_nodes(cfg, s.fraction, s.nodes, 0x5747)


def build(cfg: Config) -> Network:
  n, net = cfg.n_nodes, cfg.network
  slow = np.zeros(n, bool)
  slow[straggler_ids(cfg)] = True
  comm = net.stragglers.kind in ("communication", "both")
  comp = net.stragglers.kind in ("compute", "both")
  factor = np.where(slow & comm, net.stragglers.slowdown, 1.0)
  period = np.where(slow & comp, max(1, int(round(net.stragglers.slowdown))), 1)
  if net.preset == "diablo":
    link = diablo_matrix() * 1e6
    region = (np.arange(n) * link.shape[0]) // n
  else:
    link, region = np.full((1, 1), np.inf), np.zeros(n, np.int64)
  up, down = net.upload_mbps * 1e6 / factor, net.download_mbps * 1e6 / factor
  timed = bandwidth.tables(cfg, up, down)
  return Network(
      region=region.astype(np.int64), link_bps=link,
      upload_bps=up,
      download_bps=down,
      latency_us=np.full(n, int(round(net.latency_ms * 1e3)), np.int64),
      period=period.astype(np.int64),
      straggler=slow,
      dt_us=cfg.dt_us,
      download_cap=net.download_cap,
      upload_bps_t=None if timed is None else timed[0],
      download_bps_t=None if timed is None else timed[1],
      block_ticks=cfg.local_steps,
  )


def service_us(bits: np.ndarray, bps: np.ndarray) -> np.ndarray:
  """Transmission time in whole microseconds (rounded up), shape (N, F) for bits (F,), bps (N,).

  An infinite rate takes no time; a time beyond timebase.WIDE_MAX_US (17.8 years, after the
  end of any run) is clamped to it, so that even a vanishing rate gives a finite int64."""
  us = np.ceil(bits[None, :].astype(np.float64) * 1e6 / bps[:, None])
  return np.minimum(us, timebase.WIDE_MAX_US).astype(np.int64)


def _timed_service_us(bits: np.ndarray, bps_t: np.ndarray) -> np.ndarray:
  """service_us for rates per node and block (N, B): (N, B, F)."""
  us = np.ceil(bits[None, None, :].astype(np.float64) * 1e6 / bps_t[:, :, None])
  return np.minimum(us, timebase.WIDE_MAX_US).astype(np.int64)


def block_of(net: Network, tick) -> int:
  """The rate table's block of a tick (the last block for ticks beyond the table)."""
  return min(int(tick) // net.block_ticks, net.upload_bps_t.shape[1] - 1)


def one_service_us(bits, bps: float) -> int:
  """service_us of one message (host int, for the reference simulator)."""
  return int(service_us(np.array([bits]), np.array([bps], np.float64))[0, 0])


def link_rate_bps(net: Network, src: int, dst: int, tick: int = 0) -> float:
  """The rate one message from src to dst, enqueued in tick `tick`, is served at (host, for
  the reference)."""
  up, down = net.upload_bps[src], net.download_bps[dst]
  if net.upload_bps_t is not None:
    b = block_of(net, tick)
    up, down = net.upload_bps_t[src, b], net.download_bps_t[dst, b]
  rate = min(up, net.link_bps[net.region[src], net.region[dst]])
  return min(rate, down) if net.download_cap else rate


class Links(NamedTuple):
  """The network as traced arrays (part of engine.Params): changing them does not recompile.

  Transmission times are whole microseconds computed on the host in float64 (service_us), per
  node and fragment size, so the engine and the reference see exactly the same times.
  """
  up: timebase.Wide         # (N, F) size / upload rate of the sender
  down: timebase.Wide       # (N, F) size / download rate of the receiver (0 without download_cap)
  link: timebase.Wide       # (R, R, F) size / region-to-region cap
  region: Any               # (N,) int32
  latency_us: Any           # (N,) int32, one-way
  period: Any               # (N,) int32, ticks per local step


def links(net: Network, bits: np.ndarray) -> Links:
  """The traced link tables of `net` for messages of `bits` (F,) bits."""
  import jax.numpy as jnp
  tb = timebase
  r = net.link_bps.shape[0]
  timed = net.upload_bps_t is not None   # then up and down are (N, B, F): per block of H ticks
  down = ((_timed_service_us(bits, net.download_bps_t) if timed else service_us(bits, net.download_bps))
          if net.download_cap else np.zeros((len(net.upload_bps), len(bits)), np.int64))
  return Links(
      up=tb.wide_from_host(_timed_service_us(bits, net.upload_bps_t) if timed else service_us(bits, net.upload_bps)),
      down=tb.wide_from_host(down),
      link=tb.wide_from_host(service_us(bits, net.link_bps.reshape(-1)).reshape(r, r, -1)),
      region=jnp.asarray(net.region, jnp.int32),
      latency_us=jnp.asarray(net.latency_us, jnp.int32),
      period=jnp.asarray(net.period, jnp.int32))


def service(lk: Links, src, dst, frag, block=None) -> timebase.Wide:
  """Transmission time in us of fragment `frag` from src to dst (works on traced arrays).

  The time is size / min(upload_src, [download_dst,] link(region_src, region_dst)), rounded
  up to whole microseconds, written as the max of the rounded-up parts (ceil is monotone).
  With time-varying rates (divjax.bandwidth) the tables have a block axis: `block` is the
  block of H ticks in which the message is enqueued (clipped to the table).
  """
  tb = timebase

  def rate_part(table, node):
    if table.hi.ndim == 3:
      return tb.gather(table, node, jnp.minimum(block, table.hi.shape[1] - 1), frag)
    return tb.gather(table, node, frag)

  return tb.maximum(tb.maximum(rate_part(lk.up, src), rate_part(lk.down, dst)),
                    tb.gather(lk.link, lk.region[src], lk.region[dst], frag))


def service_fn(net: Network, bits: np.ndarray):
  """(src, dst, frag) -> transmission time in us (a timebase.Wide), the links fixed."""
  lk = links(net, bits)
  return lambda src, dst, frag: service(lk, src, dst, frag)


def link_latency_us(net: Network, src, dst):
  """One-way latency of link src -> dst (works on numpy and jax integer arrays)."""
  lat = net.latency_us
  return (lat[src] + lat[dst]) // 2
