"""Noise schedules: beta schedules in float64 NumPy and the `Schedule` pytree of constants.

Every constant of the forward process is derived from the betas in float64 and cast to float32
once, so no x64 mode is needed at run time and nothing loses precision to float32 cancellation
(e.g. 1 - alphas_cumprod near t = 0).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import struct

BETA_SCHEDULES = ("linear", "quad", "cosine", "sigmoid", "const", "jsd", "warmup10", "warmup50",
                  "chen_sigmoid")


def _check_num_timesteps(num_timesteps) -> int:
  if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)):
    raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}.")
  if num_timesteps < 1:
    raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps}.")
  return int(num_timesteps)


def _cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal (2021): alpha_bar(u) = cos((u + s) / (1 + s) * pi / 2)^2 on u = t / T."""
  def alpha_bar(u):
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  return np.array([
      min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
      for i in range(num_timesteps)
  ], dtype=np.float64)


def _chen_sigmoid_betas(num_timesteps: int, start: float = -3.0, end: float = 3.0,
                        tau: float = 1.0, max_beta: float = 0.999) -> np.ndarray:
  """Chen (2023), "On the importance of noise scheduling", sigmoid schedule (as
  denoising-diffusion-pytorch's default): alpha_bar(u) = (sigmoid(end / tau) -
  sigmoid((start + u (end - start)) / tau)) / (sigmoid(end / tau) - sigmoid(start / tau)) on
  u = t / T, which falls from 1 to 0; betas capped at max_beta (the last is 1 uncapped)."""
  sig = lambda z: 1.0 / (1.0 + np.exp(-z))
  u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  ac = (sig(end / tau) - sig((start + u * (end - start)) / tau)) / (sig(end / tau) - sig(start / tau))
  return np.minimum(1.0 - ac[1:] / ac[:-1], max_beta)


def _warmup_betas(beta_start, beta_end, num_timesteps, warmup_frac) -> np.ndarray:
  betas = beta_end * np.ones(num_timesteps, dtype=np.float64)
  warmup_time = int(num_timesteps * warmup_frac)
  betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
  return betas


def get_beta_schedule(name: str, num_timesteps: int, *, beta_start: float = 1e-4,
                      beta_end: float = 0.02) -> np.ndarray:
  """The betas of a named schedule, float64 [num_timesteps], index 0 = the paper's t = 1.

  linear, quad, sigmoid, const, jsd, warmup10 and warmup50 are those of the original DDPM code;
  cosine is Nichol & Dhariwal's (s = 0.008, betas capped at 0.999) and chen_sigmoid is Chen
  (2023)'s sigmoid schedule (start -3, end 3, tau 1; see _chen_sigmoid_betas); both ignore
  beta_start/end.
  """
  num_timesteps = _check_num_timesteps(num_timesteps)
  if name == "linear":
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  elif name == "quad":
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
  elif name == "cosine":
    betas = _cosine_betas(num_timesteps)
  elif name == "sigmoid":
    x = np.linspace(-6, 6, num_timesteps, dtype=np.float64)
    betas = (1 / (1 + np.exp(-x))) * (beta_end - beta_start) + beta_start
  elif name == "chen_sigmoid":
    betas = _chen_sigmoid_betas(num_timesteps)
  elif name == "const":
    betas = beta_end * np.ones(num_timesteps, dtype=np.float64)
  elif name == "jsd":  # 1/T, 1/(T-1), ..., 1
    betas = 1.0 / np.linspace(num_timesteps, 1, num_timesteps, dtype=np.float64)
  elif name == "warmup10":
    betas = _warmup_betas(beta_start, beta_end, num_timesteps, 0.1)
  elif name == "warmup50":
    betas = _warmup_betas(beta_start, beta_end, num_timesteps, 0.5)
  else:
    raise ValueError(f"Unknown beta schedule {name!r}; accepted: {', '.join(BETA_SCHEDULES)}.")
  return betas


def _check_betas(betas) -> np.ndarray:
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 1:
    raise ValueError(f"betas must be a 1-D array of at least one value, got shape {betas.shape}.")
  # beta = 1 exactly is allowed, as in the original code: it is jsd's last step (x_T carries no
  # signal). Anything outside (0, 1] is not a variance-preserving diffusion step.
  bad = ~((betas > 0) & (betas <= 1))
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f"betas must lie in (0, 1], got betas[{i}] = {float(betas[i])!r}.")
  return betas


@struct.dataclass
class Schedule:
  """Constants of the forward process q(x_t | x_0), float32 arrays of shape [T].

  Index t is 0-based: t = 0 is the paper's t = 1. `alphas_cumprod_prev[0] = 1`.
  `posterior_log_variance_clipped[0]` uses posterior_variance[1], since the posterior variance at
  t = 0 is 0 (as in the original code).
  """
  betas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  alphas_cumprod_prev: jnp.ndarray
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray
  log_one_minus_alphas_cumprod: jnp.ndarray
  sqrt_recip_alphas_cumprod: jnp.ndarray
  sqrt_recipm1_alphas_cumprod: jnp.ndarray
  posterior_variance: jnp.ndarray
  posterior_log_variance_clipped: jnp.ndarray
  posterior_mean_coef1: jnp.ndarray
  posterior_mean_coef2: jnp.ndarray

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]

  @classmethod
  def from_betas(cls, betas) -> "Schedule":
    """Builds every constant from betas in (0, 1], computed in float64 and cast to float32."""
    betas = _check_betas(betas)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    with np.errstate(divide="ignore", invalid="ignore"):  # inf/nan only where beta = 1 makes them so
      # 1 - alphas_cumprod without cancellation near t = 0, where it is of order beta_1.
      one_minus_ac = -np.expm1(np.cumsum(np.log1p(-betas)))
      posterior_variance = betas * (1.0 - ac_prev) / one_minus_ac
      # The posterior variance is 0 at t = 0; its log is clipped to the value at t = 1.
      first = posterior_variance[1] if len(betas) > 1 else betas[0]
      fields = dict(
          betas=betas,
          alphas_cumprod=ac,
          alphas_cumprod_prev=ac_prev,
          sqrt_alphas_cumprod=np.sqrt(ac),
          sqrt_one_minus_alphas_cumprod=np.sqrt(one_minus_ac),
          log_one_minus_alphas_cumprod=np.log(one_minus_ac),
          sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
          sqrt_recipm1_alphas_cumprod=np.sqrt(one_minus_ac / ac),
          posterior_variance=posterior_variance,
          posterior_log_variance_clipped=np.log(np.append(first, posterior_variance[1:])),
          posterior_mean_coef1=betas * np.sqrt(ac_prev) / one_minus_ac,
          posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / one_minus_ac,
      )
    return cls(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in fields.items()})


def make_schedule(name: str, num_timesteps: int = 1000, **kwargs) -> Schedule:
  """`Schedule.from_betas(get_beta_schedule(name, num_timesteps, **kwargs))`."""
  return Schedule.from_betas(get_beta_schedule(name, num_timesteps, **kwargs))
