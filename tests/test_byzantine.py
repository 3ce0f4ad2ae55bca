"""Byzantine nodes, robust aggregation and the bounded inbox (divjax.byzantine, divjax.robust,
divjax.inbox): the rules against their definitions, the engine against the reference."""

import subprocess
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from divjax import algorithms, byzantine, fragments, inbox, ring, robust, simulate
from divjax.config import ConfigError
from test_engine_vs_reference import CASES, assert_agree, run_both


# ---- the rules, against numpy on random blocks


def _block(seed, n=3, f=2, k=4, width=5):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, f, width)).astype(np.float32)
  vals = rng.normal(size=(n, f, k, width)).astype(np.float32) * 3
  valid = rng.random((n, f, k)) < 0.6
  valid[0, 0] = False                        # a fragment with no copy keeps its own value
  valid[1, 1] = True                         # a full one
  center = rng.normal(size=(n, f, width)).astype(np.float32)
  return x, vals, valid, center


@pytest.mark.parametrize("rule", robust.RULES)
def test_rules_match_their_numpy_definitions(rule):
  x, vals, valid, center = _block(0)
  args = dict(trim=1, tau=0.7, iters=3)
  if rule == "median":
    got = robust.median(x, vals, valid)
  elif rule == "trimmed_mean":
    got = robust.trimmed_mean(x, vals, valid, args["trim"])
  elif rule == "self_centered_clip":
    got = robust.self_centered_clip(x, vals, valid, args["tau"])
  else:
    got = robust.centered_clip(x, vals, valid, center, args["tau"], args["iters"])
  for i in range(x.shape[0]):
    for f in range(x.shape[1]):
      values = np.concatenate([x[i, f][None], vals[i, f][valid[i, f]]])
      want = (x[i, f] if values.shape[0] == 1 else
              robust.reference_rule(rule, values, center[i, f], **args))
      np.testing.assert_allclose(np.asarray(got[i, f]), want, rtol=1e-5, atol=1e-5)


def test_median_and_trimmed_mean_ignore_a_minority_of_outliers():
  x = np.zeros((1, 1, 3), np.float32)
  vals = np.array([[[[0.1] * 3, [-0.1] * 3, [1e6] * 3, [0.05] * 3]]], np.float32)
  valid = np.ones((1, 1, 4), bool)
  assert float(jnp.max(jnp.abs(robust.median(x, vals, valid)))) <= 0.1
  assert float(jnp.max(jnp.abs(robust.trimmed_mean(x, vals, valid, 1)))) <= 0.1
  assert float(jnp.max(jnp.abs(robust.self_centered_clip(x, vals, valid, 0.5)))) <= 0.5 / 5 * 4
  mean = (x + vals.sum(2)) / 5
  assert float(jnp.max(mean)) > 1e5  # while the mean is dragged away


# ---- the bounded inbox: which copies are kept, and the gathered block


def _records(seed, n=5, d=2, m=6, f=3):
  rng = np.random.default_rng(seed)
  shape = (n, d, m)
  src = np.broadcast_to(np.arange(n)[:, None, None], shape)
  slot = np.broadcast_to(np.arange(d)[None, :, None], shape)
  dst = rng.integers(0, n, shape)
  frag = rng.integers(0, f, shape)
  due = rng.random(shape) < 0.7
  # at most one due copy per (sender, receiver, fragment), as after superseding
  seen = set()
  for idx in np.ndindex(shape):
    key = (src[idx], dst[idx], frag[idx])
    if due[idx] and key in seen:
      due[idx] = False
    seen.add(key)
  return ring.Copies(*(jnp.asarray(a) for a in (due, src, slot, dst, frag, np.zeros(shape, np.int32))))


class Copy(NamedTuple):  # what reference_keep reads of a message
  src: int
  frag: int


