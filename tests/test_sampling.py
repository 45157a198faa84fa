"""Samplers against exact denoisers of Gaussian and Gaussian-mixture data, and float64 references."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax
from ddpm_jax import sampling
from tests import references as ref

T = 1000
SCHED = ddpm_jax.make_schedule("linear", T)
BETAS = ddpm_jax.get_beta_schedule("linear", T)
ABAR = np.cumprod(1.0 - BETAS)  # float64
ABAR_F32 = jnp.asarray(ABAR, jnp.float32)
N = 20_000  # samples per moment test: standard error of a mean ~ 0.7% of the std

# Gaussian data: x0 ~ N(MU, SD^2) independently per channel.
MU, SD = np.array([0.3, -0.2]), np.array([0.5, 0.2])


def gaussian_eps(x_t, t):
  """The exact eps-denoiser of Gaussian data: E[eps | x_t] via E[x0 | x_t] in closed form."""
  ab = ABAR_F32[t].reshape(-1, 1, 1, 1)
  gain = jnp.sqrt(ab) * SD ** 2 / (ab * SD ** 2 + 1 - ab)
  x0 = MU + gain * (x_t - jnp.sqrt(ab) * MU)
  return (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)


def predicted_moments(kept, kind, eta=0.0):
  """Mean and std of the sampler's x_0 for Gaussian data, by propagating the linear-Gaussian chain
  x_{i-1} = a_i x_i + b_i + s_i z exactly in float64 (independent of ddpm_jax's step code)."""
  ab = ABAR[kept]
  ab_prev = np.append(1.0, ab[:-1])
  beta = 1 - ab / ab_prev
  beta_tilde = beta * (1 - ab_prev) / (1 - ab)
  m, v = np.zeros(2), np.ones(2)
  for i in range(len(kept) - 1, -1, -1):
    gain = np.sqrt(ab[i]) * SD ** 2 / (ab[i] * SD ** 2 + 1 - ab[i])  # x0_hat = gain x + h
    h = MU * (1 - gain * np.sqrt(ab[i]))
    if kind == "ddim":  # x_prev = sqrt(ab_prev) x0_hat + c eps_hat + sigma z (Song et al. eq. 12)
      sigma2 = eta ** 2 * beta_tilde[i]
      c = np.sqrt(max(1 - ab_prev[i] - sigma2, 0.0)) / np.sqrt(1 - ab[i])
      a = np.sqrt(ab_prev[i]) * gain + c * (1 - np.sqrt(ab[i]) * gain)
      b = (np.sqrt(ab_prev[i]) - c * np.sqrt(ab[i])) * h
      s2 = sigma2
    else:  # the posterior mean given x0_hat (Ho et al. eq. 7)
      c1 = beta[i] * np.sqrt(ab_prev[i]) / (1 - ab[i])
      c2 = (1 - ab_prev[i]) * np.sqrt(1 - beta[i]) / (1 - ab[i])
      a, b = c1 * gain + c2, c1 * h
      s2 = 0.0 if i == 0 else {"fixedsmall": beta_tilde[i], "fixedlarge": beta[i]}[kind]
    m, v = a * m + b, a * a * v + s2
  return m, np.sqrt(v)


def draw(sampler, model_fn, shape, **kw):
  loop = ddpm_jax.ddim_sample_loop if sampler == "ddim" else ddpm_jax.p_sample_loop
  return np.asarray(jax.jit(lambda k: loop(SCHED, model_fn, shape, k, **kw))(jax.random.key(0)))


GAUSSIAN_CASES = [  # sampler, var_type/eta, steps, data reproduced within 3% of each std
    ("ancestral", "fixedsmall", T, True),
    ("ancestral", "fixedlarge", T, True),
    ("ancestral", "fixedlarge", 250, True),
    ("ancestral", "fixedsmall", 50, False),
    ("ddim", 0.0, T, True),
    ("ddim", 0.0, 250, True),
    ("ddim", 0.0, 50, False),
    ("ddim", 1.0, 100, False),
]


@pytest.mark.parametrize("sampler, option, steps, reproduces_data", GAUSSIAN_CASES)
def test_exact_denoiser_on_gaussian_data(sampler, option, steps, reproduces_data):
  if sampler == "ddim":
    x = draw("ddim", gaussian_eps, (N, 1, 1, 2), num_steps=steps, eta=option, clip_denoised=False)
    mean_want, std_want = predicted_moments(ddpm_jax.space_timesteps(T, steps), "ddim", option)
  else:
    x = draw("ancestral", gaussian_eps, (N, 1, 1, 2), num_steps=steps, var_type=option,
             clip_denoised=False)
    mean_want, std_want = predicted_moments(ddpm_jax.space_timesteps(T, steps), option)
  x = x.reshape(N, 2)
  mean, std = x.mean(0), x.std(0)
  se_mean, se_std = std_want / math.sqrt(N), std_want / math.sqrt(2 * N)
  np.testing.assert_array_less(np.abs(mean - mean_want), 5 * se_mean + 1e-4)
  np.testing.assert_array_less(np.abs(std - std_want), 5 * se_std + 1e-4)
  if reproduces_data:
    np.testing.assert_array_less(np.abs(mean - MU), 5 * se_mean + 0.01 * SD)
    np.testing.assert_array_less(np.abs(std - SD), 5 * se_std + 0.03 * SD)


# A two-component mixture: its exact denoiser weighs each component's posterior by its responsibility.
W, M, S = np.array([0.3, 0.7]), np.array([-0.5, 0.4]), np.array([0.1, 0.15])


def mixture_x0(x_t, t):
  ab = ABAR_F32[t].reshape(-1, 1, 1, 1, 1)
  x = x_t[..., None]
  var = ab * S ** 2 + 1 - ab  # of x_t given the component
  log_resp = jax.nn.log_softmax(np.log(W) - 0.5 * jnp.log(var)
                                - 0.5 * (x - jnp.sqrt(ab) * M) ** 2 / var, axis=-1)
  posterior_means = M + jnp.sqrt(ab) * S ** 2 / var * (x - jnp.sqrt(ab) * M)
  return (jnp.exp(log_resp) * posterior_means).sum(-1)


@pytest.mark.parametrize("sampler, kw", [
    ("ancestral", dict(var_type="fixedsmall")),
    ("ancestral", dict(var_type="fixedsmall", num_steps=250)),
    ("ddim", dict(num_steps=100)),
])
def test_exact_denoiser_on_gaussian_mixture(sampler, kw):
  x = draw(sampler, mixture_x0, (N, 1, 1, 1), mean_type="x0", **kw).reshape(N)
  data_mean = (W * M).sum()
  data_std = math.sqrt((W * (S ** 2 + M ** 2)).sum() - data_mean ** 2)
  assert abs(x.mean() - data_mean) < 0.015  # 5 standard errors
  assert abs(x.std() - data_std) < 0.015
  assert abs((x < 0).mean() - W[0]) < 0.015  # the mass of each mode
  assert abs(x[x < 0].std() - S[0]) < 0.2 * S[0]  # and the width of each
  assert abs(x[x > 0].std() - S[1]) < 0.2 * S[1]


# ----------------------------------------------------------------------------- single steps


def test_p_sample_draws_from_p_mean_variance():
  x_t = jnp.full((50_000, 1, 1, 2), 0.4)
  model_fn = lambda x, t: 0.3 * x
  for t in (0, 1, 700):
    tb = jnp.full((x_t.shape[0],), t, jnp.int32)
    out = ddpm_jax.p_mean_variance(SCHED, model_fn(x_t, tb), x_t, tb)
    x = ddpm_jax.p_sample(SCHED, model_fn, x_t, tb, jax.random.key(t))
    if t == 0:  # no noise at the last step
      np.testing.assert_array_equal(x, out["mean"])
      continue
    std = float(jnp.exp(0.5 * out["log_variance"][0, 0, 0, 0]))
    assert abs(float(x.mean()) - float(out["mean"][0, 0, 0, 0])) < 5 * std / math.sqrt(x.size)
    assert float(x.std()) == pytest.approx(std, rel=5 * math.sqrt(2 / x.size))


class JitInvariance(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_p_sample(self):
    x_t = jax.random.normal(jax.random.key(1), (4, 2, 2, 3))
    t = jnp.array([0, 1, 500, 999])
    step = self.variant(lambda x, t, k: ddpm_jax.p_sample(SCHED, lambda x, t: 0.1 * x, x, t, k))
    np.testing.assert_allclose(step(x_t, t, jax.random.key(2)),
                               ddpm_jax.p_sample(SCHED, lambda x, t: 0.1 * x, x_t, t,
                                                 jax.random.key(2)), rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_loops(self):
    sched = ddpm_jax.make_schedule("linear", 20)
    model_fn = lambda x, t: 0.1 * x
    for loop, kw in [(ddpm_jax.p_sample_loop, {}), (ddpm_jax.ddim_sample_loop, dict(num_steps=5))]:
      got = self.variant(lambda k: loop(sched, model_fn, (3, 2, 2, 1), k, **kw))(jax.random.key(0))
      want = loop(sched, model_fn, (3, 2, 2, 1), jax.random.key(0), **kw)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- DDIM and respacing


def test_ddim_eta0_matches_float64_reference_and_is_deterministic():
  model_fn = lambda x, t: 0.2 * x + 0.05 * (t / T).reshape(-1, 1, 1, 1)
  shape, steps = (3, 2, 2, 1), 20
  x0, traj = ddpm_jax.ddim_sample_loop(SCHED, model_fn, shape, jax.random.key(3), num_steps=steps,
                                       return_trajectory=True)
  again = ddpm_jax.ddim_sample_loop(SCHED, model_fn, shape, jax.random.key(3), num_steps=steps)
  np.testing.assert_array_equal(x0, again)
  kept = ddpm_jax.space_timesteps(T, steps)
  x = np.asarray(traj[0], np.float64)  # x_T
  for i in range(steps - 1, -1, -1):
    ab, ab_prev = ABAR[kept[i]], (ABAR[kept[i - 1]] if i else 1.0)
    eps = 0.2 * x + 0.05 * kept[i] / T
    x0_hat = np.clip((x - np.sqrt(1 - ab) * eps) / np.sqrt(ab), -1, 1)
    eps = (x - np.sqrt(ab) * x0_hat) / np.sqrt(1 - ab)  # re-derived from the clipped x0
    x = np.sqrt(ab_prev) * x0_hat + np.sqrt(1 - ab_prev) * eps
  np.testing.assert_allclose(x0, x, rtol=1e-4, atol=1e-5)


def test_ddim_eta1_is_respaced_ancestral_with_fixedsmall():
  shape, key = (64, 2, 2, 2), jax.random.key(5)
  ddim = ddpm_jax.ddim_sample_loop(SCHED, gaussian_eps, shape, key, num_steps=40, eta=1.0)
  ancestral = ddpm_jax.p_sample_loop(SCHED, gaussian_eps, shape, key, num_steps=40,
                                     var_type="fixedsmall")
  np.testing.assert_allclose(ddim, ancestral, rtol=1e-4, atol=1e-4)


def test_respacing_with_every_step_is_the_full_chain():
  shape, key = (8, 2, 2, 2), jax.random.key(6)
  full = ddpm_jax.p_sample_loop(SCHED, gaussian_eps, shape, key)
  np.testing.assert_array_equal(ddpm_jax.p_sample_loop(SCHED, gaussian_eps, shape, key, num_steps=T), full)
  np.testing.assert_array_equal(
      ddpm_jax.p_sample_loop(SCHED, gaussian_eps, shape, key, timesteps=range(T)), full)


def test_respaced_schedule_recomputes_betas():
  kept = ddpm_jax.space_timesteps(T, "ddim10")
  sched = ddpm_jax.respace(SCHED, kept)
  want = ref.schedule(1 - ABAR[kept] / np.append(1.0, ABAR[kept[:-1]]))
  np.testing.assert_allclose(sched.alphas_cumprod, ABAR[kept], rtol=2e-6)
  np.testing.assert_allclose(sched.betas, want["betas"], rtol=2e-6)
  assert float(sched.betas[0]) == pytest.approx(BETAS[0], rel=1e-6)  # kept[0] = 0
  np.testing.assert_allclose(sched.posterior_variance, want["posterior_variance"], rtol=2e-5)
  # the model of a respaced chain is called with the original timesteps
  _, model_r = sampling._respaced(SCHED, lambda x, t: t, None, kept)
  np.testing.assert_array_equal(model_r(None, jnp.array([0, 3, 9])), [0, 300, 900])


@pytest.mark.parametrize("spec, want", [
    (10, [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]),
    (1, [0]),
    ("ddim10", [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]),
    ("ddim3", [0, 333, 666]),
    ([5, 1, 999], [1, 5, 999]),
])
def test_space_timesteps(spec, want):
  np.testing.assert_array_equal(ddpm_jax.space_timesteps(T, spec), want)


def test_space_timesteps_sections():
  # two sections of 50 steps, spaced evenly with 10 and 5 kept steps (banker's rounding, as Python)
  np.testing.assert_array_equal(ddpm_jax.space_timesteps(100, "10,5"),
                                [0, 5, 11, 16, 22, 27, 33, 38, 44, 49, 50, 62, 74, 87, 99])


# ----------------------------------------------------------------------------- chain mechanics


def test_trajectory():
  shape, key = (2, 2, 2, 1), jax.random.key(8)
  sched = ddpm_jax.make_schedule("linear", 23)
  model_fn = lambda x, t: 0.1 * x
  x0 = ddpm_jax.p_sample_loop(sched, model_fn, shape, key)
  for stride, length in [(1, 24), (5, 1 + 4 + 1), (23, 2), (100, 2)]:
    final, traj = ddpm_jax.p_sample_loop(sched, model_fn, shape, key, return_trajectory=True,
                                         trajectory_stride=stride)
    assert traj.shape == (length,) + shape
    np.testing.assert_allclose(final, x0, rtol=1e-6)
    np.testing.assert_allclose(traj[-1], x0, rtol=1e-6)
  # x_T first, then the state every stride steps: with stride 1, consecutive p_sample steps
  _, traj = ddpm_jax.p_sample_loop(sched, model_fn, shape, key, return_trajectory=True)
  chain_key = jax.random.fold_in(key, 1)
  step = ddpm_jax.p_sample(sched, model_fn, traj[0], jnp.full((2,), 22), jax.random.fold_in(chain_key, 22))
  np.testing.assert_allclose(traj[1], step, rtol=1e-5, atol=1e-6)


def test_per_sample_keys_make_samples_independent_of_the_batch():
  sched = ddpm_jax.make_schedule("linear", 30)
  keys = jax.random.split(jax.random.key(9), 6)
  model_fn = lambda x, t: 0.1 * x
  for loop, kw in [(ddpm_jax.p_sample_loop, {}), (ddpm_jax.ddim_sample_loop, dict(num_steps=7, eta=0.5))]:
    batch = loop(sched, model_fn, (6, 2, 2, 1), keys, **kw)
    alone = loop(sched, model_fn, (2, 2, 2, 1), keys[3:5], **kw)
    np.testing.assert_allclose(batch[3:5], alone, rtol=1e-6)


def test_chain_is_one_scan_whatever_T():
  model_fn = lambda x, t: 0.1 * x
  sizes = []
  for steps in (10, 1000):
    sched = ddpm_jax.make_schedule("linear", steps)
    jaxpr = jax.make_jaxpr(lambda k: ddpm_jax.p_sample_loop(sched, model_fn, (2, 2, 2, 1), k))(
        jax.random.key(0)).jaxpr
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == steps
    sizes.append((len(jaxpr.eqns), len(scans[0].params["jaxpr"].jaxpr.eqns)))
  assert sizes[0] == sizes[1]  # the program does not grow with T: one step body, traced once


# ----------------------------------------------------------------------------- bad input


X_SHAPE = (2, 4, 4, 3)
f = lambda x, t: x


@pytest.mark.parametrize("call, message", [
    (lambda: ddpm_jax.p_sample_loop(SCHED, f, X_SHAPE, jax.random.key(0), mean_type="e"),
     r"Unknown mean_type 'e'; accepted: eps, x0, v\."),
    (lambda: ddpm_jax.ddim_sample_loop(SCHED, f, X_SHAPE, jax.random.key(0), num_steps=10, var_type="big"),
     r"Unknown var_type 'big'"),
    (lambda: ddpm_jax.p_sample_loop(SCHED, f, X_SHAPE, jax.random.key(0), num_steps=0),
     r"num_steps must be an integer in \[1, 1000\] \(the schedule's num_timesteps\), got 0\."),
    (lambda: ddpm_jax.ddim_sample_loop(SCHED, f, X_SHAPE, jax.random.key(0), num_steps=1001),
     r"num_steps must be an integer in \[1, 1000\].*got 1001\."),
    (lambda: ddpm_jax.ddim_sample_loop(SCHED, f, X_SHAPE, jax.random.key(0), num_steps="ddim0"),
     r"'ddim0' asks for 0 steps; accepted: 1 to 1000"),
    (lambda: ddpm_jax.ddim_sample_loop(SCHED, f, X_SHAPE, jax.random.key(0), num_steps=None),
     r"ddim_sample_loop needs num_steps"),
    (lambda: ddpm_jax.p_sample_loop(SCHED, f, X_SHAPE, jax.random.key(0), timesteps=[3, 3]),
     r"timesteps must be distinct integers in \[0, 999\]"),
    (lambda: ddpm_jax.space_timesteps(100, "10,60"), r"Section 1 of '10,60' asks for 60 steps; accepted: 1 to 50"),
    (lambda: ddpm_jax.ddim_sample_loop(SCHED, f, X_SHAPE, jax.random.key(0), num_steps=10, eta=-1.0),
     r"eta must be >= 0"),
    (lambda: ddpm_jax.p_sample_loop(SCHED, f, (4, 4, 3.0), jax.random.key(0)),
     r"shape must be a tuple of positive ints"),
    (lambda: ddpm_jax.p_sample_loop(SCHED, f, X_SHAPE, jax.random.key(0), return_trajectory=True,
                                    trajectory_stride=0), r"trajectory_stride must be an integer >= 1, got 0"),
    (lambda: ddpm_jax.p_sample_loop(SCHED, f, X_SHAPE, jax.random.split(jax.random.key(0), 3)),
     r"A batch of 3 keys cannot draw 2 examples"),
    (lambda: ddpm_jax.p_sample_loop(SCHED, f, X_SHAPE, jax.random.key(0), var_type="learned_range"),
     r"needs \(2, 4, 4, 6\): 6 channels for x_t with 3"),
])
def test_bad_input(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_respacing_a_traced_schedule_says_what_to_do():
  with pytest.raises(ValueError, match="Respacing needs a concrete Schedule"):
    jax.jit(lambda s, k: ddpm_jax.p_sample_loop(s, f, X_SHAPE, k, num_steps=10))(SCHED, jax.random.key(0))
