"""divjax sweep: points equal single runs, one compile per structure, faults stay local."""

import json
import os

import pytest

from divjax import cli, sweep
from divjax.config import ConfigError
from conftest import TINY

STRAGGLERS = ["network.stragglers.fraction=0.34", "network.stragglers.slowdown=3",
              "network.stragglers.kind=both"]
BASE = [o for o in TINY if not o.startswith("fragments=")] + STRAGGLERS


def sweep_cli(tmp_path, *args):
  return cli.main(["sweep", "--set", *BASE, "--quiet", *args])


def rows(out):
  return [json.loads(l) for l in (out / "sweep.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_groups(tmp_path_factory):
  """4 points in 2 structures: (divshare, adpsgd) x seed 0..1, stragglers of both kinds."""
  out = tmp_path_factory.mktemp("sweep") / "s"
  rc = cli.main(["sweep", "--set", *BASE, "--grid", "algorithm=divshare,adpsgd", "--grid", "seed=0..1",
                 "--out", str(out), "--quiet"])
  assert rc == 0
  return out


def test_points_equal_single_runs_and_compile_once_per_group(two_groups, tmp_path):
  r = rows(two_groups)
  assert [(x["algorithm"], x["seed"], x["group"], x["status"]) for x in r] == [
      ("divshare", 0, 0, "completed"), ("divshare", 1, 0, "completed"),
      ("adpsgd", 0, 1, "completed"), ("adpsgd", 1, 1, "completed")]
  # the second point of each group reuses the first one's compiled chunk
  assert r[0]["compile_s"] > 0 and r[2]["compile_s"] > 0
  assert r[1]["compile_s"] == 0 and r[3]["compile_s"] == 0
  info = json.loads((two_groups / "sweep_summary.json").read_text())
  assert (info["groups"], info["completed"]) == (2, 4)
  # byte-identical to `divjax run` of the same config (one point of each algorithm)
  for x in (r[1], r[3]):
    point = two_groups / "points" / x["point"]
    single = tmp_path / x["point"]
    assert cli.main(["run", str(point / "config.yaml"), "--out", str(single), "--quiet"]) == 0
    assert (single / "metrics.jsonl").read_bytes() == (point / "metrics.jsonl").read_bytes()
  for name in ("sweep.csv", "sweep.png"):
    assert (two_groups / name).stat().st_size > 0


def metrics(out, point):
  return [json.loads(l) for l in (out / "points" / point / "metrics.jsonl").read_text().splitlines()]


def assert_close_records(a, b, rtol=1e-4):
  """Equal in every count (ints, None), floats to float32 rounding (vmapped programs may pick
  other kernels than single runs)."""
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      if isinstance(x[k], float):
        assert y[k] == pytest.approx(x[k], rel=rtol, abs=1e-6), k
      else:
        assert x[k] == y[k], k


@pytest.mark.slow  # the default run covers batches through the diverging-point test
def test_batched_points_equal_points_run_one_after_the_other(two_groups, tmp_path):
  out = tmp_path / "b"
  rc = cli.main(["sweep", "--set", *BASE, "--grid", "algorithm=divshare,adpsgd", "--grid", "seed=0..1",
                 "--out", str(out), "--quiet", "--batch", "2"])
  assert rc == 0
  assert json.loads((out / "sweep_summary.json").read_text())["batches"] == [2, 2]
  for x in rows(out):
    assert x["batch"] == 2 and x["status"] == "completed"
    assert_close_records(metrics(two_groups, x["point"]), metrics(out, x["point"]))
    summary = json.loads((out / "points" / x["point"] / "summary.json").read_text())
    assert summary["batch"]["size"] == 2


def test_auto_batch_is_one_point_at_a_time_on_cpu(two_groups):
  assert json.loads((two_groups / "sweep_summary.json").read_text())["batches"] == [1, 1, 1, 1]


def test_bad_batch_is_refused(tmp_path, capsys):
  out = tmp_path / "s"
  assert sweep_cli(tmp_path, "--grid", "lr=0.1,0.2", "--out", str(out), "--batch", "0") == 2
  assert "--batch" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("batch", [pytest.param("1", marks=pytest.mark.slow), "2"])  # 2: both paths
def test_a_diverging_point_does_not_change_the_others(tmp_path, batch):
  out = tmp_path / "s"
  assert sweep_cli(tmp_path, "--grid", "lr=0.05,1e30", "--out", str(out), "--batch", batch) == 0
  r = rows(out)
  assert [x["status"] for x in r] == ["completed", "diverged"]
  alone = tmp_path / "alone"
  assert sweep_cli(tmp_path, "--grid", "lr=0.05", "--out", str(alone)) == 0
  if batch == "1":
    assert ((out / "points" / r[0]["point"] / "metrics.jsonl").read_bytes() ==
            (alone / "points" / rows(alone)[0]["point"] / "metrics.jsonl").read_bytes())
  else:  # its diverged neighbour in the vmapped batch changes nothing but float32 rounding at most
    assert_close_records(metrics(out, r[0]["point"]), metrics(alone, rows(alone)[0]["point"]))


def test_resume_runs_only_unfinished_points_and_equals_an_uninterrupted_sweep(tmp_path):
  out = tmp_path / "s"
  assert sweep_cli(tmp_path, "--grid", "lr=0.02,0.05,0.1", "--out", str(out)) == 0
  before = {p.name: (p / "metrics.jsonl").read_bytes() for p in (out / "points").iterdir()}
  table = (out / "sweep.jsonl").read_text()
  # as if killed during the second point: its summary was never written, nor the tables
  second = out / "points" / rows(out)[1]["point"]
  (second / "summary.json").unlink()
  (second / "metrics.jsonl").write_text("")
  (out / "sweep.jsonl").unlink()
  first = out / "points" / rows_of(table)[0]["point"] / "metrics.jsonl"
  stamp = os.stat(first).st_mtime_ns
  assert cli.main(["sweep", "--resume", str(out), "--quiet"]) == 0
  assert os.stat(first).st_mtime_ns == stamp                          # not run again
  assert {p.name: (p / "metrics.jsonl").read_bytes() for p in (out / "points").iterdir()} == before
  strip = lambda t: [{k: v for k, v in r.items() if k not in ("wall_s", "compile_s")} for r in rows_of(t)]
  assert strip((out / "sweep.jsonl").read_text()) == strip(table)


def rows_of(text):
  return [json.loads(l) for l in text.splitlines()]


@pytest.mark.parametrize("grid, needle", [
    (["--grid", "nope=1,2"], "nope"),
    (["--grid", "lr=0.1,oops"], "lr"),
    (["--grid", "lr="], "--grid lr: expected a non-empty list"),
    (["--grid", "seed=3..1"], "--grid seed: empty range"),
    (["--grid", "lr=0.1,0.2", "--grid", "seed=0..2", "--zip"], "--zip: every --grid needs as many values"),
    (["--grid", "n_nodes=1,6"], "n_nodes"),
    (["--grid", "algorithm=dpsgd"], "fragments: algorithm 'dpsgd'"),    # BASE sets fragments... ignored by dpsgd
])
def test_bad_grids_are_refused_before_anything_is_written(tmp_path, capsys, grid, needle):
  out = tmp_path / "s"
  extra = ["fragments=2"] if "algorithm=dpsgd" in grid else []
  rc = cli.main(["sweep", "--set", *BASE, *extra, "--quiet", "--out", str(out), *grid])
  assert rc == 2
  assert needle in capsys.readouterr().err
  assert not out.exists()


def test_parse_grid_product_zip_and_ranges():
  assert sweep.parse_grid(["lr=0.1,0.2", "seed=0..1"]) == [
      {"lr": 0.1, "seed": 0}, {"lr": 0.1, "seed": 1}, {"lr": 0.2, "seed": 0}, {"lr": 0.2, "seed": 1}]
  assert sweep.parse_grid(["lr=0.1,0.2", "seed=3..4"], zip_=True) == [{"lr": 0.1, "seed": 3}, {"lr": 0.2, "seed": 4}]
  assert sweep.parse_grid(["network.stragglers.kind=compute,both"]) == [
      {"network.stragglers.kind": "compute"}, {"network.stragglers.kind": "both"}]
  with pytest.raises(ConfigError, match="given twice"):
    sweep.parse_grid(["lr=1", "lr=2"])
  # null is a value too (a key's default of None), passed on as YAML's null
  pts = sweep.points(None, [], sweep.parse_grid(["target=null,0.5"]))
  assert [p.cfg.target for p in pts] == [None, 0.5]


def test_a_point_killed_mid_run_continues_from_its_checkpoint(tmp_path):
  """A crash inside the second point (checkpoints at every boundary: checkpoint_wall_s=0), with
  records written after its last checkpoint; the resumed sweep continues that point from the
  checkpoint and ends with the uninterrupted sweep's metrics, and deletes the checkpoints."""
  pts = sweep.points(None, BASE, sweep.parse_grid(["lr=0.02,0.05"]))
  whole, _ = sweep.run(pts, tmp_path / "a", progress=False)
  second = tmp_path / "b" / "points" / pts[1].name

  def crash():
    lines = (second / "metrics.jsonl").read_text().splitlines() if (second / "metrics.jsonl").exists() else []
    if len(lines) >= 3:
      raise RuntimeError("killed")
    return False
  with pytest.raises(RuntimeError, match="killed"):
    sweep.run(pts, tmp_path / "b", progress=False, should_stop=crash, checkpoint_wall_s=0)
  assert (second / "checkpoints").is_dir() and not (second / "summary.json").exists()
  with open(second / "metrics.jsonl", "a") as f:   # a record past the checkpoint, then the kill
    f.write('{"tick": 999}\n')
  rows_b, info = sweep.run(pts, tmp_path / "b", progress=False)
  assert list(info["resumed"]) == [pts[1].name] and 0 < info["resumed"][pts[1].name] < pts[1].cfg.n_ticks
  for p in pts:
    assert ((tmp_path / "b" / "points" / p.name / "metrics.jsonl").read_bytes()
            == (tmp_path / "a" / "points" / p.name / "metrics.jsonl").read_bytes())
  assert not (second / "checkpoints").exists()
  strip = lambda rs: [{k: v for k, v in r.items() if k not in ("wall_s", "compile_s")} for r in rs]
  assert strip(rows_b) == strip(whole)


def test_checkpoints_are_throttled_by_wall_time_and_written_on_stop():
  saved, now, stop = [], [0.0], [False]
  save = sweep.throttled(lambda s, r: saved.append(int(s.tick)), lambda: stop[0], 60.0, end_tick=100,
                         clock=lambda: now[0])
  state = lambda t: type("S", (), {"tick": t})
  for tick, t in ((10, 30.0), (20, 61.0), (30, 90.0), (40, 125.0)):
    now[0] = t
    save(state(tick), [{"tick": tick}])
  assert saved == [20, 40]
  stop[0] = True
  save(state(50), [{"tick": 50}])          # stopping: always
  now[0] = 1e6
  save(state(100), [{"tick": 100}])        # the end: never
  assert saved == [20, 40, 50]
