"""Cheaper evaluation (config `eval`): a seeded test subsample, a seeded subset of nodes, or the
network-average model only; records say what was evaluated."""

import jax
import numpy as np
import pytest

from divjax import cli, simulate, tasks
from conftest import TINY, tiny_config


def _test_rows(task):
  x, _, valid = task.test
  return np.asarray(x).reshape(-1, x.shape[-1])[np.asarray(valid).reshape(-1)]


def test_the_test_subsample_is_a_seeded_subset_of_the_test_set():
  full = _test_rows(tasks.build(tiny_config()))
  a = _test_rows(tasks.build(tiny_config("eval.test_subsample=20")))
  again = _test_rows(tasks.build(tiny_config("eval.test_subsample=20")))
  other = _test_rows(tasks.build(tiny_config("eval.test_subsample=20", "data.seed=5")))
  assert a.shape == (20, full.shape[1])
  np.testing.assert_array_equal(a, again)                           # deterministic
  rows = {r.tobytes() for r in full}
  assert all(r.tobytes() in rows for r in a)                        # drawn from the test set
  full5 = {r.tobytes() for r in _test_rows(tasks.build(tiny_config("data.seed=5")))}
  assert all(r.tobytes() in full5 for r in other) and not np.array_equal(a, other)
  # the training data and the run's training are untouched by it
  t0, t1 = tasks.build(tiny_config()), tasks.build(tiny_config("eval.test_subsample=20"))
  np.testing.assert_array_equal(np.asarray(t0.x_train), np.asarray(t1.x_train))


def test_a_node_subset_reports_those_nodes_metrics_and_names_itself():
  cfg = tiny_config("eval.nodes=3", "duration_s=0.2")
  ids = simulate.eval_node_ids(cfg)
  assert ids.tolist() == sorted(set(ids.tolist())) and len(ids) == 3
  np.testing.assert_array_equal(ids, simulate.eval_node_ids(tiny_config("eval.nodes=3", "lr=0.1")))
  sim = simulate.build(cfg)
  summary, state = simulate.run(cfg, sim=sim)
  full = jax.device_get(sim.evaluate_nodes(state.params, sim.task.test))
  rec = summary["final"]
  assert rec["eval_nodes"] == 3 and "eval_test" not in rec
  assert rec["acc_mean"] == pytest.approx(float(np.mean(full["acc"][ids])), rel=1e-6)
  assert rec["acc_min"] == pytest.approx(float(np.min(full["acc"][ids])), rel=1e-6)
  assert rec["loss_mean"] == pytest.approx(float(np.mean(full["loss"][ids])), rel=1e-6)
  # training is unchanged: the counts and the average model equal a fully evaluated run's
  plain, _ = simulate.run(tiny_config("duration_s=0.2"))
  assert "eval_nodes" not in plain["final"]
  for k in ("msgs_sent", "msgs_delivered", "acc_avg_model", "consensus"):
    assert rec[k] == plain["final"][k], k


def test_average_model_only_run_writes_its_outputs(tmp_path):
  out = tmp_path / "r"
  assert cli.main(["run", "--set", *TINY, "eval.nodes=0", "target=0.01", "--out", str(out), "--quiet"]) == 0
  import json
  records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  assert all(r["acc_mean"] is None and r["eval_nodes"] == 0 for r in records)
  summary = json.loads((out / "summary.json").read_text())
  assert summary["best_acc_mean"] == max(r["acc_avg_model"] for r in records)
  assert summary["time_to_target_s"] == 0.0
  assert (out / "metrics.png").stat().st_size > 0


@pytest.mark.parametrize("sets, needle", [
    (["eval.nodes=7"], "eval.nodes: must be <= n_nodes = 6"),
    (["eval.test_subsample=0"], "eval.test_subsample"),
    (["task=movielens-100k", "eval.test_subsample=10"], "eval.test_subsample: allowed only for tasks with one test set"),
])
def test_bad_evaluation_options_are_refused(tmp_path, capsys, sets, needle):
  out = tmp_path / "r"
  assert cli.main(["run", "--set", *TINY, *sets, "--out", str(out), "--quiet"]) == 2
  assert needle in capsys.readouterr().err
  assert not out.exists()
