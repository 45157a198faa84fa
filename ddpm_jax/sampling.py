"""Reverse-process samplers: ancestral (full or respaced), DDIM and (from solvers.py)
DPM-Solver++, each chain one `lax.scan`.

The loops are pure and traceable: wrap them in `jax.jit` with the model function closed over.
The scan body is traced once, so compile time does not grow with the number of steps.

Keys: `key` is one PRNG key, or one key per sample (shape [B]) so that a sample's noise depends
only on its own key, not on the batch it is drawn in. x_T comes from fold_in(key, 0); step i of
the chain draws from fold_in(fold_in(key, 1), i).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import checkpoint, diffusion, placement, rng, settings, solvers
from ddpm_jax.diffusion import ModelFn
from ddpm_jax.errors import UserError
from ddpm_jax.respace import respace, space_timesteps
from ddpm_jax.schedules import Schedule
from ddpm_jax.settings import ChainSettings, DiffusionSettings, ModelSettings
from ddpm_jax.unet import UNet

SAMPLERS = settings.SAMPLERS


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


def start_noise(key, shape: tuple, x_T=None):
  """x_T of a chain: the given one (checked against `shape`), else N(0, I) from fold_in(key, 0)."""
  if x_T is None:
    return rng.normal(rng.fold_in(key, 0), shape)
  if tuple(x_T.shape) != tuple(shape):
    raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape is {tuple(shape)}.")
  return jnp.asarray(x_T, jnp.float32)


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
                  num_steps: Optional[int] = None, timesteps=None, x_T=None,
                  return_trajectory: bool = False, trajectory_stride: int = 1,
                  mean_type: str = "eps", var_type: str = "fixedlarge",
                  clip_denoised: bool = True):
  """Ancestral sampling x_T ~ N(0, I) -> x_0 of `shape` [B, ...], the whole chain in one scan.

  num_steps < T (or explicit `timesteps`, see respace.space_timesteps) samples the respaced
  chain with its recomputed betas. x_T: the starting noise of `shape` (default: drawn from
  fold_in(key, 0)). Returns x_0, or (x_0, trajectory) with return_trajectory.
  """
  diffusion.check_options(mean_type, var_type)
  shape = _check_shape(shape)
  sched_r, model_r = _respaced(sched, model_fn, num_steps, timesteps)

  def step(x, i, k):
    return p_sample(sched_r, model_r, x, i, k, mean_type=mean_type, var_type=var_type,
                    clip_denoised=clip_denoised)

  x_T = start_noise(key, shape, x_T)
  return _run_chain(step, x_T, sched_r.num_timesteps, rng.fold_in(key, 1), return_trajectory,
                    trajectory_stride)


def ddim_sample_loop(sched: Schedule, model_fn: ModelFn, shape: Sequence[int], key, *,
                     num_steps: int, timesteps=None, eta: float = 0.0, x_T=None,
                     return_trajectory: bool = False, trajectory_stride: int = 1,
                     mean_type: str = "eps", var_type: str = "fixedlarge",
                     clip_denoised: bool = True):
  """DDIM sampling over num_steps evenly spaced timesteps (or explicit `timesteps`).

  eta = 0 is deterministic given x_T; eta = 1 has the ancestral sampler's fixedsmall variance.
  x_T: the starting noise of `shape` (default: drawn from fold_in(key, 0)). Returns x_0, or (x_0, trajectory) with return_trajectory.
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

  x_T = start_noise(key, shape, x_T)
  return _run_chain(step, x_T, sched_r.num_timesteps, rng.fold_in(key, 1), return_trajectory,
                    trajectory_stride)


# ----------------------------------------------------------------------------- research entry point


def guided_model_fn(model: UNet, params, labels, guidance_scale: float) -> ModelFn:
  """model_fn(x_t, t) of a trained UNet, with class labels and classifier-free guidance.

  labels: int [B] (num_classes is the null label) or None (unconditional models, or the null
  label of a conditional one). guidance_scale w (Ho & Salimans, 2022, eq. 6): the mean output
  becomes (1 + w) * out(x, y) - w * out(x, null); w = 0 is the plain conditional model and
  costs one forward pass per step, w != 0 two (run as one doubled batch). A learned variance
  is taken from the conditional output.
  """
  def apply(x, t, y):
    return model.apply({"params": params}, x, t, train=False, y=y)

  if labels is None or not guidance_scale:
    return lambda x, t: apply(x, t, labels)

  def model_fn(x, t):
    null = jnp.full_like(labels, model.num_classes)
    out = apply(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                jnp.concatenate([labels, null]))
    cond, uncond = jnp.split(out, 2)
    c = x.shape[-1]
    mean = (1.0 + guidance_scale) * cond[..., :c] - guidance_scale * uncond[..., :c]
    return jnp.concatenate([mean, cond[..., c:]], axis=-1)

  return model_fn


