"""EDM's Heun sampler (ddpm_jax.heun) against EDM's algorithm 1 in float64 NumPy, the exact
denoiser of a Gaussian mixture, and its NFE.

The reference is written in EDM's own variables: data x0 ~ N(mu, std^2) per dimension, the
state x = x0 + sigma n, whose ideal denoiser is D(x; sigma) = mu + std^2 / (std^2 + sigma^2)
(x - mu); the code under test sees only a DDPM eps model of the same data in the VP scale.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax
from ddpm_jax import heun
from tests.test_likelihood import log_abar
from tests.test_solvers import MIX_M, MIX_S, MIX_W, T, _equation_count, w1_to_mixture

MU, STD = np.array([0.3, -0.5, 0.1]), np.array([0.2, 0.5, 0.05])


def gaussian_eps(x, t):
  """Exact eps model of N(MU, diag(STD^2)) data, x [B, 3], int or float t [B]."""
  abar = jnp.exp(log_abar(t))[:, None]
  a, s = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
  return s * (x - a * MU) / (abar * STD ** 2 + s ** 2)


def edm_reference(sigmas, x_start):
  """EDM algorithm 1 (deterministic Heun) in float64 with the ideal denoiser."""
  denoise = lambda x, s: MU + STD ** 2 / (STD ** 2 + s ** 2) * (x - MU)
  x = np.asarray(x_start, np.float64)
  for s, s_next in zip(sigmas[:-1], sigmas[1:]):
    d = (x - denoise(x, s)) / s
    x_next = x + (s_next - s) * d
    if s_next > 0:
      x_next = x + (s_next - s) * 0.5 * (d + (x_next - denoise(x_next, s_next)) / s_next)
    x = x_next
  return x


@pytest.mark.parametrize("discretisation", ["ddpm", "edm"])
def test_equals_edm_algorithm_1_in_float64(discretisation):
  sched = ddpm_jax.make_schedule("linear", T)
  betas = ddpm_jax.get_beta_schedule("linear", T)
  x_T = jax.random.normal(jax.random.key(0), (256, 3))
  for n in (1, 2, 5, 18):
    sigmas = heun.heun_sigmas(betas, n, discretisation)
    got = ddpm_jax.heun_sample_loop(sched, gaussian_eps, x_T.shape, None, num_steps=n, x_T=x_T,
                                    discretisation=discretisation, clip_denoised=False)
    # EDM starts from N(0, sigma_max^2); the DDPM's x_T ~ N(0, I) is at scale sqrt(1 + sigma^2).
    want = edm_reference(sigmas, np.asarray(x_T, np.float64) * np.sqrt(1 + sigmas[0] ** 2))
    # Few steps leave values of ~100 (float32: relative error).
    np.testing.assert_allclose(np.asarray(got), want, rtol=5e-4, atol=2e-4, err_msg=f"{n} steps")


def test_sigmas():
  betas = ddpm_jax.get_beta_schedule("linear", T)
  abar = np.cumprod(1.0 - betas)
  sig = np.sqrt((1 - abar) / abar)
  np.testing.assert_allclose(heun.heun_sigmas(betas, 4), [sig[999], sig[666], sig[333], sig[0], 0])
  edm = heun.heun_sigmas(betas, 18, "edm")
  np.testing.assert_allclose(edm[[0, 17, 18]], [sig[999], sig[0], 0.0], rtol=1e-12)
  # rho = 7: the 7th roots are evenly spaced.
  np.testing.assert_allclose(np.diff(edm[:-1] ** (1 / 7)), np.diff(edm[:2] ** (1 / 7))[0] * np.ones(17),
                             rtol=1e-9)


def mixture_eps(x, t):
  """The exact eps model of 1-D data ~ 0.3 N(-0.6, 0.1^2) + 0.7 N(0.4, 0.1^2), float t."""
  abar = jnp.exp(log_abar(t))[:, None]
  a, s2 = jnp.sqrt(abar), 1.0 - abar
  var = a ** 2 * MIX_S ** 2 + s2
  resp = jax.nn.softmax(jnp.log(MIX_W) - 0.5 * (x - a * MIX_M) ** 2 / var, axis=-1)
  x0 = jnp.sum(resp * (MIX_M + a * MIX_S ** 2 / var * (x - a * MIX_M)), -1, keepdims=True)
  return (x - a * x0) / jnp.sqrt(s2)


def test_reproduces_a_gaussian_mixture_and_converges():
  sched = ddpm_jax.make_schedule("linear", T)
  shape, key = (4000, 1), jax.random.key(0)
  w1 = {}
  for n in (5, 25):
    ddim = ddpm_jax.ddim_sample_loop(sched, mixture_eps, shape, key, num_steps=heun.heun_nfe(n),
                                     clip_denoised=False)
    runs = {k: ddpm_jax.heun_sample_loop(sched, mixture_eps, shape, key, num_steps=n,
                                         clip_denoised=False, **kw)
            for k, kw in (("ddpm", {}), ("edm", {"discretisation": "edm"}),
                          ("churn", {"discretisation": "edm", "churn": 10.0}))}
    w1[n] = {"ddim": w1_to_mixture(ddim), **{k: w1_to_mixture(v) for k, v in runs.items()}}
    print(f"NFE {heun.heun_nfe(n)}: " + ", ".join(f"{k} {v:.4f}" for k, v in w1[n].items()))
  # DDIM at the same NFE is printed for comparison (1-D, sharp modes: not a ranking).
  assert w1[25]["ddpm"] < 0.025 and w1[25]["edm"] < 0.015 and w1[25]["churn"] < 0.03
  for k in ("ddpm", "edm", "churn"):
    assert w1[25][k] < 0.5 * w1[5][k], k  # it converges


def test_nfe_is_2n_minus_1_and_the_chain_is_one_scan():
  sched = ddpm_jax.make_schedule("linear", 50)
  calls = []

  def model(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return 0.1 * x
  for n in (1, 4, 9):
    calls.clear()
    jax.block_until_ready(ddpm_jax.heun_sample_loop(sched, model, (2, 3), jax.random.key(0),
                                                    num_steps=n))
    assert len(calls) == heun.heun_nfe(n) == 2 * n - 1
  count = lambda n: _equation_count(jax.make_jaxpr(lambda k: ddpm_jax.heun_sample_loop(
      sched, model, (2, 3), k, num_steps=n, churn=1.0))(jax.random.key(0)).jaxpr)
  assert count(3) == count(40)


def test_bad_num_steps_names_the_field():
  sched = ddpm_jax.make_schedule("linear", 50)
  with pytest.raises(ddpm_jax.errors.UserError, match="config.sampling.num_steps=51"):
    ddpm_jax.heun_sample_loop(sched, mixture_eps, (2, 1), jax.random.key(0), num_steps=51)
