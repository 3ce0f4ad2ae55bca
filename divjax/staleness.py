"""`divjax theory staleness`: version age against the number of nodes (PAPER.md 5.3-5.4).

Mitra & Ulukus measure staleness as version age: how many versions of node j's model node i
has not seen yet (divjax.versions). Gossip capacity is how many peers a node reaches per
version; in DivShare with one fragment that is J = `recipients` per round. Their results, in
these terms:

- relay (versions merged through mixing): the mean age over pairs grows like ln n at constant
  capacity, and stays O(1) when capacity grows like ln n;
- direct (only a sender's own version counts): node i hears of j only when j picks i, with
  probability J/(n-1) a round, so the mean age grows like n / J: bounded only with J ~ n.

For each n the engine runs the config (`observe.versions` set, n_nodes = n, recipients from
the capacity law), for at least `--rounds` rounds and 6 (n-1)/J, and the ages of its
evaluation records are averaged over the second half of the run (the first half is the
transient from everyone knowing version 0). The capacity laws:
constant J = c, log J = ceil(c ln n), linear J = ceil(c n / 10), with c = the config's
`recipients`. Fits: mean age = slope x + intercept for x = ln n and x = n, with R^2.
"""

from __future__ import annotations

import math

import numpy as np

from divjax.config import Config

LAWS = ("constant", "log", "linear")


def recipients_for(n: int, law: str, c: int) -> int:
  j = {"constant": c, "log": math.ceil(c * math.log(n)), "linear": math.ceil(c * n / 10)}[law]
  return max(1, min(n - 1, j))


def fit(x, y) -> dict:
  """Least-squares line y = slope x + intercept and its R^2."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  slope, intercept = np.polyfit(x, y, 1)
  resid = y - (slope * x + intercept)
  total = np.sum((y - y.mean()) ** 2)
  return {"slope": float(slope), "intercept": float(intercept),
          "r2": float(1 - np.sum(resid ** 2) / total) if total > 0 else 1.0}


def point_config(cfg: Config, n: int, law: str, mode: str, rounds: int) -> Config:
  """The run of one n: at least `rounds` rounds, and at least 6 (n-1)/J, so that the direct
  ages (about (n-1)/J rounds) reach their steady state in the first half."""
  from divjax import configure, network
  d = cfg.model_dump()
  j = recipients_for(n, law, cfg.recipients)
  rounds = max(rounds, 6 * math.ceil((n - 1) / j))
  d.update(n_nodes=n, recipients=j)
  d["observe"] = {"versions": mode}
  round_s = cfg.local_steps * int(network.build(cfg).period.max()) * cfg.network.compute_s_per_step
  d.update(duration_s=round_s * rounds, eval_every_s=round_s * max(1, rounds // 20))
  return configure.from_dict(d)


def measure(cfg: Config) -> dict:
  """Mean and max version age of one run, averaged over its second half's evaluations."""
  from divjax import simulate
  records = []
  summary, _ = simulate.run(cfg, on_eval=records.append)
  late = [r for r in records if r["time_s"] >= cfg.duration_s / 2]
  return {"n": cfg.n_nodes, "recipients": cfg.recipients, "duration_s": cfg.duration_s,
          "age_mean": float(np.mean([r["version_age_mean"] for r in late])),
          "age_max": float(np.mean([r["version_age_max"] for r in late])),
          "status": summary["status"]}


def experiment(cfg: Config, nodes: list[int], law: str = "constant", modes=("relay", "direct"),
               rounds: int = 40) -> dict:
  """Ages against n for each mode, and the fits of PAPER.md 5.4."""
  out = {"law": law, "c": cfg.recipients, "rounds": rounds, "modes": {}}
  for mode in modes:
    rows = [measure(point_config(cfg, n, law, mode, rounds)) for n in nodes]
    ns, ages = [r["n"] for r in rows], [r["age_mean"] for r in rows]
    out["modes"][mode] = {"points": rows, "fit_ln_n": fit(np.log(ns), ages), "fit_n": fit(ns, ages)}
  return out


def plot(result: dict, path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for mode, m in result["modes"].items():
    ns = [p["n"] for p in m["points"]]
    ax.plot(ns, [p["age_mean"] for p in m["points"]], "o-", label=f"{mode}: mean over pairs")
    ax.plot(ns, [p["age_max"] for p in m["points"]], "x:", label=f"{mode}: max over pairs")
  ax.set_xscale("log")
  ax.set_xlabel("nodes n")
  ax.set_ylabel("version age (rounds)")
  ax.set_title(f"version age, capacity {result['law']} (c = {result['c']})")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