@functools.lru_cache(maxsize=16)
def _compiled_sampler(model_settings: ModelSettings, diffusion_settings: DiffusionSettings,
                      image_shape: tuple, c: ChainSettings, per_device: int, devices: tuple):
  """chain(params, keys [n*b], labels [n*b]) -> x_0 [n*b, S, S, C] over the n `devices`.

  One jit-compiled shard_map, cached per (settings, devices): every device runs the whole
  chain (one lax.scan) on its b = per_device samples; no communication between them.
  """
  model = model_settings.make_model()
  sched = diffusion_settings.make_schedule()
  shape = (per_device,) + tuple(image_shape)
  common = dict(mean_type=diffusion_settings.mean_type, var_type=diffusion_settings.var_type,
                clip_denoised=c.clip_denoised)
  conditional = bool(model_settings.num_classes)

  def chain(params, keys, labels):
    model_fn = guided_model_fn(model, params, labels if conditional else None, c.guidance_scale)
    if c.sampler == "ddim":
      return ddim_sample_loop(sched, model_fn, shape, keys, num_steps=c.num_steps, eta=c.eta,
                              **common)
    if c.sampler == "dpm_solver":
      return solvers.dpm_solver_sample_loop(
          sched, model_fn, shape, keys, num_steps=c.num_steps, order=c.order,
          thresholding=c.thresholding, thresholding_ratio=c.thresholding_ratio,
          thresholding_max=c.thresholding_max, **common)
    steps = None if c.num_steps == sched.num_timesteps else c.num_steps
    return p_sample_loop(sched, model_fn, shape, keys, num_steps=steps, **common)

  return placement.map_over_devices(chain, devices, num_batched=2)


@functools.lru_cache(maxsize=16)
def _param_shapes(model: ModelSettings, image_shape: tuple):
  """The ShapeDtypeStructs of the model's params (eval_shape of a large UNet takes time)."""
  return jax.eval_shape(lambda: model.make_model().init(
      jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(image_shape)),
      jnp.zeros((1,), jnp.int32)))["params"]


def check_params(params, config) -> None:
  """Raises one ValueError if `params` are not parameters of the config's model."""
  s = settings.Settings.from_config(config)
  problem = checkpoint.tree_mismatch(params, _param_shapes(s.model, s.data.image_shape))
  if problem:
    raise ValueError(f"The params do not fit the config's model ({problem}); pass the config "
                     "that `params, config = ddpm_jax.load(workdir)` returned with them.")


def _check_int(name, value, low, high=None, what=""):
  ok = not isinstance(value, bool) and isinstance(value, (int, np.integer))
  if not ok or value < low or (high is not None and value > high):
    accepted = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
    raise UserError(f"{name} must be {accepted}{what}, got {value!r}.")


def _labels(labels, keys, num_samples: int, num_classes: int):
  """int32 [num_samples] labels: given, or drawn uniformly from each sample's own key."""
  if not num_classes:
    if labels is not None:
      raise ValueError("labels were given for an unconditional model (config.model.num_classes "
                       "= 0); pass labels=None.")
    return np.zeros((num_samples,), np.int32)
  if labels is None:
    draw = lambda k: jax.random.randint(jax.random.fold_in(k, 2), (), 0, num_classes)
    return np.asarray(jax.vmap(draw)(keys), np.int32)
  labels = np.asarray(labels)
  if labels.ndim == 0:
    labels = np.full((num_samples,), labels)
  if (labels.shape != (num_samples,) or not np.issubdtype(labels.dtype, np.integer)
      or labels.min() < 0 or labels.max() > num_classes):
    raise ValueError(f"labels must be one int or {num_samples} ints in [0, {num_classes}] "
                     f"({num_classes} is the null label), got {labels!r}.")
  return labels.astype(np.int32)


def _named_labels(labels, config):
  """Class names (one str, or a sequence of str) -> their indices in config.data.class_names;
  anything else is returned as it is."""
  names = tuple(config.data.get("class_names", ()))
  one = isinstance(labels, str)
  if not one and not (isinstance(labels, (list, tuple)) and labels
                      and all(isinstance(x, str) for x in labels)):
    return labels
  for name in [labels] if one else labels:
    if name not in names:
      raise UserError(f"labels={name!r} is not a class of this run; accepted: its class names "
                      f"({', '.join(names) or 'none: it was not trained on labelled subfolders'})"
                      " or their indices.")
  return names.index(labels) if one else np.array([names.index(x) for x in labels])


def sample_labels(config, key, index) -> np.ndarray:
  """int32 labels that `sample(..., labels=None)` draws for the samples of global `index` [N]."""
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(index))
  return _labels(None, keys, len(index), config.model.num_classes)


