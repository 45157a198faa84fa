"""Reverse-process samplers: ancestral (full or respaced), DDIM and (from solvers.py)
DPM-Solver++, each chain one `lax.scan`.

The loops are pure and traceable: wrap them in `jax.jit` with the model function closed over.
The scan body is traced once, so compile time does not grow with the number of steps.

Keys: `key` is one PRNG key, or one key per sample (shape [B]) so that a sample's noise depends
only on its own key, not on the batch it is drawn in. x_T comes from fold_in(key, 0); step i of
the chain draws from fold_in(fold_in(key, 1), i).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion, rng
from ddpm_jax.diffusion import ModelFn
from ddpm_jax.errors import UserError
from ddpm_jax.respace import respace, space_timesteps
from ddpm_jax.schedules import Schedule


# ----------------------------------------------------------------------------- one step


def p_sample(sched: Schedule, model_fn: ModelFn, x_t, t, key, *, mean_type: str = "eps",
             var_type: str = "fixedlarge", clip_denoised: bool = True):
  """Draws x_{t-1} ~ p(x_{t-1} | x_t) for x_t [B, ...], t [B] (or scalar); no noise at t = 0."""
  t = jnp.asarray(t)
  out = diffusion.p_mean_variance(sched, model_fn(x_t, t), x_t, t, mean_type=mean_type,
                                  var_type=var_type, clip_denoised=clip_denoised)
  nonzero = (t != 0).astype(x_t.dtype).reshape(t.shape + (1,) * (x_t.ndim - t.ndim))
  noise = rng.normal(key, x_t.shape, x_t.dtype)
  return out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise


def _ddim_step(sched: Schedule, model_fn: ModelFn, x_t, t, key, *, eta, mean_type, var_type,
               clip_denoised):
  """One DDIM step (Song et al., 2021) on `sched`; eta = 1 gives the posterior's variance."""
  out = diffusion.p_mean_variance(sched, model_fn(x_t, t), x_t, t, mean_type=mean_type,
                                  var_type=var_type, clip_denoised=clip_denoised)
  eps = diffusion.predict_eps_from_x0(sched, x_t, t, out["pred_x0"])
  shape = t.shape + (1,) * (x_t.ndim - t.ndim)
  alpha_bar_prev = sched.alphas_cumprod_prev[t].reshape(shape)
  # sigma^2 = eta^2 (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev) = eta^2 beta~_t.
  sigma = eta * jnp.sqrt(sched.posterior_variance[t]).reshape(shape)
  direction = jnp.sqrt(jnp.maximum(1.0 - alpha_bar_prev - sigma ** 2, 0.0)) * eps
  noise = rng.normal(key, x_t.shape, x_t.dtype)
  return jnp.sqrt(alpha_bar_prev) * out["pred_x0"] + direction + sigma * noise


# ----------------------------------------------------------------------------- chains


def _check_shape(shape) -> tuple:
  if (not isinstance(shape, (tuple, list)) or len(shape) < 2
      or not all(isinstance(s, int) and s >= 1 for s in shape)):
    raise ValueError(f"shape must be a tuple of positive ints [B, ...] such as (16, 32, 32, 3), "
                     f"got {shape!r}.")
  return tuple(shape)


def _respaced(sched: Schedule, model_fn: ModelFn, num_steps, timesteps):
  """(schedule, model_fn) of the chain over the kept timesteps; the model sees the originals."""
  if timesteps is None and num_steps is None:
    return sched, model_fn
  kept = space_timesteps(sched.num_timesteps, num_steps if timesteps is None else timesteps)
  if len(kept) == sched.num_timesteps:
    return sched, model_fn
  kept_j = jnp.asarray(kept)
  return respace(sched, kept), lambda x, i: model_fn(x, kept_j[i])


