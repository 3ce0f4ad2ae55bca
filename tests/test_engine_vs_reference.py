"""The proof that the engine is right: it agrees with the plain event simulator."""

import numpy as np
import pytest

from divjax import algorithms, engine, reference, simulate
from conftest import tiny_config

SLOW_LINKS = ["network.upload_mbps=0.15", "network.download_mbps=0.3", "network.download_cap=true"]
COMM_STRAGGLERS = ["network.upload_mbps=0.5", "network.stragglers.fraction=0.34",
                   "network.stragglers.slowdown=5"]
COMPUTE_STRAGGLERS = ["network.stragglers.fraction=0.34", "network.stragglers.slowdown=3",
                      "network.stragglers.kind=compute", "network.latency_ms=20"]

CASES = {
    "fast-links": [],
    "slow-links-flush": SLOW_LINKS,
    "comm-stragglers": COMM_STRAGGLERS,
    "compute-stragglers-superseded": COMPUTE_STRAGGLERS,
    "both-stragglers": ["network.stragglers.fraction=0.5", "network.stragglers.slowdown=2",
                        "network.stragglers.kind=both", "network.latency_ms=35",
                        "network.upload_mbps=0.2"],
    "short-ring-expires": ["network.latency_ms=45", "ring_depth=1"],
}


def run_both(cfg, n_ticks=40):
  sim = simulate.build(cfg)
  state = sim.engine.init(sim.run_key)
  state, _ = simulate.compile_chunk(sim, state, n_ticks)(state, sim.params)
  ref_params, ref_counts = reference.simulate(cfg, sim.task, algorithms.make(cfg), n_ticks,
                                              sim.engine.depth)
  return state, ref_params, ref_counts


def assert_agree(state, ref_params, ref_counts):
  counts = engine.message_counts(state)
  for key, value in counts.items():
    assert value == ref_counts[key], (key, value, ref_counts[key])
  assert int(state.age_sum) == ref_counts["age_sum"]
  assert int(state.age_count) == ref_counts["age_count"]
  np.testing.assert_array_equal(np.asarray(state.steps), ref_counts["steps"])
  np.testing.assert_array_equal(np.asarray(state.rounds), ref_counts["rounds"])
  np.testing.assert_allclose(np.asarray(state.params), ref_params, rtol=1e-5, atol=1e-5)


# The default run covers fragments {1, 2, 8}, stragglers of both kinds and slow links (every
# fate); `-m slow` runs the grid.
DEFAULT = {("both-stragglers", 8), ("compute-stragglers-superseded", 1), ("slow-links-flush", 2)}
GRID = [pytest.param(c, f, marks=() if (c, f) in DEFAULT else pytest.mark.slow)
        for c in sorted(CASES) for f in (1, 2, 8)]


@pytest.mark.parametrize("case, fragments", GRID)
def test_divshare_engine_matches_reference(case, fragments):
  cfg = tiny_config(f"fragments={fragments}", *CASES[case])
  assert_agree(*run_both(cfg))


@pytest.mark.parametrize("case", ["comm-stragglers", pytest.param("both-stragglers", marks=pytest.mark.slow),
                                  pytest.param("short-ring-expires", marks=pytest.mark.slow)])
def test_sgp_engine_matches_reference(case):
  """Push-sum weights as algorithm state, the mass of each message in a per-slot table."""
  cfg = tiny_config("algorithm=sgp", "fragments=1", *CASES[case])
  state, ref_params, ref_counts = run_both(cfg)
  assert ref_counts["age_count"] > 0 or ref_counts["msgs_expired"] > 0
  assert_agree(state, ref_params, ref_counts)


@pytest.mark.parametrize("case", ["both-stragglers", pytest.param("comm-stragglers", marks=pytest.mark.slow)])
def test_divshare_age_engine_matches_reference(case):
  """A new aggregation rule in one file (algorithms/divshare_age.py): weights by age."""
  cfg = tiny_config("algorithm=divshare_age", "fragments=2", *CASES[case])
  state, ref_params, ref_counts = run_both(cfg)
  assert ref_counts["age_count"] > 0
  assert_agree(state, ref_params, ref_counts)


