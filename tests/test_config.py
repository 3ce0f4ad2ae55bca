"""Bad input fails early, naming the key and what is allowed."""

import pytest

from divjax import config, configure
from divjax.config import ConfigError


@pytest.mark.parametrize("override, needle", [
    ("fragments=0", "fragments"),
    ("recipients=6", "recipients: must be < n_nodes = 6"),
    ("network.upload_mbps=-5", "network.upload_mbps"),
    ("duration_s=0.001", "duration_s: must be at least one local step"),
    ("n_nodes=many", "n_nodes"),
    ("bogus_key=1", "bogus_key: unknown key (allowed here:"),
    ("network.bogus=1", "network.bogus: unknown key (allowed here: bandwidth, compute_s_per_step"),
    ("network.stragglers.kind=slow", "network.stragglers.kind"),
    ("algorithm=nope", "(registered: adpsgd, adpsgd_pairwise, divshare, divshare_age, dpsgd, el, el_local, el_oracle, fedavg, sgp, swift, swift_original)"),
    ("network.stragglers.nodes=[99]", "network.stragglers.nodes"),
])
def test_bad_values_name_the_key(override, needle):
  with pytest.raises(ConfigError, match=None) as info:
    configure.load(None, ["n_nodes=6", override])
  assert needle in str(info.value)


def test_override_syntax_and_types(tmp_path):
  p = tmp_path / "c.yaml"
  p.write_text("n_nodes: 10\nnetwork:\n  upload_mbps: 5\n")
  cfg = configure.load(p, ["network.upload_mbps=7.5", "hidden=[3, 4]", "target=0.5"])
  assert (cfg.n_nodes, cfg.network.upload_mbps, cfg.hidden, cfg.target) == (10, 7.5, [3, 4], 0.5)
  with pytest.raises(ConfigError, match="expected KEY=VALUE"):
    configure.load(None, ["n_nodes"])
  with pytest.raises(ConfigError, match="n_nodes"):
    configure.load(None, ["n_nodes.x=1"])


def test_bad_files(tmp_path):
  with pytest.raises(ConfigError, match="does not exist"):
    configure.load(tmp_path / "missing.yaml")
  bad = tmp_path / "bad.yaml"
  bad.write_text("n_nodes: [1,\n")
  with pytest.raises(ConfigError, match="not valid YAML"):
    configure.load(bad)
  lst = tmp_path / "list.yaml"
  lst.write_text("- 1\n- 2\n")
  with pytest.raises(ConfigError, match="mapping"):
    configure.load(lst)


def test_time_base():
  cfg = configure.load(None, ["network.compute_s_per_step=0.02", "duration_s=1", "eval_every_s=0.3",
                           "local_steps=4"])
  # evaluations are rounded to whole rounds of H = 4 ticks: 0.3 s = 15 ticks -> 16
  assert (cfg.dt_us, cfg.n_ticks, cfg.eval_every_ticks) == (20000, 50, 16)


def test_quickstart_config_is_valid():
  cfg = configure.load("configs/quickstart.yaml")
  assert cfg.algorithm == "divshare"


@pytest.mark.parametrize("path", sorted(__import__("glob").glob("configs/*.yaml")))
def test_every_shipped_config_is_valid(path):
  cfg = configure.load(path)
  if cfg.task == "cifar10":  # the paper's values (PAPER.md 4.2, 6.1)
    assert (cfg.n_nodes, cfg.recipients, cfg.local_steps, cfg.batch_size, cfg.lr) == (60, 6, 128, 8, 0.05)


@pytest.mark.parametrize("override, key", [
    ("recipients=true", "recipients"), ("n_nodes=false", "n_nodes"), ("fragments=true", "fragments"),
    ("lr=true", "lr"), ("hidden=[true]", "hidden"), ("network.stragglers.nodes=[true]", "network.stragglers.nodes"),
    ("server.cohort=true", "server.cohort"), ("network.header_bits=true", "network.header_bits"),
])
def test_true_false_is_not_a_number(override, key):
  """YAML's true used to be read as 1 (`recipients: true` ran with 1 recipient)."""
  with pytest.raises(ConfigError) as info:
    configure.load(None, ["n_nodes=6", override])
  assert str(info.value).startswith(f"{key}: must be a number, not true/false")


def test_a_number_is_not_a_switch():
  with pytest.raises(ConfigError, match=r"^network\.download_cap: must be true or false \(got 1\)"):
    configure.load(None, ["network.download_cap=1"])
  assert configure.load(None, ["network.download_cap=true"]).network.download_cap is True


