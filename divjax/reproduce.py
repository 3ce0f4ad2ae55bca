"""`divjax reproduce divshare-paper`: the DivShare paper's evaluation (PAPER.md 4) as sweeps.

    divjax reproduce divshare-paper [--scale small|full] [--seeds K] [--only PART ...]
                                    [--networks none stragglers diablo] [--out DIR]

Parts, each one sweep directory OUT/<part>/ (divjax.sweep: one compile per structure, finished
points are never run again, an interrupted point continues from its checkpoint):

  cifar10       {DivShare, AD-PSGD, Swift} x {no stragglers, stragglers, Diablo} x seeds
  movielens     the same grid on MovieLens (test RMSE)
  omega         DivShare, CIFAR-10 with stragglers, Omega in {1, 2} (10 is cifar10's point)
  j             the same, J in {3, 9, 12} (6 is cifar10's point)
  calibration   DivShare and AD-PSGD, CIFAR-10 with stragglers: straggler slowdown in {2, 10}
                and compute time per step x {1/2, 2} (5x and x1 are cifar10's points)

The configs are the paper set-up's (configs/{cifar10,movielens}_{divshare,adpsgd,swift}.yaml).
`full` runs them as they are (60 nodes, 800 simulated s). `small` shrinks what 2 CPU cores
cannot afford and keeps what decides the outcome (docs/REPRODUCTION.md, "Calibration"): 16
nodes; on CIFAR-10 32 local steps of 20 ms instead of 128 of 5 ms, so a round still lasts
0.64 simulated s and a straggler's upload takes as many rounds as in the paper; 9.6 simulated
s, 500 test images, and a 25% target, since 60% is out of reach in that budget. `tiny` is a
smoke test of the pipeline (a few rounds). The report (divjax.report) is rewritten at the end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from divjax import configure
from divjax.config import ConfigError
from divjax.sweep import Point

PAPER = "divshare-paper"
ALGORITHMS = ("divshare", "adpsgd", "swift")
NETWORKS = {   # the paper's three network settings (PAPER.md 4.4)
    "none": ["network.stragglers.fraction=0"],
    "stragglers": [],                                             # the configs' 7 of 60 at 5x
    "diablo": ["network.preset=diablo", "network.stragglers.fraction=0"],
}
TASKS = ("cifar10", "movielens")
PARTS = ("cifar10", "movielens", "omega", "j", "calibration")
OMEGAS, JS = (1, 2, 10), (3, 6, 9, 12)          # the artifact's ablation grid (PAPER.md 6.1)
SLOWDOWNS, COMPUTE_FACTORS = (2, 5, 10), (0.5, 1, 2)

# What each scale changes in the paper's configs, per task (keys of divjax.config).
SCALES = {
    "full": {"cifar10": [], "movielens": []},
    "small": {
        "cifar10": ["n_nodes=16", "local_steps=32", "network.compute_s_per_step=0.02", "duration_s=9.6",
                    "eval_every_s=1.6", "eval.test_subsample=500", "target=0.25"],
        "movielens": ["n_nodes=16", "duration_s=16", "eval_every_s=4"],
    },
    "tiny": {
        "cifar10": ["n_nodes=16", "local_steps=4", "network.compute_s_per_step=0.16", "duration_s=1.92",
                    "eval_every_s=0.64", "eval.test_subsample=100", "eval.nodes=4", "target=0.15"],
        "movielens": ["n_nodes=16", "local_steps=8", "network.compute_s_per_step=0.08", "duration_s=1.92",
                      "eval_every_s=0.64"],
    },
}
SEEDS = {"full": 3, "small": 2, "tiny": 1}
# The ablations and the calibration sweep take one seed below full scale (their cost is the
# main grid's again); `--seeds` sets the main grid's.
SIDE_SEEDS = {"full": 3, "small": 1, "tiny": 1}


def config_path(task: str, algorithm: str) -> Path:
  """configs/<task>_<algorithm>.yaml of this checkout (the paper set-up's configs)."""
  root = Path(__file__).resolve().parents[1] / "configs"
  path = root / f"{task}_{algorithm}.yaml"
  if not path.is_file():
    raise ConfigError(f"reproduce: {path} not found: run from a checkout of divjax (pip install -e .)")
  return path


def _point(index: int, task: str, algorithm: str, values: dict, sets: list[str]) -> Point:
  cfg = configure.load(str(config_path(task, algorithm)), sets)
  return Point(index, {"algorithm": algorithm, **values}, cfg)


def part_points(part: str, scale: str, seeds: int, data_dir: Optional[str],
                networks: tuple = tuple(NETWORKS)) -> list[Point]:
  """The points of one part at one scale; every config validated (ConfigError names the key).
  networks: the main grid's network settings (all three by default)."""
  task = "movielens" if part == "movielens" else "cifar10"
  base = SCALES[scale][task] + ([f"data.dir={data_dir}"] if data_dir else [])
  side = range(min(seeds, SIDE_SEEDS[scale]))
  rows = []   # (algorithm, labels, overrides)
  if part in TASKS:
    for net, sets in NETWORKS.items():
      rows += [(alg, {"network": net, "seed": s}, sets + [f"seed={s}"]) for alg in ALGORITHMS for s in range(seeds)]
  elif part == "omega":
    rows = [("divshare", {"fragments": o, "seed": s}, [f"fragments={o}", f"seed={s}"])
            for o in OMEGAS if o != 10 for s in side]
  elif part == "j":
    rows = [("divshare", {"recipients": j, "seed": s}, [f"recipients={j}", f"seed={s}"])
            for j in JS if j != 6 for s in side]
  elif part == "calibration":
    compute = configure.load(str(config_path(task, "divshare")), base).network.compute_s_per_step
    for alg in ("divshare", "adpsgd"):
      rows += [(alg, {"slowdown": k, "seed": s}, [f"network.stragglers.slowdown={k}", f"seed={s}"])
               for k in SLOWDOWNS if k != 5 for s in side]
      rows += [(alg, {"compute_factor": f, "seed": s}, [f"network.compute_s_per_step={compute * f:g}", f"seed={s}"])
               for f in COMPUTE_FACTORS if f != 1 for s in side]
  else:
    raise ConfigError(f"--only: unknown part {part!r}; allowed: {', '.join(PARTS)}")
  points = []
  for i, (alg, labels, sets) in enumerate(rows):   # indices (and so directory names) as in the whole grid
    if labels.get("network", networks[0]) not in networks:
      continue
    try:
      points.append(_point(i, task, alg, labels, base + sets))
    except ConfigError as e:
      raise ConfigError(f"{e} ({part} point {i}: {alg}, {labels})") from None
  return points


def plan(scale: str, seeds: Optional[int], only: Optional[list[str]], data_dir: Optional[str],
         networks: Optional[list[str]] = None) -> dict:
  """{part: points} for the parts asked for, all validated before anything runs."""
  if scale not in SCALES:
    raise ConfigError(f"--scale: {scale!r} is not one of {', '.join(SCALES)}")
  seeds = SEEDS[scale] if seeds is None else seeds
  if seeds < 1:
    raise ConfigError(f"--seeds: at least 1 (got {seeds})")
  for p in only or ():
    if p not in PARTS:
      raise ConfigError(f"--only: unknown part {p!r}; allowed: {', '.join(PARTS)}")
  for n in networks or ():
    if n not in NETWORKS:
      raise ConfigError(f"--networks: unknown network setting {n!r}; allowed: {', '.join(NETWORKS)}")
  nets = tuple(n for n in NETWORKS if not networks or n in networks)
  return {p: part_points(p, scale, seeds, data_dir, nets) for p in PARTS if not only or p in only}


def check_spec(out: Path, spec: dict) -> None:
  """A directory holds one scale and one seed count: continuing it with others would mix them."""
  path = out / "reproduce.json"
  if path.is_file():
    old = json.loads(path.read_text())
    for key in ("experiment", "scale", "seeds", "data_dir"):
      if old.get(key) != spec.get(key):
        raise ConfigError(f"--{key.replace('_', '-')}: {out} holds a reproduction with {key} = "
                          f"{old.get(key)!r}, not {spec.get(key)!r}; use another --out (or the same value)")


def run(parts: dict, out: Path, *, progress: bool = True, should_stop: Callable[[], bool] = lambda: False,
        say: Callable[[str], None] = print) -> dict:
  """Runs every part's sweep into out/<part>/ (finished points are skipped); {part: info}."""
  from divjax import sweep
  infos = {}
  for part, points in parts.items():
    if should_stop():
      break
    d = out / part
    d.mkdir(parents=True, exist_ok=True)
    say(f"{part}: {len(points)} point(s) in {d}")
    rows, info = sweep.run(points, d, progress=progress, should_stop=should_stop, batch=None)
    if rows:
      sweep.write_tables(d, rows)
    infos[part] = {**info, "completed": len(rows)}
  return infos
