"""Evaluation memory at scale: N models x T CIFAR-10-shaped test images.

Builds a classification task (tasks.classification_task, the code every image task uses)
with random 32x32x3 test images, then for each `eval_nodes` value (models evaluated side by
side in one step; tasks.EVAL_NODES = 64 is the default, eval_nodes = N is the old unbatched
behaviour, every model vmapped at once):

  - XLA's compiled memory analysis of one evaluation (temp = intermediates; arguments = the
    (N, P) parameters; the test set is a captured constant),
  - with --run: one evaluation in a fresh process, its wall time, the process's peak RSS
    (resource.getrusage) before and after it, and (Linux) the evaluation's own peak above the
    RSS before it (/proc/self/status VmHWM after resetting it through /proc/self/clear_refs).

  python3 benchmarks/eval_memory.py                           # 1,000 x 10,000, MLP 3072-16-10
  python3 benchmarks/eval_memory.py --run                     # also run them (minutes on 2 cores)
  python3 benchmarks/eval_memory.py --model gn_lenet --nodes 1000 --eval-nodes 64 1000

The naive (N, T, classes) float32 logits alone are N * T * 40 bytes (400 MB at 1,000 x 10,000),
and the first hidden layer N * T * hidden * 4 bytes; grouped evaluation needs
eval_nodes * eval_batch of each, whatever N and T are.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from divjax import models, tasks  # noqa: E402


def build(args, eval_nodes: int):
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (args.test, 32, 32, 3)).astype(np.float32)
  y = (np.arange(args.test) % 10).astype(np.int32)
  if args.model == "gn_lenet":
    model = models.make_model("gn_lenet")
  else:
    model = models.make_model("mlp", input_shape=(32, 32, 3), hidden=tuple(args.hidden), n_classes=10)
  return tasks.classification_task("bench", model, x[:10], y[:10], [np.arange(10)], x, y,
                                   n_classes=10, eval_batch=args.eval_batch, eval_nodes=eval_nodes)


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def proc_status(field: str):
  """VmRSS / VmHWM (peak) of this process in bytes, from /proc (Linux), else None."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def reset_peak() -> bool:
  """Resets VmHWM to the current RSS (Linux: clear_refs 5), so the peak is the evaluation's."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def analyse(args, eval_nodes: int) -> dict:
  task = build(args, eval_nodes)
  t0 = time.perf_counter()
  compiled = task.eval_fn.lower(jax.ShapeDtypeStruct((args.nodes, task.n_params), jnp.float32), task.test).compile()
  out = {"model": args.model, "nodes": args.nodes, "test": args.test, "eval_batch": args.eval_batch,
         "eval_nodes": eval_nodes, "n_params": task.n_params, "compile_s": round(time.perf_counter() - t0, 1),
         "naive_logits_bytes": args.nodes * args.test * 10 * 4}
  mem = compiled.memory_analysis()
  if mem is not None:
    out |= {"temp_bytes": mem.temp_size_in_bytes, "argument_bytes": mem.argument_size_in_bytes,
            "output_bytes": mem.output_size_in_bytes}
  if args.child:  # run it once, here, in this fresh process
    params = jax.random.normal(jax.random.key(1), (args.nodes, task.n_params), jnp.float32) * 0.01
    jax.block_until_ready(params)
    out["peak_rss_before_bytes"] = peak_rss_bytes()
    reset = reset_peak()
    rss = proc_status("VmRSS")
    t0 = time.perf_counter()
    ev = jax.block_until_ready(compiled(params, task.test))
    out |= {"eval_s": round(time.perf_counter() - t0, 1), "rss_before_bytes": rss,
            "peak_rss_after_bytes": peak_rss_bytes(), "acc_mean": float(np.mean(ev["acc"]))}
    if reset and rss is not None:  # the evaluation's own peak above what was resident before it
      out["eval_peak_rss_increase_bytes"] = proc_status("VmHWM") - rss
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--nodes", type=int, default=1000)
  ap.add_argument("--test", type=int, default=10_000)
  ap.add_argument("--eval-batch", type=int, default=1024)
  ap.add_argument("--eval-nodes", type=int, nargs="+", default=None,
                  help=f"default: {tasks.EVAL_NODES} and --nodes (the unbatched behaviour)")
  ap.add_argument("--model", choices=["mlp", "gn_lenet"], default="mlp")
  ap.add_argument("--hidden", type=int, nargs="+", default=[16])
  ap.add_argument("--run", action="store_true", help="also run each evaluation in a fresh process")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  groups = args.eval_nodes or [tasks.EVAL_NODES, args.nodes]
  if args.child:
    print(json.dumps(analyse(args, groups[0])), flush=True)
    return
  for g in groups:
    if args.run:  # a fresh process per setting, so each peak RSS is its own
      cmd = [sys.executable, __file__, "--child", "--eval-nodes", str(g), "--nodes", str(args.nodes),
             "--test", str(args.test), "--eval-batch", str(args.eval_batch), "--model", args.model,
             "--hidden", *map(str, args.hidden)]
      res = subprocess.run(cmd, capture_output=True, text=True)
      line = res.stdout.strip().splitlines()[-1] if res.returncode == 0 else json.dumps(
          {"eval_nodes": g, "error": f"exit {res.returncode}", "stderr": res.stderr[-400:]})
      print(line, flush=True)
    else:
      print(json.dumps(analyse(args, g)), flush=True)


if __name__ == "__main__":
  main()