def _run_chain(step: Callable, x_T, num_steps: int, key, return_trajectory: bool,
               trajectory_stride: int):
  """x_T -> x_0 by `step(x, i, key)` for i = num_steps-1 ... 0 inside lax.scan.

  With return_trajectory, also returns [L, *shape]: x_T, then the state every
  `trajectory_stride` steps, and x_0 last.
  """
  if isinstance(trajectory_stride, bool) or not isinstance(trajectory_stride, int) \
      or trajectory_stride < 1:
    raise ValueError(f"trajectory_stride must be an integer >= 1, got {trajectory_stride!r}.")
  batch = x_T.shape[0]

  def body(x, i):
    return step(x, jnp.full((batch,), i, jnp.int32), rng.fold_in(key, i)), None

  steps = jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32)
  if not return_trajectory:
    return jax.lax.scan(body, x_T, steps)[0]

  def chunk(x, idx):
    x = jax.lax.scan(body, x, idx)[0]
    return x, x

  num_chunks, rest = divmod(num_steps, trajectory_stride)
  x, snapshots = jax.lax.scan(
      chunk, x_T, steps[:num_chunks * trajectory_stride].reshape(num_chunks, trajectory_stride))
  parts = [x_T[None], snapshots]
  if rest:
    x = jax.lax.scan(body, x, steps[num_chunks * trajectory_stride:])[0]
    parts.append(x[None])
  return x, jnp.concatenate(parts)


def p_sample_loop(sched: Schedule, model_fn: ModelFn, shape: Sequence[int], key, *,
                  num_steps: Optional[int] = None, timesteps=None,
                  return_trajectory: bool = False, trajectory_stride: int = 1,
                  mean_type: str = "eps", var_type: str = "fixedlarge",
                  clip_denoised: bool = True):
  """Ancestral sampling x_T ~ N(0, I) -> x_0 of `shape` [B, ...], the whole chain in one scan.

  num_steps < T (or explicit `timesteps`, see respace.space_timesteps) samples the respaced
  chain with its recomputed betas. Returns x_0, or (x_0, trajectory) with return_trajectory.
  """
  diffusion.check_options(mean_type, var_type)
  shape = _check_shape(shape)
  sched_r, model_r = _respaced(sched, model_fn, num_steps, timesteps)

  def step(x, i, k):
    return p_sample(sched_r, model_r, x, i, k, mean_type=mean_type, var_type=var_type,
                    clip_denoised=clip_denoised)

  x_T = rng.normal(rng.fold_in(key, 0), shape)
  return _run_chain(step, x_T, sched_r.num_timesteps, rng.fold_in(key, 1), return_trajectory,
                    trajectory_stride)


def ddim_sample_loop(sched: Schedule, model_fn: ModelFn, shape: Sequence[int], key, *,
                     num_steps: int, timesteps=None, eta: float = 0.0,
                     return_trajectory: bool = False, trajectory_stride: int = 1,
                     mean_type: str = "eps", var_type: str = "fixedlarge",
                     clip_denoised: bool = True):
  """DDIM sampling over num_steps evenly spaced timesteps (or explicit `timesteps`).

  eta = 0 is deterministic given x_T; eta = 1 has the ancestral sampler's fixedsmall variance.
  Returns x_0, or (x_0, trajectory) with return_trajectory.
  """
  diffusion.check_options(mean_type, var_type)
  shape = _check_shape(shape)
  if isinstance(eta, (int, float)) and not eta >= 0:
    raise UserError(f"eta must be >= 0 (0 is deterministic DDIM, 1 ancestral-like), got {eta}.")
  if num_steps is None and timesteps is None:
    raise ValueError("ddim_sample_loop needs num_steps (an integer in [1, T]) or timesteps.")
  sched_r, model_r = _respaced(sched, model_fn, num_steps, timesteps)

  def step(x, i, k):
    return _ddim_step(sched_r, model_r, x, i, k, eta=eta, mean_type=mean_type,
                      var_type=var_type, clip_denoised=clip_denoised)

  x_T = rng.normal(rng.fold_in(key, 0), shape)
  return _run_chain(step, x_T, sched_r.num_timesteps, rng.fold_in(key, 1), return_trajectory,
                    trajectory_stride)
