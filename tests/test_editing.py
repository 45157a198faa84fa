"""Editing (inpainting, SDEdit, DDIM inversion, interpolation) against closed forms.

Data: x0 ~ N(mu, Sigma) on a 4x4 one-channel image whose pixels are strongly correlated
(squared-exponential kernel, length 1.5 pixels). Its optimal denoiser is linear and exact,
E[x0 | x_t] = mu + sqrt(abar) Sigma (abar Sigma + (1 - abar) I)^-1 (x_t - sqrt(abar) mu), and
p(unknown | known) is the Gaussian conditional; every chain with that denoiser is linear-
Gaussian, so its output's moments are also propagated exactly in float64 (tests/references.py).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax
from ddpm_jax import editing
from tests import references as ref

T = 100  # with the linear schedule rescaled to 100 steps: abar_{T-1} = 2e-5, x_T is noise
SCHED = ddpm_jax.make_schedule("linear", T, beta_start=1e-3, beta_end=0.2)
ABAR = np.cumprod(1.0 - ddpm_jax.get_beta_schedule("linear", T, beta_start=1e-3, beta_end=0.2))
H = W = 4
MU, SIGMA = ref.correlated_gaussian(H, W, length=1.5, sd=0.5)
MASK = np.zeros((H, W, 1), np.float32)
MASK[:, :2] = 1.0  # the left half is known
KNOWN = (MU.reshape(H, W, 1) + 0.8 * MASK).astype(np.float32)  # far from the mean: a clear test
COND_MEAN, COND_COV = ref.gaussian_conditional(MU, SIGMA, MASK.ravel() > 0, KNOWN.ravel())
UNKNOWN = MASK.ravel() == 0


class ExactDenoiser:
  """The optimal model of N(MU, SIGMA) data on schedule `abar`, as an eps, x0 or v model_fn."""

  def __init__(self, abar):
    lam, self.u = np.linalg.eigh(SIGMA)
    self.lam, self.abar = jnp.asarray(lam, jnp.float32), jnp.asarray(abar, jnp.float32)
    self.u, self.mu = jnp.asarray(self.u, jnp.float32), jnp.asarray(MU, jnp.float32)

  def x0(self, x_t, t):
    ab = self.abar[t].reshape(-1, 1)
    z = (x_t.reshape(x_t.shape[0], -1) - jnp.sqrt(ab) * self.mu) @ self.u
    gain = jnp.sqrt(ab) * self.lam / (ab * self.lam + 1.0 - ab)
    return (self.mu + (gain * z) @ self.u.T).reshape(x_t.shape)

  def model_fn(self, mean_type):
    def fn(x_t, t):
      ab = self.abar[t].reshape(-1, 1, 1, 1)
      x0 = self.x0(x_t, t)
      eps = (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)
      return {"x0": x0, "eps": eps, "v": jnp.sqrt(ab) * eps - jnp.sqrt(1.0 - ab) * x0}[mean_type]
    return fn


EXACT = ExactDenoiser(ABAR)
EPS = EXACT.model_fn("eps")


def inpaint(loop, n, key=0, **kw):
  known = jnp.broadcast_to(KNOWN, (n, H, W, 1))
  run = jax.jit(lambda k: loop(SCHED, EPS, known, MASK, k, clip_denoised=False, **kw))
  return np.asarray(run(jax.random.key(key))).reshape(n, H * W)


# ----------------------------------------------------------------------------- RePaint

N = 20_000  # samples per moment test: se of a mean <= 0.43 / sqrt(N) = 0.003


@pytest.mark.parametrize("num_steps, jump_length, jump_n_sample", [(50, 1, 1), (50, 5, 5)])
def test_repaint_moments_equal_the_propagated_chain(num_steps, jump_length, jump_n_sample):
  """The sampler draws exactly the chain it describes: mean and sd of the filled pixels within
  5 standard errors of the float64 propagation of the same walk."""
  x = inpaint(editing.repaint_sample_loop, N, num_steps=num_steps, jump_length=jump_length,
              jump_n_sample=jump_n_sample)[:, UNKNOWN]
  kept = ddpm_jax.space_timesteps(T, num_steps)
  walk = editing.repaint_schedule(num_steps, jump_length, jump_n_sample)
  mean, cov = ref.repaint_moments(MU, SIGMA, ABAR[kept], walk, MASK.ravel(), KNOWN.ravel())
  sd = np.sqrt(np.diag(cov))[UNKNOWN]
  np.testing.assert_array_less(np.abs(x.mean(0) - mean[UNKNOWN]), 5 * sd / math.sqrt(N))
  np.testing.assert_array_less(np.abs(x.std(0) - sd), 5 * sd / math.sqrt(2 * N))


def test_repaint_reproduces_the_conditional_and_replacement_does_not():
  """RePaint (every step resampled 10 times: jump_length 1, jump_n_sample 10; the full 100-step
  chain) vs plain replacement, 20 000 samples each: RePaint's filled pixels have the
  conditional's mean and sd within 0.045 and its covariance within 0.035 (the propagated
  chain's bias: 0.028 / 0.025 / 0.020, plus about 5 standard errors); replacement misses the
  mean by more than 0.12 (0.176 propagated: it ignores the known half while the image is
  noisy)."""
  cond_sd = np.sqrt(np.diag(COND_COV))
  errors = {}
  for name, kw in [("repaint", dict(jump_length=1, jump_n_sample=10)),
                   ("replacement", dict(jump_n_sample=1))]:
    x = inpaint(editing.repaint_sample_loop, N, key=1, **kw)[:, UNKNOWN]
    errors[name] = (np.abs(x.mean(0) - COND_MEAN).max(), np.abs(x.std(0) - cond_sd).max(),
                    np.abs(np.cov(x.T) - COND_COV).max())
  mean_err, sd_err, cov_err = errors["repaint"]
  assert mean_err < 0.045 and sd_err < 0.045 and cov_err < 0.035, errors
  assert errors["replacement"][0] > 0.12, errors


@pytest.mark.parametrize("loop, kw", [
    (editing.repaint_sample_loop, dict(num_steps=20, jump_length=3, jump_n_sample=3)),
    (editing.ddim_inpaint_loop, dict(num_steps=10)),
    (editing.ddim_inpaint_loop, dict(num_steps=10, eta=1.0)),
    (editing.dpm_solver_inpaint_loop, dict(num_steps=10, order=2)),
])
def test_known_region_is_exact(loop, kw):
  known = jax.random.uniform(jax.random.key(3), (4, H, W, 3), minval=-1, maxval=1)
  mask = (jax.random.uniform(jax.random.key(4), (4, H, W, 3)) < 0.5).astype(jnp.float32)
  out = np.asarray(loop(SCHED, lambda x, t: 0.3 * x, known, mask, jax.random.key(5), **kw))
  keep = np.asarray(mask) == 1
  np.testing.assert_array_equal(out[keep], np.asarray(known)[keep])
  assert np.all(out[~keep] != np.asarray(known)[~keep])  # the rest is the model's


def test_ddim_and_dpm_solver_inpainting_follow_the_known_half():
  """Replacement on short deterministic chains moves the fill towards the conditional: the
  mean error is below the unconditional one (the prior mean), though not at RePaint's level."""
  prior_err = np.abs(MU[UNKNOWN] - COND_MEAN).max()
  for loop, kw in [(editing.ddim_inpaint_loop, dict(num_steps=20)),
                   (editing.dpm_solver_inpaint_loop, dict(num_steps=20))]:
    x = inpaint(loop, 4000, **kw)[:, UNKNOWN]
    assert np.abs(x.mean(0) - COND_MEAN).max() < 0.7 * prior_err


