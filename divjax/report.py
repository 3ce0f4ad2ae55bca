"""`divjax report DIR`: the DivShare paper reproduction's tables, figures and report.md.

Everything is read back from the finished points' run directories (DIR/<part>/points/*/:
config.yaml, metrics.jsonl, summary.json), so the report can be regenerated at any time, also
from a partial reproduction (what is missing is said so). Writes into DIR/report/:

  cifar10.{md,csv}       accuracy after the budget and time to target, per network and algorithm
  movielens.{md,csv}     final test RMSE (and the global-mean predictor's) per network and algorithm
  ratios.{md,csv}        DivShare against each baseline, per seed then mean +- std: time-to-target
                         speed-up, accuracy gain (points, and relative), MovieLens loss reduction
  omega.{md,csv}, j.{md,csv}, calibration.{md,csv}   the ablations and the calibration sweep
  fig1_convergence.png   AD-PSGD and Swift on CIFAR-10 with and without stragglers (paper Fig. 1)
  fig4_utility.png       accuracy (CIFAR-10) and test loss (MovieLens) over time (paper Fig. 4)
  fig5_cifar10.png       (a) accuracy after the budget, (b) time to target (paper Fig. 5)
  fig_ablations.png, fig_calibration.png
  report.md              all of it, and the paper's three claims against what divjax measured
Curves and bars are the mean over seeds; bands and error bars the min-max over seeds.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from divjax.reproduce import ALGORITHMS, NETWORKS

NAMES = {"divshare": "DivShare", "adpsgd": "AD-PSGD", "swift": "Swift"}
COLORS = {"divshare": "tab:blue", "adpsgd": "tab:red", "swift": "tab:green"}
NETS = {"none": "no stragglers", "stragglers": "stragglers", "diablo": "Diablo"}
CLAIMS = {"speedup": 3.9, "accuracy": 19.4, "loss": 9.5}   # PAPER.md 4.6 (abstract)


# ---------------------------------------------------------------------------- reading the runs

def network_of(cfg: dict) -> str:
  net = cfg["network"]
  if net.get("preset") == "diablo":
    return "diablo"
  return "stragglers" if net["stragglers"]["fraction"] > 0 else "none"


def load(out: Path) -> list[dict]:
  """Every finished point under out/<part>/points/: its labels, records and summary."""
  runs = []
  for summary_path in sorted(out.glob("*/points/*/summary.json")):
    d = summary_path.parent
    try:
      summary = json.loads(summary_path.read_text())
      if summary.get("status") not in ("completed", "diverged"):
        continue
      cfg = yaml.safe_load((d / "config.yaml").read_text())
      records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
      continue
    runs.append({"part": d.parent.parent.name, "dir": d, "algorithm": cfg["algorithm"], "seed": cfg["seed"],
                 "network": network_of(cfg), "fragments": cfg["fragments"], "recipients": cfg["recipients"],
                 "slowdown": cfg["network"]["stragglers"]["slowdown"],
                 "compute": cfg["network"]["compute_s_per_step"], "n_nodes": cfg["n_nodes"],
                 "duration": cfg["duration_s"], "target": summary.get("target"), "task": cfg["task"],
                 "records": records, "summary": summary, "status": summary["status"]})
  return runs


def select(runs: list[dict], **where) -> list[dict]:
  return sorted((r for r in runs if all(r[k] == v for k, v in where.items())), key=lambda r: r["seed"])


def main_grid(runs: list[dict], part: str) -> list[dict]:
  return [r for r in runs if r["part"] == part]


def cifar_reference(runs: list[dict]) -> list[dict]:
  """The main grid's DivShare points with stragglers: the ablations' Omega = 10, J = 6 and the
  calibration's 5x, x1 points (the same configs; not run twice)."""
  return select(main_grid(runs, "cifar10"), algorithm="divshare", network="stragglers")


# -------------------------------------------------------------------------------- the numbers

def final(r: dict, key: str) -> Optional[float]:
  return r["records"][-1].get(key) if r["records"] else None


