"""divjax.data: loading from an .npz directory (tiny fake files, no download), its errors, and
the partitioners."""

import numpy as np
import pytest

from divjax import data
from divjax.data import DataError


@pytest.fixture(autouse=True)
def no_tfds(monkeypatch):
  """Behave as on a machine without tensorflow_datasets, whatever is installed here."""
  monkeypatch.setattr(data, "_tfds_module", lambda: None)


def write_images(path, name, shape, n_train=30, n_test=10, **override):
  rng = np.random.default_rng(0)
  arrays = dict(x_train=rng.integers(0, 256, (n_train,) + shape, dtype=np.uint8),
                y_train=(np.arange(n_train) % 10).astype(np.uint8),
                x_test=rng.integers(0, 256, (n_test,) + shape, dtype=np.uint8),
                y_test=(np.arange(n_test) % 10).astype(np.uint8))
  arrays.update(override)
  np.savez(path / name, **{k: v for k, v in arrays.items() if v is not None})
  return arrays


def write_ratings(path, name="movielens_ml-latest-small.npz", n_users=5, n_items=7, drop=(), **override):
  rng = np.random.default_rng(1)
  user = np.repeat(np.arange(n_users), 4).astype(np.int32)
  arrays = dict(user=user, item=rng.integers(0, n_items, user.size).astype(np.int32),
                rating=(rng.integers(1, 11, user.size) / 2).astype(np.float32),
                timestamp=np.zeros(user.size, np.int64), n_users=np.int64(n_users), n_items=np.int64(n_items))
  arrays.update(override)
  np.savez(path / name, **{k: v for k, v in arrays.items() if k not in drop})
  return arrays


# ------------------------------------------------------------------------------------ loading


def test_cifar_from_directory_is_normalised_hwc(tmp_path):
  raw = write_images(tmp_path, "cifar10.npz", (32, 32, 3))
  ds = data.load("cifar10", tmp_path)
  assert isinstance(ds, data.ImageDataset)
  assert ds.x_train.shape == (30, 32, 32, 3) and ds.x_test.shape == (10, 32, 32, 3)
  assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32   # kept as pixels
  np.testing.assert_array_equal(ds.x_train, raw["x_train"])
  np.testing.assert_allclose(data.PIXEL_LEVELS[ds.x_train], raw["x_train"] / 255 * 2 - 1, atol=1e-6)  # mean 0.5, std 0.5
  np.testing.assert_array_equal(ds.y_test, raw["y_test"])


def test_pixel_levels_are_the_floats_computed_image_by_image():
  """The model sees exactly what x / 255 * 2 - 1 in float32 gave when images were stored as
  floats: results did not move when the images became uint8."""
  x = np.arange(256, dtype=np.uint8).reshape(16, 16)
  old = (x.astype(np.float32) * np.float32(2 / 255) - np.float32(1)).astype(np.float32)
  assert data.PIXEL_LEVELS.dtype == np.float32
  np.testing.assert_array_equal(data.PIXEL_LEVELS[x], old)
  assert data.PIXEL_LEVELS[0] == -1 and data.PIXEL_LEVELS[255] == 1


def test_mnist_gets_a_channel_axis(tmp_path):
  write_images(tmp_path, "mnist.npz", (28, 28))
  ds = data.load("mnist", str(tmp_path))
  assert ds.x_train.shape == (30, 28, 28, 1) and ds.x_test.shape == (10, 28, 28, 1)
  assert ds.x_train.dtype == np.uint8


@pytest.mark.parametrize("name, file", [("movielens-latest-small", "movielens_ml-latest-small.npz"),
                                        ("movielens-100k", "movielens_ml-100k.npz")])
def test_movielens_from_directory(tmp_path, name, file):
  raw = write_ratings(tmp_path, file)
  ds = data.load(name, tmp_path)
  assert isinstance(ds, data.RatingDataset) and (ds.n_users, ds.n_items) == (5, 7)
  np.testing.assert_array_equal(ds.user, raw["user"])
  np.testing.assert_array_equal(ds.rating, raw["rating"])