def check_settings(config, *, sampler=None, num_steps=None, num_samples=None, eta=None,
                   guidance_scale=None, dtype=None, order=None
                   ) -> Tuple[settings.Settings, ChainSettings, int]:
  """The run's settings (the model's dtype replaced by `dtype` if given), the chain's (the
  arguments, else config.sampling) and num_samples, checked: one UserError naming a bad value
  and what is accepted."""
  s = settings.Settings.from_config(config)
  c = s.sampling.chain
  sampler = c.sampler if sampler is None else sampler
  diffusion.check_choice("sampler", sampler, SAMPLERS)
  T = s.diffusion.num_timesteps
  num_steps = c.num_steps if num_steps is None else num_steps
  _check_int("num_steps", num_steps, 1, T, f" (the run's num_timesteps is {T})")
  order = c.order if order is None else order
  if sampler == "dpm_solver":
    solvers.check_solver_options(T, num_steps, order, c.thresholding_ratio, c.thresholding_max)
  elif c.thresholding:
    raise UserError(f"config.sampling.thresholding=True is used by the dpm_solver sampler only, "
                    f"not by sampler={sampler!r}; use sampler='dpm_solver' or thresholding=False.")
  num_samples = s.sampling.num_samples if num_samples is None else num_samples
  _check_int("num_samples", num_samples, 1)
  eta = float(c.eta if eta is None else eta)
  if not eta >= 0:
    raise UserError(f"eta must be >= 0 (0 is deterministic DDIM, 1 ancestral-like), got {eta}.")
  guidance_scale = float(c.guidance_scale if guidance_scale is None else guidance_scale)
  if guidance_scale and not s.model.num_classes:
    raise UserError(f"guidance_scale={guidance_scale} needs a class-conditional model, but "
                    "config.model.num_classes is 0; use guidance_scale=0.")
  if dtype is not None:
    diffusion.check_choice("dtype", dtype, settings.DTYPES)
    s = dataclasses.replace(s, model=dataclasses.replace(s.model, dtype=dtype))
  chain = dataclasses.replace(c, sampler=sampler, num_steps=int(num_steps), eta=eta,
                              guidance_scale=guidance_scale, order=int(order))
  return s, chain, int(num_samples)


def sample(params, key, *, config=None, num_samples: Optional[int] = None,
           sampler: Optional[str] = None, num_steps: Optional[int] = None,
           eta: Optional[float] = None, labels=None, guidance_scale: Optional[float] = None,
           dtype: Optional[str] = None, first_index: int = 0, order: Optional[int] = None,
           devices: Optional[Sequence[jax.Device]] = None) -> jnp.ndarray:
  """Draws images from a trained model: float32 [num_samples, S, S, C] in [-1, 1].

  params: the (EMA) parameters, e.g. from `ddpm_jax.load(workdir)`; config: that run's config.
  sampler ("ancestral" | "ddim" | "dpm_solver"), num_steps (in [1, T]; < T respaces the
  chain), eta (DDIM), order (DPM-Solver++: 1, 2 or 3), guidance_scale and num_samples default
  to config.sampling (dpm_solver's thresholding is config.sampling's); dtype
  ("float32" | "bfloat16") to config.model.dtype.
  labels: class-conditional models only: one int or [num_samples] ints in [0, num_classes]
  (num_classes is the null label), or class names of config.data.class_names (a run trained on
  a folder labelled by subfolders); None draws each sample's label from its own key.
  guidance_scale: classifier-free guidance weight w (see `guided_model_fn`); 0 is none.

  Sample i is drawn from fold_in(key, first_index + i) alone (its x_T, its noise and its
  label), so the same key gives the same samples on any number of devices or hosts (up to
  float rounding: a different per-device batch may round convolutions differently), and
  `first_index` lets a long job be cut into resumable pieces. The work is spread over `devices`
  (all local devices by default), config.sampling.batch_size samples per compiled call.
  The output is clipped to [-1, 1].
  """
  if config is None:
    raise ValueError("sample() needs the run's config: pass config=..., as returned with the "
                     "params by `params, config = ddpm_jax.load(workdir)`.")
  s, chain, num_samples = check_settings(
      config, sampler=sampler, num_steps=num_steps, num_samples=num_samples, eta=eta,
      guidance_scale=guidance_scale, dtype=dtype, order=order)
  _check_int("first_index", first_index, 0)
  num_classes = s.model.num_classes

  devices = tuple(jax.local_devices() if devices is None else devices)
  per_device = max(1, min(s.sampling.batch_size, num_samples) // len(devices))
  per_call = per_device * len(devices)
  check_params(params, config)
  run = _compiled_sampler(s.model, s.diffusion, s.data.image_shape, chain, per_device, devices)
  params = placement.replicate(params, devices)  # once for all calls below
  batch = placement.batch_sharding(devices)
  index = jnp.arange(first_index, first_index + num_samples)
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, index)
  all_labels = _labels(_named_labels(labels, config), keys, num_samples, num_classes)
  images = []
  for start in range(0, num_samples, per_call):
    stop = min(start + per_call, num_samples)
    pad = per_call - (stop - start)  # the last call is padded with copies of its first sample
    k = jnp.concatenate([keys[start:stop]] + [keys[start:start + 1]] * pad)
    y = np.concatenate([all_labels[start:stop]] + [all_labels[start:start + 1]] * pad)
    out = run(params, jax.device_put(k, batch), jax.device_put(y, batch))
    images.append(out[:stop - start])
  return jnp.clip(jnp.concatenate([np.asarray(x) for x in images]), -1.0, 1.0)

