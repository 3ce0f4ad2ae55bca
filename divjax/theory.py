"""Theory in numbers: consensus contraction measured through the engine, against predictions.

`divjax theory contraction CONFIG` runs the engine itself (the same compiled chunk as
`divjax run`) with lr = 0 from distinct random initial models (`init.spread`), so only the
mixing acts, and records the consensus distance Xi(r) = (1/n) sum_i ||x_i - xbar||^2 at
every round boundary r = 0..R. It reports:

- first_step: Xi's ratio over the first round in which anything is averaged (round 1 for the
  synchronous engines, round 2 for the asynchronous ones: at their first round end nothing
  has arrived yet);
- steady: the per-round rate over the last rounds, a geometric mean over an even number of
  rounds (with a one-round delay the ratios alternate);
- predictions, none of them from the engine:
  * lambda2: the closed form of PAPER.md 1.8 for push mixing with J recipients and delivery
    probability q, lambda_2 = a - b, a = (1 - (1 - p)^n) / (n p), p = qJ/(n-1), b = (1-a)/(n-1);
  * rho_no_delay: the mean-square contraction E Xi(r+1) / E Xi(r) of that mixing without
    delay, x(r+1) = W x(r), by Monte Carlo of the recursion (`recursion`);
  * steady_predicted: for DivShare, the rate of the delayed recursion the engine implements,
    x(r+1) = A x(r) + B x(r-1) (A = diag 1/(1+d), B[j,s] = 1[s delivered to j]/(1+d_j)):
    fragments are cut from the sender's model before its own averaging and averaged at the
    receiver's next round end; by Monte Carlo of that recursion over the same rounds;
  * for D-PSGD on a fixed graph, exact: first step ||W Pi||_F^2/(n-1) for isotropic x
    orthogonal to 1, steady rate lambda_2(W)^2.
  q comes from the network as in PAPER.md 4.8, per sender: a node delivers
  m = floor(U R / bits per message) of its J Omega messages per round before its flush.

Precision: the engine runs in float32; the initial models are re-centred to a zero network
mean before the first tick, so that Xi is not the small difference of large numbers. Under
lr = 0 that is exact for row-stochastic mixing (every averaging algorithm here): W(x - 1c)
= Wx - 1c, so every later Xi is the same as without re-centring.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from divjax.config import Config


# ------------------------------------------------------------------------------ closed forms

def lambda2(n: int, recipients: float, q: float = 1.0) -> float:
  """||E[W] Pi|| for push mixing to J distinct recipients, each delivered with probability q."""
  p = q * recipients / (n - 1)
  if p <= 0:
    return 1.0
  a = (1 - (1 - p) ** n) / (n * p)
  return a - (1 - a) / (n - 1)


def delivery_fraction(cfg: Config, message_bits: float, net=None) -> np.ndarray:
  """(n,) per-sender fraction of its J Omega messages uploaded before its next round end
  (PAPER.md 4.8): min(1, floor(U_i R_i / message_bits) / (J Omega))."""
  from divjax import network
  net = net if net is not None else network.build(cfg)
  round_s = cfg.local_steps * net.period * net.dt_us / 1e6
  per_round = np.floor(net.upload_bps * round_s / message_bits)
  return np.minimum(1.0, per_round / (cfg.recipients * (cfg.fragments or 1)))


def message_bits(cfg: Config, tensor_sizes) -> float:
  """Bits of cfg's largest message: the algorithm's payload of a fragment plus the header."""
  from divjax import algorithms, fragments
  alg = algorithms.make(cfg)
  frags = fragments.partition(tensor_sizes, alg.fragments, cfg.data_seed)
  return float(np.max(alg.payload_bits(frags.sizes))) + cfg.network.header_bits


def graph_rates(w: np.ndarray) -> tuple[float, float, float]:
  """(first step, steady rate, lambda_2) of Xi under a fixed symmetric mixing W: the first step
  E||Pi W x||^2/||x||^2 for isotropic x orthogonal to 1 is ||Pi W Pi||_F^2/(n-1); the steady
  rate is lambda_2(W)^2 (Xi is a squared norm)."""
  n = w.shape[0]
  pi = np.eye(n) - 1.0 / n
  first = float(np.sum((pi @ w @ pi) ** 2) / (n - 1))
  lam = float(np.sort(np.abs(np.linalg.eigvalsh(w)))[::-1][1])
  return first, lam * lam, lam


# ------------------------------------------------------------------------------ Monte Carlo

def push_deliveries(rng: np.random.Generator, trials: int, n: int, recipients: int,
                    q: np.ndarray) -> np.ndarray:
  """(trials, n_dst, n_src) float32: 1 where sender s picked j among its J distinct peers
  (uniform over the others) and the message was delivered (probability q[s])."""
  scores = rng.random((trials, n, n), dtype=np.float32)
  scores[:, np.arange(n), np.arange(n)] = np.inf                   # no sender picks itself
  picks = np.argpartition(scores, recipients - 1, axis=2)[:, :, :recipients]      # (t, src, J)
  delivered = rng.random((trials, n, recipients)) < np.asarray(q, np.float64)[None, :, None]
  d = np.zeros((trials, n, n), np.float32)                                        # (t, src, dst)
  np.put_along_axis(d, picks, delivered.astype(np.float32), axis=2)
  return d.transpose(0, 2, 1)


def recursion(n: int, recipients: int, q, rounds: int, *, delay: int = 1, trials: int = 2000,
              seed: int = 0, synchronous: bool = False, block: int = 500) -> np.ndarray:
  """E Xi(r), r = 0..rounds, of the pure-averaging recursion (a Monte Carlo over `trials`
  independent coordinates, each with its own mixing draws), no engine involved.

  Asynchronous (DivShare) timing: nothing is averaged at the first round end (x(1) = x(0));
  from then on, x(r+1) = (x(r) + sum of what arrived) / (1 + d) where what arrived is the
  senders' x(r - delay). Synchronous: x(r+1) = W x(r) from r = 0.
  """
  q = np.broadcast_to(np.asarray(q, np.float64), (n,))
  rng = np.random.default_rng(seed)
  total = np.zeros(rounds + 1)
  for start in range(0, trials, block):
    t = min(block, trials - start)
    x = rng.standard_normal((t, n)).astype(np.float64)
    history = [x]                                  # x(0), x(1), ...: what senders send
    xi = [_xi(x)]
    first = 0 if synchronous else 1
    for r in range(rounds):
      if r < first:
        history.append(x)
        xi.append(_xi(x))
        continue
      d = push_deliveries(rng, t, n, recipients, q)
      sent = history[max(0, r - delay)] if not synchronous else x
      x = (x + np.einsum("tds,ts->td", d, sent)) / (1.0 + d.sum(2))
      history.append(x)
      xi.append(_xi(x))
    total += np.asarray(xi) * t
  return total / trials


def _xi(x: np.ndarray) -> float:
  """Mean over the rows (coordinates) of the consensus distance over nodes."""
  return float(np.mean(np.mean((x - x.mean(1, keepdims=True)) ** 2, axis=1)))


# ------------------------------------------------------------------------------ rates

def first_index(synchronous: bool) -> int:
  """Round r whose ratio Xi(r+1)/Xi(r) is the first averaging step."""
  return 0 if synchronous else 1


def rates(xi, first: int, burn: int = 2) -> tuple[float, float, tuple[int, int]]:
  """(first step ratio, steady per-round rate, (r0, r1) window) of a curve Xi(0..R).

  The steady rate is (Xi(r1)/Xi(r0))^(1/(r1-r0)) over an even number of rounds ending at R
  and starting `burn` rounds after the first step (or as late as keeps two rounds)."""
  xi = np.asarray(xi, np.float64)
  r1 = len(xi) - 1
  r0 = min(first + 1 + burn, r1 - 2)
  if (r1 - r0) % 2:
    r0 += 1
  if r0 >= r1:
    raise ValueError(f"--rounds: too few rounds for a steady rate (need at least {first + 4})")
  return float(xi[first + 1] / xi[first]), float((xi[r1] / xi[r0]) ** (1.0 / (r1 - r0))), (r0, r1)


# ------------------------------------------------------------------------------ the engine

def contraction_config(cfg: Config, rounds: int) -> Config:
  """cfg with lr = 0, spread initial models, and just long enough for `rounds` rounds."""
  from divjax import configure, network
  net = network.build(cfg)
  round_s = cfg.local_steps * int(net.period.max()) * net.dt_us / 1e6
  d = cfg.model_dump()
  # long enough for `rounds` rounds of the asynchronous engine; a synchronous round also waits
  # for its transfers, so allow many more (only checks read the duration: nothing runs to it)
  d.update(lr=0.0, momentum=0.0, duration_s=round_s * rounds * 100, eval_every_s=round_s)
  d["init"] = {"spread": True}
  return configure.from_dict(d)


def measure(cfg: Config, rounds: int, seeds: int = 1) -> dict:
  """Xi(r) of the engine for seeds seed, seed+1, ... (one compiled chunk for all), plus the
  fraction of messages delivered."""
  import jax
  from divjax import algorithms, configure, fates, simulate, sweep
  sync = algorithms.PROPERTIES[cfg.algorithm].synchronous
  curves, delivered = [], []
  group, compiled = None, {}
  for k in range(seeds):
    c = configure.from_dict(cfg.model_dump() | {"seed": cfg.seed + k})
    if group is None:
      group = sweep.Group(c)
    sim = group.simulation(c)
    state = simulate.place(sim, sim.engine.init(sim.run_key))
    x = state.params
    state = state.with_params(x - x.mean(0, keepdims=True))     # exact under lr = 0 (docstring)
    # asynchronous: a normal-speed node's round is exactly H ticks; synchronous: a round also
    # waits for its transfers, so step one tick at a time and record at every new round
    length = 1 if sync else int(cfg.local_steps * sim.engine.net.period.min())
    if length not in compiled:
      compiled[length] = simulate.compile_chunk(sim, state, length)
    xi = [float(simulate.consensus_distance(state.params))]
    for _ in range(rounds * (100 * cfg.local_steps if sync else 1)):
      done = int(np.min(jax.device_get(state.rounds)))
      state, _ = compiled[length](state, sim.params)
      if int(np.min(jax.device_get(state.rounds))) > done or not sync:
        xi.append(float(simulate.consensus_distance(state.params)))
      if len(xi) == rounds + 1:
        break
    if len(xi) < rounds + 1:
      raise ValueError(f"--rounds: only {len(xi) - 1} rounds completed in {100 * rounds} round lengths")
    counts = fates.to_host(sim.counts(state))
    curves.append(xi)
    tensor_sizes = sim.task.tensor_sizes
    done = counts["msgs_sent"] - counts["msgs_in_flight"]
    delivered.append(counts["msgs_delivered"] / done if done else None)
  return {"curves": curves, "delivered": delivered, "tensor_sizes": tensor_sizes}


def predict(cfg: Config, rounds: int, tensor_sizes, trials: int = 4000, seed: int = 0) -> dict:
  """Predictions for cfg's algorithm (module docstring), none from the engine."""
  from divjax import algorithms, network
  alg, n, j = cfg.algorithm, cfg.n_nodes, cfg.recipients
  name = algorithms.MODULES[alg].__name__.rsplit(".", 1)[-1]      # aliases resolved
  sync = algorithms.PROPERTIES[alg].synchronous
  if name == "dpsgd" and cfg.topology not in ("random_ring",):
    import jax
    from divjax import topology
    # the algorithm's own fixed W (the same every round, whatever the key)
    src, dst, w, self_w = algorithms.make(cfg).mixing(jax.random.key(0), 0)
    first, steady, lam = graph_rates(topology.dense_mixing(src, dst, w, self_w, n))
    return {"model": "fixed graph W (Metropolis-Hastings), exact", "lambda2": lam,
            "first_step_predicted": first, "steady_predicted": steady}
  if name in ("divshare", "el_local"):
    q = np.ones(n) if sync else delivery_fraction(cfg, message_bits(cfg, tensor_sizes), network.build(cfg))
    q_mean = float(np.mean(q))
    lam = lambda2(n, j, q_mean)
    no_delay = recursion(n, j, q, rounds, delay=0, trials=trials, seed=seed, synchronous=sync)
    f = first_index(sync)
    out = {"model": ("push to J, no delay (synchronous)" if sync else
                     "push to J, one-round delay: x(r+1) = A x(r) + B x(r-1)"),
           "q": q_mean, "q_min": float(np.min(q)), "lambda2": lam,
           "rho_no_delay": float(no_delay[f + 1] / no_delay[f])}
    curve = no_delay if sync else recursion(n, j, q, rounds, delay=1, trials=trials, seed=seed + 1)
    first, steady, _ = rates(curve, f)
    out.update(first_step_predicted=first, steady_predicted=steady,
               steady_no_delay=rates(no_delay, f)[1], predicted_curve=[float(v) for v in curve])
    return out
  return {"model": None, "note": f"no prediction derived for algorithm {alg!r} (divshare, el_local, "
                                 f"dpsgd on a fixed graph have one)"}