@pytest.mark.parametrize("k", [1, 2, 3])
def test_overflow_keeps_k_copies_per_fragment_as_the_reference_does(k):
  c = _records(k)
  n, f = 5, 3
  rounds = jnp.asarray([3, 0, 7, 1, 2], jnp.int32)
  seed = inbox.seed(jax.random.key(4))
  over = np.asarray(inbox.overflow(c, rounds, seed, f, k))
  due = np.asarray(c.due)
  assert not (over & ~due).any() and over.any()
  kept = due & ~over
  for dst in range(n):
    here = due & (np.asarray(c.dst) == dst)
    copies = [Copy(int(s), int(fr)) for s, fr in zip(np.asarray(c.src)[here], np.asarray(c.frag)[here])]
    ref_kept, ref_over = inbox.reference_keep(copies, np.uint32(seed), dst, int(rounds[dst]), k)
    mine = sorted((int(s), int(fr)) for s, fr in zip(np.asarray(c.src)[kept & (np.asarray(c.dst) == dst)],
                                                    np.asarray(c.frag)[kept & (np.asarray(c.dst) == dst)]))
    assert mine == sorted((x.src, x.frag) for x in ref_kept)
    for fr in range(f):
      assert sum(1 for s, g in mine if g == fr) == min(k, sum(1 for x in copies if x.frag == fr))


def test_gather_returns_exactly_the_due_payloads():
  n, d, f, width, k = 5, 2, 3, 4, 6
  c = _records(1, n=n, d=d, f=f)
  ring_arr = jnp.asarray(np.random.default_rng(2).normal(size=(d, n, f, width)), jnp.float32)
  vals, valid = inbox.gather(ring_arr, (c,), k)
  for dst in range(n):
    for fr in range(f):
      sel = np.asarray(c.due) & (np.asarray(c.dst) == dst) & (np.asarray(c.frag) == fr)
      want = sorted(np.asarray(ring_arr)[np.asarray(c.slot)[sel], np.asarray(c.src)[sel], fr].sum(-1).tolist())
      got = sorted(np.asarray(vals[dst, fr])[np.asarray(valid[dst, fr])].sum(-1).tolist())
      np.testing.assert_allclose(got, want, rtol=1e-6)


# ---- the attacks


@pytest.mark.parametrize("attack", byzantine.ATTACKS)
def test_attacks_change_only_byzantine_payloads_and_match_the_reference(attack):
  rng = np.random.default_rng(0)
  models = rng.normal(size=(6, 7)).astype(np.float32)
  frags = fragments.from_assignment(np.array([0, 1, 1, 0, 1, 1, 0], np.int32), 2)   # sizes 3, 4
  coords = [np.flatnonzero(frags.frag_of == f) for f in range(2)]
  real = jnp.asarray(np.arange(frags.width)[None, :] < frags.sizes[:, None])
  byz = np.array([0, 1, 0, 0, 1, 0], bool)
  alg = byzantine.with_byzantine(algorithms.make(tiny_config()), byz, attack)
  key, rounds = jax.random.key(3), jnp.asarray([0, 4, 1, 2, 5, 3], jnp.int32)
  x = fragments.to_layout(jnp.asarray(models), frags)
  sent_layout, state = alg.snapshot(x, real, key, rounds, jnp.ones(6, bool), ())
  sent = np.asarray(fragments.from_layout(sent_layout, frags))
  assert state == ()
  np.testing.assert_array_equal(sent[~byz], models[~byz])
  assert not np.allclose(sent[byz], models[byz])
  for i in range(6):
    ref, _ = alg.reference_snapshot(i, models, coords, key, int(rounds[i]), None)
    np.testing.assert_allclose(sent[i], ref, rtol=1e-5, atol=1e-5)
  honest = models[~byz]
  if attack == "alie":  # mu - z sigma with Baruch et al.'s z for n = 6, f = 2 (s = 2, z = Phi^-1(4/6))
    np.testing.assert_allclose(sent[1], honest.mean(0) - 0.4307273 * honest.std(0), rtol=1e-4, atol=1e-5)
  if attack == "ipm":
    np.testing.assert_allclose(sent[4], -0.1 * honest.mean(0), rtol=1e-5, atol=1e-6)


