"""Churn: the delivered share of messages against the prediction from availability (issue 20).

    divjax sweep configs/churn.yaml --zip --grid churn.mean_online_s=null,2,8,2 \\
        --grid churn.mean_offline_s=null,2,8,6 --out runs/churn_sweep
    python3 benchmarks/churn_prediction.py runs/churn_sweep

A message sent at a round end is lost when its sender is offline in the next round (it
cannot upload) or its receiver is offline when it arrives; otherwise it fares as without
churn. For independent two-state on/off processes with availability a = on / (on + off), a
sender online now is online a round R later with probability a + (1 - a) exp(-R (1/on +
1/off)), so the predicted delivered share is
    (share without churn) x (a + (1 - a) exp(-R (1/on + 1/off))) x a,
with a the measured online share. The point without churn (null means) gives the first factor.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml


def point(d: Path) -> dict:
  cfg = yaml.safe_load((d / "config.yaml").read_text())
  recs = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
  last = recs[-1]
  online = [r["online_fraction"] for r in recs[1:] if r.get("online_fraction") is not None]
  summary = json.loads((d / "summary.json").read_text())
  return {"on": cfg["churn"]["mean_online_s"], "off": cfg["churn"]["mean_offline_s"],
          "round_s": cfg["local_steps"] * cfg["network"]["compute_s_per_step"],
          "online": sum(online) / len(online) if online else 1.0, "acc": last["acc_mean"],
          "ttt": summary.get("time_to_target_s"), "share": last["msgs_delivered"] / last["msgs_sent"],
          "lost": last["msgs_lost"]}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("sweep", help="a divjax sweep directory over churn.mean_online_s / mean_offline_s")
  args = ap.parse_args()
  pts = [point(d) for d in sorted((Path(args.sweep) / "points").iterdir()) if (d / "summary.json").exists()]
  base = next(p for p in pts if p["on"] is None)["share"]
  print("| mean online / offline (s) | online share | final acc. | time to target | delivered share | predicted | lost |")
  print("|---|---|---|---|---|---|---|")
  for p in pts:
    if p["on"] is None:
      pred, name = "", "no churn"
    else:
      a, r = p["online"], p["round_s"]
      stay = a + (1 - a) * math.exp(-r * (1 / p["on"] + 1 / p["off"]))
      pred, name = f"{base * stay * a:.3f}", f"{p['on']:g} / {p['off']:g}"
    ttt = "not reached" if p["ttt"] is None else f"{p['ttt']:g} s"
    print(f"| {name} | {p['online']:.3f} | {p['acc']:.3f} | {ttt} | {p['share']:.3f} | {pred} | {p['lost']:,} |")


if __name__ == "__main__":
  main()