def test_mean_types_give_the_same_fill():
  known = jnp.broadcast_to(KNOWN, (8, H, W, 1))
  outs = [editing.repaint_sample_loop(SCHED, EXACT.model_fn(m), known, MASK, jax.random.key(6),
                                      num_steps=20, jump_length=5, jump_n_sample=2,
                                      mean_type=m, clip_denoised=False)
          for m in ("eps", "x0", "v")]
  np.testing.assert_allclose(outs[1], outs[0], atol=2e-4)
  np.testing.assert_allclose(outs[2], outs[0], atol=2e-4)


def test_repaint_schedule_is_the_papers_walk():
  # 5 levels, jumps of 2 at levels 0 and 2, taken twice: down 4 -> 2, up to 4, down to 0, up
  # to 2, down to x_0
  walk = editing.repaint_schedule(5, 2, 2).tolist()
  assert walk == [[0, 4], [0, 3], [1, 3], [1, 4], [0, 4], [0, 3], [0, 2], [0, 1], [1, 1],
                  [1, 2], [0, 2], [0, 1], [0, 0]]
  assert editing.repaint_schedule(4, 10, 1).tolist() == [[0, 3], [0, 2], [0, 1], [0, 0]]
  assert len(editing.repaint_schedule(250, 10, 10)) == 4570  # the paper's setting: ~10x calls