def test_per_recipient_noise_differs_between_recipients_and_spares_honest_senders():
  byz = np.array([0, 1, 0, 0, 1, 0], bool)
  alg = byzantine.with_byzantine(algorithms.make(tiny_config()), byz, "gaussian", per_recipient=True)
  assert alg.snapshot is None                      # nothing changes at the sender
  got = jnp.ones((4, 5), jnp.float32)
  src, dst = jnp.array([1, 1, 0, 4]), jnp.array([2, 3, 2, 2])
  frag, rounds = jnp.zeros(4, jnp.int32), jnp.array([5, 5, 5, 5])
  out = np.asarray(alg.received(got, src, dst, frag, rounds, jax.random.key(0)))
  assert not np.allclose(out[0], out[1]) and not np.allclose(out[0], out[3])   # per recipient, per sender
  np.testing.assert_array_equal(out[2], np.ones(5))                           # an honest sender
  ref = alg.reference_received(np.ones(3, np.float32), 1, 2, 0, 5, jax.random.key(0), 5)
  np.testing.assert_allclose(ref, out[0, :3], rtol=1e-6)


def test_byzantine_choice_is_seeded_and_explicit_ids_win():
  a = byzantine.ids(tiny_config("byzantine.fraction=0.34"))
  assert a.size == 2 and np.array_equal(a, byzantine.ids(tiny_config("byzantine.fraction=0.34")))
  assert byzantine.ids(tiny_config("byzantine.fraction=0.34", "byzantine.nodes=[5]")).tolist() == [5]


# ---- the engine against the reference, with stragglers


# The default run has one case (and tests/test_bandwidth.py one of every wrapper composed on
# Swift); `-m slow` runs the rest.
AGREEMENT = [
    pytest.param("divshare", "sign_flip", "median", "both-stragglers", [], marks=pytest.mark.slow),
    ("divshare", "gaussian", "trimmed_mean", "comm-stragglers", ["aggregation.inbox=2"]),   # overflow
    pytest.param("swift", "alie", "median", "comm-stragglers", [], marks=pytest.mark.slow),
    pytest.param("divshare", "ipm", "centered_clip", "both-stragglers", ["aggregation.clip_tau=0.5"],
                 marks=pytest.mark.slow),
    pytest.param("divshare", "alie", "self_centered_clip", "compute-stragglers-superseded", [],
                 marks=pytest.mark.slow),
    pytest.param("swift", "sign_flip", "self_centered_clip", "both-stragglers", ["ring_depth=3"],
                 marks=pytest.mark.slow),
    pytest.param("divshare", None, "mean", "both-stragglers", ["aggregation.inbox=2"], marks=pytest.mark.slow),
    ("divshare", "gaussian", "self_centered_clip", "both-stragglers", ["byzantine.per_recipient=true"]),
    pytest.param("adpsgd", "gaussian", "mean", "comm-stragglers", ["byzantine.per_recipient=true", "recipients=4"],
                 marks=pytest.mark.slow),
    # push-pull AD-PSGD: pings and replies share the inbox (K = 4 < the copies due: overflow)
    ("adpsgd", "sign_flip", "median", "comm-stragglers", ["recipients=4", "aggregation.inbox=4"]),
    pytest.param("adpsgd", "alie", "trimmed_mean", "both-stragglers", ["recipients=2"], marks=pytest.mark.slow),
    # Swift as published: the rule over the own model and the stored neighbour copies
    ("swift_original", "sign_flip", "median", "comm-stragglers", ["topology=regular", "topology_degree=3"]),
    pytest.param("swift_original", "gaussian", "centered_clip", "both-stragglers",
                 ["topology=regular", "topology_degree=3", "byzantine.per_recipient=true"], marks=pytest.mark.slow),
    pytest.param("divshare_age", "ipm", "self_centered_clip", "comm-stragglers", [], marks=pytest.mark.slow),
    # AD-PSGD's atomic exchanges: an attacker gives its attack, from the live models, to each partner
    ("adpsgd_pairwise", "alie", "mean", "comm-stragglers", []),
    pytest.param("adpsgd_pairwise", "gaussian", "mean", "both-stragglers", [], marks=pytest.mark.slow),
    pytest.param("adpsgd_pairwise", "sign_flip", "mean", "compute-stragglers-superseded", [], marks=pytest.mark.slow),
    pytest.param("adpsgd_pairwise", "ipm", "mean", "comm-stragglers", [], marks=pytest.mark.slow),
]


