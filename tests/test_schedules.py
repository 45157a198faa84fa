"""Beta schedules and the Schedule pytree against float64 formulas written from the papers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax
from tests import references as ref

T = 1000
B0, B1 = 1e-4, 0.02


def expected_betas(name, T, b0=B0, b1=B1):
  i = np.arange(T, dtype=np.float64)
  if name == "linear":
    return b0 + (b1 - b0) * i / (T - 1)
  if name == "quad":
    return (math.sqrt(b0) + (math.sqrt(b1) - math.sqrt(b0)) * i / (T - 1)) ** 2
  if name == "cosine":  # Nichol & Dhariwal eq. 17, betas capped at 0.999
    f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.minimum(1 - f(i + 1) / f(i), 0.999)
  if name == "sigmoid":
    return b0 + (b1 - b0) / (1 + np.exp(-(-6 + 12 * i / (T - 1))))
  if name == "chen_sigmoid":  # Chen (2023) Algorithm 1's sigmoid gamma(u), start -3, end 3, tau 1
    g = lambda u: 1 / (1 + np.exp(-(-3 + 6 * u)))
    abar = lambda u: (g(1.0) - g(u)) / (g(1.0) - g(0.0))
    return np.minimum(1 - abar((i + 1) / T) / abar(i / T), 0.999)
  if name == "const":
    return np.full(T, b1)
  if name == "jsd":  # 1/T, 1/(T-1), ..., 1
    return 1.0 / (T - i)
  frac = {"warmup10": 0.1, "warmup50": 0.5}[name]
  n = int(T * frac)
  return np.where(i < n, b0 + (b1 - b0) * i / max(n - 1, 1), b1)


@pytest.mark.parametrize("name", ddpm_jax.schedules.BETA_SCHEDULES)
@pytest.mark.parametrize("num_timesteps", [T, 37])
def test_beta_schedules(name, num_timesteps):
  betas = ddpm_jax.get_beta_schedule(name, num_timesteps, beta_start=B0, beta_end=B1)
  assert betas.dtype == np.float64 and betas.shape == (num_timesteps,)
  np.testing.assert_allclose(betas, expected_betas(name, num_timesteps), rtol=1e-12, atol=0)


def test_schedule_endpoints():
  betas = ddpm_jax.get_beta_schedule("linear", T)
  assert betas[0] == B0 and betas[-1] == pytest.approx(B1, rel=1e-15)
  cos = ddpm_jax.get_beta_schedule("cosine", T)
  assert cos.max() == 0.999 and cos[-1] == 0.999  # the cap bites at the last step
  assert ddpm_jax.get_beta_schedule("jsd", 10)[-1] == 1.0


@pytest.mark.parametrize("name", ["linear", "cosine", "quad", "jsd", "warmup10"])
def test_schedule_fields_match_paper(name):
  betas = ddpm_jax.get_beta_schedule(name, T)
  sched = ddpm_jax.make_schedule(name, T)
  want = ref.schedule(betas)
  assert sched.num_timesteps == T
  fields = [f for f in sched.__dataclass_fields__]
  assert sorted(fields) == sorted(want)
  for field in fields:
    got = getattr(sched, field)
    assert got.dtype == jnp.float32 and got.shape == (T,), field
    # float32 holds each constant to its own precision: ~1 ulp of float32 relative error.
    np.testing.assert_allclose(np.asarray(got, np.float64), want[field].astype(np.float32),
                               rtol=2e-7, atol=0, err_msg=field)


def test_one_minus_alphas_cumprod_keeps_precision_near_t0():
  # 1 - abar_0 = beta_0 = 1e-4: a float32 subtraction would lose ~3 digits here.
  sched = ddpm_jax.make_schedule("linear", T)
  assert float(sched.sqrt_one_minus_alphas_cumprod[0]) == pytest.approx(math.sqrt(B0), rel=1e-7)
  assert float(sched.log_one_minus_alphas_cumprod[0]) == pytest.approx(math.log(B0), rel=1e-7)


def test_single_step_schedule():
  sched = ddpm_jax.Schedule.from_betas([0.3])
  assert sched.num_timesteps == 1
  assert float(sched.posterior_variance[0]) == 0.0
  assert float(sched.posterior_log_variance_clipped[0]) == pytest.approx(math.log(0.3), rel=1e-6)
  assert float(sched.posterior_mean_coef1[0]) == pytest.approx(1.0)
  assert float(sched.posterior_mean_coef2[0]) == 0.0


def test_schedule_is_a_pytree_for_jit():
  sched = ddpm_jax.make_schedule("linear", 10)
  assert len(jax.tree_util.tree_leaves(sched)) == 12
  doubled = jax.jit(lambda s: jax.tree_util.tree_map(lambda a: 2 * a, s))(sched)
  np.testing.assert_allclose(doubled.betas, 2 * sched.betas)


@pytest.mark.parametrize("call, message", [
    (lambda: ddpm_jax.get_beta_schedule("cosin", 10), r"Unknown beta schedule 'cosin'; accepted: linear, quad, cosine"),
    (lambda: ddpm_jax.make_schedule("linear", 0), r"num_timesteps must be an integer >= 1, got 0"),
    (lambda: ddpm_jax.make_schedule("linear", 10.0), r"num_timesteps must be an integer >= 1, got 10.0"),
    (lambda: ddpm_jax.Schedule.from_betas([0.1, 0.0]), r"betas must lie in \(0, 1\], got betas\[1\] = 0.0"),
    (lambda: ddpm_jax.Schedule.from_betas([0.1, 1.5]), r"betas\[1\] = 1.5"),
    (lambda: ddpm_jax.Schedule.from_betas([-0.1]), r"betas\[0\] = -0.1"),
    (lambda: ddpm_jax.Schedule.from_betas([0.1, float("nan")]), r"betas\[1\] = nan"),
    (lambda: ddpm_jax.Schedule.from_betas(np.full((2, 2), 0.1)), r"1-D array .* shape \(2, 2\)"),
    (lambda: ddpm_jax.make_schedule("linear", 10, beta_start=-1e-4), r"betas must lie in \(0, 1\]"),
])
def test_bad_schedules(call, message):
  with pytest.raises(ValueError, match=message):
    call()
