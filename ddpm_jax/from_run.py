"""A trained run's params and config turned into images: `sample()`, the research entry point.

`sample(params, key, config=...)` checks the request against the run's settings, draws each
sample's label, builds the model function (class labels, classifier-free guidance) and runs one
of sampling.py's pure chains on every local device, compiled once per (settings, devices).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import checkpoint, diffusion, heun, placement, settings, solvers
from ddpm_jax.diffusion import ModelFn
from ddpm_jax.errors import UserError
from ddpm_jax.sampling import ddim_sample_loop, p_sample_loop
from ddpm_jax.settings import ChainSettings, DiffusionSettings, ModelSettings
from ddpm_jax.unet import UNet

SAMPLERS = settings.SAMPLERS

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
    if c.sampler == "heun":  # EDM's Heun sampler: 2 * num_steps - 1 model evaluations
      return heun.heun_sample_loop(sched, model_fn, shape, keys, num_steps=c.num_steps, **common)
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
  sampler ("ancestral" | "ddim" | "dpm_solver" | "heun"), num_steps (in [1, T]; < T respaces
  the ancestral chain; heun makes 2 * num_steps - 1 model calls), eta (DDIM), order
  (DPM-Solver++: 1, 2 or 3), guidance_scale and num_samples default to config.sampling
  (dpm_solver's thresholding is config.sampling's); dtype ("float32" | "bfloat16") to
  config.model.dtype.
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

