"""DPM-Solver++ (ddpm_jax.solvers) against diffusers, exact denoisers, DDIM, and sample().

References: tests/fixtures/dpm_solver_reference.npz, diffusers' DPMSolverMultistepScheduler run
on the exact model of Gaussian data (written by benchmarks/dpm_solver_reference.py); the exact
denoiser of a two-mode Gaussian mixture and its CDF; DDIM (eta = 0) on the same timesteps;
Imagen's thresholding written in NumPy.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtr

import ddpm_jax
from ddpm_jax import from_run, generate, settings
from ddpm_jax.errors import UserError
from tests.test_loop import random_params, smoke_config

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "dpm_solver_reference.npz")
T = 1000


def abar64(schedule):
  return np.cumprod(1.0 - ddpm_jax.get_beta_schedule(schedule, T))


def gaussian_model(schedule, mu, std, prediction):
  """The exact eps / v / x0 model of N(mu, diag(std^2)) data, x [B, D], t [B]."""
  abar = jnp.asarray(abar64(schedule), jnp.float32)

  def model(x, t):
    a, s = jnp.sqrt(abar[t])[:, None], jnp.sqrt(1.0 - abar[t])[:, None]
    x0 = mu + a * std ** 2 / (a ** 2 * std ** 2 + s ** 2) * (x - a * mu)
    eps = (x - a * x0) / s
    return {"eps": eps, "v": a * eps - s * x0, "x0": x0}[prediction]
  return model


@pytest.fixture(scope="module")
def reference():
  with np.load(FIXTURE) as f:
    return {k: f[k] for k in f.files}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_equals_diffusers_dpmsolver_plus_plus(reference, schedule, prediction):
  np.testing.assert_allclose(abar64(schedule), reference[f"alphas_cumprod_{schedule}"],
                             rtol=2e-5)
  mu, std, x_T = (jnp.asarray(reference[k], jnp.float32) for k in ("mu", "std", "x_T"))
  model = gaussian_model(schedule, mu, std, prediction)
  sched = ddpm_jax.make_schedule(schedule, T)
  for n in (10, 20, 50):
    np.testing.assert_array_equal(ddpm_jax.dpm_solver_timesteps(T, n), reference[f"timesteps_{n}"])
    for k in (1, 2, 3):
      got = ddpm_jax.dpm_solver_sample_loop(sched, model, x_T.shape, None, num_steps=n, order=k,
                                            x_T=x_T, mean_type=prediction, clip_denoised=False)
      want = reference[f"x0_{schedule}_{prediction}_o{k}_n{n}"]
      np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-3,
                                 err_msg=f"order {k}, {n} steps")


# ----------------------------------------------------------------------------- exact answer

MIX_W, MIX_M, MIX_S = np.array([0.3, 0.7]), np.array([-0.6, 0.4]), 0.1


def mixture_eps_model(abar):
  """The exact eps-predictor of 1-D data ~ 0.3 N(-0.6, 0.1^2) + 0.7 N(0.4, 0.1^2): x [B, 1]."""
  abar = jnp.asarray(abar, jnp.float32)

  def model(x, t):
    a, s2 = jnp.sqrt(abar[t])[:, None], (1.0 - abar[t])[:, None]
    var = a ** 2 * MIX_S ** 2 + s2
    resp = jax.nn.softmax(jnp.log(MIX_W) - 0.5 * (x - a * MIX_M) ** 2 / var, axis=-1)
    x0 = jnp.sum(resp * (MIX_M + a * MIX_S ** 2 / var * (x - a * MIX_M)), -1, keepdims=True)
    return (x - a * x0) / jnp.sqrt(s2)
  return model


def w1_to_mixture(samples):
  """1-Wasserstein distance = the integral of |F_samples - F_mixture| (on a fine grid)."""
  grid = np.linspace(-2.0, 2.0, 20001)
  xs = np.sort(np.asarray(samples).ravel())
  empirical = np.searchsorted(xs, grid, side="right") / len(xs)
  exact = sum(w * ndtr((grid - m) / MIX_S) for w, m in zip(MIX_W, MIX_M))
  return np.trapezoid(np.abs(empirical - exact), grid)


def test_closer_to_a_gaussian_mixture_than_ddim_at_10_steps():
  sched = ddpm_jax.make_schedule("linear", T)
  model = mixture_eps_model(abar64("linear"))
  shape, key = (4000, 1), jax.random.key(0)
  distances = {}
  for n in (10, 20, 50):
    ddim = ddpm_jax.ddim_sample_loop(sched, model, shape, key, num_steps=n, clip_denoised=False)
    dpm = ddpm_jax.dpm_solver_sample_loop(sched, model, shape, key, num_steps=n, order=2,
                                          clip_denoised=False)
    distances[n] = (w1_to_mixture(ddim), w1_to_mixture(dpm))
    print(f"{n} steps: W1 DDIM {distances[n][0]:.4f}, DPM-Solver++(2) {distances[n][1]:.4f}")
  assert distances[10][1] < 0.85 * distances[10][0]
  assert distances[50][1] < 0.5 * distances[10][1]  # it converges


# ----------------------------------------------------------------------------- consistency


def test_order_1_is_ddim_eta0_on_the_same_timesteps_and_learned_range_uses_the_mean():
  sched = ddpm_jax.make_schedule("linear", T)
  model = mixture_eps_model(abar64("linear"))
  shape, key = (64, 1), jax.random.key(1)
  for n in (1, 7):
    dpm = ddpm_jax.dpm_solver_sample_loop(sched, model, shape, key, num_steps=n, order=1)
    ddim = ddpm_jax.ddim_sample_loop(sched, model, shape, key, eta=0.0, num_steps=None,
                                     timesteps=ddpm_jax.dpm_solver_timesteps(T, n))
    np.testing.assert_allclose(np.asarray(dpm), np.asarray(ddim), rtol=0, atol=2e-5)
  garbage = lambda x, t: jnp.concatenate([model(x, t), 1e3 * jnp.ones_like(x)], axis=-1)
  plain = ddpm_jax.dpm_solver_sample_loop(sched, model, shape, key, num_steps=10, order=3)
  learned = ddpm_jax.dpm_solver_sample_loop(sched, garbage, shape, key, num_steps=10, order=3,
                                            var_type="learned_range")
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(learned))


def test_num_steps_up_to_T_gives_distinct_timesteps_and_finite_samples():
  """At num_steps = T the rounded linspace grid repeats a timestep; a repeated timestep is a
  zero-length step with NaN coefficients, so the repeat is dropped (as diffusers does)."""
  for t_total in (10, 100, 1000):
    for n in range(max(1, t_total - 3), t_total + 1):
      ts = ddpm_jax.dpm_solver_timesteps(t_total, n)
      assert np.all(np.diff(ts) < 0) and ts[0] == t_total - 1 and ts[-1] > 0, (t_total, n)
      assert len(ts) == min(n, t_total - 1), (t_total, n, len(ts))
  sched = ddpm_jax.make_schedule("linear", 10)
  model = lambda x, t: 0.1 * x
  shape, key = (8, 1), jax.random.key(2)
  full = ddpm_jax.dpm_solver_sample_loop(sched, model, shape, key, num_steps=10, order=2)
  assert np.all(np.isfinite(np.asarray(full)))
  np.testing.assert_array_equal(np.asarray(full), np.asarray(ddpm_jax.dpm_solver_sample_loop(
      sched, model, shape, key, num_steps=9, order=2)))


def _equation_count(jaxpr) -> int:
  count = 0
  for eqn in jaxpr.eqns:
    count += 1
    for param in eqn.params.values():
      if isinstance(param, jax.extend.core.ClosedJaxpr):
        count += _equation_count(param.jaxpr)
  return count


def test_jaxpr_size_does_not_depend_on_num_steps():
  sched = ddpm_jax.make_schedule("linear", T)
  model = mixture_eps_model(abar64("linear"))
  sizes = {n: _equation_count(jax.make_jaxpr(lambda k: ddpm_jax.dpm_solver_sample_loop(
      sched, model, (4, 1), k, num_steps=n, order=3))(jax.random.key(0)).jaxpr)
           for n in (5, 50, 500)}
  assert len(set(sizes.values())) == 1, sizes


def test_dynamic_threshold_is_imagens():
  x0 = np.random.default_rng(0).normal(0.0, 1.2, (5, 4, 4, 3)).astype(np.float32)
  x0[0] *= 0.3  # a sample within [-1, 1]: s = 1, plain clipping
  for ratio, max_value in ((0.995, 1.5), (0.9, 10.0)):
    s = np.quantile(np.abs(x0.reshape(5, -1)), ratio, axis=1)
    s = np.clip(s, 1.0, max_value)[:, None, None, None]
    want = np.clip(x0, -s, s) / s
    np.testing.assert_allclose(np.asarray(ddpm_jax.dynamic_threshold(jnp.asarray(x0), ratio,
                                                                     max_value)),
                               want, rtol=1e-6, atol=1e-6)
  # With max 1 it is clip_denoised.
  sched = ddpm_jax.make_schedule("linear", 50)
  model = lambda x, t: 0.5 * x  # predicts x0 outside [-1, 1] early on
  kw = dict(num_steps=8, order=2)
  clipped = ddpm_jax.dpm_solver_sample_loop(sched, model, (3, 2, 2, 1), jax.random.key(0), **kw)
  thresholded = ddpm_jax.dpm_solver_sample_loop(sched, model, (3, 2, 2, 1), jax.random.key(0),
                                                thresholding=True, thresholding_max=1.0, **kw)
  np.testing.assert_array_equal(np.asarray(clipped), np.asarray(thresholded))


# ----------------------------------------------------------------------------- sample()


@pytest.fixture(scope="module")
def conditional():
  """A class-conditional smoke config (20 timesteps) and random params (not the UNet's init:
  its zero output layer predicts eps = 0, for which every solver order is exact)."""
  config = smoke_config(**{"model.num_classes": 3, "sampling.sampler": "dpm_solver",
                           "sampling.num_steps": 6, "sampling.order": 3,
                           "sampling.guidance_scale": 1.5, "sampling.batch_size": 8})
  model, params = random_params(config)
  return config, model, params


def test_sample_with_guidance_is_the_loop_on_1_and_8_devices(conditional):
  config, model, params = conditional
  key = jax.random.PRNGKey(4)
  eight = ddpm_jax.sample(params, key, config=config, num_samples=8)
  one = ddpm_jax.sample(params, key, config=config, num_samples=8, devices=jax.local_devices()[:1])
  np.testing.assert_allclose(np.asarray(eight), np.asarray(one), rtol=0, atol=2e-5)
  labels = from_run.sample_labels(config, key, np.arange(8))
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(8))
  sched = settings.Settings.from_config(config).diffusion.make_schedule()
  guided = from_run.guided_model_fn(model, params, jnp.asarray(labels), 1.5)
  loop = lambda order: np.clip(np.asarray(ddpm_jax.dpm_solver_sample_loop(
      sched, guided, (8, 8, 8, 1), keys, num_steps=6, order=order)), -1, 1)
  want = loop(3)
  np.testing.assert_allclose(np.asarray(eight), want, atol=1e-5)
  # config.sampling.order reached the solver: order 2 gives other images.
  assert np.abs(loop(2) - want).max() > 1e-3


def test_mode_sample_writes_the_same_images_into_a_directory_named_by_the_order(conditional,
                                                                               tmp_path):
  config, _, params = conditional
  directory = generate.generate(config, str(tmp_path), num_samples=8, step=0, params=params)
  assert directory.name == "00000000_dpm_solver6_cfg1.5_order3"
  images, labels = generate.read_samples(directory, 8)
  want = ddpm_jax.sample(params, generate.sample_key(config), config=config, num_samples=8)
  np.testing.assert_array_equal(images, np.round((np.asarray(want) + 1) * 127.5).astype(np.uint8))
  manifest = json.loads((directory / generate.MANIFEST).read_text())
  assert manifest["order"] == 3 and manifest["thresholding"] is False


@pytest.mark.parametrize("field,value,message", [
    ("sampling.order", 4, "config.sampling.order=4"),
    ("sampling.order", 0, "config.sampling.order=0"),
    ("sampling.num_steps", 21, "num_steps"),
    ("sampling.thresholding_ratio", 1.5, "config.sampling.thresholding_ratio=1.5"),
    ("sampling.thresholding_max", 0.5, "config.sampling.thresholding_max=0.5"),
])
def test_bad_settings_get_one_sentence(conditional, field, value, message):
  _, _, params = conditional
  config = smoke_config(**{"model.num_classes": 3, "sampling.sampler": "dpm_solver",
                           field: value})
  with pytest.raises(ValueError, match=message):
    ddpm_jax.sample(params, jax.random.PRNGKey(0), config=config, num_samples=1)


def test_bad_loop_inputs_and_thresholding_with_another_sampler(conditional):
  sched = ddpm_jax.make_schedule("linear", 20)
  model = lambda x, t: x
  for kw, message in (({"num_steps": 0}, r"num_steps=0 .*\[1, 20\]"),
                      ({"num_steps": 21}, r"num_steps=21 .*\[1, 20\]"),
                      ({"num_steps": 5, "order": 4}, r"order=4 .*1, 2 or 3"),
                      ({"num_steps": 5, "order": True}, "order=True"),
                      ({"num_steps": 5, "order": 2.0}, "order=2.0")):
    with pytest.raises(UserError, match=message):
      ddpm_jax.dpm_solver_sample_loop(sched, model, (1, 2), jax.random.key(0), **kw)
  _, _, params = conditional
  bad = smoke_config(**{"model.num_classes": 3, "sampling.sampler": "ddim",
                        "sampling.thresholding": True})
  with pytest.raises(UserError, match="config.sampling.thresholding=True.*dpm_solver"):
    ddpm_jax.sample(params, jax.random.PRNGKey(0), config=bad, num_samples=1)