def ttt(r: dict) -> float:
  """Time to target; inf when the target was not reached within the budget."""
  t = r["summary"].get("time_to_target_s")
  return math.inf if t is None else float(t)


def delivered(r: dict) -> Optional[float]:
  last = r["records"][-1]
  return last["msgs_delivered"] / last["msgs_sent"] if last.get("msgs_sent") else None


def stats(xs: list[float]) -> dict:
  """mean, std (over seeds, ddof 1), min, max, n; of the finite values, with `inf` counting the rest."""
  fin = [x for x in xs if x is not None and math.isfinite(x)]
  out = {"n": len(xs), "finite": len(fin)}
  if fin:
    out.update(mean=float(np.mean(fin)), std=float(np.std(fin, ddof=1)) if len(fin) > 1 else 0.0,
               min=float(np.min(fin)), max=float(np.max(fin)))
  return out


def fmt(s: dict, digits: int = 3, scale: float = 1.0) -> str:
  if "mean" not in s:
    return "not reached" if s["n"] else "-"
  text = f"{s['mean'] * scale:.{digits}f}"
  if s["n"] > 1:
    text += f" ± {s['std'] * scale:.{digits}f}"
  if s["finite"] < s["n"]:
    text += f" ({s['finite']} of {s['n']} reached)"
  return text


def paired(div: list[dict], base: list[dict], f) -> list[float]:
  """f(divshare run, baseline run) for every seed both have."""
  by_seed = {r["seed"]: r for r in base}
  return [f(d, by_seed[d["seed"]]) for d in div if d["seed"] in by_seed]


def speedup(d: dict, b: dict) -> float:
  """Baseline's time to target over DivShare's; a baseline that never reached it gives a lower
  bound (its budget), returned as -bound to be told apart; nan when DivShare did not reach it."""
  td, tb = ttt(d), ttt(b)
  if not math.isfinite(td):
    return math.nan
  return tb / td if math.isfinite(tb) else -b["duration"] / td


# --------------------------------------------------------------------------------- the tables