def contraction(cfg: Config, rounds: int = 16, seeds: int = 1, trials: int = 4000) -> dict:
  """The whole `divjax theory contraction` result (module docstring) as a JSON-able dict."""
  from divjax import algorithms
  cfg = contraction_config(cfg, rounds)
  sync = algorithms.PROPERTIES[cfg.algorithm].synchronous
  f = first_index(sync)
  m = measure(cfg, rounds, seeds)
  norm = np.mean([np.asarray(c) / c[0] for c in m["curves"]], axis=0)   # seeds pooled, Xi(0) = 1
  first, steady, window = rates(norm, f)
  per_seed = [rates(c, f) for c in m["curves"]]
  out = {
      "algorithm": cfg.algorithm, "n_nodes": cfg.n_nodes, "recipients": cfg.recipients,
      "fragments": cfg.fragments, "rounds": rounds, "seeds": seeds, "first_round": f,
      "first_step": first, "steady": steady, "steady_window": list(window),
      "first_step_per_seed": [r[0] for r in per_seed], "steady_per_seed": [r[1] for r in per_seed],
      "consensus": [float(v) for v in norm], "consensus_first_seed": m["curves"][0],
      "delivered_fraction": m["delivered"],
      "precision": "float32 engine; initial models re-centred to a zero network mean (exact under lr = 0)",
  }
  pred = predict(cfg, rounds, m["tensor_sizes"], trials=trials, seed=cfg.seed)
  out.update(pred)
  if pred.get("predicted_curve") is not None:
    c = np.asarray(pred["predicted_curve"])
    out["predicted_curve"] = [float(v) for v in c / c[0]]
  return out


