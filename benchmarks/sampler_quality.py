"""Sample quality against the number of steps: ancestral (1000, respaced 100 and 50), DDIM
(eta = 0) and DPM-Solver++ (orders 2 and 3) at 5, 10, 20 and 50 steps, and EDM's Heun sampler
at 3, 5, 10 and 25 steps, i.e. 5, 9, 19 and 49 model evaluations, on the DDPM's own sigmas
(`heun`) and on EDM's rho = 7 spacing of them (`heun(rho=7)`).

    python benchmarks/sampler_quality.py --parts gmm                       # seconds to minutes
    python main.py --config=configs/digits.py --workdir=/tmp/ddpm-digits   # train the model first
    python benchmarks/sampler_quality.py --parts digits --workdir=/tmp/ddpm-digits

Two measures, each on its own table row per (sampler, steps):
- gmm: data from a 64-dimensional Gaussian mixture whose exact eps-predictor is the model, so
  every error is the sampler's. Score: the 2-Wasserstein distance between each dimension's
  sample marginal and the mixture's exact marginal (from its quantile function), averaged over
  the 64 dimensions. `floor` is the same score of exact samples from the mixture: the
  finite-sample level below which no sampler can go.
- digits: a model trained with configs/digits.py (its EMA params, `--step` or the latest
  checkpoint). Score: the Frechet distance between the samples and the training split in the
  feature space of a small classifier (scikit-learn's MLPClassifier, one hidden layer of 64
  ReLU units, fixed seed, trained on the digits' training split; the features are that
  layer's activations). `test split` is the distance of the 297 held-out real images: a scale,
  not a floor (a model sampled well can be closer to its training split than unseen digits).

Every sampler starts from the same x_T (the loops draw it from fold_in(key, 0)) and runs as one
jitted lax.scan; `compile s` is timed on its own, `run s` is one run after it. NFE is the
number of model evaluations. On a shared machine, compare times only within one run.
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import ndtr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Report, device_line  # noqa: E402
import ddpm_jax  # noqa: E402  (_common makes the repository importable)
from digits_frechet import DigitsFrechet, to_uint8  # noqa: E402
from ddpm_jax import settings  # noqa: E402



def samplers(steps, ancestral=(1000, 100, 50), heun=()):
  """[(name, order, num_steps)] of the table's rows."""
  rows = [("ancestral", 0, n) for n in ancestral]
  for n in steps:
    rows += [("ddim", 0, n), ("dpm_solver", 2, n), ("dpm_solver", 3, n)]
  # order 0: the DDPM's own sigmas; 7: EDM's rho = 7 spacing of them.
  return rows + [("heun", rho, n) for rho in (0, 7) for n in heun]


def chain(sched, model_fn, shape, name, order, num_steps, clip_denoised):
  """keys -> x_0 for one row (not yet jitted)."""
  T = sched.num_timesteps
  kw = dict(clip_denoised=clip_denoised)
  if name == "ancestral":
    return lambda key: ddpm_jax.p_sample_loop(sched, model_fn, shape, key,
                                              num_steps=None if num_steps == T else num_steps,
                                              **kw)
  if name == "ddim":
    return lambda key: ddpm_jax.ddim_sample_loop(sched, model_fn, shape, key,
                                                 num_steps=num_steps, **kw)
  if name == "heun":
    return lambda key: ddpm_jax.heun_sample_loop(
        sched, model_fn, shape, key, num_steps=num_steps,
        discretisation="edm" if order else "ddpm", **kw)
  return lambda key: ddpm_jax.dpm_solver_sample_loop(sched, model_fn, shape, key,
                                                     num_steps=num_steps, order=order, **kw)


def run_rows(report, rows, make_chain, key, score):
  report.header(f"{'sampler':<16} {'steps':>5} {'NFE':>5} {'compile s':>9} {'run s':>8} "
                f"{'score':>8}")
  for name, order, n in rows:
    start = time.perf_counter()
    compiled = jax.jit(make_chain(name, order, n)).lower(key).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    x = jax.block_until_ready(compiled(key))
    run_s = time.perf_counter() - start
    label = {"dpm_solver": f"dpm_solver++({order})",
             "heun": "heun(rho=7)" if order else "heun"}.get(name, name)
    nfe = 2 * n - 1 if name == "heun" else n
    report(f"{label:<16} {n:>5} {nfe:>5} {compile_s:>9.1f} {run_s:>8.2f} "
           f"{score(np.asarray(x, np.float64)):>8.4f}")


# ----------------------------------------------------------------------------- (a) exact


