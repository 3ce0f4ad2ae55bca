"""MovieLens: the global-mean bar, why the plain model cannot clear it, and lr/batch sweeps.

Three modes (all need the real data: --data DIR, the layout of shared/data):

  baseline   the global-mean predictor's RMSE on every node's own held-out ratings (the
             number a run must beat; also in every MovieLens run's summary.json, `baseline`)
  central    one centralised model trained on all training ratings with minibatch SGD,
             evaluated like the simulator (mean over nodes of the per-node RMSE): the plain
             dot product versus the same model with the global-mean offset (tasks.movielens)
  sweep      simulator runs of CONFIG for each (lr, batch_size) given, with --offset; prints
             the mean per-node test RMSE at every evaluation, then one line per run

  python3 benchmarks/movielens_tune.py baseline --data ../shared/data
  python3 benchmarks/movielens_tune.py central --data ../shared/data
  python3 benchmarks/movielens_tune.py sweep configs/movielens_divshare.yaml --data ../shared/data \\
      --lr 0.5 2 3 4 --batch 32 --set duration_s=16 eval_every_s=3.2

Why learning is slow (lr 0.5: RMSE 2.23 after 40 s without the offset): the loss is the
batch mean, so a row moves by lr * 2 * err * (other row) / B per occurrence, and its expected
step is proportional to lr times its share of the node's ratings. A node's heaviest user holds
a third of its ratings (median over nodes; up to 80%), a typical item 1/1,000, so item rows
learn ~300x slower than the rows that set the stability limit (lr 3 and 4 diverge at B = 32).
The U(-0.05, 0.05) init adds a slow start (gradients are proportional to the other row, norm
~0.13), and averaging dilutes each user row, trained at 1 node of 60. In plain SGD a summed
loss at lr is exactly the mean loss at lr * B, so only lr is swept (no reduction option).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from divjax import config, configure, data, simulate, tasks


def baseline(args):
  ds = data.load("movielens-latest-small", args.data)
  train, test = data.split_movielens(ds.user, ds.item, ds.rating, args.nodes, args.seed)
  out = tasks.global_mean_baseline(ds.rating, train, test, ds.item)
  print(json.dumps(out))
  return out


def central(args):
  """Centralised minibatch SGD (summed loss, as classic MF SGD) on the simulator's split."""
  ds = data.load("movielens-latest-small", args.data)
  train, test = data.split_movielens(ds.user, ds.item, ds.rating, args.nodes, args.seed)
  base = tasks.global_mean_baseline(ds.rating, train, test, ds.item)
  rating = np.asarray(ds.rating, np.float32)
  tr = np.concatenate(train)
  x = jnp.asarray(np.stack([ds.user, ds.item], 1)[tr])
  y = jnp.asarray(rating[tr])
  b = 32

  def node_rmse(u, v, shift):
    u, v = np.asarray(u), np.asarray(v)
    return float(np.mean([np.sqrt(np.mean((np.sum(u[ds.user[t]] * v[ds.item[t]], 1) + shift - rating[t]) ** 2))
                          for t in test]))

  def fit(lr, shift, epochs):
    k1, k2 = jax.random.split(jax.random.key(args.seed))
    u = jax.random.uniform(k1, (ds.n_users, 20), minval=-0.05, maxval=0.05)
    v = jax.random.uniform(k2, (ds.n_items, 20), minval=-0.05, maxval=0.05)

    def loss(u, v, xb, yb):
      return jnp.sum((jnp.sum(u[xb[:, 0]] * v[xb[:, 1]], 1) + shift - yb) ** 2)

    @jax.jit
    def epoch(u, v, key):
      n = x.shape[0] // b
      perm = jax.random.permutation(key, x.shape[0])[:n * b].reshape(n, b)

      def step(c, idx):
        gu, gv = jax.grad(loss, (0, 1))(*c, x[idx], y[idx])
        return (c[0] - lr * gu, c[1] - lr * gv), None
      return jax.lax.scan(step, (u, v), perm)[0]

    curve = []
    for e in range(epochs):
      u, v = epoch(u, v, jax.random.key(1000 + e))
      curve.append(node_rmse(u, v, shift))
    return curve

  print(f"global-mean baseline {base['loss']:.4f}; cold test ratings {base['cold']:.2%}")
  for name, shift in (("plain", 0.0), ("global_mean offset", base["mean"])):
    for lr in args.central_lr:
      curve = fit(lr, shift, args.epochs)
      best = int(np.argmin(curve))
      print(f"{name:20s} lr {lr:<6g} (summed loss, batch {b}): RMSE by epoch "
            + " ".join(f"{c:.3f}" for c in curve) + f"  best {curve[best]:.4f} at epoch {best + 1}",
            flush=True)


def load(args, overrides):
  """The config and its offset: --offset, else the file's `mf_offset`; the key is taken out
  of the file when this divjax's Config does not know it yet."""
  import yaml
  with open(args.config) as f:
    raw = yaml.safe_load(f) or {}
  offset = args.offset or raw.get("mf_offset", "none")
  if "mf_offset" not in config.Config.model_fields:
    raw.pop("mf_offset", None)
  return configure.from_dict(config.apply_overrides(raw, overrides)), offset


def sweep(args):
  for bs in args.batch:
    for lr in args.lr:
      cfg, offset = load(args, [f"data.dir={args.data}", f"lr={lr}", f"batch_size={bs}"] + list(args.set))
      task = tasks.movielens(cfg, offset=offset)
      sim = simulate.build(cfg, task)
      curve = []
      t0 = time.perf_counter()
      summary, _ = simulate.run(cfg, sim=sim, on_eval=lambda r: curve.append((r["time_s"], r["loss_mean"])))
      wall = time.perf_counter() - t0
      print(f"lr {lr:g} batch {bs} offset {offset}: "
            + " ".join(f"{t:.1f}s:{l:.4f}" for t, l in curve), flush=True)
      print(json.dumps({"config": args.config, "lr": lr, "batch_size": bs, "offset": offset,
                        "status": summary["status"], "final_rmse": summary["final"]["loss_mean"],
                        "best_rmse": min(l for _, l in curve), "baseline": task.baseline["loss"],
                        "wall_s": round(wall, 1), "set": args.set}), flush=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("mode", choices=["baseline", "central", "sweep"])
  ap.add_argument("config", nargs="?", default="configs/movielens_divshare.yaml")
  ap.add_argument("--data", default="../shared/data")
  ap.add_argument("--nodes", type=int, default=60)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--epochs", type=int, default=12)
  ap.add_argument("--central-lr", type=float, nargs="+", default=[0.005, 0.01, 0.02])
  ap.add_argument("--offset", default=None, choices=list(tasks.MF_OFFSETS),
                  help="default: the config's mf_offset")
  ap.add_argument("--lr", type=float, nargs="+", default=[0.5])
  ap.add_argument("--batch", type=int, nargs="+", default=[32])
  ap.add_argument("--set", nargs="*", default=[], help="more --set style overrides, e.g. duration_s=16")
  args = ap.parse_args()
  {"baseline": baseline, "central": central, "sweep": sweep}[args.mode](args)


if __name__ == "__main__":
  main()
