import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for this test session (a fresh, empty directory, subprocess
# runs included): many tests compile the same tiny programs, which then compile once.
_CACHE = tempfile.mkdtemp(prefix="divjax-test-jax-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("DIVJAX_COMPILATION_CACHE", _CACHE)
# Compile the tests' programs with LLVM at -O0 (subprocesses too): the tests check what is
# computed, not how fast, and this takes about a third off the suite's CPU time, most of which
# is compiling tiny programs. Float results may differ from -O2 in the last bits; every
# comparison in the tests is within one optimisation level or has a tolerance.
# DIVJAX_TEST_XLA_OPT=default keeps XLA's default.
if os.environ.get("DIVJAX_TEST_XLA_OPT", "0") != "default" and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# 4 CPU devices for the sharded-run tests (DESIGN.md 7); everything else uses the first one
jax.config.update("jax_num_cpu_devices", 4)
if os.environ["DIVJAX_COMPILATION_CACHE"] != "off":
  jax.config.update("jax_compilation_cache_dir", os.environ["DIVJAX_COMPILATION_CACHE"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from divjax import config, configure  # noqa: E402

TINY = [
    "n_nodes=6", "fragments=2", "recipients=2", "local_steps=4", "batch_size=4",
    "data.samples_per_node=16", "data.dim=5", "data.test_size=50", "hidden=[7]",
    "duration_s=0.4", "eval_every_s=0.1", "network.compute_s_per_step=0.01",
    "network.upload_mbps=0.5", "network.latency_ms=3",
]


def tiny_config(*overrides: str) -> config.Config:
  """A 6-node, 122-parameter DivShare run of 40 ticks; overrides are --set style.

  TINY's fragments and recipients are left out for an algorithm that does not use them (it
  would refuse them)."""
  from divjax import algorithms
  name = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("algorithm=")), "divshare")
  props = algorithms.PROPERTIES.get(name)
  base = [o for o in TINY if props is None
          or not (o.startswith("fragments=") and not props.uses_fragments)
          and not (o.startswith("recipients=") and not props.uses_recipients)]
  return configure.load(None, base + list(overrides))


@pytest.fixture
def tiny():
  return tiny_config