def write_table(path: Path, header: list[str], rows: list[list]) -> str:
  """Writes path.csv and path.md; returns the Markdown."""
  with open(path.with_suffix(".csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  md = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
  md += "".join("| " + " | ".join(str(c) for c in row) + " |\n" for row in rows)
  path.with_suffix(".md").write_text(md)
  return md


def cifar_table(runs: list[dict], out: Path) -> str:
  grid = main_grid(runs, "cifar10")
  if not grid:
    return ""
  target = grid[0]["target"]
  rows = []
  for net in NETWORKS:
    for alg in ALGORITHMS:
      rs = select(grid, algorithm=alg, network=net)
      if rs:
        rows.append([NETS[net], NAMES[alg], len(rs), fmt(stats([final(r, "acc_mean") for r in rs])),
                     fmt(stats([r["summary"].get("best_acc_mean") for r in rs])),
                     fmt(stats([ttt(r) for r in rs]), 1), fmt(stats([delivered(r) for r in rs]))])
  return write_table(out / "cifar10", ["network", "algorithm", "seeds", "accuracy after the budget", "best accuracy",
                                       f"time to {target:.0%} (s)", "messages delivered / sent"], rows)


def movielens_table(runs: list[dict], out: Path) -> str:
  grid = main_grid(runs, "movielens")
  if not grid:
    return ""
  rows = []
  for net in NETWORKS:
    for alg in ALGORITHMS:
      rs = select(grid, algorithm=alg, network=net)
      if rs:
        base = stats([(r["summary"].get("baseline") or {}).get("loss") for r in rs])
        rows.append([NETS[net], NAMES[alg], len(rs), fmt(stats([final(r, "loss_mean") for r in rs]), 4),
                     fmt(base, 4), fmt(stats([delivered(r) for r in rs]))])
  return write_table(out / "movielens", ["network", "algorithm", "seeds", "test RMSE after the budget",
                                         "global-mean predictor", "messages delivered / sent"], rows)


def ratio_rows(runs: list[dict]) -> list[dict]:
  """DivShare against each baseline and network: per-seed values and their statistics."""
  out = []
  for net in NETWORKS:
    for base in ("adpsgd", "swift"):
      row = {"network": net, "baseline": base}
      cd, cb = (select(main_grid(runs, "cifar10"), algorithm=a, network=net) for a in ("divshare", base))
      md, mb = (select(main_grid(runs, "movielens"), algorithm=a, network=net) for a in ("divshare", base))
      if cd and cb:
        s = paired(cd, cb, speedup)
        row["speedup"] = s
        row["acc_points"] = paired(cd, cb, lambda d, b: 100 * (final(d, "acc_mean") - final(b, "acc_mean")))
        row["acc_relative"] = paired(cd, cb, lambda d, b: 100 * (final(d, "acc_mean") / final(b, "acc_mean") - 1))
      if md and mb:
        row["loss_reduction"] = paired(md, mb, lambda d, b: 100 * (1 - final(d, "loss_mean") / final(b, "loss_mean")))
      if len(row) > 2:
        out.append(row)
  return out


def fmt_speedup(xs: list[float]) -> str:
  """Mean +- std of the speed-ups; lower bounds (baseline never reached) as '> x'."""
  if not xs:
    return "-"
  if any(math.isnan(x) for x in xs):
    return "DivShare did not reach the target" if all(math.isnan(x) for x in xs) else \
        fmt_speedup([x for x in xs if not math.isnan(x)]) + f" ({sum(map(math.isnan, xs))} seed(s): DivShare not reached)"
  bound = any(x < 0 for x in xs)
  text = fmt(stats([abs(x) for x in xs]), 2) + "x"
  return f"> {text} (baseline not reached in {sum(x < 0 for x in xs)} of {len(xs)} seeds; bound = budget)" if bound else text


def ratios_table(rows: list[dict], out: Path) -> str:
  if not rows:
    return ""
  table = [[NETS[r["network"]], NAMES[r["baseline"]], fmt_speedup(r.get("speedup", [])),
            fmt(stats(r["acc_points"]), 1) if r.get("acc_points") else "-",
            fmt(stats(r["acc_relative"]), 1) if r.get("acc_relative") else "-",
            fmt(stats(r["loss_reduction"]), 1) if r.get("loss_reduction") else "-"] for r in rows]
  return write_table(out / "ratios", ["network", "DivShare against", "time-to-target speed-up (CIFAR-10)",
                                      "accuracy gain (points)", "accuracy gain (%)",
                                      "MovieLens RMSE reduction (%)"], table)


def ablation_table(runs: list[dict], out: Path, part: str, key: str, label: str) -> str:
  rs = [r for r in runs if r["part"] == part] + cifar_reference(runs)
  values = sorted({r[key] for r in rs})
  if not [r for r in runs if r["part"] == part]:
    return ""
  target = rs[0]["target"]
  rows = []
  for v in values:
    sel = select(rs, **{key: v})
    rows.append([v, len(sel), fmt(stats([final(r, "acc_mean") for r in sel])), fmt(stats([ttt(r) for r in sel]), 1),
                 fmt(stats([delivered(r) for r in sel]))])
  return write_table(out / part, [label, "seeds", "accuracy after the budget", f"time to {target:.0%} (s)",
                                  "messages delivered / sent"], rows)


def calibration_settings(runs: list[dict]) -> list[tuple]:
  """(slowdown, compute factor, DivShare runs, AD-PSGD runs) per calibration setting, the
  configs' own (5x, x1) first: it is the main grid's stragglers point."""
  cal = [r for r in runs if r["part"] == "calibration"]
  ref = [r for r in main_grid(runs, "cifar10") if r["network"] == "stragglers" and r["algorithm"] in ("divshare", "adpsgd")]
  if not cal:
    return []
  # the configs' compute time: the main grid's, which the slowdown points keep
  base_compute = (ref or [r for r in cal if r["slowdown"] != 5] or cal)[0]["compute"]
  factor = {id(r): round(r["compute"] / base_compute, 3) for r in ref + cal}
  settings = sorted({(r["slowdown"], factor[id(r)]) for r in ref + cal if r["seed"] == 0}, key=lambda s: (s[1] != 1, s))
  pick = lambda alg, slow, f: [r for r in select(ref + cal, algorithm=alg, slowdown=slow) if factor[id(r)] == f]
  return [(slow, f, pick("divshare", slow, f), pick("adpsgd", slow, f)) for slow, f in settings]


def mean_speedup(xs: list[float]) -> float:
  """The mean of the speed-ups DivShare reached (bounds as their value), nan if none."""
  xs = [abs(x) for x in xs if not math.isnan(x)]
  return float(np.mean(xs)) if xs else math.nan


def calibration_table(runs: list[dict], out: Path) -> str:
  rows = [[f"{slow:g}x", f"x{f:g}", fmt(stats([ttt(r) for r in d]), 1), fmt(stats([ttt(r) for r in a]), 1),
           fmt_speedup(paired(d, a, speedup)), fmt(stats([delivered(r) for r in d]))]
          for slow, f, d, a in calibration_settings(runs)]
  if not rows:
    return ""
  return write_table(out / "calibration", ["straggler slowdown", "compute per step", "DivShare time to target (s)",
                                           "AD-PSGD time to target (s)", "AD-PSGD / DivShare",
                                           "DivShare delivered / sent"], rows)


# -------------------------------------------------------------------------------- the figures

def curve(rs: list[dict], key: str):
  """Mean and min-max over the runs of one metric against time (the runs share a schedule)."""
  n = min(len(r["records"]) for r in rs)
  t = np.array([rec["time_s"] for rec in rs[0]["records"][:n]])
  ys = np.array([[np.nan if rec.get(key) is None else rec[key] for rec in r["records"][:n]] for r in rs], float)
  return t, np.nanmean(ys, 0), np.nanmin(ys, 0), np.nanmax(ys, 0)


def draw(ax, rs: list[dict], key: str, label: str, color=None, style="-") -> None:
  if not rs:
    return
  t, mean, lo, hi = curve(rs, key)
  ax.plot(t, mean, style, color=color, label=f"{label} ({len(rs)} seed{'s' if len(rs) > 1 else ''})")
  if len(rs) > 1:
    ax.fill_between(t, lo, hi, color=color, alpha=0.2)


def figures(runs: list[dict], out: Path) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  made = []

  def save(fig, name):
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    made.append(name)

  cifar, ml = main_grid(runs, "cifar10"), main_grid(runs, "movielens")
  if cifar:  # Figure 1: the baselines with and without stragglers
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, alg in zip(axes, ("adpsgd", "swift")):
      for net, style in (("none", "-"), ("stragglers", "--")):
        draw(ax, select(cifar, algorithm=alg, network=net), "acc_mean", NETS[net], COLORS[alg], style)
      ax.set(title=f"{NAMES[alg]}, CIFAR-10", xlabel="simulated time (s)", ylabel="mean test accuracy")
      _legend(ax)
    save(fig, "fig1_convergence.png")
  if cifar or ml:  # Figure 4: utility over time, every algorithm and network
    tasks = [(t, k, y) for t, k, y in ((cifar, "acc_mean", "mean test accuracy"), (ml, "loss_mean", "test RMSE")) if t]
    fig, axes = plt.subplots(len(tasks), 3, figsize=(13, 3.4 * len(tasks)), squeeze=False)
    for row, (grid, key, ylabel) in zip(axes, tasks):
      for ax, net in zip(row, NETWORKS):
        for alg in ALGORITHMS:
          draw(ax, select(grid, algorithm=alg, network=net), key, NAMES[alg], COLORS[alg])
        ax.set(title=f"{grid[0]['task']}, {NETS[net]}", xlabel="simulated time (s)", ylabel=ylabel)
        _legend(ax)
    save(fig, "fig4_utility.png")
  if cifar:  # Figure 5: accuracy after the budget and time to target
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.27
    for i, alg in enumerate(ALGORITHMS):
      acc = [stats([final(r, "acc_mean") for r in select(cifar, algorithm=alg, network=n)]) for n in NETWORKS]
      tt = [stats([ttt(r) for r in select(cifar, algorithm=alg, network=n)]) for n in NETWORKS]
      x = np.arange(len(NETWORKS)) + (i - 1) * width
      a.bar(x, [s.get("mean", 0) for s in acc], width, color=COLORS[alg], label=NAMES[alg],
            yerr=[[s.get("mean", 0) - s.get("min", 0) for s in acc], [s.get("max", 0) - s.get("mean", 0) for s in acc]])
      budget = cifar[0]["duration"]   # a target not reached: a bar above the budget, marked ∞
      heights = [s["mean"] if "mean" in s and s["finite"] == s["n"] else 1.05 * budget for s in tt]
      bars = b.bar(x, heights, width, color=COLORS[alg], label=NAMES[alg])
      for bar, s in zip(bars, tt):
        if not ("mean" in s and s["finite"] == s["n"]) and s["n"]:
          b.text(bar.get_x() + width / 2, bar.get_height(), "∞", ha="center", va="bottom")
    target = cifar[0]["target"]
    b.axhline(cifar[0]["duration"], color="gray", ls=":", lw=1)
    for ax, ylabel in ((a, "accuracy after the budget"), (b, f"time to {target:.0%} (simulated s)")):
      ax.set_xticks(np.arange(len(NETWORKS)), [NETS[n] for n in NETWORKS])
      ax.set_ylabel(ylabel)
      _legend(ax)
    a.set_title("(a) accuracy after convergence")
    b.set_title("(b) time to target; ∞: a seed did not reach it in the budget")
    save(fig, "fig5_cifar10.png")
  ablations = [(p, k, lbl) for p, k, lbl in (("omega", "fragments", "Omega"), ("j", "recipients", "J"))
               if any(r["part"] == p for r in runs)]
  if ablations:
    fig, axes = plt.subplots(1, len(ablations), figsize=(5.5 * len(ablations), 3.6), squeeze=False)
    for ax, (part, key, label) in zip(axes[0], ablations):
      rs = [r for r in runs if r["part"] == part] + cifar_reference(runs)
      for v in sorted({r[key] for r in rs}):
        draw(ax, select(rs, **{key: v}), "acc_mean", f"{label} = {v}")
      ax.set(title=f"DivShare, CIFAR-10, stragglers: {label}", xlabel="simulated time (s)", ylabel="mean test accuracy")
      _legend(ax)
    save(fig, "fig_ablations.png")
  cal = calibration_settings(runs)
  if cal:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, axis, xlabel in ((axes[0], 0, "straggler slowdown (x)"), (axes[1], 1, "compute time per step (x)")):
      keep = [c for c in cal if (c[1] == 1 if axis == 0 else c[0] == 5)]   # one knob moved at a time
      xs = np.array([c[axis] for c in keep], float)
      ys = np.array([mean_speedup(paired(c[2], c[3], speedup)) for c in keep])
      order = np.argsort(xs)
      ax.plot(xs[order], ys[order], "o-")
      ax.set(xlabel=xlabel, ylabel="AD-PSGD / DivShare time to target")
    save(fig, "fig_calibration.png")
  return made


def _legend(ax) -> None:
  if ax.get_legend_handles_labels()[0]:   # a panel whose points have not run yet has none
    ax.legend(fontsize=8)


# ------------------------------------------------------------------------------- the report

def best(rows: list[dict], key: str, networks=tuple(NETWORKS)) -> Optional[tuple[float, dict]]:
  """The largest mean over seeds of rows[key] (the paper's "up to"), with its row."""
  found = [(float(np.mean([abs(x) for x in r[key]])), r) for r in rows
           if r.get(key) and r["network"] in networks and not any(math.isnan(x) for x in r[key])]
  return max(found, key=lambda f: f[0]) if found else None


def verdict(measured: Optional[float], claim: float) -> str:
  if measured is None:
    return "not measured (points missing)"
  if measured >= claim:
    return "holds (at least the paper's value)"
  if measured > (1.0 if claim == CLAIMS["speedup"] else 0.05 * claim):
    return f"same direction, smaller ({measured / claim:.0%} of the paper's value)"
  return "does not hold here (no clear gain)"


def claims(rows: list[dict]) -> str:
  lines = ["| paper's claim (PAPER.md 4.6) | divjax | where | verdict |", "|---|---|---|---|"]
  s = best([r for r in rows if r["baseline"] == "adpsgd"], "speedup", ("stragglers", "diablo"))
  lines.append(f"| up to {CLAIMS['speedup']}x lower time to accuracy than AD-PSGD, CIFAR-10 with stragglers | "
               + (f"{s[0]:.2f}x{' (lower bound)' if any(x < 0 for x in s[1]['speedup']) else ''} | {NETS[s[1]['network']]}"
                  if s else "- | -") + f" | {verdict(s[0] if s else None, CLAIMS['speedup'])} |")
  a = best(rows, "acc_relative")
  p = best(rows, "acc_points")
  lines.append(f"| up to {CLAIMS['accuracy']}% better accuracy (CIFAR-10) | "
               + (f"{a[0]:+.1f}% relative (against {NAMES[a[1]['baseline']]}), {p[0]:+.1f} points "
                  f"(against {NAMES[p[1]['baseline']]}) | {NETS[a[1]['network']]} / {NETS[p[1]['network']]}" if a and p else "- | -")
               + f" | {verdict(a[0] if a else None, CLAIMS['accuracy'])} (relative); "
                 f"{verdict(p[0] if p else None, CLAIMS['accuracy'])} (points) |")
  m = best(rows, "loss_reduction")
  lines.append(f"| up to {CLAIMS['loss']}% lower test loss (MovieLens) | "
               + (f"{m[0]:.1f}% (against {NAMES[m[1]['baseline']]}) | {NETS[m[1]['network']]}" if m else "- | -")
               + f" | {verdict(m[0] if m else None, CLAIMS['loss'])} |")
  return "\n".join(lines) + "\n"


def write(out: Path) -> Path:
  """Writes out/report/ from the finished points; returns the report.md path."""
  out = Path(out)
  rep = out / "report"
  rep.mkdir(parents=True, exist_ok=True)
  runs = load(out)
  spec = json.loads((out / "reproduce.json").read_text()) if (out / "reproduce.json").is_file() else {}
  rows = ratio_rows(runs)
  tables = [("CIFAR-10 (paper Fig. 5)", cifar_table(runs, rep)), ("MovieLens", movielens_table(runs, rep)),
            ("DivShare against the baselines (per seed, then mean ± std over seeds)", ratios_table(rows, rep)),
            ("Ablation: Omega (fragments), DivShare, CIFAR-10 with stragglers", ablation_table(runs, rep, "omega", "fragments", "Omega")),
            ("Ablation: J (recipients), DivShare, CIFAR-10 with stragglers", ablation_table(runs, rep, "j", "recipients", "J")),
            ("Calibration: AD-PSGD / DivShare time to target against straggler slowdown and compute time",
             calibration_table(runs, rep))]
  figs = figures(runs, rep)
  parts = sorted({r["part"] for r in runs})
  text = ["# DivShare paper reproduction: report\n",
          f"Regenerate with `divjax report {out}`. Scale: {spec.get('scale', '?')}; seeds (main grid): "
          f"{spec.get('seeds', '?')}; command: `{spec.get('command', '?')}`; device: {spec.get('device', '?')}.\n",
          f"{len(runs)} finished point(s) in the parts: {', '.join(parts) or 'none'}.\n",
          "## The paper's claims\n", claims(rows) if rows else "No pairs of DivShare and a baseline finished yet.\n"]
  for title, md in tables:
    if md:
      text += [f"## {title}\n", md]
  text += ["## Figures\n"] + [f"![{f}]({f})\n" for f in figs]
  path = rep / "report.md"
  path.write_text("\n".join(text))
  return path