def test_repaint_is_one_scan():
  known = jnp.zeros((2, H, W, 1))
  for steps in (10, 50):
    jaxpr = jax.make_jaxpr(lambda k: editing.repaint_sample_loop(
        SCHED, EPS, known, MASK, k, num_steps=steps, jump_length=3, jump_n_sample=3))(
            jax.random.key(0)).jaxpr
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1
    assert scans[0].params["length"] == len(editing.repaint_schedule(steps, 3, 3))


# ----------------------------------------------------------------------------- inversion


def data(n, seed):
  """n images [n, H, W, 1] drawn from N(MU, SIGMA)."""
  z = np.random.default_rng(seed).standard_normal((n, H * W))
  return jnp.asarray(MU + z @ np.linalg.cholesky(SIGMA).T, jnp.float32).reshape(n, H, W, 1)


def test_ddim_inversion_reconstructs_with_error_falling_in_steps():
  x0 = data(64, seed=0)
  errors = []
  for n in (5, 20, 100):
    x_T = editing.ddim_invert(SCHED, EPS, x0, num_steps=n)
    back = ddpm_jax.ddim_sample_loop(SCHED, EPS, x0.shape, jax.random.key(0), num_steps=n,
                                     x_T=x_T, clip_denoised=False)
    errors.append(float(jnp.sqrt(jnp.mean((back - x0) ** 2))))
  # first order in the step: about 0.31, 0.098, 0.022 (rms, data sd 0.5)
  assert errors[0] > errors[1] > errors[2], errors
  assert errors[2] < 0.1 * errors[0], errors


def test_ddim_inversion_matches_float64_reference_and_maps_data_to_noise():
  x0 = data(20_000, seed=1)
  x_T = np.asarray(jax.jit(lambda x: editing.ddim_invert(SCHED, EPS, x, num_steps=100))(x0))
  x_T = x_T.reshape(-1, H * W)
  want = ref.ddim_inversion(MU, SIGMA, ABAR,
                            np.asarray(x0).reshape(-1, H * W))
  np.testing.assert_allclose(x_T, want, atol=2e-4)
  # the ODE carries N(mu, Sigma) to (nearly) N(0, I): measured 0.068 (discretisation + noise)
  np.testing.assert_allclose(np.cov(x_T.T), np.eye(H * W), atol=0.1)
  np.testing.assert_allclose(x_T.mean(0), 0.0, atol=0.05)


def test_ddim_inversion_mean_types_agree():
  x0 = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (4, H, W, 1)), jnp.float32)
  outs = [editing.ddim_invert(SCHED, EXACT.model_fn(m), x0, num_steps=30, mean_type=m)
          for m in ("eps", "x0", "v")]
  np.testing.assert_allclose(outs[1], outs[0], atol=1e-3)
  np.testing.assert_allclose(outs[2], outs[0], atol=1e-3)


# ----------------------------------------------------------------------------- SDEdit


X0 = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (3, H, W, 1)), jnp.float32)


@pytest.mark.parametrize("sampler", editing.EDIT_SAMPLERS)
def test_sdedit_strength_one_is_sampling_from_the_same_x_T(sampler):
  key = jax.random.key(7)
  got = editing.sdedit(SCHED, EPS, X0, key, strength=1.0, sampler=sampler, num_steps=20)
  x_T = ddpm_jax.q_sample(SCHED, X0, jnp.full((3,), T - 1),
                          jax.random.normal(jax.random.fold_in(key, 0), X0.shape))
  if sampler == "dpm_solver":
    want = ddpm_jax.dpm_solver_sample_loop(SCHED, EPS, X0.shape, key, num_steps=20, x_T=x_T)
  else:
    loop = ddpm_jax.ddim_sample_loop if sampler == "ddim" else ddpm_jax.p_sample_loop
    want = loop(SCHED, EPS, X0.shape, key, num_steps=20, x_T=x_T)
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("sampler", editing.EDIT_SAMPLERS)
def test_sdedit_strength_zero_is_the_identity(sampler):
  got = editing.sdedit(SCHED, EPS, X0, jax.random.key(8), strength=0.0, sampler=sampler,
                       num_steps=20)
  np.testing.assert_array_equal(got, X0)


