"""Compressed messages (divjax.compression): sizes, the identity at k = size, per-coordinate
routing, and the engine against the reference with stragglers."""

import numpy as np
import jax.numpy as jnp
import pytest

from conftest import tiny_config
from divjax import compression, engine, ring, robust, simulate
from divjax.config import ConfigError
from test_byzantine import _block
from test_engine_vs_reference import CASES, SLOW_LINKS, assert_agree, run_both


def test_message_sizes_follow_the_encoding():
  sizes = np.array([1000, 345, 1])
  # top 1%: k = 10, 4, 1 values with 10, 9, 1 index bits; the 1-coordinate fragment goes dense
  np.testing.assert_array_equal(compression.payload_bits("top_k", sizes, 0.01, 16), [10 * 42, 4 * 41, 32])
  np.testing.assert_array_equal(compression.payload_bits("random_k", sizes, 1.0, 16), 32 * sizes)  # dense
  # qsgd, 4 levels: the norm, then a sign and 3 bits per coordinate
  np.testing.assert_array_equal(compression.payload_bits("qsgd", sizes, 0.01, 4), 32 + 4 * sizes)


def test_per_coordinate_routing_counts_only_the_coordinates_sent():
  rng = np.random.default_rng(0)
  d, n, f, width = 2, 4, 2, 3
  ring_arr = rng.normal(size=(d, n, f, width)).astype(np.float32)
  ring_arr[rng.random(ring_arr.shape) < 0.4] = np.nan
  shape = (n, d, 2)
  due = rng.random(shape) < 0.8
  src = np.broadcast_to(np.arange(n)[:, None, None], shape)
  slot = np.broadcast_to(np.arange(d)[None, :, None], shape)
  dst, frag = rng.integers(0, n, shape), rng.integers(0, f, shape)
  sums, counts = ring.route(jnp.asarray(ring_arr), *(jnp.asarray(a) for a in (due, src, slot, dst, frag)),
                            per_coordinate=True)
  want_s, want_c = np.zeros((n, f, width)), np.zeros((n, f, width))
  for idx in zip(*np.nonzero(due)):
    payload = ring_arr[slot[idx], src[idx], frag[idx]]
    here = ~np.isnan(payload)
    want_s[dst[idx], frag[idx]][here] += payload[here]
    want_c[dst[idx], frag[idx]][here] += 1
  np.testing.assert_allclose(np.asarray(sums), want_s, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(counts), want_c)


@pytest.mark.parametrize("rule", robust.RULES)
def test_robust_rules_read_sparse_copies_per_coordinate(rule):
  x, vals, valid, center = _block(5)
  vals[np.random.default_rng(1).random(vals.shape) < 0.5] = np.nan
  args = dict(trim=1, tau=0.7, iters=2)
  fn = {"median": lambda: robust.median(x, vals, valid),
        "trimmed_mean": lambda: robust.trimmed_mean(x, vals, valid, 1),
        "self_centered_clip": lambda: robust.self_centered_clip(x, vals, valid, 0.7),
        "centered_clip": lambda: robust.centered_clip(x, vals, valid, center, 0.7, 2)}[rule]
  got = np.asarray(fn())
  assert np.isfinite(got).all()
  for i in range(x.shape[0]):
    for f in range(x.shape[1]):
      values = np.concatenate([x[i, f][None], vals[i, f][valid[i, f]]])
      np.testing.assert_allclose(got[i, f], robust.reference_rule(rule, values, center[i, f], **args),
                                 rtol=1e-5, atol=1e-5)


def test_sending_every_coordinate_is_the_uncompressed_run():
  """k = size: top-k and random-k send the whole fragment, dense, at the same size: every
  simulated number is that of the run without compression (parameters to float32 rounding:
  the two programs sum the same numbers in differently fused kernels)."""
  base = tiny_config("fragments=2", *SLOW_LINKS)
  runs = {}
  for kind in ("none", "random_k"):
    cfg = tiny_config("fragments=2", *SLOW_LINKS, f"compression.kind={kind}", "compression.fraction=1")
    sim = simulate.build(cfg)
    state, _ = simulate.compile_chunk(sim, sim.engine.init(sim.run_key), 40)(sim.engine.init(sim.run_key), sim.params)
    runs[kind] = state
  np.testing.assert_allclose(np.asarray(runs["none"].params), np.asarray(runs["random_k"].params),
                             rtol=1e-6, atol=1e-6)
  assert engine.message_counts(runs["none"]) == engine.message_counts(runs["random_k"])
  assert base.compression.kind == "none"


