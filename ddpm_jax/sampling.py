"""Reverse-process samplers: ancestral (full or respaced) and DDIM, each chain one `lax.scan`.

The loops are pure and traceable: wrap them in `jax.jit` with the model function closed over.
The scan body is traced once, so compile time does not grow with the number of steps.

Keys: `key` is one PRNG key, or one key per sample (shape [B]) so that a sample's noise depends
only on its own key, not on the batch it is drawn in. x_T comes from fold_in(key, 0); step i of
the chain draws from fold_in(fold_in(key, 1), i).
"""
from __future__ import annotations

import functools
import json
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax.diffusion import ModelFn
from ddpm_jax.respace import respace, space_timesteps
from ddpm_jax.schedules import Schedule, make_schedule
from ddpm_jax.unet import UNet

SAMPLERS = ("ancestral", "ddim")


# ----------------------------------------------------------------------------- keys


def _is_key_batch(key) -> bool:
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key.ndim == 1
  return key.ndim == 2  # raw uint32 keys: [2] for one key, [B, 2] for a batch


def _fold_in(key, data):
  if _is_key_batch(key):
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, data)
  return jax.random.fold_in(key, data)


def _normal(key, shape, dtype=jnp.float32):
  """Standard normal noise of `shape`; with a key batch, row b is drawn from key[b] alone."""
  if _is_key_batch(key):
    if key.shape[0] != shape[0]:
      raise ValueError(f"A batch of {key.shape[0]} keys cannot draw {shape[0]} samples; pass one "
                       "key or one key per sample.")
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(key)
  return jax.random.normal(key, shape, dtype)


# ----------------------------------------------------------------------------- one step


def p_sample(sched: Schedule, model_fn: ModelFn, x_t, t, key, *, mean_type: str = "eps",
             var_type: str = "fixedlarge", clip_denoised: bool = True):
  """Draws x_{t-1} ~ p(x_{t-1} | x_t) for x_t [B, ...], t [B] (or scalar); no noise at t = 0."""
  t = jnp.asarray(t)
  out = diffusion.p_mean_variance(sched, model_fn(x_t, t), x_t, t, mean_type=mean_type,
                                  var_type=var_type, clip_denoised=clip_denoised)
  nonzero = (t != 0).astype(x_t.dtype).reshape(t.shape + (1,) * (x_t.ndim - t.ndim))
  noise = _normal(key, x_t.shape, x_t.dtype)
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
  noise = _normal(key, x_t.shape, x_t.dtype)
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
    return step(x, jnp.full((batch,), i, jnp.int32), _fold_in(key, i)), None

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

  x_T = _normal(_fold_in(key, 0), shape)
  return _run_chain(step, x_T, sched_r.num_timesteps, _fold_in(key, 1), return_trajectory,
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
    raise ValueError(f"eta must be >= 0 (0 is deterministic DDIM, 1 ancestral-like), got {eta}.")
  if num_steps is None and timesteps is None:
    raise ValueError("ddim_sample_loop needs num_steps (an integer in [1, T]) or timesteps.")
  sched_r, model_r = _respaced(sched, model_fn, num_steps, timesteps)

  def step(x, i, k):
    return _ddim_step(sched_r, model_r, x, i, k, eta=eta, mean_type=mean_type,
                      var_type=var_type, clip_denoised=clip_denoised)

  x_T = _normal(_fold_in(key, 0), shape)
  return _run_chain(step, x_T, sched_r.num_timesteps, _fold_in(key, 1), return_trajectory,
                    trajectory_stride)


# ----------------------------------------------------------------------------- research entry point


def schedule_from_config(config) -> Schedule:
  """The run's Schedule from config.diffusion."""
  d = config.diffusion
  return make_schedule(d.beta_schedule, d.num_timesteps, beta_start=d.beta_start,
                       beta_end=d.beta_end)


@functools.lru_cache(maxsize=16)
def _compiled_sampler(config_json: str, sampler: str, num_steps: int, eta: float,
                      per_device: int, devices: tuple):
  """A pmapped chain for one (config, sampler) over `devices`, compiled once and cached."""
  config = ml_collections.ConfigDict(json.loads(config_json))
  model = UNet(**_model_kwargs(config))
  sched = schedule_from_config(config)
  d, s = config.diffusion, config.sampling
  shape = (per_device, config.data.image_size, config.data.image_size, config.data.num_channels)
  common = dict(mean_type=d.mean_type, var_type=d.var_type, clip_denoised=s.clip_denoised)

  def chain(params, keys):
    model_fn = lambda x, t: model.apply({"params": params}, x, t, train=False)
    if sampler == "ddim":
      return ddim_sample_loop(sched, model_fn, shape, keys, num_steps=num_steps, eta=eta, **common)
    steps = None if num_steps == sched.num_timesteps else num_steps
    return p_sample_loop(sched, model_fn, shape, keys, num_steps=steps, **common)

  return jax.pmap(chain, in_axes=(None, 0), devices=list(devices))


def _model_kwargs(config) -> dict:
  kwargs = dict(config.model)
  for k in ("ch_mult", "attn_resolutions"):  # JSON turns tuples into lists
    kwargs[k] = tuple(kwargs[k])
  return kwargs


def sample(params, key, *, config=None, num_samples: Optional[int] = None,
           sampler: Optional[str] = None, num_steps: Optional[int] = None,
           eta: Optional[float] = None) -> jnp.ndarray:
  """Draws images from a trained model: float32 [num_samples, S, S, C] in [-1, 1].

  params: the (EMA) parameters, e.g. from `ddpm_jax.load(workdir)`; config: that run's config.
  sampler ("ancestral" | "ddim"), num_steps and eta default to config.sampling. Sample i's noise
  comes from fold_in(key, i) alone, so the same key gives the same samples on any device count.
  The batch is spread over all local devices, config.sampling.batch_size samples per call.
  """
  if config is None:
    raise ValueError("sample() needs the run's config: pass config=..., as returned with the "
                     "params by `params, config = ddpm_jax.load(workdir)`.")
  s = config.sampling
  sampler = s.sampler if sampler is None else sampler
  diffusion.check_choice("sampler", sampler, SAMPLERS)
  num_steps = s.num_steps if num_steps is None else num_steps
  T = config.diffusion.num_timesteps
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= T:
    raise ValueError(f"num_steps must be an integer in [1, {T}] (the run's num_timesteps), "
                     f"got {num_steps!r}.")
  num_samples = s.num_samples if num_samples is None else num_samples
  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}.")
  eta = s.eta if eta is None else float(eta)

  devices = tuple(jax.local_devices())
  per_device = max(1, min(s.batch_size, num_samples) // len(devices))
  per_call = per_device * len(devices)
  run = _compiled_sampler(config.to_json(), sampler, num_steps, eta, per_device, devices)
  images = []
  for start in range(0, num_samples, per_call):
    index = jnp.arange(start, start + per_call)  # past num_samples: padding, dropped below
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, index)
    out = run(params, keys.reshape((len(devices), per_device) + keys.shape[1:]))
    images.append(np.asarray(out).reshape((per_call,) + out.shape[2:]))
  return jnp.asarray(np.concatenate(images)[:num_samples])
