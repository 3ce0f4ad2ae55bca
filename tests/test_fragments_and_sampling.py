import jax
import jax.numpy as jnp
import numpy as np
import pytest

from divjax import fragments, sampling


def test_partition_takes_about_one_fth_of_every_tensor():
  sizes = [100, 7, 40]
  fr = fragments.partition(sizes, 4, seed=0)
  offsets = np.cumsum([0] + sizes)
  for t, m in enumerate(sizes):
    ids = fr.frag_of[offsets[t]:offsets[t + 1]]
    counts = np.bincount(ids, minlength=4)
    per = m // 4
    np.testing.assert_array_equal(counts[:3], [per] * 3)   # remainder goes to the last fragment
    assert counts[3] == m - 3 * per
  assert fr.sizes.sum() == sum(sizes)
  # same seed -> same partition (it is global and fixed), other seed -> different
  np.testing.assert_array_equal(fr.frag_of, fragments.partition(sizes, 4, seed=0).frag_of)
  assert not np.array_equal(fr.frag_of, fragments.partition(sizes, 4, seed=1).frag_of)


def test_layout_round_trip():
  fr = fragments.partition([10, 3], 3, seed=2)
  x = jnp.arange(26.0).reshape(2, 13)
  y = fragments.to_layout(x, fr)
  assert y.shape == (2, 3, fr.width)
  np.testing.assert_array_equal(fragments.from_layout(y, fr), x)
  for f in range(3):  # row f holds exactly fragment f's coordinates
    coords = np.flatnonzero(fr.frag_of == f)
    np.testing.assert_array_equal(np.asarray(y[0, f, : coords.size]), coords)


@pytest.mark.parametrize("n, k", [(5, 4), (60, 6), (100, 40)])
def test_distinct_peers(n, k):
  keys = jax.random.split(jax.random.key(0), 300)
  peers = np.asarray(jax.vmap(lambda kk: sampling.distinct_peers(kk, 2, n, k))(keys))
  assert peers.min() >= 0 and peers.max() < n
  assert not (peers == 2).any()
  assert all(len(set(row)) == k for row in peers)
  # roughly uniform over the n - 1 others
  freq = np.bincount(peers.ravel(), minlength=n) / peers.size
  others = np.delete(freq, 2)
  assert np.abs(others - 1 / (n - 1)).max() < 0.35 / (n - 1) + 0.02


def test_plan_has_j_distinct_recipients_per_fragment():
  key = jax.random.key(0)
  dst, frag = sampling.fragment_fanout_plan(key, 3, 7, n=10, n_fragments=4, recipients=3)
  assert dst.shape == frag.shape == (12,)
  for f in range(4):
    peers = np.asarray(dst)[np.asarray(frag) == f]
    assert len(set(peers.tolist())) == 3 and 3 not in peers
  # a different round gives a different plan; the same round the same plan
  again = sampling.fragment_fanout_plan(key, 3, 7, n=10, n_fragments=4, recipients=3)
  other = sampling.fragment_fanout_plan(key, 3, 8, n=10, n_fragments=4, recipients=3)
  np.testing.assert_array_equal(dst, again[0])
  assert not np.array_equal(np.asarray(dst), np.asarray(other[0]))


@pytest.mark.parametrize("m", [1, 2, 24, 60, 64, 65])
def test_permutation_is_jax_random_permutation_bit_for_bit(m):
  """The send plan's queue order is JAX's own permutation (plans, and so every run, are
  unchanged by computing it from ranks instead of a sort)."""
  keys = jax.random.split(jax.random.key(3), 64)
  want = jax.vmap(lambda k: jax.random.permutation(k, m))(keys)
  got = jax.vmap(lambda k: sampling.permutation(k, m))(keys)
  assert got.dtype == want.dtype
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_stable_order_breaks_ties_by_position():
  keys = jnp.array([3, 1, 3, 0, 1, 3, 0], jnp.uint32)
  np.testing.assert_array_equal(np.asarray(sampling.stable_order(keys)), np.argsort(np.asarray(keys), kind="stable"))
