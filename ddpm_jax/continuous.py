"""The discrete schedule in continuous time, for the probability-flow ODE (likelihood.py) and
EDM's sampler (heun.py).

Time t is a float in [0, T-1]: t = i is the discrete timestep i (0-based), and between integer
steps log alpha_bar is interpolated linearly,

    log abar(t) = (1 - f) log abar_i + f log abar_{i+1},    i = floor(t), f = t - i,

so beta(t) = -d log abar / dt is piecewise constant, -log(1 - beta_{i+1}) on (i, i+1): the
continuous process passes through every marginal q(x_i | x_0) of the discrete chain. A model
is called with such a float t (the U-Net's sinusoidal embedding takes it as it is).

VP quantities: alpha = sqrt(abar), sigma = sqrt(1 - abar); EDM's noise level of the scaled
state x / alpha is sigma_edm = sigma / alpha = sqrt((1 - abar) / abar).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax.schedules import Schedule


def log_alpha_bar_table(sched: Schedule) -> jnp.ndarray:
  """log abar_i for i = 0..T-1, float32 [T], summed from log(1 - beta) (no cancellation)."""
  return jnp.cumsum(jnp.log1p(-sched.betas))


def _interval(sched: Schedule, t):
  t = jnp.asarray(t, jnp.float32)
  i = jnp.clip(jnp.floor(t), 0, sched.num_timesteps - 2).astype(jnp.int32)
  return t, i


def log_alpha_bar(sched: Schedule, t) -> jnp.ndarray:
  """log abar(t) for float t (any shape) in [0, T-1], linear between integer steps."""
  table = log_alpha_bar_table(sched)
  t, i = _interval(sched, t)
  return table[i] + (t - i) * (table[i + 1] - table[i])


def beta(sched: Schedule, t) -> jnp.ndarray:
  """-d log abar(t) / dt: -log(1 - beta_{i+1}) on [i, i+1) (the last interval includes T-1)."""
  _, i = _interval(sched, t)
  return -jnp.log1p(-sched.betas[i + 1])


def edm_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
  """float64 sqrt((1 - abar) / abar) of each discrete timestep, increasing with t."""
  abar = np.asarray(alphas_cumprod, np.float64)
  return np.sqrt((1.0 - abar) / abar)


def timestep_of_edm_sigma(betas: np.ndarray, sigma) -> np.ndarray:
  """float64 inverse of sigma_edm(t) under the log-linear abar: t in [0, T-1] (clipped there)."""
  log_abar = np.cumsum(np.log1p(-np.asarray(betas, np.float64)))
  target = -np.log1p(np.asarray(sigma, np.float64) ** 2)  # log abar = -log(1 + sigma^2)
  # log abar decreases with t: interpolate on the reversed (increasing) table.
  return np.interp(target, log_abar[::-1], np.arange(len(log_abar), dtype=np.float64)[::-1])


def eps_and_x0(output, x, alpha, sigma, mean_type: str, var_type: str):
  """(eps, x0) predicted by a model output at x = alpha x0 + sigma eps (alpha, sigma
  broadcastable to x); the variance half of a learned_range output is dropped."""
  out, _ = diffusion.split_model_output(output, x, var_type)
  if mean_type == "eps":
    return out, (x - sigma * out) / alpha
  if mean_type == "x0":
    return (x - alpha * out) / sigma, out
  # v = alpha eps - sigma x0 with alpha^2 + sigma^2 = 1.
  return alpha * out + sigma * x, alpha * x - sigma * out
