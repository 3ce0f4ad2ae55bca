"""Simulated times stay exact on links slow enough to overflow int32 microseconds (issue 18).

A fragment over a 1e-6 Mbit/s link takes about half an hour, a few of them queued pass 2**31
us, and a 1e-9 Mbit/s link needs 10**15 us: the engine and the reference must agree on every
message's fate there, and nothing can be delivered that could not arrive in time.
"""

import numpy as np
import pytest

from divjax import algorithms, engine, network, reference, simulate
from divjax import timebase as tb
from conftest import tiny_config
from test_engine_vs_reference import assert_agree, run_both


def test_wide_arithmetic_matches_python_ints():
  rng = np.random.default_rng(0)
  big = rng.integers(0, 1 << 47, size=200)
  small = rng.integers(-(1 << 30), 1 << 30, size=200)
  a, b = tb.wide_from_host(big), tb.wide_from_host(big[::-1].copy())
  value = lambda w: (np.asarray(w.hi, np.int64) << tb.LO_BITS) + np.asarray(w.lo, np.int64)
  np.testing.assert_array_equal(value(tb.add(a, b)), big + big[::-1])
  np.testing.assert_array_equal(value(tb.sub(a, b)), big - big[::-1])
  np.testing.assert_array_equal(value(tb.sub_narrow(a, small.astype(np.int32))), big - small)
  np.testing.assert_array_equal(value(tb.maximum(a, b)), np.maximum(big, big[::-1]))
  np.testing.assert_array_equal(np.asarray(tb.narrow(a)), np.minimum(big, tb.CAP_US))
  np.testing.assert_array_equal(np.asarray(tb.narrow(tb.wide(small.astype(np.int32)))), small)
  # running sums saturate at WIDE_MAX_US instead of wrapping
  rows = np.full((3, 40), 1 << 45)
  np.testing.assert_array_equal(value(tb.cumsum(tb.wide_from_host(rows), axis=1)),
                                np.minimum(np.cumsum(rows, axis=1), tb.WIDE_MAX_US))
  seg = tb.segment_max(a, np.arange(200) % 3 != 0, np.arange(200) % 4, 4, tb.wide(np.zeros(4, np.int32)))
  live = np.arange(200) % 3 != 0
  want = [max([0] + [int(v) for v, k, l in zip(big, range(200), live) if k % 4 == s and l]) for s in range(4)]
  np.testing.assert_array_equal(value(seg), want)


def test_saturating_segmented_cumsum():
  x = np.array([5, 7, 2**30, 2**30, 3, 4], np.int32)
  first = np.array([True, False, False, False, True, False])
  np.testing.assert_array_equal(np.asarray(tb.sat_segmented_cumsum(x, first, 2**31 - 1)),
                                [5, 12, 2**30 + 12, 2**31 - 1, 3, 7])


@pytest.mark.parametrize("mbps", [pytest.param(1e-6, marks=pytest.mark.slow), 1e-9])
def test_divshare_on_hopeless_links_delivers_nothing(mbps):
  """Every fragment needs more than a round: all flushed, none delivered (was ~half)."""
  cfg = tiny_config(f"network.upload_mbps={mbps}", "fragments=8")
  state, ref_params, ref_counts = run_both(cfg)
  counts = engine.message_counts(state)
  assert counts["msgs_sent"] > 0 and counts["msgs_delivered"] == 0
  assert counts["msgs_flushed"] + counts["msgs_in_flight"] == counts["msgs_sent"]
  assert_agree(state, ref_params, ref_counts)


def test_swift_queue_far_behind_drains_exactly():
  """A queue more than CAP_US (17.9 min) behind must drain at the right time, not early.

  Node 0 downloads at 1/770,000 of the normal rate, so a fragment sent to it takes about 25
  minutes and every later message of its sender waits behind it; rounds last 100 s. Saturating
  the backlog at CAP_US (the old code) would release those queues 7 minutes too early.
  """
  cfg = tiny_config("algorithm=swift", "ring_depth=2", "local_steps=1", "network.compute_s_per_step=100",
                    "duration_s=3000", "eval_every_s=1000", "network.upload_mbps=1",
                    "network.download_cap=true", "network.stragglers.nodes=[0]",
                    "network.stragglers.slowdown=770000", "network.latency_ms=0")
  state, ref_params, ref_counts = run_both(cfg, n_ticks=30)
  assert ref_counts["msgs_expired"] > 0 and ref_counts["msgs_delivered"] > 0
  assert_agree(state, ref_params, ref_counts)


def test_sync_round_longer_than_the_run_never_completes():
  cfg = tiny_config("algorithm=dpsgd", "topology=ring", "network.upload_mbps=1e-9", "duration_s=0.6")
  sim = simulate.build(cfg)
  state = sim.engine.init(sim.run_key)
  state, _ = simulate.compile_chunk(sim, state, 60)(state, sim.params)
  _, ref = reference.simulate_sync(cfg, sim.task, algorithms.make(cfg), 60)
  assert ref["rounds"][0] == 0
  np.testing.assert_array_equal(np.asarray(state.rounds), ref["rounds"])
  assert int(state.sent) == 0


@pytest.mark.parametrize("overrides, key", [
    (["network.latency_ms=700000"], "network.latency_ms"),
    (["ring_depth=30", "network.compute_s_per_step=10"], "ring_depth"),
    (["local_steps=80", "network.compute_s_per_step=5", "ring_depth=3"], "local_steps"),
])
def test_horizon_beyond_int32_is_refused_naming_the_key(overrides, key):
  cfg = tiny_config(*overrides, "duration_s=5000", "eval_every_s=1000")
  net = network.build(cfg)
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    engine.check_horizon(cfg, engine.ring_depth(cfg, algorithms.make(cfg), net), net)
