"""`divjax reproduce divshare-paper` and `divjax report` (issue 21).

Default set: the grid's points and their validation, refusals, and the report's numbers on
hand-made run directories (no JAX). Slow set: the whole pipeline at `--scale tiny` (about 8
minutes on 2 cores), then `divjax report` again from the run directories alone."""

import json
import math
import shutil

import pytest
import yaml

from divjax import cli, report, reproduce
from divjax.config import ConfigError

DATA = "../shared/data"


def _exit_code(argv) -> int:
  try:
    return cli.main(argv)
  except SystemExit as e:   # argparse's own refusals (choices) exit 2 too
    return e.code


def test_grid_has_the_papers_parts():
  parts = reproduce.plan("full", None, None, None)
  main = parts["cifar10"]
  assert len(main) == 3 * 3 * 3                              # algorithms x networks x 3 seeds
  assert {p.cfg.algorithm for p in main} == set(reproduce.ALGORITHMS)
  assert all(p.cfg.n_nodes == 60 and p.cfg.duration_s == 800 and p.cfg.target == 0.6 for p in main)
  diablo = [p for p in main if p.values["network"] == "diablo"]
  assert all(p.cfg.network.preset == "diablo" and p.cfg.network.stragglers.fraction == 0 for p in diablo)
  assert sorted({p.cfg.fragments for p in parts["omega"]}) == [1, 2]          # 10: the main grid's
  assert sorted({p.cfg.recipients for p in parts["j"]}) == [3, 9, 12]         # 6: the main grid's
  assert all(p.cfg.task == "movielens-latest-small" for p in parts["movielens"])
  cal = parts["calibration"]
  assert {p.cfg.network.stragglers.slowdown for p in cal} == {2, 5, 10}
  assert {p.cfg.network.compute_s_per_step for p in cal} == {0.0025, 0.005, 0.01}


def test_networks_restrict_the_main_grid():
  pts = reproduce.plan("full", 3, ["cifar10"], None, ["stragglers"])["cifar10"]
  assert len(pts) == 9 and {p.values["network"] for p in pts} == {"stragglers"}
  assert {p.cfg.network.stragglers.fraction for p in pts} == {0.1167}
  whole = {p.name for p in reproduce.plan("full", 3, ["cifar10"], None)["cifar10"]}
  assert {p.name for p in pts} <= whole      # the same directories as in the whole grid: resumable


def test_small_scale_keeps_the_round_length():
  """small: 4x fewer local steps of 4x the compute time, so uploads take as many rounds."""
  full, small = (reproduce.plan(s, None, ["cifar10"], None)["cifar10"][0].cfg for s in ("full", "small"))
  assert full.local_steps * full.network.compute_s_per_step == small.local_steps * small.network.compute_s_per_step
  assert small.n_nodes == 16 and small.eval.test_subsample == 500


@pytest.mark.parametrize("args, field", [
    (["--scale", "huge"], "--scale"),
    (["--only", "cifar11"], "cifar11"),
    (["--seeds", "0"], "--seeds"),
    (["--networks", "lan"], "--networks"),
])
def test_bad_input_exits_2_naming_the_field(tmp_path, capsys, args, field):
  assert _exit_code(["reproduce", "divshare-paper", "--out", str(tmp_path / "r"), *args]) == 2
  assert field in capsys.readouterr().err
  assert not (tmp_path / "r").exists()                    # nothing written


def test_a_directory_keeps_its_scale(tmp_path):
  (tmp_path / "reproduce.json").write_text(json.dumps({"experiment": "divshare-paper", "scale": "small",
                                                       "seeds": 2, "data_dir": DATA}))
  with pytest.raises(ConfigError, match="--scale"):
    reproduce.check_spec(tmp_path, {"experiment": "divshare-paper", "scale": "full", "seeds": 2, "data_dir": DATA})
  reproduce.check_spec(tmp_path, {"experiment": "divshare-paper", "scale": "small", "seeds": 2, "data_dir": DATA})


def test_report_refuses_a_directory_without_points(tmp_path, capsys):
  assert cli.main(["report", str(tmp_path)]) == 2
  assert "no finished points" in capsys.readouterr().err


# ------------------------------------------------------------------ the report's numbers

