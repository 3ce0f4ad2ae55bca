"""Churn (divjax.churn): schedules, offline nodes, the LOST fate, and the engine against the
reference with stragglers."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_config
from divjax import churn, engine, simulate
from divjax.config import ConfigError
from test_engine_vs_reference import CASES, assert_agree, run_both

ON_OFF = ["churn.mean_online_s=0.12", "churn.mean_offline_s=0.08"]


def test_exponential_schedule_has_the_stationary_offline_share():
  cfg = tiny_config("n_nodes=400", "churn.mean_online_s=1", "churn.mean_offline_s=3", "duration_s=40")
  online, next_off = churn.tables(cfg, np.full(400, 4), 10_000, cfg.n_ticks)   # rounds of 0.04 s
  assert abs(online.mean() - 0.25) < 0.03                                      # mean_on / (on + off)
  # next_off: the first offline round after each round
  i, r = 7, 3
  later = np.flatnonzero(~online[i, r + 1:])
  assert next_off[i, r] == (r + 1 + later[0] if later.size else churn.NEVER)
  # the same seed, the same schedule; a longer run extends it
  longer = tiny_config("n_nodes=400", "churn.mean_online_s=1", "churn.mean_offline_s=3", "duration_s=80")
  online2, _ = churn.tables(longer, np.full(400, 4), 10_000, longer.n_ticks)
  np.testing.assert_array_equal(online2[:, :online.shape[1] - 1], online[:, :-1])


def test_trace_marks_the_rounds_that_start_offline(tmp_path):
  trace = tmp_path / "t.csv"
  trace.write_text("node,start_s,end_s\n1,0.08,0.2\n1,0.3,0.33\n4,0,1\n")
  cfg = tiny_config(f"churn.trace={trace}")
  online, _ = churn.tables(cfg, np.full(6, 4), 10_000, cfg.n_ticks)          # rounds start every 0.04 s
  np.testing.assert_array_equal(np.flatnonzero(~online[1])[:4], [2, 3, 4, 8])  # 0.08, 0.12, 0.16; 0.32
  assert not online[4].any() and online[[0, 2, 3, 5]].all()


@pytest.mark.parametrize("rows, what", [
    ("0,0.5,0.2\n", "start_s < end_s"),
    ("0,-1,0.2\n", "start_s < end_s"),
    ("0,0.3,0.4\n0,0.1,0.2\n", "sorted"),
    ("9,0.1,0.2\n", "node must be in"),
    ("0,abc,0.2\n", "node,start_s,end_s"),
])
def test_bad_traces_are_refused_naming_the_key(tmp_path, rows, what):
  trace = tmp_path / "t.csv"
  trace.write_text(rows)
  with pytest.raises(ConfigError, match=r"churn\.trace.*" + what):
    tiny_config(f"churn.trace={trace}")


@pytest.mark.slow  # the same exit path as tests/test_byzantine.py's
def test_cli_refuses_a_bad_trace_with_exit_2(tmp_path):
  trace = tmp_path / "t.csv"
  trace.write_text("0,0.3,0.1\n")
  r = subprocess.run([sys.executable, "-m", "divjax.cli", "run", "configs/quickstart.yaml", "--set",
                      f"churn.trace={trace}", "--out", str(tmp_path / "r")], capture_output=True, text=True)
  assert r.returncode == 2 and "churn.trace" in r.stderr
  assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("sets, key", [
    (["churn.mean_online_s=1"], "mean_offline_s"),
    (["churn.mean_online_s=1", "churn.mean_offline_s=1", "churn.trace=x.csv"], "trace"),
    (["churn.mean_online_s=0", "churn.mean_offline_s=1"], "churn.mean_online_s"),
])
def test_bad_churn_settings_are_refused_naming_the_key(sets, key):
  with pytest.raises(ConfigError, match=key):
    tiny_config(*sets)


def test_an_offline_node_neither_trains_nor_sends(tmp_path):
  trace = tmp_path / "t.csv"
  trace.write_text("2,0,100\n")                  # node 2 is away for the whole run
  sim = simulate.build(tiny_config(f"churn.trace={trace}"))
  state0 = sim.engine.init(sim.run_key)
  x0 = np.asarray(state0.params[2])                 # the chunk donates the state it is given
  state, _ = simulate.compile_chunk(sim, state0, 40)(state0, sim.params)
  assert int(state.steps[2]) == 0 and int(state.steps[0]) == 40
  np.testing.assert_array_equal(np.asarray(state.params[2]), x0)
  assert not bool((np.asarray(state.msgs.fate[2]) != 0).any())                  # nothing sent
  assert int(state.rounds[2]) == int(state.rounds[0])                           # its slots still pass
  counts = engine.message_counts(state)
  assert counts["msgs_lost"] > 0                                                # what was sent to it


AGREEMENT = [
    ("divshare", "both-stragglers", []),
    pytest.param("swift", "comm-stragglers", ["ring_depth=3"], marks=pytest.mark.slow),
    ("sgp", "comm-stragglers", []),                   # an algorithm with its own state and rule
    ("adpsgd", "comm-stragglers", ["recipients=4"]),  # replies: the replier's last online snapshot
    pytest.param("adpsgd_pairwise", "compute-stragglers-superseded", [], marks=pytest.mark.slow),
    pytest.param("divshare", "slow-links-flush", [], marks=pytest.mark.slow),
    pytest.param("divshare", "short-ring-expires", [], marks=pytest.mark.slow),
    pytest.param("divshare_age", "compute-stragglers-superseded", [], marks=pytest.mark.slow),
    pytest.param("swift_original", "fast-links", ["topology=regular", "topology_degree=3"], marks=pytest.mark.slow),
    pytest.param("divshare", "both-stragglers",       # composed with the other wrappers
                 ["compression.kind=top_k", "compression.fraction=0.3", "aggregation.rule=median",
                  "byzantine.fraction=0.34"], marks=pytest.mark.slow),
]


@pytest.mark.parametrize("alg, case, extra", AGREEMENT)
def test_engine_matches_reference_with_churn(alg, case, extra):
  sets = [f"algorithm={alg}", "fragments=2" if alg in ("divshare", "divshare_age") else "fragments=1",
          *CASES[case], *ON_OFF, *extra]
  if alg in ("sgp", "swift_original", "adpsgd_pairwise"):
    sets = [s for s in sets if not s.startswith("recipients")]
  state, ref_params, ref_counts = run_both(tiny_config(*sets), n_ticks=48)
  assert ref_counts["msgs_lost"] > 0 and ref_counts["msgs_delivered"] + ref_counts["msgs_expired"] > 0
  assert_agree(state, ref_params, ref_counts)
  c = engine.message_counts(state)   # every message ends as exactly one fate, or is in flight
  assert c["msgs_sent"] == (c["msgs_delivered"] + c["msgs_flushed"] + c["msgs_expired"] + c["msgs_lost"]
                            + c["msgs_in_flight"])


@pytest.mark.slow
def test_engine_matches_reference_with_a_trace(tmp_path):
  trace = tmp_path / "t.csv"
  trace.write_text("0,0.05,0.15\n3,0,0.1\n3,0.2,0.3\n5,0.12,0.5\n")
  state, ref_params, ref_counts = run_both(tiny_config("fragments=2", *CASES["comm-stragglers"],
                                                       f"churn.trace={trace}"), n_ticks=48)
  assert ref_counts["msgs_lost"] > 0
  assert_agree(state, ref_params, ref_counts)


def test_records_say_how_many_nodes_are_online():
  records = []
  simulate.run(tiny_config(*ON_OFF), on_eval=records.append)
  assert all(0.0 <= r["online_fraction"] <= 1.0 for r in records)
  assert any(r["online_fraction"] < 1.0 for r in records)
  assert records[-1]["msgs_lost"] > 0


@pytest.mark.parametrize("case, extra", [
    ("both-stragglers-short-ring", ["recipients=4", "seed=2"]),   # a reply from a replier back from offline
    pytest.param("comm-stragglers-expiring", [], marks=pytest.mark.slow),
])
def test_adpsgd_replies_under_churn_match_the_reference(case, extra):
  """A replier back from offline rounds answers with its last online snapshot, unless that
  snapshot's ring slot is already gone; replies not uploaded when it leaves, or reaching an
  offline pinger, are lost."""
  from test_engine_vs_reference import ADPSGD_CASES
  cfg = tiny_config("algorithm=adpsgd", "fragments=1", *ADPSGD_CASES[case], *ON_OFF, *extra)
  state, ref_params, ref_counts = run_both(cfg, n_ticks=48)
  assert ref_counts["msgs_lost"] > 0 and ref_counts["msgs_expired"] > 0
  assert_agree(state, ref_params, ref_counts)
