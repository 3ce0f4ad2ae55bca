import json

import yaml

from divjax import cli
from conftest import TINY


def test_run_writes_outputs(tmp_path):
  out = tmp_path / "run"
  rc = cli.main(["run", "--set", *TINY, "target=0.01", "--out", str(out), "--quiet"])
  assert rc == 0
  names = sorted(p.name for p in out.iterdir())
  assert names == [".divjax-run", "checkpoints", "config.yaml", "label_histograms.csv", "metrics.jsonl", "metrics.png",
                   "summary.json"]
  hist = (out / "label_histograms.csv").read_text().splitlines()
  assert hist[0].startswith("node,class_0") and len(hist) == 1 + 6
  records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  assert records[0]["tick"] == 0 and records[0]["time_s"] == 0.0
  assert len(records) == 6  # time 0, then every 8 ticks (2 rounds of 4 steps) up to tick 40
  for key in ("tick", "time_s", "acc_mean", "acc_min", "acc_max", "loss_mean", "consensus",
              "msgs_sent", "msgs_delivered", "msgs_flushed", "msgs_expired", "msgs_in_flight"):
    assert key in records[-1]
  summary = json.loads((out / "summary.json").read_text())
  assert summary["status"] == "completed"
  for key in ("final", "time_to_target_s", "n_params", "wall_s", "compile_s", "node_steps_per_s", "device"):
    assert key in summary
  assert summary["n_params"] == 122
  speeds = summary["chunk_node_steps_per_s"]  # one per chunk (5 evaluation intervals)
  assert len(speeds) == len(records) - 1 and all(v > 0 for v in speeds)
  resolved = yaml.safe_load((out / "config.yaml").read_text())
  assert resolved["n_nodes"] == 6 and resolved["network"]["latency_ms"] == 3


def test_bad_config_fails_before_writing(tmp_path, capsys):
  out = tmp_path / "run"
  rc = cli.main(["run", "--set", "fragments=0", "--out", str(out), "--quiet"])
  assert rc != 0
  assert not out.exists()
  assert "fragments" in capsys.readouterr().err


def test_existing_output_is_not_overwritten(tmp_path, capsys):
  out = tmp_path / "run"
  out.mkdir()
  (out / "precious.txt").write_text("keep me")
  rc = cli.main(["run", "--set", *TINY, "--out", str(out), "--quiet"])
  assert rc != 0
  assert (out / "precious.txt").read_text() == "keep me"
  assert "exists" in capsys.readouterr().err


def test_the_figure_shows_rmse_and_its_bar_for_a_regression_task():
  from divjax import plots
  recs = [{"time_s": t, "acc_mean": 0.1, "acc_min": 0.0, "acc_max": 0.2, "loss_mean": l,
           "acc_avg_model": None} for t, l in ((0.0, 1.04), (8.0, 0.98), (16.0, 0.95))]
  fig = plots.figure(recs, kind="regression", baseline={"predictor": "global_mean", "loss": 1.0445})
  _, ax_loss = fig.axes
  assert ax_loss.get_ylabel() == "test RMSE" and ax_loss.get_yscale() == "linear"
  bars = [line for line in ax_loss.get_lines() if list(line.get_ydata()) == [1.0445, 1.0445]]
  assert len(bars) == 1 and bars[0].get_label() == "global_mean predictor"
  plots.plt.close(fig)
  fig = plots.figure(recs)  # classification: accuracy and a log-scale loss, no bar
  ax_acc, ax_loss = fig.axes
  assert ax_acc.get_ylabel() == "test accuracy" and ax_loss.get_yscale() == "log"
  assert len(ax_loss.get_lines()) == 1
  plots.plt.close(fig)


def test_a_second_run_of_one_structure_reads_the_persistent_compilation_cache(tmp_path):
  """summary.json says whether each compile was read from the cache (the tests' session cache)."""
  from conftest import TINY
  over = [o for o in TINY if not o.startswith("hidden=")] + ["hidden=[5]", "n_nodes=7", "duration_s=0.16"]
  summaries = []
  for name in ("a", "b"):
    assert cli.main(["run", "--set", *over, "--out", str(tmp_path / name), "--quiet"]) == 0
    summaries.append(json.loads((tmp_path / name / "summary.json").read_text()))
  first, second = (s["compile_cache"] for s in summaries)
  assert first["dir"] and first["hits"] + first["misses"] >= 1
  assert second["hits"] >= 1 and second["misses"] == 0