def test_unknown_name_lists_the_allowed_ones(tmp_path):
  with pytest.raises(DataError, match="allowed names: cifar10, mnist, movielens-latest-small"):
    data.load("imagenet", tmp_path)


def test_missing_directory_or_file_says_how_to_provide_the_data(tmp_path):
  for where, data_dir in (("directory does not exist", tmp_path / "nope"), ("file not found", tmp_path)):
    with pytest.raises(DataError) as info:
      data.load("cifar10", data_dir)
    msg = str(info.value)
    assert where in msg and "cifar10.npz" in msg and str(data_dir) in msg
    assert "pip install tensorflow-datasets" in msg
    # the config key as a user writes it, and no pointer to files outside the repository
    assert "data.dir" in msg and "data_dir=" not in msg and "shared/data" not in msg
    assert "x_train, y_train, x_test, y_test" in msg and "divjax/data.py" in msg
  with pytest.raises(DataError, match="tensorflow-datasets"):
    data.load("mnist")  # no directory and no tfds


@pytest.mark.parametrize("override, message", [
    (dict(x_test=None), r"missing arrays \['x_test'\]"),
    (dict(x_train=np.zeros((30, 32, 32), np.uint8)), r"x_train: expected shape \(S, 32, 32, 3\)"),
    (dict(x_train=np.zeros((30, 32, 32, 3), np.float32)), "expected uint8"),
    (dict(y_train=np.zeros(29, np.uint8)), r"y_train: expected shape \(30,\)"),
    (dict(y_test=np.full(10, 12, np.uint8)), "labels must lie in 0..9"),
])
def test_malformed_image_file(tmp_path, override, message):
  write_images(tmp_path, "cifar10.npz", (32, 32, 3), **override)
  with pytest.raises(DataError, match=message):
    data.load("cifar10", tmp_path)


def test_malformed_ratings_and_non_archives(tmp_path):
  write_ratings(tmp_path, n_items=3, item=np.full(20, 5, np.int32))
  with pytest.raises(DataError, match=r"item ids must lie in 0..n_items-1 = 0..2"):
    data.load("movielens-latest-small", tmp_path)
  write_ratings(tmp_path, drop=("n_users",))
  with pytest.raises(DataError, match=r"missing arrays \['n_users'\]"):
    data.load("movielens-latest-small", tmp_path)
  (tmp_path / "mnist.npz").write_text("not a zip")
  with pytest.raises(DataError, match="not a readable .npz"):
    data.load("mnist", tmp_path)


def _exits_2(exc: BaseException) -> bool:
  """What `divjax run` reports as bad input (exit 2) rather than a traceback (cli.cmd_run)."""
  from divjax.config import ConfigError
  return isinstance(exc, (ConfigError, ValueError, OSError))


