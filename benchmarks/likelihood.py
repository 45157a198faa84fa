"""The probability-flow ODE's bits/dim (ddpm_jax.ode_likelihood) against closed forms, and
against the variational bound on a trained model.

    python benchmarks/likelihood.py --parts gaussian                 # minutes on a CPU
    python benchmarks/likelihood.py --parts digits --workdir=/tmp/ddpm-digits

- gaussian: data N(mu, Sigma) in D dimensions (a random covariance, fixed seed) on the linear
  schedule, T = 1000, with its exact eps model at every float time of the continuous schedule;
  the analytic NLL of its t = 0 marginal (float64) against the ODE's, with the exact trace and
  with Hutchinson's estimator, continuous and dequantized (the reference then is the exact
  expectation over the uniform noise). `diff` is mean(ODE - analytic) with its standard error
  over the examples; the analytic side includes the prior's mismatch at t = T-1 (log N(z; 0, I)
  - log p_{T-1}(z)), which the ODE cannot see.
- digits: a configs/digits.py run: the variational bound (all T terms) and the ODE's bits/dim
  of the first test examples, each with its standard error.
"""
import argparse
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Report, device_line  # noqa: E402
import ddpm_jax  # noqa: E402  (_common makes the repository importable)
from ddpm_jax import likelihood, settings  # noqa: E402

T = 1000


class Gaussian:
  """N(mu, Sigma) in `dims` dimensions and its exact eps model in continuous time."""

  def __init__(self, dims, seed=0, scale=0.05):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dims, dims))
    self.sigma = scale * (a @ a.T / dims + 0.4 * np.eye(dims))
    self.mu = rng.uniform(-0.5, 0.5, dims)
    self.log_abar = np.cumsum(np.log1p(-ddpm_jax.get_beta_schedule("linear", T)))

  def marginal(self, t):
    abar = math.exp(self.log_abar[t])
    return math.sqrt(abar) * self.mu, abar * self.sigma + (1 - abar) * np.eye(len(self.mu))

  def eps_model(self):
    lam, q = np.linalg.eigh(self.sigma)
    table = jnp.asarray(self.log_abar, jnp.float32)

    def model(x, t):
      abar = jnp.exp(jnp.interp(t.astype(jnp.float32), jnp.arange(T, dtype=jnp.float32),
                                table))[:, None]
      s = jnp.sqrt(1.0 - abar)
      return s * (((x - jnp.sqrt(abar) * self.mu) @ q) / (abar * lam + s ** 2)) @ q.T
    return model

  def log_prob(self, x, t):
    mean, cov = self.marginal(t)
    d = np.asarray(x, np.float64) - mean
    return (-0.5 * np.einsum("bi,ij,bj->b", d, np.linalg.inv(cov), d)
            - 0.5 * np.linalg.slogdet(2 * np.pi * cov)[1])

  def expected_dequantized_nll(self, levels):
    """E_u[-log p_0((level + u) / 128 - 1)], u ~ U[0, 1)^D, exactly."""
    mean, cov = self.marginal(0)
    centre = (levels + 0.5) / 128.0 - 1.0
    return -self.log_prob(centre, 0) + 0.5 * np.trace(np.linalg.inv(cov)) / (12 * 128 ** 2)


