"""A run over two processes (divjax.multihost), on localhost with CPU collectives: 2 processes
with 2 host devices each stand in for 2 hosts. It must simulate what one process simulates."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY
from divjax import configure, simulate

SET = TINY + ["devices=4", "n_nodes=8", "checkpoint_every_s=0.1"]
COUNTS = ("msgs_sent", "msgs_delivered", "msgs_superseded", "msgs_flushed", "msgs_expired", "msgs_in_flight")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(extra: list[str]) -> list[subprocess.CompletedProcess]:
  """The same `divjax run` command in two processes; both must finish."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "divjax.cli", "run", *extra, "--quiet", "--distributed",
       "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
  out = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
  for r in out:
    assert r.returncode == 0, r.stderr[-3000:]
  return out


def _records(path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same(got: list[dict], want: list[dict]):
  assert [r["tick"] for r in got] == [r["tick"] for r in want]
  for g, w in zip(got, want):
    assert {k: g[k] for k in COUNTS} == {k: w[k] for k in COUNTS}, g["tick"]  # exactly
    for k in ("acc_mean", "acc_avg_model", "loss_mean", "consensus", "train_loss"):
      if w[k] is not None:  # float32 rounding: another device layout, another summation order
        np.testing.assert_allclose(g[k], w[k], rtol=1e-4, atol=1e-6, err_msg=f"{k} at tick {g['tick']}")


def _one_process(duration: float) -> list[dict]:
  want = []
  simulate.run(configure.load(None, SET + ["devices=1", f"duration_s={duration}"]), on_eval=want.append)
  return want


def test_two_processes_match_one(tmp_path):
  _two_processes(tmp_path, _one_process(0.4), resume=False)


@pytest.mark.slow
def test_two_processes_resume_a_run(tmp_path):
  _two_processes(tmp_path, _one_process(0.6), resume=True)


def _two_processes(tmp_path, want: list[dict], resume: bool):
  out = tmp_path / "run"
  _launch(["--set", *SET, "--out", str(out)])
  # process 0 wrote the run directory; process 1 wrote nothing anywhere in it
  assert sorted(p.name for p in out.iterdir()) == sorted(
      [".divjax-run", "checkpoints", "config.yaml", "label_histograms.csv", "metrics.jsonl",
       "metrics.png", "summary.json"])
  summary = json.loads((out / "summary.json").read_text())
  assert summary["status"] == "completed" and summary["devices"] == 4
  first = _records(out / "metrics.jsonl")
  _assert_same(first, want[:len(first)])

  if not resume:
    return
  # both processes read the checkpoint of the shared directory and continue the run
  _launch(["--resume", str(out), "--set", "duration_s=0.6"])
  _assert_same(_records(out / "metrics.jsonl"), want)


def test_distributed_refuses_bad_input(tmp_path):
  from divjax import cli
  for argv, says in [(["run", "--distributed", "--quiet"], "--out"),
                     (["run", "--process-id", "1", "--out", str(tmp_path / "a")], "--distributed")]:
    r = subprocess.run([sys.executable, "-m", "divjax.cli", *argv], capture_output=True, text=True)
    assert r.returncode == cli.EXIT_BAD_INPUT and says in r.stderr, r.stderr
  assert not (tmp_path / "a").exists()
