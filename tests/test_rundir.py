"""Run directories (issue 18, items 3, 4 and 6): unique default names, the lock that keeps a
second run out, what --force may delete, output paths that cannot be written, Ctrl-C before
the run loop, and the exit codes in --help. In-process; all but the first are refused before
anything is built."""

import os
import signal
import threading

import pytest

from divjax import cli, config, rundir, simulate
from conftest import TINY, tiny_config


def _refused(capsys, *args) -> str:
  """Runs `divjax run ARGS`, which must be refused (exit 2) without a traceback; its stderr."""
  rc = cli.main(["run", *args, "--quiet"])
  err = capsys.readouterr().err
  assert rc == 2, err
  assert "Traceback" not in err, err
  return err


def _files(d):
  return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def no_build(monkeypatch):
  """Fails the test if a run gets as far as building the simulation."""
  def build(cfg):
    raise AssertionError("refused too late: the simulation was built")
  monkeypatch.setattr(simulate, "build", build)


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch, capsys):
  """The default name of a run started in the same second as another is taken: this run gets
  the name with -2, and the other keeps its directory as it was."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(cli, "_timestamp", lambda: "20250101-120000")
  name = rundir.default_name("default", TINY, "20250101-120000")
  assert name.startswith("default_n_nodes-6_fragments-2_") and name.endswith("_20250101-120000")
  other = tmp_path / "runs" / name
  other.mkdir(parents=True)  # the other run's, with its first files
  (other / rundir.MARKER).write_text("")
  (other / "config.yaml").write_text("seed: 1\n")
  with rundir.claim(other):  # the other run is still going
    before = _files(other)
    assert cli.main(["run", "--set", *TINY, "--quiet"]) == 0, capsys.readouterr().err
  mine = tmp_path / "runs" / f"{name}-2"
  assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [name, mine.name]
  assert _files(other) == before
  assert len((mine / "metrics.jsonl").read_text().splitlines()) == 6


def test_unique_names_are_atomic_under_concurrency(tmp_path):
  made, locks = [], []

  def start():
    out, lock = rundir.create(tmp_path / "runs" / "same", force=False, unique=True)
    made.append(out)
    locks.append(lock)
  threads = [threading.Thread(target=start) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(set(made)) == 8 and {p.name for p in made} == {"same"} | {f"same-{i}" for i in range(2, 9)}
  for lock in locks:
    lock.release()


def test_default_names_describe_the_overrides_briefly():
  assert rundir.default_name("quickstart", [], "T") == "quickstart_T"
  name = rundir.default_name("c", ["network.upload_mbps=30", "hidden=[7, 8]"], "T")
  assert name == "c_upload_mbps-30_hidden-7-8_T"
  long_a = rundir.default_name("c", [f"k{i}={i}" for i in range(40)], "T")
  long_b = rundir.default_name("c", [f"k{i}={i + 1}" for i in range(40)], "T")
  assert len(long_a) <= len("c__T") + 48 and long_a != long_b


def test_a_run_directory_in_use_is_refused(tmp_path, capsys, no_build):
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.yaml").write_text(config.dump_yaml(tiny_config()))
  (run / "metrics.jsonl").write_text("{}\n")
  empty = tmp_path / "empty"
  empty.mkdir()
  with rundir.claim(run):  # another run holds it
    before = _files(run)
    for args in (["--resume", str(run)], ["--set", *TINY, "--out", str(run), "--force"]):
      err = _refused(capsys, *args)
      assert f"{run}: another divjax run holds this run directory" in err, err
    assert _files(run) == before
    with rundir.claim(empty), pytest.raises(rundir.RunDirError, match="another divjax run holds"):
      rundir.create(empty, force=False, unique=False)  # taken between the checks and the start
  with rundir.claim(run):  # released when a run ends: the directory can be taken again
    assert rundir.is_locked(run)
  assert not rundir.is_locked(run)


def test_force_replaces_only_a_divjax_run_directory(tmp_path, monkeypatch, capsys, no_build):
  photos = tmp_path / "photos"
  (photos / "2024").mkdir(parents=True)
  (photos / "2024" / "a.jpg").write_bytes(b"jpg")
  (photos / "notes.txt").write_text("keep")
  err = _refused(capsys, "--set", *TINY, "--out", str(photos), "--force")
  assert f"{photos} was not created by divjax" in err and rundir.MARKER in err, err
  assert _files(photos) == {"2024/a.jpg": b"jpg", "notes.txt": b"keep"}

  note = tmp_path / "note.txt"
  note.write_text("keep")
  err = _refused(capsys, "--set", *TINY, "--out", str(note), "--force")
  assert f"--out {note} is a file, not a directory" in err and "left untouched" in err, err
  assert note.read_text() == "keep"

  # a marked run directory, but the current one or one containing it: refused
  work = tmp_path / "work"
  work.mkdir()
  (work / rundir.MARKER).write_text("")
  (work / "metrics.jsonl").write_text("{}\n")
  (tmp_path / rundir.MARKER).write_text("")
  monkeypatch.chdir(work)
  for out in (".", ".."):
    err = _refused(capsys, "--set", *TINY, "--out", out, "--force")
    assert f"--force refused: {out} is the current directory or contains it" in err, err
  assert (work / "metrics.jsonl").exists() and (tmp_path / "note.txt").exists()

  # what --force does replace: the contents of a divjax run directory (the lock file stays)
  (work / "checkpoints" / "8").mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  out, lock = rundir.create(work, force=True, unique=False)
  with lock:
    assert out == work and [p.name for p in work.iterdir()] == [rundir.MARKER]


def test_output_paths_that_cannot_be_written_are_refused(tmp_path, capsys, no_build):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  err = _refused(capsys, "--set", *TINY, "--out", str(blocker / "run"))
  assert f"cannot create the run directory {blocker / 'run'}: {blocker} is not a directory" in err, err
  err = _refused(capsys, "--set", *TINY, "--resume", str(blocker / "run"))
  assert str(blocker) in err, err
  assert blocker.read_text() == "x"
  if os.geteuid() != 0:  # root writes into read-only directories
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
      err = _refused(capsys, "--set", *TINY, "--out", str(ro / "run"))
      assert f"cannot create the run directory {ro / 'run'}: {ro} is not writable" in err, err
    finally:
      ro.chmod(0o755)


def test_ctrl_c_before_the_run_loop_exits_130_without_a_traceback(tmp_path, monkeypatch, capsys):
  build = simulate.build

  def interrupted_build(cfg):  # Ctrl-C while building: the run stops once it is built
    os.kill(os.getpid(), signal.SIGINT)
    return build(cfg)
  monkeypatch.setattr(simulate, "build", interrupted_build)
  out = tmp_path / "run"
  assert cli.main(["run", "--set", *TINY, "--out", str(out), "--quiet"]) == 130
  err = capsys.readouterr().err
  assert "interrupted before the run started; nothing was written" in err and "Traceback" not in err, err
  assert not out.exists()

  def aborted_build(cfg):  # a KeyboardInterrupt (a second Ctrl-C) anywhere before the loop
    raise KeyboardInterrupt
  monkeypatch.setattr(simulate, "build", aborted_build)
  assert cli.main(["run", "--set", *TINY, "--out", str(out), "--quiet"]) == 130
  err = capsys.readouterr().err
  assert "interrupted" in err and "Traceback" not in err, err
  assert not out.exists()
  # while resuming: the run directory's lock is released
  out.mkdir()
  (out / "config.yaml").write_text(config.dump_yaml(tiny_config()))
  assert cli.main(["run", "--resume", str(out), "--quiet"]) == 130
  assert "Traceback" not in capsys.readouterr().err
  assert not rundir.is_locked(out)


def test_help_lists_the_exit_codes(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["run", "--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  assert "exit codes:" in text
  for line in ("  0    completed", "  1    failed", "  2    bad input", "  3    diverged",
               "  130  interrupted by Ctrl-C (SIGINT); 143 by SIGTERM"):
    assert line in text, text
