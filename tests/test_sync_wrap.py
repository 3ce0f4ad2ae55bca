"""Byzantine nodes, compression and robust rules over the synchronous algorithms
(divjax.sync_wrap): the round engine against the plain reference, and what they must do."""

import numpy as np
import pytest

from conftest import tiny_config
from divjax import algorithms, fates, reference, simulate
from divjax.config import ConfigError
from test_sync_vs_reference import ALGOS, CASES

N_TICKS = 60


def run_both(cfg, n_ticks=N_TICKS):
  sim = simulate.build(cfg)
  state = sim.engine.init(sim.run_key)
  state, _ = simulate.compile_chunk(sim, state, n_ticks)(state, sim.params)
  ref_params, ref = reference.simulate_sync(cfg, sim.task, algorithms.make(cfg), n_ticks)
  return sim, state, ref_params, ref


def engine_state(cfg, n_ticks=N_TICKS):
  sim = simulate.build(cfg)
  state = sim.engine.init(sim.run_key)
  return simulate.compile_chunk(sim, state, n_ticks)(state, sim.params)[0]


def assert_agree(sim, state, ref_params, ref):
  assert ref["rounds"][0] >= 2
  assert int(state.time_us) == ref["time_us"]
  np.testing.assert_array_equal(np.asarray(state.rounds), ref["rounds"])
  counts = fates.to_host(sim.engine.counts(state))
  for k, v in counts.items():
    assert v == ref[k], k
  assert counts["msgs_sent"] == counts["msgs_delivered"] + counts["msgs_lost"]   # overflow: part of delivered
  assert counts["msgs_overflow"] <= counts["msgs_delivered"]
  np.testing.assert_allclose(np.asarray(state.params), ref_params, rtol=2e-5, atol=2e-5)


BYZ = ["byzantine.nodes=[1,4]"]
WRAPS = {   # name: overrides
    "sign_flip-median": BYZ + ["byzantine.attack=sign_flip", "aggregation.rule=median"],
    "alie-trimmed": BYZ + ["byzantine.attack=alie", "aggregation.rule=trimmed_mean"],
    "gaussian-scc": BYZ + ["byzantine.attack=gaussian", "aggregation.rule=self_centered_clip",
                           "aggregation.clip_tau=0.5"],
    "ipm-cc": BYZ + ["byzantine.attack=ipm", "aggregation.rule=centered_clip", "aggregation.clip_tau=0.5"],
    "top_k": ["compression.kind=top_k", "compression.fraction=0.1"],
    "random_k-median": ["compression.kind=random_k", "compression.fraction=0.3", "aggregation.rule=median"],
    "qsgd-sign_flip": BYZ + ["compression.kind=qsgd", "compression.levels=4", "byzantine.attack=sign_flip"],
    "top_k-no-ef": ["compression.kind=top_k", "compression.fraction=0.2", "compression.error_feedback=false"],
    "gaussian-per-recipient": BYZ + ["byzantine.attack=gaussian", "byzantine.per_recipient=true",
                                     "aggregation.rule=median"],
}
# Every wrapper once with stragglers, on D-PSGD, EL, EL-Oracle or FedAvg (the rest: -m slow).
DEFAULT = {("dpsgd-ring", w) for w in ("sign_flip-median", "top_k", "random_k-median", "qsgd-sign_flip")} | {
    ("el", "alie-trimmed"), ("fedavg-cohort", "sign_flip-median"), ("fedavg-cohort", "top_k"),
    ("el_oracle", "ipm-cc"), ("el", "gaussian-per-recipient")}


@pytest.mark.parametrize("algo, wrap", [
    pytest.param(a, w, marks=() if (a, w) in DEFAULT else pytest.mark.slow)
    for a in ("dpsgd-ring", "dpsgd-random-ring", "el", "el_oracle", "fedavg-cohort") for w in WRAPS
    if not (a.startswith("fedavg") and "per_recipient=true" in " ".join(WRAPS[w]))])
def test_sync_engine_matches_reference_with_wrappers(algo, wrap):
  cfg = tiny_config(*ALGOS[algo], *CASES["comm-stragglers"], *WRAPS[wrap], "duration_s=0.6")
  assert_agree(*run_both(cfg))


