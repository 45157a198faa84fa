"""EDM's second-order sampler (Karras et al., 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", algorithms 1 and 2) for a DDPM (VP) model, in one `lax.scan`.

EDM writes the probability-flow ODE of the scaled state x = x_vp / sqrt(abar) at noise level
sigma = sqrt((1 - abar) / abar) as dx/dsigma = (x - D(x; sigma)) / sigma, where the denoiser D is
the model's x0 prediction at x_vp = x / sqrt(1 + sigma^2) and the timestep t(sigma) of
continuous.py (log abar linear between integer steps; t is a float only off the grid). Each of
the num_steps steps from sigma_i to sigma_{i+1} is a Heun step (an Euler step corrected by the
slope at its end) except the last one, to sigma = 0, which is Euler: 2 * num_steps - 1 model
evaluations (NFE).

Noise levels: by default the DDPM's own, at round(linspace(T-1, 0, num_steps)) (so the model is
called at integer timesteps only); with discretisation="edm" EDM's rho = 7 spacing between the
DDPM's sigma_max = sigma(T-1) and sigma_min = sigma(0). churn > 0 adds algorithm 2's noise: at
every step with churn_tmin <= sigma_i <= churn_tmax the level is raised to
sigma_hat = sigma_i * (1 + gamma), gamma = min(churn / num_steps, sqrt(2) - 1) (held at or below
sigma_max, the model's range), by fresh noise of std churn_noise * sqrt(sigma_hat^2 - sigma_i^2).
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import continuous, diffusion, rng, solvers
from ddpm_jax.diffusion import ModelFn
from ddpm_jax.errors import UserError
from ddpm_jax.schedules import Schedule

DISCRETISATIONS = ("ddpm", "edm")


def heun_nfe(num_steps: int) -> int:
  """Model evaluations of heun_sample_loop over num_steps noise levels."""
  return 2 * num_steps - 1


def heun_sigmas(betas: np.ndarray, num_steps: int, discretisation: str = "ddpm",
                rho: float = 7.0) -> np.ndarray:
  """float64 [num_steps + 1]: EDM noise levels from sigma(T-1) down, then 0 (module docstring)."""
  all_sigmas = continuous.edm_sigmas(np.cumprod(1.0 - np.asarray(betas, np.float64)))
  if discretisation == "ddpm":
    steps = np.linspace(len(all_sigmas) - 1, 0, num_steps).round().astype(np.int64)
    return np.append(all_sigmas[steps], 0.0)
  hi, lo = all_sigmas[-1] ** (1.0 / rho), all_sigmas[0] ** (1.0 / rho)
  frac = np.arange(num_steps) / max(num_steps - 1, 1)
  return np.append((hi + frac * (lo - hi)) ** rho, 0.0)


def check_heun_options(num_timesteps: int, num_steps, discretisation: str, churn: float) -> None:
  """One UserError naming the config field for a bad num_steps; ValueError for the rest."""
  if (isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer))
      or not 1 <= num_steps <= num_timesteps):
    raise UserError(f"config.sampling.num_steps={num_steps!r} is not a number of Heun steps; "
                    f"accepted: an integer in [1, {num_timesteps}] (the run's num_timesteps).")
  if discretisation not in DISCRETISATIONS:
    raise ValueError(f"discretisation={discretisation!r}; accepted: {', '.join(DISCRETISATIONS)}.")
  if not churn >= 0.0:
    raise ValueError(f"churn={churn!r}; accepted: a number >= 0 (0: deterministic).")


def heun_sample_loop(sched: Schedule, model_fn: ModelFn, shape: Sequence[int], key, *,
                     num_steps: int, x_T: Optional[jnp.ndarray] = None,
                     discretisation: str = "ddpm", rho: float = 7.0, churn: float = 0.0,
                     churn_tmin: float = 0.0, churn_tmax: float = float("inf"),
                     churn_noise: float = 1.0, mean_type: str = "eps",
                     var_type: str = "fixedlarge", clip_denoised: bool = True) -> jnp.ndarray:
  """EDM's Heun sampler over num_steps noise levels (NFE = 2 * num_steps - 1): x_T -> x_0 [B, ...].

  sched must be concrete (closed over, not a jit argument): the noise levels are computed from
  it on the host. x_T: the starting noise of `shape` in the DDPM's own scale, N(0, I) (else
  drawn from fold_in(key, 0) as the other loops do); churn's noise at step i comes from
  fold_in(fold_in(key, 1), i). Deterministic given x_T when churn = 0 (key then unused if x_T
  is given). model_fn(x_vp, t) gets int32 t on the DDPM grid (default, churn = 0), else float32
  t in [0, T-1]. clip_denoised clips every x0 prediction to [-1, 1]; mean_type eps | x0 | v;
  with var_type="learned_range" the mean half of the output is used.
  """
  diffusion.check_options(mean_type, var_type)
  check_heun_options(sched.num_timesteps, num_steps, discretisation, churn)
  shape, x_T = solvers.host_planned_start("heun_sample_loop", sched, shape, key, x_T)
  betas = np.asarray(sched.betas, np.float64)
  sigmas = heun_sigmas(betas, num_steps, discretisation, rho)
  cur, nxt = sigmas[:-1], sigmas[1:]
  gamma = np.where((cur >= churn_tmin) & (cur <= churn_tmax),
                   min(churn / num_steps, np.sqrt(2.0) - 1.0), 0.0)
  hat = np.minimum(cur * (1.0 + gamma), sigmas[0])
  t_hat = continuous.timestep_of_edm_sigma(betas, hat)
  t_next = continuous.timestep_of_edm_sigma(betas, nxt)  # the last (sigma 0) is unused
  on_grid = discretisation == "ddpm" and churn == 0.0
  t_dtype = jnp.int32 if on_grid else jnp.float32
  if on_grid:
    t_hat, t_next = t_hat.round(), t_next.round()
  noise_std = churn_noise * np.sqrt(np.maximum(hat ** 2 - cur ** 2, 0.0))
  batch = shape[0]
  steps = tuple(jnp.asarray(a, jnp.float32) for a in (cur, hat, nxt, t_hat, t_next, noise_std))
  noise_key = rng.fold_in(key, 1) if churn > 0.0 else None

  def denoise(x, sigma, t):
    scale = jax.lax.rsqrt(1.0 + sigma ** 2)  # alpha = sqrt(abar) at this sigma
    x_vp = x * scale
    output = model_fn(x_vp, jnp.full((batch,), t).astype(t_dtype))
    _, x0 = continuous.eps_and_x0(output, x_vp, scale, sigma * scale, mean_type, var_type)
    return jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0

  def body(x, step):
    i, (sigma, sigma_hat, sigma_next, t_hat, t_next, std) = step
    if noise_key is not None:
      x = x + std * rng.normal(rng.fold_in(noise_key, i), x.shape, x.dtype)
    d = (x - denoise(x, sigma_hat, t_hat)) / sigma_hat
    euler = x + (sigma_next - sigma_hat) * d

    def correct(_):
      d_next = (euler - denoise(euler, sigma_next, t_next)) / sigma_next
      return x + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
    return jax.lax.cond(sigma_next > 0.0, correct, lambda _: euler, None), None

  x = x_T * jnp.sqrt(1.0 + steps[0][0] ** 2)
  x, _ = jax.lax.scan(body, x, (jnp.arange(num_steps, dtype=jnp.int32), steps))
  return x
