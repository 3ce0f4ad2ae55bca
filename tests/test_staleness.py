"""divjax theory staleness: capacity laws, fits, and the direct ages of a tiny run."""

import json

import numpy as np
import pytest

from divjax import cli, staleness

TINY = ["fragments=1", "recipients=1", "task=synthetic", "model=mlp", "hidden=[4]", "local_steps=1",
        "batch_size=2", "lr=0", "data.dim=4", "data.samples_per_node=4", "data.test_size=20",
        "data.n_classes=2", "data.classes_per_node=1", "network.upload_mbps=1000",
        "network.download_mbps=1000", "network.latency_ms=1", "network.compute_s_per_step=0.01",
        "network.stragglers.fraction=0"]


def test_capacity_laws():
  assert [staleness.recipients_for(n, "constant", 2) for n in (8, 100)] == [2, 2]
  assert [staleness.recipients_for(n, "log", 1) for n in (8, 100)] == [3, 5]
  assert [staleness.recipients_for(n, "linear", 1) for n in (8, 100)] == [1, 10]
  assert staleness.recipients_for(4, "linear", 50) == 3          # at most n - 1


def test_fit_recovers_a_line():
  x = np.array([1.0, 2.0, 3.0, 4.0])
  f = staleness.fit(x, 2 * x + 1)
  assert f == pytest.approx({"slope": 2.0, "intercept": 1.0, "r2": 1.0})
  assert staleness.fit(x, [1.0, 3.0, 2.0, 4.0])["r2"] < 0.9


@pytest.mark.slow  # the observer itself is checked against the reference in test_versions
def test_direct_ages_grow_like_n(tmp_path, capsys):
  out = tmp_path / "s"
  rc = cli.main(["theory", "staleness", "--set", *TINY, "--nodes", "6", "12", "--rounds", "20",
                 "--modes", "direct", "--out", str(out)])
  assert rc == 0
  r = json.loads(capsys.readouterr().out)
  direct = [p["age_mean"] for p in r["modes"]["direct"]["points"]]
  # node i hears of j only when j picks it (probability 1/(n-1) a round): about n - 1
  assert direct[0] == pytest.approx(5, rel=0.35) and direct[1] == pytest.approx(11, rel=0.35)
  assert r["modes"]["direct"]["fit_n"]["slope"] == pytest.approx(1.0, rel=0.35)


@pytest.mark.slow
def test_direct_ages_grow_like_n_and_relay_stays_below(tmp_path, capsys):
  out = tmp_path / "s"
  rc = cli.main(["theory", "staleness", "--set", *TINY, "--nodes", "6", "12", "--rounds", "20",
                 "--out", str(out)])
  assert rc == 0
  r = json.loads(capsys.readouterr().out)
  assert json.loads((out / "staleness.json").read_text()) == r and (out / "staleness.png").exists()
  direct = [p["age_mean"] for p in r["modes"]["direct"]["points"]]
  relay = [p["age_mean"] for p in r["modes"]["relay"]["points"]]
  # direct: node i hears of j only when j picks it (probability 1/(n-1) a round): about n - 1
  assert direct[0] == pytest.approx(5, rel=0.35) and direct[1] == pytest.approx(11, rel=0.35)
  assert relay[0] < direct[0] and relay[1] < direct[1]
  assert cli.main(["theory", "staleness", "--set", *TINY, "--nodes", "6", "--out", str(tmp_path / "x")]) == 2