def _valid_archive(tmp_path, compressed: bool) -> bytes:
  write_images(tmp_path, "mnist.npz", (28, 28))
  if compressed:
    with np.load(tmp_path / "mnist.npz") as z:
      np.savez_compressed(tmp_path / "mnist.npz", **{k: z[k] for k in z.files})
  return (tmp_path / "mnist.npz").read_bytes()


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("damage", ["truncated", "garbled_tail", "garbled_member", "bit_flips"])
def test_damaged_archive_is_refused_naming_the_file(tmp_path, compressed, damage):
  """Truncated and garbled archives used to escape as zipfile.BadZipFile / zlib.error /
  tokenize.TokenError tracebacks; now every one is a DataError naming the file, which
  `divjax run` reports as bad input (exit 2)."""
  good = _valid_archive(tmp_path, compressed)
  rng = np.random.default_rng(7)
  must_fail = damage in ("truncated", "garbled_tail")
  if damage == "truncated":
    bad = [good[:n] for n in (10, len(good) // 3, len(good) - 30)]
  elif damage == "garbled_tail":  # a valid zip header, then random bytes
    bad = [good[:40] + rng.bytes(len(good) - 40)]
  elif damage == "garbled_member":  # the archive's directory intact, a member's data garbled
    bad = [good[:200] + rng.bytes(500) + good[700:], good[:60] + rng.bytes(64) + good[124:],
           good[:157] + rng.bytes(64) + good[221:]]
  else:
    bad = []
    for _ in range(40):
      b = bytearray(good)
      b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
      bad.append(bytes(b))
  path = tmp_path / "mnist.npz"
  failed = 0
  for content in bad:
    path.write_bytes(content)
    try:
      data.load("mnist", tmp_path)
    except DataError as e:
      assert str(e).startswith(f"{path}: ") and _exits_2(e)
      failed += 1
    # a flipped bit in pixel data can leave a readable archive: only a clean outcome is required
  assert failed == len(bad) if must_fail else failed >= 1


def test_known_library_errors_become_data_errors(tmp_path, monkeypatch):
  import tokenize
  import zipfile
  import zlib
  write_images(tmp_path, "cifar10.npz", (32, 32, 3))
  path = tmp_path / "cifar10.npz"
  for err in (zipfile.BadZipFile("Bad CRC-32"), zlib.error("Error -3 while decompressing"),
              EOFError("ran out"), tokenize.TokenError("EOF in multi-line statement"),
              NotImplementedError("That compression method is not supported"),
              MemoryError(), ValueError("cannot reshape")):
    real_load = np.load

    class Broken:
      def __init__(self, z):
        self.z, self.files = z, z.files

      def __enter__(self):
        return self

      def __exit__(self, *a):
        self.z.close()

      def __getitem__(self, k, err=err):
        raise err

    monkeypatch.setattr(np.lib.npyio, "NpzFile", Broken)
    monkeypatch.setattr(np, "load", lambda p, real_load=real_load: Broken(real_load(p)))
    with pytest.raises(DataError) as info:
      data.load("cifar10", tmp_path)
    assert str(info.value).startswith(f"{path}: ") and "array 'x_train'" in str(info.value)
    monkeypatch.undo()


def test_object_arrays_are_refused_naming_the_file(tmp_path):
  write_images(tmp_path, "cifar10.npz", (32, 32, 3), y_test=np.array([1, "a"] * 5, dtype=object))
  with pytest.raises(DataError) as info:
    data.load("cifar10", tmp_path)
  msg = str(info.value)
  assert msg.startswith(f"{tmp_path / 'cifar10.npz'}: ") and "'y_test'" in msg
  assert "object arrays are not supported" in msg
  np.save(tmp_path / "mnist.npy", np.array([None, 1], dtype=object))  # a lone .npy, renamed
  (tmp_path / "mnist.npy").rename(tmp_path / "mnist.npz")
  with pytest.raises(DataError, match="object arrays are not supported") as info:
    data.load("mnist", tmp_path)
  assert str(info.value).startswith(f"{tmp_path / 'mnist.npz'}: ")


@pytest.mark.parametrize("override, message", [
    (dict(y_train=np.array(["a"] * 30)), r"y_train: expected integers, got dtype <U1"),
    (dict(y_train=np.full(30, 0.5)), "y_train: expected integers, got dtype float64 with non-integral"),
])
def test_labels_of_the_wrong_type_name_the_file(tmp_path, override, message):
  write_images(tmp_path, "cifar10.npz", (32, 32, 3), **override)
  with pytest.raises(DataError, match=message) as info:
    data.load("cifar10", tmp_path)
  assert str(info.value).startswith(str(tmp_path / "cifar10.npz"))


@pytest.mark.parametrize("override, message", [
    (dict(n_users=np.arange(3)), r"n_users: expected a single integer, got shape \(3,\)"),
    (dict(n_items=np.int64(0)), "n_items: must be >= 1"),
    (dict(rating=np.full(20, np.nan, np.float32)), "rating: expected finite numbers"),
    (dict(user=np.array(["x"] * 20)), "user: expected integers"),
])
def test_ratings_of_the_wrong_type_name_the_file(tmp_path, override, message):
  arrays = write_ratings(tmp_path)
  path = tmp_path / "movielens_ml-latest-small.npz"
  np.savez(path, **{**arrays, **override})
  with pytest.raises(DataError, match=message) as info:
    data.load("movielens-latest-small", tmp_path)
  assert str(info.value).startswith(str(path))


# ------------------------------------------------------------------------------- partitioners


def check_disjoint(parts, n_samples):
  flat = np.concatenate(parts)
  assert flat.dtype == np.int64 and len(np.unique(flat)) == flat.size
  assert flat.min() >= 0 and flat.max() < n_samples


def sorted_labels(n=1000, classes=10):
  return np.random.default_rng(5).permutation(np.arange(n) % classes)


def test_iid_covers_everything_evenly():
  parts = data.partition_iid(103, 10, seed=1)
  check_disjoint(parts, 103)
  assert sum(map(len, parts)) == 103 and {len(p) for p in parts} == {10, 11}
  assert all(np.array_equal(a, b) for a, b in zip(parts, data.partition_iid(103, 10, seed=1)))
  assert not np.array_equal(parts[0], data.partition_iid(103, 10, seed=2)[0])


def test_kshard_block_sizes_as_in_decentralizepy():
  # PAPER.md 4.2 in miniature: S = 1000, 6 nodes -> e = 166, blocks of 33; last node 170 -> 34
  labels = sorted_labels()
  parts = data.partition_kshard(labels, 6, shards=5, seed=0)
  assert [len(p) for p in parts] == [165] * 5 + [170]
  check_disjoint(parts, 1000)
  # the CIFAR-10 numbers: 50,000 on 60 nodes -> 830 per node, 850 on the last, 180 unassigned
  big = data.partition_kshard(np.repeat(np.arange(10), 5000), 60, shards=5, seed=0)
  assert [len(p) for p in big[:2]] == [830, 830] and len(big[-1]) == 850
  assert sum(map(len, big)) == 49_820


def test_kshard_is_label_skewed_and_deterministic():
  labels = sorted_labels()
  parts = data.partition_kshard(labels, 6, shards=2, seed=3)
  hist = data.label_histograms(labels, parts, 10)
  assert hist.shape == (6, 10) and hist.sum() == sum(map(len, parts))
  seen = (hist > 0).sum(1)
  # 2 blocks of 83 label-sorted samples: node 0 (unfragmented pool) sees at most 2 + 2 classes;
  # later nodes take blocks from a fragmented pool and see a few more
  assert seen[0] <= 4 and seen.mean() < 6
  iid_hist = data.label_histograms(labels, data.partition_iid(1000, 6, seed=3), 10)
  assert (iid_hist > 0).sum(1).min() == 10
  again = data.partition_kshard(labels, 6, shards=2, seed=3)
  assert all(np.array_equal(a, b) for a, b in zip(parts, again))
  other = data.partition_kshard(labels, 6, shards=2, seed=4)
  assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def test_kshard_blocks_are_consecutive_in_label_order():
  labels = np.zeros(40, int)                   # one class: label order = index order
  for seed in range(5):
    first = np.sort(data.partition_kshard(labels, 4, shards=1, seed=seed)[0])
    assert len(first) == 10
    gaps = np.flatnonzero(np.diff(first) != 1)
    # one run of 10, or a run wrapping around the end of the pool (…, 38, 39, 0, 1, …)
    assert len(gaps) == 0 or (len(gaps) == 1 and first[0] == 0 and first[-1] == 39)


def test_dirichlet_alpha_controls_skew():
  labels = sorted_labels(2000)
  def skew(alpha):
    parts = data.partition_dirichlet(labels, 20, alpha, seed=0)
    check_disjoint(parts, 2000)
    assert sum(map(len, parts)) == 2000 and min(map(len, parts)) >= 1
    hist = data.label_histograms(labels, parts, 10)
    return np.mean(hist.max(1) / hist.sum(1))  # share of each node's top class
  assert skew(0.05) > skew(1.0) > skew(100.0)
  assert skew(100.0) < 0.3
  a, b = (data.partition_dirichlet(labels, 20, 0.5, seed=7) for _ in range(2))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_dirichlet_gives_every_node_a_sample():
  parts = data.partition_dirichlet(np.arange(30) % 3, 25, 0.01, seed=0)
  assert min(map(len, parts)) >= 1 and sum(map(len, parts)) == 30


def test_partition_argument_errors_name_the_argument():
  labels = np.arange(20) % 2
  with pytest.raises(ValueError, match=r"n_nodes=30: must be in 1..20"):
    data.partition_iid(20, 30, seed=0)
  with pytest.raises(ValueError, match=r"n_nodes=0"):
    data.partition_dirichlet(labels, 0, 1.0, seed=0)
  with pytest.raises(ValueError, match=r"alpha=0: must be > 0"):
    data.partition_dirichlet(labels, 2, 0, seed=0)
  with pytest.raises(ValueError, match=r"shards=0: must be >= 1"):
    data.partition_kshard(labels, 2, shards=0, seed=0)
  with pytest.raises(ValueError, match=r"n_nodes=5: must be in 1..4 .* 5 per node"):
    data.partition_kshard(labels, 5, shards=5, seed=0)
  with pytest.raises(ValueError, match="labels: must lie in 0..n_classes-1"):
    data.label_histograms(labels, [np.arange(3)], 1)


def test_movielens_split_by_user_blocks_and_per_user_fraction():
  # 61 users on 6 nodes: node 0 gets 11 users, the others 10 (as 610 on 60 in PAPER.md 4.3)
  rng = np.random.default_rng(2)
  counts = rng.integers(20, 40, 61)
  user = np.repeat(np.arange(61), counts)
  item = rng.integers(0, 50, user.size)
  rating = rng.integers(1, 11, user.size) / 2
  train, test = data.split_movielens(user, item, rating, 6, seed=0)
  assert [len(np.unique(user[t])) for t in train] == [11, 10, 10, 10, 10, 10]
  all_idx = np.concatenate(train + test)
  assert np.array_equal(np.sort(all_idx), np.arange(user.size))    # disjoint and complete
  for tr, te in zip(train, test):
    assert set(user[tr]) == set(user[te])                            # tested on its own users
  for u in range(61):
    n_train = sum(np.count_nonzero(user[t] == u) for t in train)
    assert n_train == round(0.7 * counts[u])
  again = data.split_movielens(user, item, rating, 6, seed=0)
  assert all(np.array_equal(a, b) for a, b in zip(train + test, again[0] + again[1]))
  with pytest.raises(ValueError, match=r"n_nodes=62: must be in 1..61 for 61 users"):
    data.split_movielens(user, item, rating, 62, seed=0)
  with pytest.raises(ValueError, match="train_frac=1.0"):
    data.split_movielens(user, item, rating, 6, seed=0, train_frac=1.0)


def test_pad_partition():
  idx, counts = data.pad_partition([np.array([4, 5, 6]), np.array([], np.int64), np.array([9])])
  assert idx.dtype == np.int32 and counts.dtype == np.int32
  np.testing.assert_array_equal(idx, [[4, 5, 6], [0, 0, 0], [9, 0, 0]])
  np.testing.assert_array_equal(counts, [3, 0, 1])


# ---------------------------------------------------------------------------- through the CLI


@pytest.mark.parametrize("content", ["truncated", "object_array"])
def test_cli_reports_a_bad_data_file_as_bad_input(tmp_path, capsys, content):
  """`divjax run` on a damaged or object-array file: exit 2, one line naming the file, no
  traceback, nothing written."""
  from divjax import cli
  good = _valid_archive(tmp_path, compressed=True)
  path = tmp_path / "mnist.npz"
  if content == "truncated":
    path.write_bytes(good[: len(good) // 2])
  else:
    write_images(tmp_path, "mnist.npz", (28, 28), y_train=np.array([None] * 30, dtype=object))
  out = tmp_path / "run"
  rc = cli.main(["run", "--set", "task=mnist", f"data.dir={tmp_path}", "n_nodes=2", "recipients=1",
                 "--out", str(out), "--quiet"])
  err = capsys.readouterr().err
  assert rc == 2 and not out.exists()
  assert f"{path}: " in err and "Traceback" not in err