class Mixture:
  """A Gaussian mixture in `dims` dimensions with isotropic components (fixed seed)."""

  def __init__(self, dims=64, components=8, seed=0):
    rng = np.random.default_rng(seed)
    self.w = rng.dirichlet(np.full(components, 2.0))
    self.mu = rng.uniform(-0.7, 0.7, (components, dims))
    self.std = rng.uniform(0.1, 0.3, components)

  def sample(self, n, seed):
    rng = np.random.default_rng(seed)
    k = rng.choice(len(self.w), size=n, p=self.w)
    return self.mu[k] + self.std[k, None] * rng.standard_normal((n, self.mu.shape[1]))

  def eps_model(self, sched):
    """The exact eps-predictor model_fn(x [B, D], t [B]) under `sched` (float32); a float t
    (heun(rho=7)) is continuous time, log abar linear between integer steps."""
    abar64 = np.cumprod(1.0 - np.asarray(sched.betas, np.float64))
    abar, log_abar = (jnp.asarray(a, jnp.float32) for a in (abar64, np.log(abar64)))
    w, mu, var0 = (jnp.asarray(a, jnp.float32) for a in (self.w, self.mu, self.std ** 2))

    def model(x, t):
      if jnp.issubdtype(t.dtype, jnp.integer):
        abar_t = abar[t]
      else:
        abar_t = jnp.exp(jnp.interp(t, jnp.arange(len(abar64), dtype=jnp.float32), log_abar))
      a, s2 = jnp.sqrt(abar_t)[:, None], (1.0 - abar_t)[:, None]  # [B, 1]
      var = a ** 2 * var0[None] + s2  # [B, K]: each component's variance at t
      diff = x[:, None, :] - a[:, :, None] * mu[None]  # [B, K, D]
      logp = (jnp.log(w)[None] - 0.5 * jnp.sum(diff ** 2, -1) / var
              - 0.5 * x.shape[-1] * jnp.log(var))
      resp = jax.nn.softmax(logp, axis=-1)  # [B, K]
      x0_k = mu[None] + (a * var0[None] / var)[..., None] * diff  # E[x0 | x_t, k]
      x0 = jnp.einsum("bk,bkd->bd", resp, x0_k)
      return (x - a * x0) / jnp.sqrt(s2)
    return model

  def marginal_w2(self, x):
    """The 2-Wasserstein distance of each dimension's sample marginal to the exact one,
    averaged over dimensions (the exact quantiles by inverting the CDF on a fine grid)."""
    n, dims = x.shape
    u = (np.arange(n) + 0.5) / n
    grid = np.linspace(-3.0, 3.0, 30001)
    out = []
    for d in range(dims):
      cdf = sum(w * ndtr((grid - m) / s) for w, m, s in zip(self.w, self.mu[:, d], self.std))
      quantiles = np.interp(u, cdf, grid)
      out.append(np.sqrt(np.mean((np.sort(x[:, d]) - quantiles) ** 2)))
    return float(np.mean(out))


def part_gmm(report, steps, ancestral, num_samples, heun=()):
  mix = Mixture()
  sched = ddpm_jax.make_schedule("linear", 1000)
  model = mix.eps_model(sched)
  shape = (num_samples, mix.mu.shape[1])
  report(f"(a) 64-d Gaussian mixture (8 components, std 0.1-0.3), exact eps model, linear "
         f"schedule T=1000, {num_samples} samples, clip_denoised=False; score: mean over "
         f"dimensions of the marginals' W2; floor (exact samples): "
         f"{mix.marginal_w2(mix.sample(num_samples, 1)):.4f}")
  run_rows(report, samplers(steps, ancestral, heun),
           lambda name, order, n: chain(sched, model, shape, name, order, n, False),
           jax.random.key(0), mix.marginal_w2)


# ----------------------------------------------------------------------------- (b) digits


def part_digits(report, steps, ancestral, num_samples, workdir, step, heun=()):
  params, config = ddpm_jax.load(workdir, step=step)
  model = settings.Settings.from_config(config).model.make_model()
  model_fn = lambda x, t: model.apply({"params": params}, x, t, train=False)
  sched = settings.Settings.from_config(config).diffusion.make_schedule()
  size, channels = config.data.image_size, config.data.num_channels
  frechet = DigitsFrechet()
  report(f"(b) digits model of {workdir} (configs/digits.py, checkpoint "
         f"{step if step is not None else 'latest'}), {num_samples} samples, clip_denoised=True; "
         f"score: Frechet distance to the train split in an MLP's 64 hidden features (test "
         f"accuracy {frechet.accuracy:.3f}); the 297 test images score "
         f"{frechet.floor():.3f}")
  shape = (num_samples, size, size, channels)
  run_rows(report, samplers(steps, ancestral, heun),
           lambda name, order, n: chain(sched, model_fn, shape, name, order, n, True),
           jax.random.key(0), lambda x: frechet.distance(to_uint8(x)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--parts", default="gmm,digits", help="gmm and/or digits")
  parser.add_argument("--steps", default="5,10,20,50", help="of DDIM and DPM-Solver++")
  parser.add_argument("--ancestral", default="1000,100,50", help="ancestral steps ('' for none)")
  parser.add_argument("--heun", default="3,5,10,25", help="Heun steps ('' for none)")
  parser.add_argument("--gmm_samples", type=int, default=10000)
  parser.add_argument("--digits_samples", type=int, default=256)
  parser.add_argument("--workdir", default="/tmp/ddpm-digits", help="a configs/digits.py run")
  parser.add_argument("--step", type=int, default=None, help="its checkpoint (default: latest)")
  args = parser.parse_args()
  steps = [int(s) for s in args.steps.split(",") if s]
  ancestral = [int(s) for s in args.ancestral.split(",") if s]
  heun = [int(s) for s in args.heun.split(",") if s]
  report = Report("Sample quality against steps", packages=("scikit-learn",))
  report(f"on {device_line()}")
  parts = args.parts.split(",")
  if "gmm" in parts:
    part_gmm(report, steps, ancestral, args.gmm_samples, heun)
  if "digits" in parts:
    part_digits(report, steps, ancestral, args.digits_samples, args.workdir, args.step, heun)
  report.save()


if __name__ == "__main__":
  main()
