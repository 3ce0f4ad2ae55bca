"""Checkpoint integrity (issue 18, items 2, 6 and 7): checksums and config fingerprints
verified on resume, fallback from a corrupt checkpoint to the previous intact one, checkpoints
written before checksums existed, a full disk while writing one, and a resume of a completed
run, which changes nothing. All in-process, on one tiny finished run copied per test."""

import json
import logging
import resource
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from divjax import checkpoint, cli, config, simulate
from conftest import TINY, tiny_config


def _ticks(run: Path) -> list[int]:
  return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


def _files(run: Path) -> dict[str, bytes]:
  return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _data_file(run: Path, tick: int) -> Path:
  """The largest file of a checkpoint's arrays: where their bytes are."""
  return max((run / "checkpoints" / str(tick) / "state").rglob("*"), key=lambda p: p.stat().st_size)


def _flip_bit(run: Path, tick: int) -> None:
  f = _data_file(run, tick)
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x01  # in the middle: array bytes, not an index
  f.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A completed tiny run (40 ticks) with checkpoints at ticks 32 and 40."""
  out = tmp_path_factory.mktemp("finished") / "run"
  assert cli.main(["run", "--set", *TINY, "--out", str(out), "--quiet"]) == 0
  assert _ticks(out) == [32, 40]
  return out


def _resume(run: Path, capsys) -> tuple[int, str]:
  rc = cli.main(["run", "--resume", str(run), "--quiet"])
  err = capsys.readouterr().err
  assert "Traceback" not in err, err
  return rc, err


def test_a_flipped_bit_is_reported_and_the_previous_checkpoint_used(finished, tmp_path, capsys):
  run = tmp_path / "run"
  shutil.copytree(finished, run)
  _flip_bit(run, 40)
  with pytest.raises(checkpoint.CorruptCheckpoint, match="tick 40"):
    checkpoint.read(run)
  rc, err = _resume(run, capsys)
  assert rc == 0, err
  assert f"checkpoint {run / 'checkpoints' / '40'} (tick 40) is corrupt" in err, err
  assert "falling back to the intact checkpoint at tick 32" in err, err
  assert (run / "checkpoints-corrupt" / "40").is_dir()  # kept aside, and tick 40 written again
  assert (run / "metrics.jsonl").read_bytes() == (finished / "metrics.jsonl").read_bytes()
  (ta, xa, ra), (tb, xb, rb) = checkpoint.read(run), checkpoint.read(finished)
  assert ta == tb == 40 and ra == rb and sorted(xa) == sorted(xb)
  for k in xa:
    np.testing.assert_array_equal(xa[k], xb[k], err_msg=k)


def test_no_intact_checkpoint_is_refused_and_nothing_changes(finished, tmp_path, capsys):
  run = tmp_path / "run"
  shutil.copytree(finished, run)
  _flip_bit(run, 40)
  garbage = _data_file(run, 32)  # larger garbage, once reported as "diverged"
  garbage.write_bytes(np.random.default_rng(0).bytes(garbage.stat().st_size))
  before = _files(run)
  rc, err = _resume(run, capsys)
  assert rc == 2, err
  assert "no intact checkpoint (corrupt at ticks 40, 32)" in err, err
  assert _files(run) == before


def test_an_edited_config_yaml_is_refused_listing_the_keys(finished, tmp_path, capsys):
  run = tmp_path / "run"
  shutil.copytree(finished, run)
  cfg = yaml.safe_load((run / "config.yaml").read_text())
  cfg["lr"] = 0.1
  cfg["network"]["upload_mbps"] = 0.6
  (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
  before = _files(run)
  rc, err = _resume(run, capsys)
  assert rc == 2, err
  for needle in ("differs from the configuration this checkpoint was written with",
                 "lr (checkpoint: 0.05, config.yaml: 0.1)",
                 "network.upload_mbps (checkpoint: 0.5, config.yaml: 0.6)"):
    assert needle in err, err
  assert _files(run) == before


def test_resuming_a_completed_run_changes_nothing(finished, tmp_path, capsys):
  run = tmp_path / "run"
  shutil.copytree(finished, run)
  before = _files(run)
  rc, err = _resume(run, capsys)
  assert rc == 0 and "already completed (tick 40); nothing was changed" in err, err
  assert _files(run) == before  # summary.json's timings included


def test_checkpoints_without_checksums_restore_unverified(tmp_path, monkeypatch):
  """Written by a divjax before checksums: restored, with the tick listed as unverified."""
  sim = simulate.build(tiny_config())
  state = sim.engine.init(sim.run_key)
  template = jax.eval_shape(sim.engine.init, sim.run_key)
  record = [{"tick": 0, "time_s": 0.0}]
  with monkeypatch.context() as m:
    m.setattr(checkpoint, "_checksums", lambda *a: None)
    old = checkpoint.Checkpointer(tmp_path, template)
    old.save(state, record)
    old.close()
  ckpt = checkpoint.Checkpointer(tmp_path, template, config=config.to_dict(tiny_config("lr=0.1")))
  got, records = ckpt.restore()
  assert records == record and ckpt.unverified == {0}
  np.testing.assert_array_equal(np.asarray(got.params), np.asarray(state.params))
  ckpt.close()


def test_a_full_disk_while_checkpointing_fails_in_one_line(tmp_path, capsys, caplog):
  """A checkpoint larger than the file-size limit fails to be written as on a full disk:
  status "failed", the records kept, one line saying why; none of orbax's tracebacks (its
  ERROR logs and 'Event loop is closed' exceptions)."""
  out = tmp_path / "run"
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  # the arrays (about 800 kB with 400 hidden units) do not fit; every other file does
  resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, hard))
  try:
    rc = cli.main(["run", "--set", *TINY, "hidden=[400]", "--out", str(out), "--quiet"])
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  err = capsys.readouterr().err
  assert rc == 1, err
  assert "Traceback" not in err, err
  lines = [l for l in err.splitlines() if "could not write the checkpoint" in l]
  assert len(lines) == 1 and "File too large" in lines[0], err
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
  summary = json.loads((out / "summary.json").read_text())
  assert summary["status"] == "failed" and "File too large" in summary["error"]
  records = (out / "metrics.jsonl").read_text().splitlines()
  assert len(records) >= 2 and summary["final"] == json.loads(records[-1])


def test_a_checkpoint_from_before_a_key_existed_resumes_at_its_default():
  """Config keys added later (eval, train_block, data.zeta) were their defaults in older runs."""
  from divjax.checkpoint import ConfigMismatch, _check_config
  now = config.to_dict(tiny_config())
  old = {k: v for k, v in now.items() if k not in ("eval", "train_block")}
  old["data"] = {k: v for k, v in now["data"].items() if k != "zeta"}
  _check_config("ckpt", old, now)                                  # no mismatch
  with pytest.raises(ConfigMismatch, match="train_block"):
    _check_config("ckpt", old, config.to_dict(tiny_config("train_block=2")))


def test_a_checkpoint_from_before_pending_snapshots_resumes_exactly(tmp_path):
  """Older engines wrote a round end's snapshots into the ring at once; their checkpoints have
  no engine.Fresh arrays, and restore as 'nothing pending', continuing the same simulation.
  They also counted five fates (no OVERFLOW): restored with a zero count."""
  sim = simulate.build(tiny_config())
  run = simulate.compile_chunk(sim, sim.engine.init(sim.run_key), 8)
  state, _ = run(sim.engine.init(sim.run_key), sim.params)                  # two rounds
  assert bool((state.fresh.slot >= 0).any())
  older = state._replace(ring=state.ring_now(), fresh=None,                 # what an older engine held
                         counters=state.counters._replace(retired=state.counters.retired[:5]))  # no OVERFLOW
  ckpt = checkpoint.Checkpointer(tmp_path, template=jax.eval_shape(sim.engine.init, sim.run_key))
  ckpt.save(older, [{"tick": int(state.tick)}])
  restored, _ = ckpt.restore()
  ckpt.close()
  assert not bool((restored.fresh.slot >= 0).any())
  a, _ = run(state, sim.params)
  b, _ = run(restored, sim.params)
  np.testing.assert_array_equal(np.asarray(a.params), np.asarray(b.params))
  assert simulate.engine_lib.message_counts(a) == simulate.engine_lib.message_counts(b)
