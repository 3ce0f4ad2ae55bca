"""Time-varying link rates: per-node upload and download rates that change over simulated time.

Rates are piecewise constant over blocks of H ticks (one round of a normal-speed node, the
engine's unit of work), from
  * a trace: a CSV file with a header naming its columns, `node`, `upload_mbps`, and
    optionally `download_mbps` and `time_s`. Rows with `time_s` set a node's rates from that
    time on (sorted per node); rows without it set a node's rates for the whole run, the form
    of FedScale's per-client capacity traces. Nodes absent from the trace keep the config's
    rates (stragglers included), and so does any node before its first timed row.
  * a seeded random walk: every `interval_s`, each node's log-rate (upload and download
    apart) takes a Gaussian step of standard deviation `random_walk`, starting from the
    config's rates and kept within a factor `max_factor` of them.
A message is served at the rates in effect in the block in which it enters its sender's
queue (its round's end, or a reply's request); the engine and the reference read the same
(N, blocks) tables (network.Network.upload_bps_t), so their integer service times agree.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np

from divjax.config import ConfigError


def enabled(cfg) -> bool:
  b = cfg.network.bandwidth
  return b.trace is not None or b.random_walk is not None


def n_blocks(cfg) -> int:
  return int(cfg.n_ticks // cfg.local_steps) + 2


def read_trace(path: str, n_nodes: int) -> list[dict]:
  """The trace's rows as dicts (node, time_s or None, upload_bps, download_bps or None),
  checked; a bad row is refused naming network.bandwidth.trace."""
  where = f"network.bandwidth.trace: {path}"
  try:
    text = Path(path).read_text()
  except OSError as e:
    raise ConfigError(f"{where}: cannot be read ({e.strerror})") from None
  reader = csv.DictReader(text.splitlines())
  cols = set(reader.fieldnames or [])
  if not {"node", "upload_mbps"} <= cols or not cols <= {"node", "upload_mbps", "download_mbps", "time_s"}:
    raise ConfigError(f"{where}: the header must name node, upload_mbps and optionally download_mbps, "
                      f"time_s (got {','.join(reader.fieldnames or [])})")
  rows, last = [], {}
  for k, row in enumerate(reader, 2):
    try:
      node = int(row["node"])
      up = float(row["upload_mbps"])
      down = float(row["download_mbps"]) if row.get("download_mbps") not in (None, "") else None
      time = float(row["time_s"]) if row.get("time_s") not in (None, "") else None
    except ValueError:
      raise ConfigError(f"{where}: line {k}: not a number ({','.join(str(v) for v in row.values())})") from None
    if not 0 <= node < n_nodes:
      raise ConfigError(f"{where}: line {k}: node must be in 0..{n_nodes - 1} (got {node})")
    for name, v in (("upload_mbps", up), ("download_mbps", down)):
      if v is not None and not (np.isfinite(v) and v > 0):
        raise ConfigError(f"{where}: line {k}: {name} must be a positive number (got {v})")
    if time is not None and not (np.isfinite(time) and time >= 0):
      raise ConfigError(f"{where}: line {k}: time_s must be >= 0 (got {time})")
    if time is not None and node in last and time <= last[node]:
      raise ConfigError(f"{where}: line {k}: node {node}'s times must increase (got {time} after {last[node]})")
    if time is not None:
      last[node] = time
    rows.append({"node": node, "time_s": time, "up": up * 1e6, "down": None if down is None else down * 1e6})
  return rows


def tables(cfg, upload_bps: np.ndarray, download_bps: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
  """(upload, download) bps per node and block (N, B), or None when rates are fixed."""
  if not enabled(cfg):
    return None
  b, n = cfg.network.bandwidth, cfg.n_nodes
  blocks = n_blocks(cfg)
  block_s = cfg.local_steps * cfg.dt_us / 1e6
  start_s = np.arange(blocks) * block_s                                  # each block's start
  up = np.repeat(np.asarray(upload_bps, np.float64)[:, None], blocks, axis=1)
  down = np.repeat(np.asarray(download_bps, np.float64)[:, None], blocks, axis=1)
  if b.trace is not None:
    for row in read_trace(b.trace, n):
      later = np.ones(blocks, bool) if row["time_s"] is None else start_s >= row["time_s"] - 1e-12
      up[row["node"], later] = row["up"]
      if row["down"] is not None:
        down[row["node"], later] = row["down"]
    return up, down
  step = np.floor(start_s / b.interval_s + 1e-9).astype(np.int64)       # the walk's step of each block
  lim = np.log(b.max_factor)
  for rates in (up, down):
    walk_seed = 0xBA if rates is up else 0xBD
    for i in range(n):  # each node its own stream: a longer run extends the same walk
      z = np.random.default_rng([cfg.data_seed, walk_seed, i]).normal(0.0, b.random_walk, step[-1] + 1)
      z[0] = 0.0
      log_factor = np.clip(np.cumsum(z), -lim, lim)
      rates[i] *= np.exp(log_factor[step])
  return up, down