def test_smaller_messages_reach_the_network_model():
  """On slow links DivShare flushes what is not uploaded by the next round end; top-10%
  messages are a fraction of the size, so fewer are flushed."""
  counts = {}
  for kind in ("none", "top_k"):
    cfg = tiny_config("fragments=2", *SLOW_LINKS, f"compression.kind={kind}", "compression.fraction=0.1")
    sim = simulate.build(cfg)
    state, _ = simulate.compile_chunk(sim, sim.engine.init(sim.run_key), 40)(sim.engine.init(sim.run_key), sim.params)
    counts[kind] = engine.message_counts(state)
    assert sim.engine.message_bits > 0
  assert counts["none"]["msgs_flushed"] > 0
  assert counts["top_k"]["msgs_flushed"] < counts["none"]["msgs_flushed"]


AGREEMENT = [
    ("divshare", "top_k", "both-stragglers", ["compression.fraction=0.3"]),
    pytest.param("swift", "qsgd", "comm-stragglers", ["compression.levels=8", "ring_depth=3"], marks=pytest.mark.slow),
    ("adpsgd", "random_k", "compute-stragglers-superseded", ["compression.fraction=0.2", "recipients=4"]),   # replies
    pytest.param("divshare", "top_k", "slow-links-flush", ["compression.fraction=0.3", "compression.error_feedback=false"],
                 marks=pytest.mark.slow),
    pytest.param("divshare", "qsgd", "both-stragglers", ["compression.levels=4", "compression.error_feedback=false"],
                 marks=pytest.mark.slow),
    pytest.param("divshare", "random_k", "both-stragglers",   # composed: robust rule and attackers
                 ["compression.fraction=0.4", "aggregation.rule=self_centered_clip", "byzantine.fraction=0.34",
                  "byzantine.attack=gaussian"], marks=pytest.mark.slow),
    pytest.param("divshare", "top_k", "both-stragglers",
                 ["compression.fraction=0.3", "aggregation.rule=median", "byzantine.fraction=0.34"],
                 marks=pytest.mark.slow),
    # age-weighted DivShare: its own rule, per coordinate (AsyncAlgorithm.sparse_rule)
    ("divshare_age", "top_k", "both-stragglers", ["fragments=2", "compression.fraction=0.3"]),
    ("swift_original", "random_k", "comm-stragglers", ["topology=regular", "topology_degree=3",
                                                       "compression.fraction=0.3"]),   # stored per coordinate
    pytest.param("swift_original", "top_k", "both-stragglers",
                 ["topology=regular", "topology_degree=3", "compression.fraction=0.3", "aggregation.rule=trimmed_mean",
                  "byzantine.fraction=0.34", "byzantine.attack=alie"], marks=pytest.mark.slow),
    pytest.param("divshare_age", "random_k", "comm-stragglers",
                 ["fragments=2", "compression.fraction=0.4", "aggregation.rule=trimmed_mean"], marks=pytest.mark.slow),
]


@pytest.mark.parametrize("alg, kind, case, extra", AGREEMENT)
def test_engine_matches_reference_with_compression(alg, kind, case, extra):
  sets = [f"algorithm={alg}", "fragments=2" if alg == "divshare" else "fragments=1", *CASES[case],
          f"compression.kind={kind}", *extra]
  state, ref_params, ref_counts = run_both(tiny_config(*sets), n_ticks=48)
  assert ref_counts["msgs_delivered"] > 0
  assert_agree(state, ref_params, ref_counts)


@pytest.mark.parametrize("sets, key", [
    (["compression.kind=top_k", "compression.fraction=0"], "compression.fraction"),
    (["compression.kind=qsgd", "compression.levels=0"], "compression.levels"),
    (["compression.kind=gzip"], "compression.kind"),
    (["algorithm=sgp", "compression.kind=top_k"], "compression.kind"),
    (["algorithm=adpsgd_pairwise", "compression.kind=top_k"], "compression.kind"),
])
def test_bad_compression_settings_are_refused_naming_the_key(sets, key):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    tiny_config(*sets)