def test_per_recipient_payloads_differ_between_receivers():
  """byzantine.per_recipient: one attacker's copies to two receivers carry different noise, and
  an honest sender's copies are its payload."""
  import jax
  import jax.numpy as jnp
  from divjax import sync_wrap
  cfg = tiny_config("algorithm=dpsgd", "topology=ring", "byzantine.nodes=[1]", "byzantine.attack=gaussian",
                    "byzantine.per_recipient=true")
  wrap = sync_wrap.make(cfg, 10, algorithms.make(cfg))
  got = jnp.ones((4, 10))
  src, dst = jnp.array([1, 1, 2, 2]), jnp.array([0, 2, 1, 3])
  out = np.asarray(wrap.received(got, src, dst, 3, jax.random.key(0)))
  assert np.abs(out[0] - out[1]).min() > 0 and (out[2:] == 1).all()


def test_el_local_inbox_overflows_are_counted_and_match_the_reference():
  """EL-Local's in-degree varies: with K = 1 some copies overflow, the same ones as in the reference."""
  cfg = tiny_config("algorithm=el", "recipients=2", "aggregation.rule=median", "aggregation.inbox=2",
                    "n_nodes=8", "duration_s=0.6")
  cfg = cfg.model_copy(update={"aggregation": cfg.aggregation.model_copy(update={"inbox": 1})})
  sim, state, ref_params, ref = run_both(cfg)
  assert ref["msgs_overflow"] > 0
  assert_agree(sim, state, ref_params, ref)


def test_compressed_uploads_make_rounds_shorter():
  """Message size follows the compression: with slow links the same time holds more rounds."""
  slow = ["algorithm=dpsgd", "topology=ring", "network.upload_mbps=0.05", "duration_s=2"]
  dense = simulate.build(tiny_config(*slow))
  sparse = simulate.build(tiny_config(*slow, "compression.kind=top_k", "compression.fraction=0.05"))
  assert sparse.engine.message_bits < dense.engine.message_bits / 4
  rounds = []
  for sim in (dense, sparse):
    state = sim.engine.init(sim.run_key)
    state, _ = simulate.compile_chunk(sim, state, 200)(state, sim.params)
    rounds.append(int(state.rounds[0]))
  assert rounds[1] > 2 * rounds[0] >= 2


def test_identity_settings_leave_the_run_unchanged():
  """top-k with k = P sends the model dense: the same run as without compression."""
  base = ["algorithm=dpsgd", "topology=ring", "duration_s=0.6"]
  plain, full = (engine_state(tiny_config(*base, *extra))
                 for extra in ([], ["compression.kind=random_k", "compression.fraction=1"]))
  np.testing.assert_array_equal(np.asarray(plain.params), np.asarray(full.params))
  assert int(plain.time_us) == int(full.time_us)


def test_median_and_trimmed_mean_survive_a_sign_flip_minority_that_breaks_the_mean():
  """One D-PSGD mixing on a complete graph of 8, 2 nodes sending -4 x: the honest nodes' mean
  moves as far as the models are from the origin, the median and trimmed mean stay within the
  honest models' spread (BENCHMARKS.md has the same on the quickstart, with accuracy)."""
  import jax
  import jax.numpy as jnp
  from divjax import sync_wrap
  n, p = 8, 50
  rng = np.random.default_rng(0)
  x = jnp.asarray(1.0 + 0.1 * rng.normal(size=(n, p)), jnp.float32)
  payload = x.at[:2].set(-4 * x[:2])
  src, dst = (jnp.asarray(a) for a in np.nonzero(~np.eye(n, dtype=bool)))
  w, self_w = jnp.full(src.shape, 1 / n), jnp.full((n,), 1 / n)
  honest = np.arange(2, n)
  spread = float(jnp.max(x[2:]) - jnp.min(x[2:]))
  moved = {}
  for rule in ("mean", "median", "trimmed_mean"):
    cfg = tiny_config("algorithm=dpsgd", "topology=complete", f"n_nodes={n}", f"aggregation.rule={rule}",
                      "aggregation.trim=2")
    wrap = sync_wrap.make(cfg, p, algorithms.make(cfg))
    mixed, over = sync_wrap.gossip(wrap, x, x, payload, src, dst, w, self_w, jax.random.key(0), 0)
    assert int(over) == 0
    moved[rule] = float(jnp.max(jnp.abs(mixed[honest] - jnp.mean(x[honest], axis=0))))
  assert moved["mean"] > 1.0
  assert moved["median"] < spread and moved["trimmed_mean"] < spread


CHURN = ["churn.mean_online_s=0.2", "churn.mean_offline_s=0.2"]


