"""divjax.theory: consensus contraction of the engine under pure averaging against predictions."""

import json

import numpy as np
import pytest

from divjax import cli, configure, theory

# A small model with many fragments: every fragment is mixed with its own random recipients,
# so 128 fragments x seeds independent draws of W a round keep the measured ratios within ~1%
# (a 16-node W varies more than a 60-node one: more seeds there).
SMALL = ["task=synthetic", "model=mlp", "hidden=[16]", "data.dim=8", "data.samples_per_node=8",
         "data.test_size=20", "local_steps=1", "batch_size=2", "network.upload_mbps=1000",
         "network.download_mbps=1000", "network.latency_ms=1", "network.compute_s_per_step=0.01",
         "network.stragglers.fraction=0"]


def run(n, j, algorithm="divshare", extra=(), rounds=12, seeds=None):
  seeds = seeds or (6 if n < 32 else 2)
  sets = SMALL + [f"n_nodes={n}", f"recipients={j}", f"algorithm={algorithm}", *extra]
  if algorithm == "divshare":
    sets.append("fragments=128")
  return theory.contraction(configure.load(None, sets), rounds=rounds, seeds=seeds, trials=3000)


def test_lambda2_closed_form_matches_the_table_of_paper_1_8():
  table = {(16, 1): 0.602, (16, 6): 0.100, (60, 1): 0.625, (60, 3): 0.302, (60, 6): 0.150, (128, 12): 0.076}
  for (n, j), v in table.items():
    assert theory.lambda2(n, j) == pytest.approx(v, abs=6e-4)
  # q acts like J_eff = qJ; no delivery, no mixing
  assert theory.lambda2(60, 6, 0.5) == pytest.approx(theory.lambda2(60, 3), rel=0.02)
  assert theory.lambda2(60, 3, 0.0) == 1.0


def test_monte_carlo_no_delay_step_is_lambda2_and_delay_slows_mixing():
  no_delay = theory.recursion(60, 3, 1.0, 8, delay=0, trials=3000, seed=1)
  delayed = theory.recursion(60, 3, 1.0, 8, delay=1, trials=3000, seed=2)
  assert no_delay[1] == pytest.approx(no_delay[0], rel=1e-9)        # nothing averaged at round end 0
  assert no_delay[2] / no_delay[1] == pytest.approx(theory.lambda2(60, 3), rel=0.02)
  assert theory.rates(delayed, 1)[1] > 1.4 * theory.rates(no_delay, 1)[1]


@pytest.mark.parametrize("n, j", [(16, 6), pytest.param(60, 3, marks=pytest.mark.slow)])
def test_engine_first_step_is_lambda2_and_steady_rate_is_the_delayed_recursion(n, j):
  r = run(n, j)
  assert r["first_step"] == pytest.approx(theory.lambda2(n, j), rel=0.03)
  assert r["steady"] == pytest.approx(r["steady_predicted"], rel=0.03)
  assert r["steady"] > 1.2 * r["lambda2"]                           # the one-round delay shows
  assert set(r["delivered_fraction"]) == {1.0}


@pytest.mark.slow
@pytest.mark.parametrize("n, j", [(16, 1), (16, 3), (60, 1), (60, 6)])
def test_engine_contraction_other_sizes(n, j):
  r = run(n, j)
  assert r["first_step"] == pytest.approx(theory.lambda2(n, j), rel=0.03)
  assert r["steady"] == pytest.approx(r["steady_predicted"], rel=0.03)


def test_synchronous_el_contracts_by_lambda2_every_round():
  # one mixing matrix a round for the whole model (no fragments): more seeds for the same noise
  r = run(60, 3, algorithm="el_local", rounds=8, seeds=6)
  assert r["first_round"] == 0
  assert r["first_step"] == pytest.approx(theory.lambda2(60, 3), rel=0.03)
  assert r["steady"] == pytest.approx(r["steady_predicted"], rel=0.03)
  assert r["steady"] == pytest.approx(theory.lambda2(60, 3), rel=0.03)


def test_dpsgd_on_a_ring_matches_its_mixing_matrix():
  r = run(16, 3, algorithm="dpsgd", extra=["topology=ring"], rounds=12, seeds=1)
  w = np.zeros((16, 16))
  for i in range(16):                 # Metropolis-Hastings weights on a ring: 1/3 each
    w[i, i] = w[i, (i + 1) % 16] = w[i, (i - 1) % 16] = 1 / 3
  lam = np.sort(np.abs(np.linalg.eigvalsh(w)))[-2]
  assert r["lambda2"] == pytest.approx(lam, rel=1e-6)
  assert r["steady"] == pytest.approx(lam ** 2, rel=0.03)
  assert r["first_step"] == pytest.approx(r["first_step_predicted"], rel=0.1)


def test_cli_prints_the_result_and_writes_json_and_plot(tmp_path, capsys):
  out = tmp_path / "c"
  rc = cli.main(["theory", "contraction", "--set", *SMALL, "n_nodes=16", "recipients=3", "fragments=16",
                 "--rounds", "6", "--trials", "500", "--out", str(out)])
  assert rc == 0
  printed = json.loads(capsys.readouterr().out)
  for key in ("first_step", "steady", "lambda2", "steady_predicted", "consensus"):
    assert key in printed
  assert json.loads((out / "contraction.json").read_text()) == printed
  assert (out / "contraction.png").stat().st_size > 0
  assert cli.main(["theory", "contraction", "--set", *SMALL, "--rounds", "2", "--out", str(tmp_path / "x")]) == 2
  assert "--rounds" in capsys.readouterr().err
