"""Bad input fails early, naming the key and what is allowed."""

import pytest

from divjax import config
from divjax.config import ConfigError


@pytest.mark.parametrize("override, needle", [
    ("fragments=0", "fragments"),
    ("recipients=6", "recipients: must be < n_nodes = 6"),
    ("network.upload_mbps=-5", "network.upload_mbps"),
    ("duration_s=0.001", "duration_s: must be at least one local step"),
    ("n_nodes=many", "n_nodes"),
    ("bogus_key=1", "bogus_key: unknown key (allowed here:"),
    ("network.bogus=1", "network.bogus: unknown key (allowed here: compute_s_per_step"),
    ("network.stragglers.kind=slow", "network.stragglers.kind"),
    ("algorithm=nope", "(registered: adpsgd, adpsgd_pairwise, divshare, dpsgd, el, fedavg, swift, swift_original)"),
    ("network.stragglers.nodes=[99]", "network.stragglers.nodes"),
])
def test_bad_values_name_the_key(override, needle):
  with pytest.raises(ConfigError, match=None) as info:
    config.load(None, ["n_nodes=6", override])
  assert needle in str(info.value)


def test_override_syntax_and_types(tmp_path):
  p = tmp_path / "c.yaml"
  p.write_text("n_nodes: 10\nnetwork:\n  upload_mbps: 5\n")
  cfg = config.load(p, ["network.upload_mbps=7.5", "hidden=[3, 4]", "target=0.5"])
  assert (cfg.n_nodes, cfg.network.upload_mbps, cfg.hidden, cfg.target) == (10, 7.5, [3, 4], 0.5)
  with pytest.raises(ConfigError, match="expected KEY=VALUE"):
    config.load(None, ["n_nodes"])
  with pytest.raises(ConfigError, match="n_nodes"):
    config.load(None, ["n_nodes.x=1"])


def test_bad_files(tmp_path):
  with pytest.raises(ConfigError, match="does not exist"):
    config.load(tmp_path / "missing.yaml")
  bad = tmp_path / "bad.yaml"
  bad.write_text("n_nodes: [1,\n")
  with pytest.raises(ConfigError, match="not valid YAML"):
    config.load(bad)
  lst = tmp_path / "list.yaml"
  lst.write_text("- 1\n- 2\n")
  with pytest.raises(ConfigError, match="mapping"):
    config.load(lst)


def test_time_base():
  cfg = config.load(None, ["network.compute_s_per_step=0.02", "duration_s=1", "eval_every_s=0.3",
                           "local_steps=4"])
  # evaluations are rounded to whole rounds of H = 4 ticks: 0.3 s = 15 ticks -> 16
  assert (cfg.dt_us, cfg.n_ticks, cfg.eval_every_ticks) == (20000, 50, 16)


def test_quickstart_config_is_valid():
  cfg = config.load("configs/quickstart.yaml")
  assert cfg.algorithm == "divshare"


@pytest.mark.parametrize("path", sorted(__import__("glob").glob("configs/*.yaml")))
def test_every_shipped_config_is_valid(path):
  cfg = config.load(path)
  if cfg.task == "cifar10":  # the paper's values (PAPER.md 4.2, 6.1)
    assert (cfg.n_nodes, cfg.recipients, cfg.local_steps, cfg.batch_size, cfg.lr) == (60, 6, 128, 8, 0.05)
