"""Time-varying link rates (divjax.bandwidth): tables from traces and random walks, their
refusals, and the engine against the reference."""

import numpy as np
import pytest

from conftest import tiny_config
from divjax import bandwidth, engine, network, simulate
from divjax.config import ConfigError
from test_engine_vs_reference import CASES, SLOW_LINKS, assert_agree, run_both

WALK = ["network.bandwidth.random_walk=0.8", "network.bandwidth.interval_s=0.05"]


def test_a_timed_trace_sets_rates_from_its_times_on(tmp_path):
  trace = tmp_path / "bw.csv"
  trace.write_text("node,time_s,upload_mbps,download_mbps\n0,0.08,2,3\n0,0.2,4,\n5,0,0.1,0.2\n")
  net = network.build(tiny_config(f"network.bandwidth.trace={trace}"))   # blocks of 4 ticks: 0.04 s
  up, down = net.upload_bps_t, net.download_bps_t
  base = 0.5e6
  np.testing.assert_array_equal(up[0, :6], [base, base, 2e6, 2e6, 2e6, 4e6])   # 0, .04 | .08 .. | .2
  np.testing.assert_array_equal(down[0, :6], [net.download_bps[0]] * 2 + [3e6] * 4)   # a blank keeps 3
  assert (up[5] == 0.1e6).all() and (down[5] == 0.2e6).all()
  assert (up[1:5] == base).all()                                                # not in the trace


def test_a_static_trace_loads_per_node_capacities(tmp_path):
  """FedScale's client capacity traces give one rate per client: rows without time_s."""
  trace = tmp_path / "fedscale.csv"
  trace.write_text("node,upload_mbps\n" + "".join(f"{i},{0.1 * (i + 1)}\n" for i in range(6)))
  net = network.build(tiny_config(f"network.bandwidth.trace={trace}"))
  np.testing.assert_allclose(net.upload_bps_t[:, 0], 0.1e6 * np.arange(1, 7))
  assert (net.upload_bps_t == net.upload_bps_t[:, :1]).all()


def test_random_walk_is_seeded_bounded_and_moves():
  cfg = tiny_config(*WALK, "network.bandwidth.max_factor=3")
  a, b = network.build(cfg), network.build(cfg)
  np.testing.assert_array_equal(a.upload_bps_t, b.upload_bps_t)
  ratio = a.upload_bps_t / a.upload_bps[:, None]
  assert np.all(ratio <= 3 + 1e-9) and np.all(ratio >= 1 / 3 - 1e-9)
  assert np.ptp(ratio) > 0.1 and (ratio[:, 0] == 1).all()
  assert not np.allclose(a.upload_bps_t, a.download_bps_t)                      # two walks
  other = network.build(tiny_config(*WALK, "network.bandwidth.max_factor=3", "data.seed=5"))
  assert not np.allclose(a.upload_bps_t, other.upload_bps_t)


def test_slower_links_in_time_flush_more():
  """Rates that drop mid-run make DivShare flush more than the fixed rates they start from."""
  counts = {}
  for name, extra in (("fixed", []), ("walk", ["network.bandwidth.random_walk=1.5",
                                                  "network.bandwidth.interval_s=0.05"])):
    sim = simulate.build(tiny_config("fragments=2", *SLOW_LINKS, *extra))
    state0 = sim.engine.init(sim.run_key)
    state, _ = simulate.compile_chunk(sim, state0, 40)(state0, sim.params)
    counts[name] = engine.message_counts(state)
  assert counts["walk"]["msgs_flushed"] != counts["fixed"]["msgs_flushed"]
  assert counts["walk"]["msgs_sent"] == counts["fixed"]["msgs_sent"]


@pytest.mark.parametrize("text, what", [
    ("node,upload_mbps\n0,-3\n", "positive"),
    ("node,upload_mbps,download_mbps\n0,1,0\n", "positive"),
    ("node,time_s,upload_mbps\n0,0.5,1\n0,0.2,1\n", "must increase"),
    ("node,time_s,upload_mbps\n0,-1,1\n", "time_s must be"),
    ("node,speed\n0,1\n", "header"),
    ("node,upload_mbps\n7,1\n", "node must be in"),
])
def test_bad_traces_are_refused_naming_the_key(tmp_path, text, what):
  trace = tmp_path / "bw.csv"
  trace.write_text(text)
  with pytest.raises(ConfigError, match=r"network\.bandwidth\.trace.*" + what):
    tiny_config(f"network.bandwidth.trace={trace}")


@pytest.mark.parametrize("sets, key", [
    (["network.bandwidth.random_walk=0"], "random_walk"),
    (["network.bandwidth.random_walk=1", "network.bandwidth.trace=x.csv"], "trace"),
])
def test_bad_bandwidth_settings_are_refused(sets, key):
  with pytest.raises(ConfigError, match=key):
    tiny_config(*sets)


AGREEMENT = [
    pytest.param("divshare", "both-stragglers", WALK, marks=pytest.mark.slow),
    ("adpsgd", "comm-stragglers", WALK + ["recipients=4"]),          # replies, queued at their request
    ("swift", "comm-stragglers",                                      # every wrapper on a baseline
     WALK + ["ring_depth=3", "churn.mean_online_s=0.12", "churn.mean_offline_s=0.08", "compression.kind=random_k",
             "compression.fraction=0.5", "aggregation.rule=median", "byzantine.fraction=0.34",
             "byzantine.attack=alie"]),
    pytest.param("adpsgd_pairwise", "fast-links", WALK + ["network.upload_mbps=0.2"], marks=pytest.mark.slow),
    pytest.param("divshare", "slow-links-flush", WALK, marks=pytest.mark.slow),
    pytest.param("divshare", "both-stragglers",       # with every other wrapper
                 WALK + ["churn.mean_online_s=0.12", "churn.mean_offline_s=0.08", "compression.kind=qsgd",
                         "aggregation.rule=trimmed_mean", "byzantine.fraction=0.34"], marks=pytest.mark.slow),
]


@pytest.mark.parametrize("alg, case, extra", AGREEMENT)
def test_engine_matches_reference_with_time_varying_rates(alg, case, extra):
  sets = [f"algorithm={alg}", "fragments=2" if alg == "divshare" else "fragments=1", *CASES[case], *extra]
  if alg == "adpsgd_pairwise":
    sets = [s for s in sets if not s.startswith("recipients")]
  state, ref_params, ref_counts = run_both(tiny_config(*sets), n_ticks=48)
  assert ref_counts["msgs_delivered"] > 0
  assert_agree(state, ref_params, ref_counts)


def test_engine_matches_reference_with_a_trace(tmp_path):
  trace = tmp_path / "bw.csv"
  trace.write_text("node,time_s,upload_mbps,download_mbps\n0,0.1,0.05,1\n0,0.25,2,2\n3,0,0.08,0.3\n5,0.15,0.1,0.1\n")
  state, ref_params, ref_counts = run_both(tiny_config("fragments=2", *SLOW_LINKS,
                                                       f"network.bandwidth.trace={trace}"), n_ticks=48)
  assert ref_counts["msgs_flushed"] > 0
  assert_agree(state, ref_params, ref_counts)
  assert bandwidth.enabled(tiny_config(f"network.bandwidth.trace={trace}"))