def _point(out, part, name, *, algorithm, seed, ttt, accs, losses=None, fraction=0.1167, preset=None,
           fragments=10, recipients=6, slowdown=5.0, task="cifar10"):
  d = out / part / "points" / name
  d.mkdir(parents=True)
  cfg = {"algorithm": algorithm, "seed": seed, "n_nodes": 16, "fragments": fragments, "recipients": recipients,
         "duration_s": 10.0, "task": task,
         "network": {"preset": preset, "compute_s_per_step": 0.02,
                     "stragglers": {"fraction": fraction, "slowdown": slowdown}}}
  (d / "config.yaml").write_text(yaml.safe_dump(cfg))
  times = [0.0, 5.0, 10.0]
  recs = [{"time_s": t, "acc_mean": a, "loss_mean": (losses or [1.0] * 3)[i], "msgs_sent": 100, "msgs_delivered": 80}
          for i, (t, a) in enumerate(zip(times, accs))]
  (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  (d / "summary.json").write_text(json.dumps({"status": "completed", "time_to_target_s": ttt, "target": 0.25,
                                              "best_acc_mean": max(accs), "baseline": {"loss": 1.04}}))


def test_report_numbers_from_run_directories(tmp_path):
  for seed, (t_div, t_ad) in enumerate([(2.0, 6.0), (4.0, None)]):
    _point(tmp_path, "cifar10", f"d{seed}", algorithm="divshare", seed=seed, ttt=t_div, accs=[0.1, 0.3, 0.40])
    _point(tmp_path, "cifar10", f"a{seed}", algorithm="adpsgd", seed=seed, ttt=t_ad, accs=[0.1, 0.2, 0.32])
    _point(tmp_path, "movielens", f"md{seed}", algorithm="divshare", seed=seed, ttt=None, accs=[0] * 3,
           losses=[1.04, 1.0, 0.90], task="movielens-latest-small")
    _point(tmp_path, "movielens", f"ma{seed}", algorithm="adpsgd", seed=seed, ttt=None, accs=[0] * 3,
           losses=[1.04, 1.0, 1.00], task="movielens-latest-small")
  _point(tmp_path, "omega", "o1", algorithm="divshare", seed=0, ttt=None, accs=[0.1, 0.15, 0.2], fragments=1)
  # a point still running (no final status) is left out
  _point(tmp_path, "cifar10", "running", algorithm="swift", seed=0, ttt=None, accs=[0.1, 0.1, 0.1])
  (tmp_path / "cifar10" / "points" / "running" / "summary.json").write_text(json.dumps({"status": "running"}))

  assert cli.main(["report", str(tmp_path)]) == 0
  rep = tmp_path / "report"
  rows = report.ratio_rows(report.load(tmp_path))
  ad = next(r for r in rows if r["network"] == "stragglers" and r["baseline"] == "adpsgd")
  assert ad["speedup"][0] == pytest.approx(3.0)
  assert ad["speedup"][1] == pytest.approx(-10.0 / 4.0)           # AD-PSGD never reached: bound = budget
  assert ad["acc_points"] == pytest.approx([8.0, 8.0])
  assert ad["loss_reduction"] == pytest.approx([10.0, 10.0])
  ratios = (rep / "ratios.md").read_text()
  assert "> 2.75 ± 0.35x (baseline not reached in 1 of 2 seeds" in ratios
  cifar = (rep / "cifar10.md").read_text()
  assert "| stragglers | DivShare | 2 | 0.400 ± 0.000 |" in cifar and "Swift" not in cifar
  assert "| 1 | 1 | 0.200 |" in (rep / "omega.md").read_text()
  assert "| 10 | 2 | 0.400 ± 0.000 |" in (rep / "omega.md").read_text()  # the main grid's Omega = 10
  md = (rep / "report.md").read_text()
  assert "up to 9.5% lower test loss" in md and "10.0% (against AD-PSGD)" in md
  for f in ("fig1_convergence.png", "fig4_utility.png", "fig5_cifar10.png", "fig_ablations.png", "cifar10.csv"):
    assert (rep / f).stat().st_size > 0
  assert math.isinf(report.ttt({"summary": {"time_to_target_s": None}}))


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path):
  out = tmp_path / "paper"
  args = ["reproduce", "divshare-paper", "--scale", "tiny", "--out", str(out), "--quiet", "--data-dir", DATA]
  assert cli.main(args) == 0
  rep = out / "report"
  for f in ("report.md", "cifar10.md", "cifar10.csv", "movielens.md", "ratios.md", "omega.md", "j.md",
            "calibration.md", "fig1_convergence.png", "fig4_utility.png", "fig5_cifar10.png", "fig_ablations.png"):
    assert (rep / f).is_file() and (rep / f).stat().st_size > 0, f
  n_points = len(list(out.glob("*/points/*/summary.json")))
  assert n_points == sum(len(p) for p in reproduce.plan("tiny", None, None, DATA).values())
  before = (rep / "cifar10.md").read_text()
  shutil.rmtree(rep)
  assert cli.main(["report", str(out)]) == 0                     # regenerated from the run directories
  assert (rep / "cifar10.md").read_text() == before
  assert cli.main(args) == 0                                     # resumable: nothing left to run
  assert len(list(out.glob("*/points/*/summary.json"))) == n_points