@pytest.mark.parametrize("alg, attack, rule, case, extra", AGREEMENT)
def test_engine_matches_reference_with_byzantine_nodes(alg, attack, rule, case, extra):
  sets = [f"algorithm={alg}", "fragments=2" if alg == "divshare" else "fragments=1", *CASES[case],
          f"aggregation.rule={rule}", *extra]
  if attack:
    sets += ["byzantine.fraction=0.34", f"byzantine.attack={attack}"]
  state, ref_params, ref_counts = run_both(tiny_config(*sets), n_ticks=48)
  assert ref_counts["msgs_delivered"] > 0
  if "aggregation.inbox=2" in extra or "aggregation.inbox=4" in extra:
    assert ref_counts["msgs_overflow"] > 0
  assert_agree(state, ref_params, ref_counts)


def test_crashed_nodes_fall_silent_and_the_engine_matches_the_reference():
  cfg = tiny_config("fragments=2", *CASES["comm-stragglers"], "byzantine.nodes=[1,4]", "byzantine.attack=crash",
                    "byzantine.crash_at_s=0.08")
  state, ref_params, ref_counts = run_both(cfg, n_ticks=48)
  assert_agree(state, ref_params, ref_counts)
  steps = np.asarray(state.steps)
  assert steps[1] == steps[4] == 8 and steps[0] == 48          # they trained until 0.08 s, then nothing
  assert ref_counts["msgs_lost"] > 0                            # what was sent to them afterwards


# ---- config, metrics


@pytest.mark.parametrize("sets, key", [
    (["byzantine.fraction=1"], "byzantine.fraction"),
    (["byzantine.nodes=[0,1,2,3,4,5]"], "byzantine.nodes"),
    (["byzantine.nodes=[9]"], "byzantine.nodes"),
    (["aggregation.inbox=1"], "aggregation.inbox"),
    (["aggregation.rule=max"], "aggregation.rule"),
    (["algorithm=sgp", "aggregation.rule=median"], "aggregation.rule"),
    (["algorithm=adpsgd_pairwise", "aggregation.rule=median"], "aggregation.rule"),
    (["byzantine.fraction=0.2", "byzantine.per_recipient=true"], "per_recipient"),       # sign_flip
    (["algorithm=adpsgd_pairwise", "byzantine.fraction=0.2", "byzantine.attack=gaussian",
      "byzantine.per_recipient=true"], "byzantine.per_recipient"),
])
def test_bad_settings_are_refused_naming_the_key(sets, key):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    tiny_config(*sets)


def test_cli_refuses_before_compiling_with_exit_2(tmp_path):
  r = subprocess.run([sys.executable, "-m", "divjax.cli", "run", "configs/quickstart.yaml", "--set",
                      "byzantine.fraction=1", "--out", str(tmp_path / "r")], capture_output=True, text=True)
  assert r.returncode == 2 and "byzantine.fraction" in r.stderr
  assert not (tmp_path / "r").exists()


def test_records_report_honest_and_byzantine_nodes_apart():
  cfg = tiny_config("byzantine.nodes=[1,4]", "byzantine.attack=sign_flip", "aggregation.rule=median")
  records = []
  summary, _ = simulate.run(cfg, on_eval=records.append)
  rec = records[-1]
  assert summary["best_acc_mean"] == max(r["acc_mean_honest"] for r in records)
  for k in ("acc_mean_honest", "acc_min_honest", "loss_mean_honest", "acc_mean_byzantine", "acc_avg_model_honest"):
    assert rec[k] is not None
  assert simulate.headline(records) == "acc_mean_honest"
  assert rec["msgs_overflow"] == 0


def test_an_attack_reaches_the_honest_partners_of_pairwise_exchanges():
  """adpsgd_pairwise reads no payload: the attack acts where the exchange averages (it once
  changed nothing there). The honest nodes end elsewhere than without attackers."""
  base = ["algorithm=adpsgd_pairwise", "fragments=1", *CASES["comm-stragglers"]]
  out = []
  for extra in ([], ["byzantine.nodes=[0]", "byzantine.attack=sign_flip", "byzantine.scale=4"]):
    sim = simulate.build(tiny_config(*base, *extra))
    state = sim.engine.init(sim.run_key)
    out.append(np.asarray(simulate.compile_chunk(sim, state, 48)(state, sim.params)[0].nodes.params)[1:])
  assert np.abs(out[0] - out[1]).max() > 0.1
