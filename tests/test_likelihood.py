"""The probability-flow ODE's likelihood (ddpm_jax.likelihood) against closed forms.

Gaussian data N(mu, Sigma) has, at every (float) time of the continuous schedule, the Gaussian
marginal N(a mu, a^2 Sigma + s^2 I), a = sqrt(abar(t)), s^2 = 1 - abar(t), and its exact eps
model eps(x, t) = s (a^2 Sigma + s^2 I)^{-1} (x - a mu). Its ODE NLL of a point x at t = 0 is
-log p_0(x) (analytic, float64) up to the prior's mismatch log N(z; 0, I) - log p_{T-1}(z) at the
end point z, which is added to the reference (about 1e-3 bits/dim here).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax
from ddpm_jax import continuous, likelihood

T = 1000
D, SHAPE = 4, (2, 2, 1)
LOG_ABAR = np.cumsum(np.log1p(-ddpm_jax.get_beta_schedule("linear", T)))


def log_abar(t):
  """log abar at float t, linear between integer steps (float64 table, independent of the code)."""
  return jnp.interp(jnp.asarray(t, jnp.float32), jnp.arange(T, dtype=jnp.float32),
                    jnp.asarray(LOG_ABAR, jnp.float32))


def make_gaussian(seed=0, scale=0.05):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(D, D))
  sigma = scale * (a @ a.T / D + 0.4 * np.eye(D))
  return rng.uniform(-0.5, 0.5, D), sigma


def gaussian_model(mu, sigma, mean_type="eps"):
  """The exact eps / x0 / v model of N(mu, sigma) data: x [B, 2, 2, 1], float t [B]."""
  lam, q = np.linalg.eigh(sigma)

  def model(x, t):
    abar = jnp.exp(log_abar(t))[:, None]
    a, s = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
    xf = x.reshape(x.shape[0], -1)
    eps = s * (((xf - a * mu) @ q) / (abar * lam + s ** 2)) @ q.T
    x0 = (xf - s * eps) / a
    out = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[mean_type]
    return out.reshape(x.shape).astype(jnp.float32)
  return model


def marginal(mu, sigma, t):
  abar = math.exp(LOG_ABAR[t])
  return math.sqrt(abar) * mu, abar * sigma + (1.0 - abar) * np.eye(D)


def log_normal(x, mean, cov):
  d = x - mean
  return (-0.5 * np.einsum("bi,ij,bj->b", d, np.linalg.inv(cov), d)
          - 0.5 * np.linalg.slogdet(2 * np.pi * cov)[1])


def prior_mismatch(mu, sigma, z):
  """log N(z; 0, I) - log p_{T-1}(z) per example, nats."""
  z = np.asarray(z, np.float64).reshape(len(z), -1)
  return log_normal(z, np.zeros(D), np.eye(D)) - log_normal(z, *marginal(mu, sigma, T - 1))


def to_bpd(nats):
  return nats / (D * math.log(2.0)) + 7.0


@pytest.fixture(scope="module")
def gaussian():
  mu, sigma = make_gaussian()
  x = np.random.default_rng(1).multivariate_normal(*marginal(mu, sigma, 0), size=32)
  return mu, sigma, x


def check_continuous(mu, sigma, x, out):
  want = to_bpd(-log_normal(x, *marginal(mu, sigma, 0)) - prior_mismatch(mu, sigma, out["z"]))
  return np.asarray(out["bpd"], np.float64) - want


def run(model, x, key=0, **kw):
  return likelihood.ode_likelihood(ddpm_jax.make_schedule("linear", T), model,
                                   jnp.asarray(x.reshape((-1,) + SHAPE), jnp.float32),
                                   jax.random.key(key), **kw)


def test_exact_trace_equals_the_analytic_nll(gaussian):
  mu, sigma, x = gaussian
  out = run(gaussian_model(mu, sigma), x, dequantize=False, exact_trace=True)
  diff = check_continuous(mu, sigma, x, out)
  print("exact trace: max |ODE - analytic| =", np.abs(diff).max(), "bits/dim; NFE",
        int(out["nfe"]))
  assert np.abs(diff).max() < 4e-3
  assert int(out["nfe"]) == 6 * int(out["num_steps"]) + 1


@pytest.mark.parametrize("mean_type", ["x0", "v", "learned_range"])
def test_every_mean_type_gives_the_same_ode(gaussian, mean_type):
  mu, sigma, x = gaussian
  sched = ddpm_jax.make_schedule("linear", T)
  xs = jnp.asarray(x.reshape((-1,) + SHAPE), jnp.float32)
  want = likelihood.probability_flow(sched, gaussian_model(mu, sigma))
  if mean_type == "learned_range":
    eps = gaussian_model(mu, sigma)
    model = lambda x, t: jnp.concatenate([eps(x, t), 1e3 * jnp.ones_like(x)], axis=-1)
    got = likelihood.probability_flow(sched, model, var_type="learned_range")
  else:
    got = likelihood.probability_flow(sched, gaussian_model(mu, sigma, mean_type),
                                      mean_type=mean_type)
  for t in (0.0, 0.5, 17.25, 500.0, 998.5):
    np.testing.assert_allclose(np.asarray(got(xs, t)), np.asarray(want(xs, t)),
                               rtol=2e-3, atol=2e-4, err_msg=f"t = {t}")


def test_hutchinson_is_unbiased_within_its_standard_error(gaussian):
  mu, sigma, x = gaussian
  x = np.concatenate([x, x])  # two independent probes per point
  out = run(gaussian_model(mu, sigma), x, key=3, dequantize=False)
  diff = check_continuous(mu, sigma, x, out)
  se = float(likelihood.standard_error(diff))
  print(f"Hutchinson: mean(ODE - analytic) = {diff.mean():.4f} +- {se:.4f} bits/dim")
  assert 1e-3 < se < 0.05  # the probes do add noise, and not much of it
  assert abs(diff.mean()) < 4 * se


def test_dequantized_bpd_is_the_expected_nll_over_the_uniform_noise():
  # Pixel-scale data: 256 levels, a std of 3-10 levels.
  mu, sigma = make_gaussian(seed=2, scale=0.003)
  rng = np.random.default_rng(4)
  x = rng.multivariate_normal(*marginal(mu, sigma, 0), size=48)
  levels = np.clip(np.round((x + 1.0) * 127.5), 0, 255)
  x0 = levels / 127.5 - 1.0
  out = run(gaussian_model(mu, sigma), x0, key=5, dequantize=True, exact_trace=True)
  # E_u[-log p_0((level + u) / 128 - 1)], u ~ U[0, 1)^D: the quadratic form's mean at the bin's
  # centre plus tr(P Cov_u), Cov_u = I / (12 * 128^2).
  mean, cov = marginal(mu, sigma, 0)
  centre = (levels + 0.5) / 128.0 - 1.0
  expected = -log_normal(centre, mean, cov) + 0.5 * np.trace(np.linalg.inv(cov)) / (12 * 128 ** 2)
  diff = np.asarray(out["bpd"], np.float64) - to_bpd(expected - prior_mismatch(mu, sigma, out["z"]))
  se = float(likelihood.standard_error(diff))
  print(f"dequantized: mean(ODE - E_u analytic) = {diff.mean():.5f} +- {se:.5f} bits/dim")
  assert abs(diff.mean()) < 4 * se + 1e-3


def test_integrating_in_the_wrong_direction_fails_the_check(gaussian):
  mu, sigma, x = gaussian
  sched = ddpm_jax.make_schedule("linear", T)
  xs = jnp.asarray(x.reshape((-1,) + SHAPE), jnp.float32)
  z, div, _ = likelihood.integrate(sched, gaussian_model(mu, sigma), xs, jax.random.key(0),
                                   t_start=T - 1, t_end=0, exact_trace=True)
  flipped = {"bpd": likelihood.nll_to_bpd(likelihood.prior_log_prob(z) + div, D), "z": z}
  assert np.abs(check_continuous(mu, sigma, x, flipped)).mean() > 0.5


def test_continuous_schedule_passes_through_the_discrete_one():
  sched = ddpm_jax.make_schedule("linear", T)
  t = jnp.arange(T, dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(continuous.log_alpha_bar(sched, t)), LOG_ABAR,
                             rtol=1e-5, atol=1e-6)
  # beta(t) is the slope of log abar on each interval, constant inside it.
  mid = jnp.asarray([0.25, 0.75, 10.5, 998.9])
  np.testing.assert_allclose(np.asarray(continuous.beta(sched, mid)),
                             -np.diff(LOG_ABAR)[[0, 0, 10, 998]], rtol=1e-4)
  sig = continuous.edm_sigmas(np.exp(LOG_ABAR))
  np.testing.assert_allclose(continuous.timestep_of_edm_sigma(
      ddpm_jax.get_beta_schedule("linear", T), sig), np.arange(T), atol=1e-6)


def test_unet_takes_float_timesteps():
  model = ddpm_jax.UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                        dropout=0.0, out_channels=1)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  params = model.init(jax.random.key(1), x, jnp.zeros((2,), jnp.int32))["params"]
  params = jax.tree_util.tree_map(lambda p: p + 0.05 * jnp.ones_like(p), params)
  out = lambda t: np.asarray(model.apply({"params": params}, x, t))
  np.testing.assert_allclose(out(jnp.asarray([3, 7])), out(jnp.asarray([3.0, 7.0])), atol=1e-6)
  between = out(jnp.asarray([3.5, 7.5]))
  assert np.all(np.isfinite(between))
  assert not np.allclose(between, out(jnp.asarray([3.0, 7.0])))