def part_gaussian(report, dims_list, num_examples):
  sched = ddpm_jax.make_schedule("linear", T)
  report(f"(a) Gaussian data, exact eps model, linear schedule T={T}, {num_examples} examples, "
         "rtol = atol = 1e-5; bits/dim on the 8-bit scale")
  report.header(f"{'D':>3} {'divergence':<11} {'data':<12} {'analytic':>9} {'ODE':>9} "
                f"{'diff +- se':>20} {'NFE':>5} {'s':>6}")
  for dims in dims_list:
    g = Gaussian(dims)
    model = g.eps_model()
    x = np.random.default_rng(1).multivariate_normal(*g.marginal(0), size=num_examples)
    levels = np.clip(np.round((x + 1.0) * 127.5), 0, 255)
    for data in ("continuous", "dequantized"):
      x0 = x if data == "continuous" else levels / 127.5 - 1.0
      for exact in (True, False):
        start = time.perf_counter()
        out = likelihood.ode_likelihood(sched, model, jnp.asarray(x0, jnp.float32),
                                        jax.random.key(2), dequantize=data == "dequantized",
                                        exact_trace=exact)
        bpd = np.asarray(jax.block_until_ready(out["bpd"]), np.float64)
        seconds = time.perf_counter() - start
        z = np.asarray(out["z"], np.float64)
        mismatch = (-0.5 * np.sum(z ** 2, 1) - 0.5 * dims * math.log(2 * math.pi)
                    - g.log_prob(z, T - 1))
        nll = (-g.log_prob(x0, 0) if data == "continuous"
               else g.expected_dequantized_nll(levels))
        want = (nll - mismatch) / (dims * math.log(2)) + 7.0
        diff = bpd - want
        se = diff.std(ddof=1) / math.sqrt(len(diff))
        report(f"{dims:>3} {'exact' if exact else 'Hutchinson':<11} {data:<12} "
               f"{want.mean():>9.4f} {bpd.mean():>9.4f} {diff.mean():>+10.4f} +- {se:<7.4f} "
               f"{int(out['nfe']):>5} {seconds:>6.1f}")


def part_digits(report, workdir, step, num_examples):
  params, config = ddpm_jax.load(workdir, step=step)
  s = settings.Settings.from_config(config)
  model = s.model.make_model()
  model_fn = lambda x, t: model.apply({"params": params}, x, t, train=False)
  sched = s.diffusion.make_schedule()
  opts = dict(mean_type=s.diffusion.mean_type, var_type=s.diffusion.var_type)
  _, batches = ddpm_jax.data.eval_batches(config, "test", batch_size=num_examples,
                                          limit=num_examples)
  x0 = jnp.asarray(next(batches)["image"])
  bound = np.asarray(ddpm_jax.bits_per_dim(sched, model_fn, x0, jax.random.key(1), **opts)
                     ["total_bpd"])
  start = time.perf_counter()
  ode = likelihood.ode_likelihood(sched, model_fn, x0, jax.random.key(2), **opts)
  ode_bpd = np.asarray(jax.block_until_ready(ode["bpd"]))
  seconds = time.perf_counter() - start
  se = lambda v: float(likelihood.standard_error(v))
  report(f"(b) digits run {workdir} (checkpoint {step if step is not None else 'latest'}), the "
         f"first {len(x0)} test examples")
  report.header(f"{'measure':<28} {'bits/dim':>9} {'se':>7} {'NFE':>6} {'s':>6}")
  report(f"{'variational bound (T terms)':<28} {bound.mean():>9.4f} {se(bound):>7.4f} "
         f"{s.diffusion.num_timesteps:>6} {'':>6}")
  report(f"{'probability-flow ODE':<28} {ode_bpd.mean():>9.4f} {se(ode_bpd):>7.4f} "
         f"{int(ode['nfe']):>6} {seconds:>6.1f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--parts", default="gaussian,digits", help="gaussian and/or digits")
  parser.add_argument("--dims", default="4,16,64", help="dimensions of the Gaussian rows")
  parser.add_argument("--gaussian_examples", type=int, default=64)
  parser.add_argument("--digits_examples", type=int, default=64)
  parser.add_argument("--workdir", default="/tmp/ddpm-digits", help="a configs/digits.py run")
  parser.add_argument("--step", type=int, default=None, help="its checkpoint (default: latest)")
  args = parser.parse_args()
  report = Report("Likelihood through the probability-flow ODE", packages=("diffrax",))
  report(f"on {device_line()}")
  parts = args.parts.split(",")
  if "gaussian" in parts:
    part_gaussian(report, [int(d) for d in args.dims.split(",")], args.gaussian_examples)
  if "digits" in parts:
    part_digits(report, args.workdir, args.step, args.digits_examples)
  report.save()


if __name__ == "__main__":
  main()