@pytest.mark.parametrize("algo, extra", [
    ("dpsgd-ring", []),
    ("el", ["aggregation.rule=trimmed_mean"]),
    ("fedavg-cohort", []),
    pytest.param("fedavg-cohort", WRAPS["gaussian-scc"], marks=pytest.mark.slow),
    pytest.param("el_oracle", WRAPS["top_k"], marks=pytest.mark.slow),
    pytest.param("dpsgd-random-ring", WRAPS["ipm-cc"], marks=pytest.mark.slow),
])
def test_sync_engine_matches_reference_with_churn(algo, extra):
  """Nodes offline at a round's start sit it out: no training, no sending; messages to them are
  lost, and their weight goes to the receiver's own model; FedAvg's server takes the cohort's
  online members."""
  cfg = tiny_config(*ALGOS[algo], *CASES["comm-stragglers"], *CHURN, *extra, "duration_s=0.6")
  sim, state, ref_params, ref = run_both(cfg)
  if not algo.startswith("fedavg"):
    assert ref["msgs_lost"] > 0
  assert_agree(sim, state, ref_params, ref)


def test_offline_nodes_neither_train_nor_send_and_crashed_ones_stop():
  """A crash (byzantine.attack=crash) takes nodes 1 and 4 offline from 0.1 s on: they stop
  stepping, and every message to them from then on is lost."""
  cfg = tiny_config("algorithm=dpsgd", "topology=ring", "byzantine.nodes=[1,4]", "byzantine.attack=crash",
                    "byzantine.crash_at_s=0.1", "duration_s=0.6")
  sim, state, ref_params, ref = run_both(cfg)
  assert_agree(sim, state, ref_params, ref)
  steps = np.asarray(state.steps)
  assert steps[1] == steps[4] < steps[0] == steps[2]
  assert ref["msgs_lost"] == 4 * (ref["rounds"][0] - steps[1] // cfg.local_steps)   # 2 ring neighbours each


WALK = ["network.bandwidth.random_walk=0.8", "network.bandwidth.interval_s=0.05"]


@pytest.mark.parametrize("algo, extra", [
    ("dpsgd-random-ring", WALK),
    ("fedavg-cohort", WALK + CHURN),
    pytest.param("el", WALK + WRAPS["top_k"], marks=pytest.mark.slow),
])
def test_sync_engine_matches_reference_with_time_varying_rates(algo, extra):
  """A message is served at the rates of the block where its sender's H steps end (FedAvg: the
  client's upload); round times follow, the same in the engine and the reference."""
  cfg = tiny_config(*ALGOS[algo], *CASES["comm-stragglers"], *extra, "duration_s=0.6")
  sim, state, ref_params, ref = run_both(cfg)
  fixed = simulate.build(tiny_config(*ALGOS[algo], *CASES["comm-stragglers"], *extra[2:], "duration_s=0.6"))
  fixed_state = fixed.engine.init(fixed.run_key)
  fixed_state, _ = simulate.compile_chunk(fixed, fixed_state, N_TICKS)(fixed_state, fixed.params)
  assert int(state.time_us) != int(fixed_state.time_us) or int(state.rounds[0]) != int(fixed_state.rounds[0])
  assert_agree(sim, state, ref_params, ref)


@pytest.mark.parametrize("sets, key", [
    (["algorithm=fedavg", "byzantine.fraction=0.2", "byzantine.attack=gaussian", "byzantine.per_recipient=true"],
     "byzantine.per_recipient"),
    (["algorithm=dpsgd", "aggregation.inbox=4"], "aggregation.inbox"),
    (["algorithm=fedavg", "aggregation.rule=median", "aggregation.inbox=4"], "aggregation.inbox"),
    (["algorithm=fedavg", "byzantine.fraction=1"], "byzantine.fraction"),
    (["algorithm=dpsgd", "compression.kind=top_k", "compression.fraction=0"], "compression.fraction"),
])
def test_what_a_synchronous_round_cannot_express_is_refused_naming_the_key(sets, key):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    tiny_config(*sets)


def test_a_synchronous_checkpoint_from_before_the_wrappers_resumes(tmp_path, monkeypatch):
  """Checkpoints written before SyncState had `overflow` and `lost` restore them as 0."""
  from divjax import checkpoint
  cfg = tiny_config("algorithm=dpsgd", "topology=ring")
  sim = simulate.build(cfg)
  state = sim.engine.init(sim.run_key)
  state = state._replace(params=state.params + 1.0)
  old = checkpoint.flatten
  monkeypatch.setattr(checkpoint, "flatten", lambda s: {k: v for k, v in old(s).items() if k not in ("overflow", "lost")})
  ckpt = checkpoint.Checkpointer(tmp_path, state)
  ckpt.save(state, [])
  monkeypatch.setattr(checkpoint, "flatten", old)
  restored, _ = checkpoint.Checkpointer(tmp_path, state).restore()
  assert int(restored.overflow) == int(restored.lost) == 0
  np.testing.assert_array_equal(np.asarray(restored.params), np.asarray(state.params))