@pytest.mark.parametrize("case, fragments", [
    pytest.param("both-stragglers", 1, marks=pytest.mark.slow), ("slow-links-flush", 4),
    pytest.param("fast-links", 1, marks=pytest.mark.slow),
    pytest.param("fast-links", 4, marks=pytest.mark.slow),
    pytest.param("slow-links-flush", 1, marks=pytest.mark.slow),
    pytest.param("both-stragglers", 4, marks=pytest.mark.slow)])
def test_swift_engine_matches_reference(case, fragments):
  """Swift never flushes: on slow links the backlog grows until payloads expire from the ring."""
  cfg = tiny_config("algorithm=swift", f"fragments={fragments}", "ring_depth=3", *CASES[case])
  state, ref_params, ref_counts = run_both(cfg, n_ticks=48)
  assert ref_counts["msgs_flushed"] == 0
  assert_agree(state, ref_params, ref_counts)


def test_swift_backlog_grows_and_expires():
  cfg = tiny_config("algorithm=swift", "ring_depth=2", *SLOW_LINKS)
  state, ref_params, ref_counts = run_both(cfg, n_ticks=60)
  assert ref_counts["msgs_expired"] > 0 and ref_counts["msgs_flushed"] == 0
  assert_agree(state, ref_params, ref_counts)


ADPSGD_CASES = {
    "fast-links": [],
    "slow-links": ["network.upload_mbps=0.2"],
    "comm-stragglers-expiring": ["n_nodes=8", "recipients=5", "network.upload_mbps=0.3",
                                 "network.stragglers.fraction=0.25", "network.stragglers.slowdown=5",
                                 "ring_depth=3"],
    "compute-stragglers": COMPUTE_STRAGGLERS,
    "both-stragglers-short-ring": ["network.stragglers.fraction=0.5", "network.stragglers.slowdown=2",
                                   "network.stragglers.kind=both", "network.latency_ms=35", "ring_depth=2"],
}


@pytest.mark.parametrize("case", [c if c == "comm-stragglers-expiring"
                                  else pytest.param(c, marks=pytest.mark.slow) for c in sorted(ADPSGD_CASES)])
def test_adpsgd_engine_matches_reference(case):
  """Pings, replies queued behind the replier's backlog, newest model per sender."""
  cfg = tiny_config("algorithm=adpsgd", "recipients=4", *ADPSGD_CASES[case])
  state, ref_params, ref_counts = run_both(cfg)
  assert ref_counts["msgs_delivered"] > 0
  assert_agree(state, ref_params, ref_counts)


@pytest.mark.parametrize("seed", [pytest.param(s, marks=pytest.mark.slow) for s in (1, 2, 3)])  # covered by the cases above
def test_agreement_over_seeds_with_stragglers(seed):
  cfg = tiny_config(f"seed={seed}", "fragments=8", "recipients=3", *COMM_STRAGGLERS)
  state, ref_params, ref_counts = run_both(cfg, n_ticks=60)
  assert ref_counts["msgs_flushed"] > 0  # the stragglers really lose fragments
  assert_agree(state, ref_params, ref_counts)


@pytest.mark.slow
def test_cases_exercise_every_fate():
  """Guards the test above against silently testing nothing: each fate occurs somewhere."""
  seen = {}
  for case in ("slow-links-flush", "compute-stragglers-superseded", "short-ring-expires"):
    _, _, counts = run_both(tiny_config("fragments=2", *CASES[case]))
    for k in ("msgs_delivered", "msgs_flushed", "msgs_superseded", "msgs_expired"):
      seen[k] = seen.get(k, 0) + counts[k]
  assert all(v > 0 for v in seen.values()), seen


def test_diablo_preset_matches_reference():
  """Region-pair bandwidths (PAPER.md 4.4) cap each message on top of the node links."""
  cfg = tiny_config("n_nodes=10", "network.preset=diablo", "network.upload_mbps=100",
                    "fragments=4", "recipients=3", "network.compute_s_per_step=0.00004",
                    "network.latency_ms=0.1")
  state, ref_params, ref_counts = run_both(cfg)
  assert ref_counts["msgs_flushed"] > 0  # slow region pairs lose fragments at the flush
  assert_agree(state, ref_params, ref_counts)