def plot(result: dict, path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  r = np.arange(len(result["consensus"]))
  ax.semilogy(r, result["consensus"], "o-", label=f"engine (mean of {result['seeds']} seed(s))")
  if result.get("predicted_curve"):
    ax.semilogy(r, result["predicted_curve"], "--", label=f"prediction: {result['model']}")
  if result.get("lambda2") is not None:
    f = result["first_round"]
    base = result["consensus"][f]
    ax.semilogy(r[f:], base * result["lambda2"] ** (r[f:] - f), ":", label="lambda_2^r (no delay)")
  ax.set_xlabel("round")
  ax.set_ylabel("consensus distance / initial")
  ax.set_title(f"{result['algorithm']}, n={result['n_nodes']}, J={result['recipients']}, lr=0")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def least_squares_constants(cfg: Config) -> dict:
  """The exact constants of the least-squares task (tasks.least_squares), in float64 from the
  arrays the run trains on. With H_i = A_i^T A_i / m and x_hat the minimiser of
  f = (1/n) sum_i f_i:
    L        max_i lambda_max(H_i): every f_i is L-smooth;
    L_f, mu  lambda_max and lambda_min of (1/n) sum_i H_i: f's smoothness and strong convexity;
    zeta2    (1/n) sum_i ||grad f_i(x_hat)||^2: the heterogeneity at the optimum;
    sigma2   (1/n) sum_i E ||g - grad f_i(x_hat)||^2 for a minibatch gradient g of batch_size
             samples drawn with replacement (as divjax.sampling does): the per-sample variance
             divided by the batch size (sigma2_sample before dividing);
    f_min    f(x_hat).
  """
  from divjax import tasks
  if cfg.task != "lsq":
    raise ValueError(f"task: least-squares constants need task 'lsq' (got {cfg.task!r})")
  t = tasks.least_squares(cfg)
  n, m, d = cfg.n_nodes, cfg.data.samples_per_node, cfg.data.dim
  a = np.asarray(t.x_train, np.float64).reshape(n, m, d)
  b = np.asarray(t.y_train, np.float64).reshape(n, m)
  h = np.einsum("nmd,nme->nde", a, a) / m
  x_hat = np.linalg.solve(h.mean(0), np.einsum("nmd,nm->d", a, b) / (n * m))
  resid = np.einsum("nmd,d->nm", a, x_hat) - b                                     # (n, m)
  per_sample = a * resid[..., None]                                                 # (n, m, d)
  grads = per_sample.mean(1)                                                        # grad f_i(x_hat)
  var = np.mean(np.sum((per_sample - grads[:, None]) ** 2, -1))
  eig = np.linalg.eigvalsh(h.mean(0))
  return {"L": float(max(np.linalg.eigvalsh(h_i)[-1] for h_i in h)), "L_f": float(eig[-1]),
          "mu": float(eig[0]), "zeta2": float(np.mean(np.sum(grads ** 2, -1))),
          "sigma2": float(var / cfg.batch_size), "sigma2_sample": float(var),
          "f_min": float(0.5 * np.mean(resid ** 2)), "x_hat_norm": float(np.linalg.norm(x_hat))}
