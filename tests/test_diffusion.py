"""The diffusion math against float64 references, Bayes' rule, and jit/vmap invariants."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from scipy import stats

import ddpm_jax
from ddpm_jax import diffusion
from tests import references as ref

T = 1000
SCHED = ddpm_jax.make_schedule("linear", T)
REF = ref.schedule(ddpm_jax.get_beta_schedule("linear", T))
TS = np.array([0, 1, 2, 500, T - 2, T - 1], dtype=np.int32)  # both ends of the chain
SHAPE = (len(TS), 4, 4, 3)


def rand(seed, shape=SHAPE, scale=1.0):
  return np.random.default_rng(seed).normal(size=shape) * scale


def grid_image(seed, shape=SHAPE):
  """Data on the 256-level grid in [-1, 1], including both edge values."""
  x = np.random.default_rng(seed).integers(0, 256, size=shape).astype(np.float64) / 127.5 - 1.0
  x.flat[0], x.flat[1] = -1.0, 1.0
  return x


def f32(x):
  return jnp.asarray(x, jnp.float32)


# ----------------------------------------------------------------------------- forward process


def test_q_mean_variance_and_q_sample():
  x0, noise = rand(0), rand(1)
  mean, var, logvar = ddpm_jax.q_mean_variance(SCHED, f32(x0), TS)
  abar = ref.bcast(REF["alphas_cumprod"], TS, 4)
  np.testing.assert_allclose(mean, np.sqrt(abar) * x0, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(var, np.broadcast_to(1 - abar, SHAPE), rtol=1e-6)
  np.testing.assert_allclose(logvar, np.broadcast_to(np.log(1 - abar), SHAPE), rtol=1e-6)
  x_t = ddpm_jax.q_sample(SCHED, f32(x0), TS, f32(noise))
  np.testing.assert_allclose(x_t, np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise,
                             rtol=1e-5, atol=1e-6)


def test_q_sample_has_the_forward_marginal():
  # x_t ~ N(sqrt(abar) x0, 1 - abar) for x0 fixed: check the moments by Monte Carlo.
  n = 200_000
  x0 = jnp.full((n, 1), 0.7)
  t = jnp.full((n,), 300, jnp.int32)
  x_t = ddpm_jax.q_sample(SCHED, x0, t, jax.random.normal(jax.random.key(0), x0.shape))
  abar = REF["alphas_cumprod"][300]
  assert abs(float(x_t.mean()) - math.sqrt(abar) * 0.7) < 5 * math.sqrt((1 - abar) / n)
  assert abs(float(x_t.var()) - (1 - abar)) < 5 * (1 - abar) * math.sqrt(2 / n)


def test_q_posterior_against_reference():
  x0, x_t = rand(0), rand(1)
  mean, var, logvar = ddpm_jax.q_posterior_mean_variance(SCHED, f32(x0), f32(x_t), TS)
  c1, c2 = (ref.bcast(REF[k], TS, 4) for k in ("posterior_mean_coef1", "posterior_mean_coef2"))
  np.testing.assert_allclose(mean, c1 * x0 + c2 * x_t, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, np.broadcast_to(ref.bcast(REF["posterior_variance"], TS, 4), SHAPE),
                             rtol=1e-6, atol=0)
  np.testing.assert_allclose(
      logvar, np.broadcast_to(ref.bcast(REF["posterior_log_variance_clipped"], TS, 4), SHAPE),
      rtol=1e-6)
  # t = 0: the posterior is the point x0 (abar_{-1} = 1), so its mean is x0 exactly.
  np.testing.assert_allclose(mean[0], x0[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", [1, 2, 10, 500, T - 1])
def test_posterior_is_bayes_rule(t):
  """q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0), normalised numerically on a fine grid."""
  x0, x_t = 0.4, -0.3
  beta, abar_prev = REF["betas"][t], REF["alphas_cumprod"][t - 1]
  loc, scale = math.sqrt(abar_prev) * x0, math.sqrt(1 - abar_prev)
  width = 12 * min(scale, math.sqrt(beta))
  centre = ref.schedule(REF["betas"])["posterior_mean_coef1"][t] * x0 + \
      REF["posterior_mean_coef2"][t] * x_t  # only centres the grid
  grid = np.linspace(centre - width, centre + width, 400_001)
  log_p = (stats.norm.logpdf(x_t, loc=math.sqrt(1 - beta) * grid, scale=math.sqrt(beta))
           + stats.norm.logpdf(grid, loc=loc, scale=scale))
  w = np.exp(log_p - log_p.max())
  w /= w.sum()
  bayes_mean = (w * grid).sum()
  bayes_var = (w * (grid - bayes_mean) ** 2).sum()
  mean, var, _ = ddpm_jax.q_posterior_mean_variance(
      SCHED, jnp.full((1, 1), x0), jnp.full((1, 1), x_t), jnp.array([t]))
  assert float(mean[0, 0]) == pytest.approx(bayes_mean, rel=1e-5, abs=1e-6)
  assert float(var[0, 0]) == pytest.approx(bayes_var, rel=1e-4)


# ----------------------------------------------------------------------------- parameterisations


def test_parameterisations_against_reference():
  x0, eps = rand(0), rand(1)
  sa, s1 = (ref.bcast(REF[k], TS, 4) for k in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"))
  x_t = sa * x0 + s1 * eps
  v = sa * eps - s1 * x0
  np.testing.assert_allclose(ddpm_jax.get_v(SCHED, f32(x0), f32(eps), TS), v, rtol=1e-5, atol=1e-6)
  # x0 from eps amplifies float32 rounding of x_t by 1/sqrt(abar) (~157 at t = T-1).
  # so compare the error scaled back by sqrt(abar) (and by sqrt(1 - abar) for eps).
  got_x0 = np.asarray(ddpm_jax.predict_x0_from_eps(SCHED, f32(x_t), TS, f32(eps)))
  np.testing.assert_allclose(got_x0 * sa, x0 * sa, rtol=1e-5, atol=1e-6)
  got_eps = np.asarray(ddpm_jax.predict_eps_from_x0(SCHED, f32(x_t), TS, f32(x0)))
  np.testing.assert_allclose(got_eps * s1, eps * s1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ddpm_jax.predict_x0_from_v(SCHED, f32(x_t), TS, f32(v)), x0,
                             rtol=1e-5, atol=1e-5)


def reference_p_mean_variance(out, x_t, t, mean_type, var_type, clip):
  nd = x_t.ndim
  c = x_t.shape[-1]
  b = lambda k: ref.bcast(REF[k], t, nd)
  eps_or_x0 = out[..., :c]
  if mean_type == "eps":
    pred_x0 = (x_t - b("sqrt_one_minus_alphas_cumprod") * eps_or_x0) / b("sqrt_alphas_cumprod")
  elif mean_type == "x0":
    pred_x0 = eps_or_x0
  else:
    pred_x0 = b("sqrt_alphas_cumprod") * x_t - b("sqrt_one_minus_alphas_cumprod") * eps_or_x0
  if clip:
    pred_x0 = np.clip(pred_x0, -1, 1)
  mean = b("posterior_mean_coef1") * pred_x0 + b("posterior_mean_coef2") * x_t
  small = np.log(np.append(REF["posterior_variance"][1], REF["posterior_variance"][1:]))
  if var_type == "fixedsmall":
    logvar = ref.bcast(small, t, nd)
  elif var_type == "fixedlarge":
    logvar = ref.bcast(np.log(np.append(REF["posterior_variance"][1], REF["betas"][1:])), t, nd)
  else:
    frac = (out[..., c:] + 1) / 2
    logvar = frac * ref.bcast(np.log(REF["betas"]), t, nd) + (1 - frac) * ref.bcast(small, t, nd)
  return mean, np.broadcast_to(logvar, x_t.shape), pred_x0


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall", "learned_range"])
@pytest.mark.parametrize("clip", [True, False])
def test_p_mean_variance_against_reference(mean_type, var_type, clip):
  x_t = rand(0)
  channels = 6 if var_type == "learned_range" else 3
  out = rand(1, SHAPE[:-1] + (channels,), scale=0.8)
  if var_type == "learned_range":
    out[..., 3:] = np.tanh(out[..., 3:])
  got = ddpm_jax.p_mean_variance(SCHED, f32(out), f32(x_t), TS, mean_type=mean_type,
                                 var_type=var_type, clip_denoised=clip)
  mean, logvar, pred_x0 = reference_p_mean_variance(out, x_t, TS, mean_type, var_type, clip)
  scale = np.abs(pred_x0).max() if not clip else 1.0
  np.testing.assert_allclose(got["pred_x0"], pred_x0, rtol=1e-5, atol=2e-5 * scale)
  np.testing.assert_allclose(got["mean"], mean, rtol=1e-5, atol=2e-5 * scale)
  np.testing.assert_allclose(got["log_variance"], logvar, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["variance"], np.exp(logvar), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- likelihoods


def test_normal_kl_against_closed_form():
  m1, m2 = rand(0, (50,)), rand(1, (50,))
  lv1, lv2 = rand(2, (50,)), rand(3, (50,))
  want = ref.gaussian_kl(m1, np.exp(lv1), m2, np.exp(lv2))
  np.testing.assert_allclose(ddpm_jax.normal_kl(f32(m1), f32(lv1), f32(m2), f32(lv2)), want,
                             rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(ddpm_jax.normal_kl(f32(m1), f32(lv1), f32(m1), f32(lv1))).max()) == 0.0


@pytest.mark.parametrize("std", [1e-3, 7e-3, 0.05, 1.0, 30.0])
def test_discretized_likelihood_against_reference(std):
  x = grid_image(0, (2, 256))
  x[0] = np.arange(256) / 127.5 - 1.0  # every grid value, including the +-1 edge bins
  mean = np.clip(x + rand(1, x.shape, scale=0.02), -1.2, 1.2)
  log_scales = np.full(x.shape, math.log(std))
  got = ddpm_jax.discretized_gaussian_log_likelihood(f32(x), f32(mean), f32(log_scales))
  want = ref.discretized_log_likelihood(x, mean, std)
  assert np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("mean, std", [(0.0, 0.3), (0.93, 0.01), (-1.3, 0.2), (0.2, 5.0)])
def test_discretized_likelihood_sums_to_one_over_the_grid(mean, std):
  x = np.arange(256) / 127.5 - 1.0
  logp = ddpm_jax.discretized_gaussian_log_likelihood(
      f32(x), jnp.full((256,), mean), jnp.full((256,), math.log(std)))
  assert float(jnp.exp(logp.astype(jnp.float64) if jax.config.jax_enable_x64 else logp).sum()) \
      == pytest.approx(1.0, abs=2e-5)


def test_discretized_likelihood_far_tail_stays_finite_with_finite_gradient():
  x = jnp.array([0.5, -0.5, 0.0])
  mean = jnp.array([-0.9, 0.9, 0.0])
  log_scales = jnp.full((3,), math.log(0.01))  # 140 standard deviations away
  logp = ddpm_jax.discretized_gaussian_log_likelihood(x, mean, log_scales)
  want = ref.discretized_log_likelihood(np.asarray(x), np.asarray(mean), 0.01)
  np.testing.assert_allclose(logp, want, rtol=1e-4)
  grads = jax.grad(lambda m: ddpm_jax.discretized_gaussian_log_likelihood(x, m, log_scales).sum())(mean)
  assert np.isfinite(np.asarray(grads)).all()


# ----------------------------------------------------------------------------- losses and bound


def linear_model(a, c, channels=None):
  """A cheap model function: a * x_t + c * (t / T), optionally with extra variance channels."""
  def model_fn(x_t, t):
    t = jnp.broadcast_to(t, x_t.shape[:1]).reshape((-1,) + (1,) * (x_t.ndim - 1))
    out = a * x_t + c * t / T
    if channels:
      out = jnp.concatenate([out, jnp.tanh(out[..., :channels] * 0.5)], axis=-1)
    return out
  return model_fn


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_mse_loss_against_reference(mean_type):
  x0, noise = grid_image(0), rand(1)
  model_fn = linear_model(0.5, 0.3)
  got = ddpm_jax.training_losses(SCHED, model_fn, f32(x0), TS, f32(noise), mean_type=mean_type)
  sa, s1 = (ref.bcast(REF[k], TS, 4) for k in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"))
  x_t = sa * x0 + s1 * noise
  pred = 0.5 * x_t + 0.3 * TS.reshape(-1, 1, 1, 1) / T
  target = {"eps": noise, "x0": x0, "v": sa * noise - s1 * x0}[mean_type]
  np.testing.assert_allclose(got, ((target - pred) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall", "learned_range"])
def test_kl_loss_against_reference(var_type):
  x0, noise = grid_image(0), rand(1)
  model_fn = linear_model(0.2, 0.1, channels=3 if var_type == "learned_range" else None)
  got = ddpm_jax.training_losses(SCHED, model_fn, f32(x0), TS, f32(noise), var_type=var_type,
                                 loss_type="kl")
  x_t = np.asarray(ddpm_jax.q_sample(SCHED, f32(x0), TS, f32(noise)), np.float64)
  out = np.asarray(model_fn(f32(x_t), TS), np.float64)
  mean, logvar, _ = reference_p_mean_variance(out, x_t, TS, "eps", var_type, clip=False)
  true_mean = ref.bcast(REF["posterior_mean_coef1"], TS, 4) * x0 + \
      ref.bcast(REF["posterior_mean_coef2"], TS, 4) * x_t
  true_var = ref.bcast(REF["posterior_variance"], TS, 4)
  with np.errstate(divide="ignore"):
    kl = ref.gaussian_kl(true_mean, true_var, mean, np.exp(logvar)).mean(axis=(1, 2, 3))
  nll = -ref.discretized_log_likelihood(x0, mean, np.exp(0.5 * logvar)).mean(axis=(1, 2, 3))
  want = np.where(TS == 0, nll, kl) / math.log(2)
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)


def test_hybrid_loss_value_and_gradient_split():
  x0, noise = f32(grid_image(0)), f32(rand(1))

  def model(p):
    def model_fn(x_t, t):
      mean_out = p["a"] * x_t
      return jnp.concatenate([mean_out, jnp.tanh(p["b"] * x_t)], axis=-1)
    return model_fn

  p = {"a": jnp.array(0.4), "b": jnp.array(0.3)}
  hybrid = lambda p: ddpm_jax.training_losses(SCHED, model(p), x0, TS, noise, var_type="learned_range",
                                              loss_type="hybrid").mean()
  kl = lambda p: ddpm_jax.training_losses(SCHED, model(p), x0, TS, noise, var_type="learned_range",
                                          loss_type="kl").mean()
  mse = lambda p: ddpm_jax.training_losses(SCHED, model(p), x0, TS, noise, var_type="fixedlarge",
                                           loss_type="mse").mean()
  mse_of_mean = lambda p: mse({"a": p["a"], "b": p["b"]})
  # the mean channels alone, through the same parameters
  mse_ref = lambda p: ddpm_jax.training_losses(
      SCHED, lambda x, t: p["a"] * x, x0, TS, noise, loss_type="mse").mean()
  assert float(hybrid(p)) == pytest.approx(float(mse_ref(p)) + 0.001 * T * float(kl(p)), rel=1e-5)
  g_hybrid, g_kl, g_mse = jax.grad(hybrid)(p), jax.grad(kl)(p), jax.grad(mse_ref)(p)
  # The VLB term reaches the mean parameters only through stop_gradient: no gradient there.
  assert float(g_hybrid["a"]) == pytest.approx(float(g_mse["a"]), rel=1e-5)
  assert float(g_kl["a"]) != 0.0
  # and it alone trains the variance.
  assert float(g_hybrid["b"]) == pytest.approx(0.001 * T * float(g_kl["b"]), rel=1e-4)
  del mse_of_mean


def test_loss_weight_and_min_snr():
  x0, noise = f32(grid_image(0)), f32(rand(1))
  model_fn = linear_model(0.5, 0.0)
  for mean_type in ("eps", "x0", "v"):
    weight = ddpm_jax.min_snr_loss_weight(SCHED, gamma=5.0, mean_type=mean_type)
    snr = REF["alphas_cumprod"] / (1 - REF["alphas_cumprod"])
    want = {"eps": np.minimum(snr, 5) / snr, "x0": np.minimum(snr, 5),
            "v": np.minimum(snr, 5) / (snr + 1)}[mean_type]
    np.testing.assert_allclose(weight, want, rtol=1e-5)
    plain = ddpm_jax.training_losses(SCHED, model_fn, x0, TS, noise, mean_type=mean_type)
    weighted = ddpm_jax.training_losses(SCHED, model_fn, x0, TS, noise, mean_type=mean_type,
                                        loss_weight=weight)
    np.testing.assert_allclose(weighted, plain * want[TS], rtol=1e-5)


def test_min_snr_eps_weight_is_min_snr_x0_error():
  # min(snr, g)/snr * |eps - eps_hat|^2 == min(snr, g) * |x0 - x0_hat|^2 (Hang et al. eq. 8).
  x0, noise = f32(grid_image(0)), f32(rand(1))
  model_fn = linear_model(0.5, 0.2)
  w = ddpm_jax.min_snr_loss_weight(SCHED, mean_type="eps")
  loss = ddpm_jax.training_losses(SCHED, model_fn, x0, TS, noise, loss_weight=w)
  x_t = ddpm_jax.q_sample(SCHED, x0, TS, noise)
  x0_hat = ddpm_jax.predict_x0_from_eps(SCHED, x_t, TS, model_fn(x_t, TS))
  snr = REF["alphas_cumprod"][TS] / (1 - REF["alphas_cumprod"][TS])
  want = np.minimum(snr, 5) * np.asarray(jnp.square(x0 - x0_hat).mean(axis=(1, 2, 3)))
  np.testing.assert_allclose(loss, want, rtol=2e-3)


def test_vb_terms_bpd_matches_kl_loss():
  x0, noise = f32(grid_image(0)), f32(rand(1))
  model_fn = linear_model(0.2, 0.1)
  x_t = ddpm_jax.q_sample(SCHED, x0, TS, noise)
  vb = ddpm_jax.vb_terms_bpd(SCHED, model_fn, x0, x_t, TS, clip_denoised=False)
  kl = ddpm_jax.training_losses(SCHED, model_fn, x0, TS, noise, loss_type="kl")
  np.testing.assert_allclose(vb, kl, rtol=1e-6)


@pytest.mark.parametrize("mean_type", ["x0", "eps"])
def test_bits_per_dim_of_single_point_data(mean_type):
  """Data = one point c: the exact denoiser makes every L_{t-1} (t > 0) zero with fixedsmall."""
  c = np.tile(np.array([-1.0, 1.0, 3 / 127.5 - 1, 200 / 127.5 - 1]), 12).reshape(1, 4, 4, 3)
  x0 = jnp.asarray(np.repeat(c, 2, axis=0), jnp.float32)
  sched_ref = REF

  def exact(x_t, t):
    if mean_type == "x0":
      return jnp.broadcast_to(x0[:1], x_t.shape)
    return ddpm_jax.predict_eps_from_x0(SCHED, x_t, t, jnp.broadcast_to(x0[:1], x_t.shape))

  out = jax.jit(lambda k: ddpm_jax.bits_per_dim(SCHED, exact, x0, k, mean_type=mean_type,
                                                var_type="fixedsmall"))(jax.random.key(0))
  terms = np.asarray(out["terms_bpd"])
  assert terms.shape == (2, T)
  assert np.abs(terms[:, 1:]).max() < 1e-5  # L_1 ... L_{T-1}
  # prior: KL(N(sqrt(abar_T) c, 1 - abar_T) || N(0, 1)), averaged over dimensions, in bits
  abar = sched_ref["alphas_cumprod"][-1]
  prior = ref.gaussian_kl(math.sqrt(abar) * c, 1 - abar, 0.0, 1.0).mean() / math.log(2)
  np.testing.assert_allclose(out["prior_bpd"], [prior, prior], rtol=1e-4)
  # decoder: -log N-mass of c's bin under N(c, beta~_1) (the clipped variance at t = 0)
  std = math.sqrt(sched_ref["posterior_variance"][1])
  nll = -ref.discretized_log_likelihood(c, c, std).mean() / math.log(2)
  np.testing.assert_allclose(terms[:, 0], [nll, nll], rtol=1e-4)
  np.testing.assert_allclose(out["total_bpd"], terms.sum(1) + prior, rtol=1e-5)


def test_bits_per_dim_is_the_sum_of_vb_terms():
  sched = ddpm_jax.make_schedule("linear", 20)
  x0 = f32(grid_image(3, (3, 2, 2, 3)))
  model_fn = linear_model(0.1, 0.0)
  key = jax.random.key(7)
  out = ddpm_jax.bits_per_dim(sched, model_fn, x0, key)
  for t in (0, 5, 19):  # the scan's step t used the noise of fold_in(key, t)
    noise = jax.random.normal(jax.random.fold_in(key, t), x0.shape)
    tb = jnp.full((3,), t, jnp.int32)
    x_t = ddpm_jax.q_sample(sched, x0, tb, noise)
    np.testing.assert_allclose(out["terms_bpd"][:, t],
                               ddpm_jax.vb_terms_bpd(sched, model_fn, x0, x_t, tb), rtol=1e-5)
  np.testing.assert_allclose(out["prior_bpd"], ddpm_jax.prior_bpd(sched, x0), rtol=1e-6)


# ----------------------------------------------------------------------------- invariants


class JitInvariance(chex.TestCase):
  """The same numbers with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_forward_and_posterior(self):
    x0, x_t, noise = f32(rand(0)), f32(rand(1)), f32(rand(2))
    q = self.variant(lambda x0, t, n: ddpm_jax.q_sample(SCHED, x0, t, n))
    post = self.variant(lambda a, b, t: ddpm_jax.q_posterior_mean_variance(SCHED, a, b, t))
    np.testing.assert_allclose(q(x0, TS, noise), ddpm_jax.q_sample(SCHED, x0, TS, noise), rtol=1e-6)
    for got, want in zip(post(x0, x_t, TS), ddpm_jax.q_posterior_mean_variance(SCHED, x0, x_t, TS)):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("fixedlarge", "learned_range")
  def test_p_mean_variance_and_losses(self, var_type):
    channels = 6 if var_type == "learned_range" else 3
    out, x_t = f32(np.tanh(rand(0, SHAPE[:-1] + (channels,)))), f32(rand(1))
    pmv = self.variant(lambda o, x, t: ddpm_jax.p_mean_variance(SCHED, o, x, t, var_type=var_type))
    want = reference_p_mean_variance(np.asarray(out, np.float64), np.asarray(x_t, np.float64), TS,
                                     "eps", var_type, True)
    got = pmv(out, x_t, TS)
    np.testing.assert_allclose(got["mean"], want[0], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(got["log_variance"], want[1], rtol=1e-5, atol=1e-6)
    model_fn = linear_model(0.3, 0.1, channels=3 if var_type == "learned_range" else None)
    loss_type = "hybrid" if var_type == "learned_range" else "mse"
    loss = self.variant(lambda x0, t, n: ddpm_jax.training_losses(
        SCHED, model_fn, x0, t, n, var_type=var_type, loss_type=loss_type))
    x0, noise = f32(grid_image(0)), f32(rand(2))
    np.testing.assert_allclose(loss(x0, TS, noise), ddpm_jax.training_losses(
        SCHED, model_fn, x0, TS, noise, var_type=var_type, loss_type=loss_type), rtol=1e-5)


def test_vmap_over_examples_equals_batched_call():
  x0, noise, x_t = f32(grid_image(0)), f32(rand(1)), f32(rand(2))
  one = lambda f: jax.vmap(lambda *a: f(*(v[None] for v in a))[0])
  np.testing.assert_allclose(
      one(lambda a, t, n: ddpm_jax.q_sample(SCHED, a, t, n))(x0, TS, noise),
      ddpm_jax.q_sample(SCHED, x0, TS, noise), rtol=1e-6)
  # and with scalar t per example, the natural vmap form
  np.testing.assert_allclose(
      jax.vmap(lambda a, t, n: ddpm_jax.q_sample(SCHED, a, t, n))(x0, TS, noise),
      ddpm_jax.q_sample(SCHED, x0, TS, noise), rtol=1e-6)
  model_fn = linear_model(0.3, 0.2)
  np.testing.assert_allclose(
      one(lambda a, t, n: ddpm_jax.training_losses(SCHED, model_fn, a, t, n, loss_type="kl"))(x0, TS, noise),
      ddpm_jax.training_losses(SCHED, model_fn, x0, TS, noise, loss_type="kl"), rtol=1e-5)
  pmv = lambda o, x, t: ddpm_jax.p_mean_variance(SCHED, o, x, t)["mean"]
  np.testing.assert_allclose(one(pmv)(x_t, x_t, TS), pmv(x_t, x_t, TS), rtol=1e-6)


# ----------------------------------------------------------------------------- bad input


X = jnp.zeros((2, 4, 4, 3))
TT = jnp.array([0, 5])


@pytest.mark.parametrize("call, message", [
    (lambda: ddpm_jax.p_mean_variance(SCHED, X, X, TT, mean_type="epsilon"),
     r"Unknown mean_type 'epsilon'; accepted: eps, x0, v\."),
    (lambda: ddpm_jax.p_mean_variance(SCHED, X, X, TT, var_type="large"),
     r"Unknown var_type 'large'; accepted: fixedlarge, fixedsmall, learned_range\."),
    (lambda: ddpm_jax.training_losses(SCHED, lambda x, t: x, X, TT, X, loss_type="l2"),
     r"Unknown loss_type 'l2'; accepted: mse, kl, hybrid\."),
    (lambda: ddpm_jax.q_sample(SCHED, X, jnp.array([0, 1, 2]), X),
     r"t must be a scalar or of shape \[B\] = \[2\] to match x's batch size, got shape \(3,\)"),
    (lambda: ddpm_jax.q_sample(SCHED, X, jnp.array([0, 1000]), X),
     r"Timestep 1000 is out of range; accepted: 0 to 999 \(0-based, num_timesteps = 1000\)\."),
    (lambda: ddpm_jax.q_posterior_mean_variance(SCHED, X, X, np.array([-1, 3])),
     r"Timestep -1 is out of range"),
    (lambda: ddpm_jax.q_sample(SCHED, X, jnp.array([0.5, 1.0]), X),
     r"t must hold integer timesteps, got dtype float32"),
    (lambda: ddpm_jax.q_sample(SCHED, X, TT, jnp.zeros((2, 4, 4, 1))),
     r"noise must have the shape of x0 \(2, 4, 4, 3\), got \(2, 4, 4, 1\)"),
    (lambda: ddpm_jax.p_mean_variance(SCHED, X, X, TT, var_type="learned_range"),
     r"model output has shape \(2, 4, 4, 3\) but var_type='learned_range' needs \(2, 4, 4, 6\)"),
    (lambda: ddpm_jax.p_mean_variance(SCHED, jnp.zeros((2, 4, 4, 6)), X, TT),
     r"var_type='fixedlarge' needs \(2, 4, 4, 3\): 3 channels"),
    (lambda: ddpm_jax.training_losses(SCHED, lambda x, t: x, X, TT, X, var_type="learned_range"),
     r"loss_type='mse' does not train a learned_range variance"),
    (lambda: ddpm_jax.training_losses(SCHED, lambda x, t: x, X, TT, X, loss_type="hybrid"),
     r"loss_type='hybrid' trains a learned variance but var_type='fixedlarge'"),
    (lambda: ddpm_jax.min_snr_loss_weight(SCHED, mean_type="score"), r"Unknown mean_type 'score'"),
])
def test_bad_input(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_bad_input_raises_under_jit_too():
  with pytest.raises(ValueError, match=r"needs \(2, 4, 4, 6\)"):
    jax.jit(lambda o, x, t: ddpm_jax.p_mean_variance(SCHED, o, x, t, var_type="learned_range"))(X, X, TT)