@pytest.mark.parametrize("case", ["comm-stragglers", "compute-stragglers-superseded",
                                  pytest.param("fast-links", marks=pytest.mark.slow),
                                  pytest.param("both-stragglers", marks=pytest.mark.slow),
                                  pytest.param("short-ring-expires", marks=pytest.mark.slow)])
def test_swift_original_engine_matches_reference(case):
  """Fixed neighbours, stored copies reused when a neighbour sent nothing new, 1/(deg+1)."""
  cfg = tiny_config("algorithm=swift_original", "topology=ring", *CASES[case])
  state, ref_params, ref_counts = run_both(cfg, n_ticks=48)
  # with the short ring every copy expires: the stored initial models are all there is
  assert ref_counts["msgs_expired" if case == "short-ring-expires" else "msgs_delivered"] > 0
  assert_agree(state, ref_params, ref_counts)


@pytest.mark.parametrize("case, topo", [pytest.param("comm-stragglers", "complete", marks=pytest.mark.slow),
                                        ("both-stragglers", "ring"),
                                        pytest.param("fast-links", "torus", marks=pytest.mark.slow),
                                        pytest.param("slow-links-flush", "complete", marks=pytest.mark.slow),
                                        pytest.param("compute-stragglers-superseded", "complete",
                                                     marks=pytest.mark.slow)])
def test_adpsgd_pairwise_engine_matches_reference(case, topo):
  """Atomic pairwise averages when the reply of an exchange reaches its pinger."""
  cfg = tiny_config("algorithm=adpsgd_pairwise", f"topology={topo}", *CASES[case])
  state, ref_params, ref_counts = run_both(cfg, n_ticks=48)
  assert ref_counts["age_count"] > 0  # exchanges completed
  assert_agree(state, ref_params, ref_counts)


@pytest.mark.parametrize("algorithm", ["divshare", pytest.param("swift_original", marks=pytest.mark.slow)])
def test_spread_initial_models_agree_with_reference(algorithm):
  """init.spread: every node starts from its own model, in the engine and the reference alike
  (swift_original's state holds copies of the initial model)."""
  extra = ["fragments=1", "topology=regular"] if algorithm == "swift_original" else []
  cfg = tiny_config(f"algorithm={algorithm}", "init.spread=true", *extra, *COMM_STRAGGLERS)
  state, ref_params, ref_counts = run_both(cfg)
  p = np.asarray(state.params)
  assert np.ptp(p, axis=0).max() > 0.05                 # the nodes' models differ
  assert_agree(state, ref_params, ref_counts)


@pytest.mark.parametrize("algorithm", ["divshare", pytest.param("adpsgd", marks=pytest.mark.slow)])
def test_bfloat16_ring_agrees_with_reference(algorithm):
  """ring_dtype=bfloat16: payloads rounded once at the snapshot, in both simulators; the
  timing (every count) is the float32 run's, the models are not."""
  extra = ["recipients=4"] if algorithm == "adpsgd" else []
  cfg = tiny_config(f"algorithm={algorithm}", "ring_dtype=bfloat16", *extra, *COMM_STRAGGLERS)
  state, ref_params, ref_counts = run_both(cfg)
  assert state.ring.dtype == np.dtype("bfloat16")
  assert_agree(state, ref_params, ref_counts)
  f32 = tiny_config(f"algorithm={algorithm}", *extra, *COMM_STRAGGLERS)
  sim = simulate.build(f32)
  s32 = sim.engine.init(sim.run_key)
  s32, _ = simulate.compile_chunk(sim, s32, 40)(s32, sim.params)
  assert engine.message_counts(s32) == engine.message_counts(state)
  assert not np.allclose(np.asarray(s32.params), np.asarray(state.params), rtol=1e-5, atol=1e-6)