def test_sdedit_starts_at_its_strength():
  """At strength 0.5, DDIM's edit is the second half of the 20-step chain from x0 noised to
  its 10th timestep: the same as ddim_sample_loop over those timesteps."""
  key = jax.random.key(9)
  got = editing.sdedit(SCHED, EPS, X0, key, strength=0.5, num_steps=20)
  kept = ddpm_jax.space_timesteps(T, 20)[:10]
  x_t = ddpm_jax.q_sample(SCHED, X0, jnp.full((3,), kept[-1]),
                          jax.random.normal(jax.random.fold_in(key, 0), X0.shape))
  want = ddpm_jax.ddim_sample_loop(SCHED, EPS, X0.shape, key, num_steps=None, timesteps=kept,
                                   x_T=x_t)
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert float(jnp.abs(got - X0).mean()) < float(jnp.abs(
      editing.sdedit(SCHED, EPS, X0, key, strength=1.0, num_steps=20) - X0).mean())


# ----------------------------------------------------------------------------- interpolation


def test_slerp():
  a, b = np.array([1.0, 0.0]), np.array([0.0, 2.0])
  out = np.asarray(editing.slerp(a, b, np.array([0.0, 0.5, 1.0])))
  np.testing.assert_allclose(out[0], a, atol=1e-6)
  np.testing.assert_allclose(out[2], b, atol=1e-6)
  # the float64 formula: sin((1 - w) theta) / sin(theta) a + sin(w theta) / sin(theta) b
  np.testing.assert_allclose(out[1], (a + b) * math.sin(math.pi / 4), atol=1e-6)
  same = np.asarray(editing.slerp(a, 3 * a, 0.5))  # parallel: linear interpolation
  np.testing.assert_allclose(same, 2 * a, atol=1e-6)
  z = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  mid = editing.slerp(z[0], z[1], 0.5)  # between Gaussian noises, the norm stays that of noise
  assert abs(float(jnp.linalg.norm(mid)) / math.sqrt(z[0].size) - 1.0) < 0.02


def test_ddim_interpolate_ends_at_the_images():
  x0 = data(2, seed=4)
  path = editing.ddim_interpolate(SCHED, EPS, x0[0], x0[1], num=5, num_steps=100,
                                  clip_denoised=False)
  assert path.shape == (5, H, W, 1)
  np.testing.assert_allclose(path[0], x0[0], atol=0.08)  # rms 0.022 at 100 steps
  np.testing.assert_allclose(path[-1], x0[1], atol=0.08)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call, message", [
    (lambda: editing.repaint_sample_loop(SCHED, EPS, X0, jnp.ones((3, 4)), jax.random.key(0)),
     r"mask of shape \(3, 4\) does not broadcast against the images \(3, 4, 4, 1\)"),
    (lambda: editing.repaint_sample_loop(SCHED, EPS, X0, MASK, jax.random.key(0), num_steps=10),
     r"jump_length=10 leaves no room for a jump in a chain of 10 steps"),
    (lambda: editing.repaint_sample_loop(SCHED, EPS, X0, MASK, jax.random.key(0), jump_length=0),
     r"jump_length must be an integer >= 1, got 0"),
    (lambda: editing.sdedit(SCHED, EPS, X0, jax.random.key(0), strength=1.5, num_steps=10),
     r"strength must be a number in \[0, 1\]"),
    (lambda: editing.sdedit(SCHED, EPS, X0, jax.random.key(0), strength=0.5, num_steps=10,
                            sampler="heun"), r"Unknown sampler 'heun'"),
    (lambda: editing.ddim_invert(SCHED, EPS, X0, num_steps=None), r"ddim_invert needs num_steps"),
    (lambda: editing.slerp(np.ones(3), np.ones(4), 0.5), r"slerp needs a and b of one shape"),
])
def test_bad_input(call, message):
  with pytest.raises(ValueError, match=message):
    call()