@pytest.mark.parametrize("overrides, hi", [
    (["data.dim=5", "hidden=[7]"], 70),                         # MLP 5-7-10: tensors 35, 7, 70, 10
    (["model=logreg", "data.dim=3", "data.n_classes=2", "data.classes_per_node=1"], 6),
    (["task=cifar10"], 51200),                                  # GN-LeNet: conv3, 5 x 5 x 32 x 64
    (["task=mnist"], 784 * 64),
])
def test_fragments_at_most_the_largest_tensor(overrides, hi):
  """More fragments than the largest tensor has entries leave fragments empty (each tensor
  is cut into all fragments); they used to be accepted."""
  assert configure.load(None, overrides + [f"fragments={hi}"]).fragments == hi
  with pytest.raises(ConfigError) as info:
    configure.load(None, overrides + [f"fragments={hi + 1}"])
  assert str(info.value).startswith(f"fragments: must be in 1..{hi} for this model")
  assert str(info.value).endswith(f"(got {hi + 1})")


def test_fragments_default_checked_too():
  with pytest.raises(ConfigError, match=r"^fragments: must be in 1\.\.2 .*\(got 8\)"):
    configure.load(None, ["model=logreg", "data.dim=1", "data.n_classes=2", "data.classes_per_node=1"])


def test_fragments_of_movielens_checked_against_the_data_file(tmp_path):
  import numpy as np
  np.savez(tmp_path / "movielens_ml-100k.npz", user=np.zeros(3, np.int32), item=np.zeros(3, np.int32),
           rating=np.ones(3, np.float32), n_users=np.int64(4), n_items=np.int64(9))
  base = ["task=movielens-100k", f"data.dir={tmp_path}", "mf_dim=2"]
  assert configure.load(None, base + ["fragments=18"]).fragments == 18   # items: 9 x 2
  with pytest.raises(ConfigError, match=r"^fragments: must be in 1\.\.18 for this model \(mf, 26 parameters"):
    configure.load(None, base + ["fragments=19"])
  # no file to read the sizes from: left to the run (which loads the data)
  assert configure.load(None, ["task=movielens-100k", "fragments=19"]).fragments == 19


def test_fragments_check_does_not_start_the_backend(monkeypatch):
  """`divjax run` sets up its CPU devices after validating the config, so validation must not
  touch the JAX backend (shapes come from tracing only)."""
  import jax
  from jax._src import xla_bridge

  def no(*a, **k):
    raise AssertionError("config validation asked for the JAX backend")

  for name in ("backends", "get_backend", "default_backend", "_get_backend_uncached"):
    monkeypatch.setattr(xla_bridge, name, no)
  for name in ("default_backend", "devices", "local_devices", "device_count"):
    monkeypatch.setattr(jax, name, no)
  configure._tensor_sizes.cache_clear()
  for task, hi in (("synthetic", 2048), ("cifar10", 51200), ("mnist", 784 * 64)):
    assert configure.load(None, [f"task={task}", f"fragments={hi}"]).fragments == hi
    with pytest.raises(ConfigError, match="^fragments: must be in"):  # the check did run
      configure.load(None, [f"task={task}", f"fragments={hi + 1}"])
  configure._tensor_sizes.cache_clear()  # nothing traced under the patches stays cached


def test_load_for_drops_what_the_algorithm_ignores():
  """Comparing algorithms on one file (benchmarks/compare.py): keys meant for the others are
  dropped for an algorithm that does not use them, and kept for one that does."""
  a = configure.load_for("adpsgd", "configs/quickstart.yaml", ["recipients=6"])
  assert (a.fragments, a.recipients) == (1, 6)
  d = configure.load_for("dpsgd", "configs/quickstart.yaml", ["recipients=6", "topology=ring"])
  assert (d.fragments, d.recipients, d.topology) == (1, 3, "ring")
  s = configure.load_for("divshare", "configs/quickstart.yaml", ["topology=ring"])
  assert (s.fragments, s.topology) == (8, "complete")
  with pytest.raises(ConfigError, match="^fragments: algorithm 'adpsgd' sends whole models"):
    configure.load("configs/quickstart.yaml", ["algorithm=adpsgd"])


def test_config_imports_nothing_from_divjax():
  import subprocess
  import sys
  code = "import sys, divjax.config; print(sorted(m for m in sys.modules if m.startswith('divjax')))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert out.strip() == "['divjax', 'divjax.config']"
