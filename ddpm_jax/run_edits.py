"""A trained run's edits, beside `sample()`: `inpaint`, `edit` (SDEdit), `invert` (DDIM) and
`interpolate`, on every local device, with class labels and guidance where the model has
classes.

Images may be uint8 [0, 255] or float in [-1, 1], [N, S, S, C] or one [S, S, C]; outputs are
float32 in [-1, 1] (invert: the noise x_T, unbounded). Sample i of a call draws from
fold_in(key, first_index + i) alone, as `sample()` does, so a result does not depend on the
number of devices or on how a long job is cut. Defaults come from config.edit
(edit_settings.py) and config.sampling (eta, order, clip_denoised, guidance_scale,
thresholding, batch_size).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import editing, from_run, placement, solvers
from ddpm_jax.edit_settings import NAMED_MASKS, EditSettings
from ddpm_jax.errors import UserError
from ddpm_jax.sampling import ddim_sample_loop


# sample()'s checks and labels, shared so that edits read labels and steps as it does.
_check_int = from_run._check_int  # pylint: disable=protected-access
_draw_labels = from_run._labels  # pylint: disable=protected-access
_named_labels = from_run._named_labels  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True)
class _Task:
  """One compiled edit: the cache key beside the run's settings."""
  kind: str  # inpaint | edit | invert | decode
  sampler: str = "ddim"
  num_steps: int = 100
  strength: float = 0.0
  jump_length: int = 10
  jump_n_sample: int = 10


# ----------------------------------------------------------------------------- inputs


def named_mask(name: str, image_size: int) -> np.ndarray:
  """float32 [S, S, 1]: 0 on the named region (to fill), 1 elsewhere (kept)."""
  if name not in NAMED_MASKS:
    raise UserError(f"mask={name!r} is not a named mask; accepted: {', '.join(NAMED_MASKS)}, or "
                    "an array of 0 (fill) and 1 (keep).")
  s, q = image_size, image_size // 4
  mask = np.ones((s, s, 1), np.float32)
  region = {"center": (slice(q, s - q), slice(q, s - q)),
            "left-half": (slice(None), slice(0, s // 2)),
            "right-half": (slice(None), slice(s // 2, s)),
            "top-half": (slice(0, s // 2), slice(None)),
            "bottom-half": (slice(s // 2, s), slice(None))}[name]
  mask[region] = 0.0
  return mask


def model_images(images, image_shape: tuple, what: str = "images") -> np.ndarray:
  """float32 [N, S, S, C] in [-1, 1] from uint8 [0, 255] or float [-1, 1] images."""
  x = np.asarray(images)
  if x.shape == tuple(image_shape):
    x = x[None]
  if x.ndim != 4 or x.shape[1:] != tuple(image_shape) or not len(x):
    raise UserError(f"{what} of shape {x.shape} do not fit the run's images; accepted: "
                    f"[N, {', '.join(map(str, image_shape))}] or one image "
                    f"{tuple(image_shape)}.")
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 127.5 - 1.0
  if not np.issubdtype(x.dtype, np.floating) or not np.all(np.abs(x) <= 1.0 + 1e-3):
    raise UserError(f"{what} must be uint8 in [0, 255] or floats in [-1, 1]; got {x.dtype} in "
                    f"[{np.nanmin(x):g}, {np.nanmax(x):g}].")
  return np.clip(x.astype(np.float32), -1.0, 1.0)


def model_masks(masks, num: int, image_shape: tuple) -> np.ndarray:
  """float32 [num, S, S, C] of 0 (fill) and 1 (keep) from a named mask or an array that
  broadcasts to the images ([S, S], [S, S, 1 or C], [N, S, S, 1 or C]; bool or 0/1)."""
  if isinstance(masks, str):
    masks = named_mask(masks, image_shape[0])
  m = np.asarray(masks)
  if m.shape == tuple(image_shape[:2]):
    m = m[..., None]
  target = (num,) + tuple(image_shape)
  try:
    out = np.broadcast_to(m, target)
  except ValueError:
    raise UserError(f"masks of shape {m.shape} do not fit {num} images of shape "
                    f"{tuple(image_shape)}; accepted: [S, S], [S, S, 1], or [N, S, S, 1 or C]."
                    ) from None
  if not np.all((out == 0) | (out == 1)):
    raise UserError("masks must hold only 0 (fill) and 1 (keep) (or booleans); got values "
                    f"{np.unique(out)[:5].tolist()}.")
  return out.astype(np.float32)


# ----------------------------------------------------------------------------- compiled edits


@functools.lru_cache(maxsize=16)
def _compiled(model_s, diffusion_s, chain, task: _Task, per_device: int, devices: tuple):
  """edit(params, keys, labels, images, masks) over `devices`, one jit-compiled shard_map."""
  model, sched = model_s.make_model(), diffusion_s.make_schedule()
  common = dict(mean_type=diffusion_s.mean_type, var_type=diffusion_s.var_type)
  chain_opts = dict(common, clip_denoised=chain.clip_denoised)
  thresholding = dict(thresholding=chain.thresholding,
                      thresholding_ratio=chain.thresholding_ratio,
                      thresholding_max=chain.thresholding_max)
  conditional = bool(model_s.num_classes)
  steps = None if task.num_steps == sched.num_timesteps else task.num_steps

  def fn(params, keys, labels, images, masks):
    model_fn = from_run.guided_model_fn(model, params, labels if conditional else None,
                                        chain.guidance_scale)
    if task.kind == "invert":
      return editing.ddim_invert(sched, model_fn, images, num_steps=task.num_steps, **common)
    if task.kind == "decode":
      return ddim_sample_loop(sched, model_fn, images.shape, keys, num_steps=task.num_steps,
                              x_T=images, **chain_opts)
    if task.kind == "edit":
      extra = thresholding if task.sampler == "dpm_solver" else {}
      return editing.sdedit(sched, model_fn, images, keys, strength=task.strength,
                            sampler=task.sampler, num_steps=task.num_steps, eta=chain.eta,
                            order=chain.order, **chain_opts, **extra)
    if task.sampler == "ddim":
      return editing.ddim_inpaint_loop(sched, model_fn, images, masks, keys,
                                       num_steps=task.num_steps, eta=chain.eta, **chain_opts)
    if task.sampler == "dpm_solver":
      return editing.dpm_solver_inpaint_loop(sched, model_fn, images, masks, keys,
                                             num_steps=task.num_steps, order=chain.order,
                                             **chain_opts, **thresholding)
    return editing.repaint_sample_loop(
        sched, model_fn, images, masks, keys, num_steps=steps, jump_length=task.jump_length,
        jump_n_sample=task.jump_n_sample if task.sampler == "repaint" else 1, **chain_opts)

  return placement.map_over_devices(fn, devices, num_batched=4)


def _settings(config, guidance_scale):
  if config is None:
    raise ValueError("The run's config is needed: pass config=..., as returned with the params "
                     "by `params, config = ddpm_jax.load(workdir)`.")
  s, chain, _ = from_run.check_settings(config, guidance_scale=guidance_scale)
  return s, chain, s.edit


def _labels(labels, keys, n, num_classes, draw: bool):
  if num_classes and labels is None and not draw:
    return np.full((n,), num_classes, np.int32)  # the null label: the unconditional model
  return _draw_labels(labels, keys, n, num_classes)


def _run(params, key, images, masks, *, config, s, chain, task: _Task, labels, draw_labels,
         first_index: int, devices) -> np.ndarray:
  """The task on images [N, S, S, C] (and masks), per_call samples at a time over devices."""
  n = len(images)
  devices = tuple(jax.local_devices() if devices is None else devices)
  per_device = max(1, min(s.sampling.batch_size, n) // len(devices))
  per_call = per_device * len(devices)
  from_run.check_params(params, config)
  run = _compiled(s.model, s.diffusion, chain, task, per_device, devices)
  params = placement.replicate(params, devices)
  batch = placement.batch_sharding(devices)
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(first_index, first_index + n))
  labels = _labels(_named_labels(labels, config), keys, n,
                   s.model.num_classes, draw_labels)
  masks = np.ones_like(images) if masks is None else masks
  out = []
  for start in range(0, n, per_call):
    stop = min(start + per_call, n)
    pad = lambda a: np.concatenate([np.asarray(a[start:stop])]
                                   + [np.asarray(a[start:start + 1])] * (per_call - stop + start))
    args = [jax.device_put(pad(a), batch) for a in (keys, labels, images, masks)]
    out.append(np.asarray(run(params, *args))[:stop - start])
  return np.concatenate(out)


# ----------------------------------------------------------------------------- public


def inpaint(params, key, images, masks: Union[str, np.ndarray, None] = None, *, config=None,
            sampler: Optional[str] = None, num_steps: Optional[int] = None,
            jump_length: Optional[int] = None, jump_n_sample: Optional[int] = None,
            labels=None, guidance_scale: Optional[float] = None, first_index: int = 0,
            devices: Optional[Sequence[jax.Device]] = None) -> np.ndarray:
  """Fills images where masks == 0: float32 [N, S, S, C] in [-1, 1], equal to the images where
  masks == 1. masks: 0/1 arrays or a named mask (edit_settings.NAMED_MASKS names the region
  filled); default config.edit.mask. sampler: "repaint" (with jumps), "ancestral", "ddim" or
  "dpm_solver" (replacement); see ddpm_jax.editing for which to use. Defaults: config.edit."""
  s, chain, e = _settings(config, guidance_scale)
  x = model_images(images, s.data.image_shape)
  m = model_masks(e.mask if masks is None else masks, len(x), s.data.image_shape)
  task = _Task("inpaint", *_checked(e, s, sampler, num_steps, inpaint=True),
               jump_length=e.jump_length if jump_length is None else jump_length,
               jump_n_sample=e.jump_n_sample if jump_n_sample is None else jump_n_sample)
  if task.sampler == "repaint":
    for name in ("jump_length", "jump_n_sample"):
      _check_int(name, getattr(task, name), 1)
    if task.jump_n_sample > 1 and task.jump_length >= task.num_steps:
      raise UserError(f"jump_length={task.jump_length} must be below num_steps="
                      f"{task.num_steps} for RePaint's jumps (or use jump_n_sample=1).")
  out = _run(params, key, x, m, config=config, s=s, chain=chain, task=task, labels=labels,
             draw_labels=True, first_index=first_index, devices=devices)
  return np.clip(out, -1.0, 1.0)


def edit(params, key, images, *, strength: Optional[float] = None, config=None,
         sampler: Optional[str] = None, num_steps: Optional[int] = None, labels=None,
         guidance_scale: Optional[float] = None, first_index: int = 0,
         devices: Optional[Sequence[jax.Device]] = None) -> np.ndarray:
  """SDEdit: images noised to `strength` of the chain (0 keeps them, 1 samples anew) and
  denoised by sampler ("ancestral", "ddim" or "dpm_solver"): float32 [N, S, S, C] in [-1, 1].
  Defaults: config.edit."""
  s, chain, e = _settings(config, guidance_scale)
  strength = e.strength if strength is None else strength
  if isinstance(strength, bool) or not isinstance(strength, (int, float)) \
      or not 0.0 <= strength <= 1.0:
    raise UserError(f"strength must be a number in [0, 1] (0 keeps the image, 1 samples "
                    f"anew), got {strength!r}.")
  x = model_images(images, s.data.image_shape)
  task = _Task("edit", *_checked(e, s, sampler, num_steps, inpaint=False),
               strength=float(strength))
  out = _run(params, key, x, None, config=config, s=s, chain=chain, task=task, labels=labels,
             draw_labels=True, first_index=first_index, devices=devices)
  return np.clip(out, -1.0, 1.0)


def invert(params, images, *, config=None, num_steps: Optional[int] = None, labels=None,
           devices: Optional[Sequence[jax.Device]] = None) -> np.ndarray:
  """DDIM inversion: the noise x_T float32 [N, S, S, C] from which deterministic DDIM over
  num_steps (default config.edit.num_steps) decodes the images. labels: class-conditional
  models only (default: the null label)."""
  s, chain, e = _settings(config, None)
  x = model_images(images, s.data.image_shape)
  num_steps = e.num_steps if num_steps is None else num_steps
  _check_steps(num_steps, s)
  return _run(params, jax.random.PRNGKey(0), x, None, config=config, s=s, chain=chain,
              task=_Task("invert", num_steps=num_steps), labels=labels, draw_labels=False,
              first_index=0, devices=devices)


def interpolate(params, image_a, image_b, *, num: Optional[int] = None, config=None,
                num_steps: Optional[int] = None, labels=None,
                devices: Optional[Sequence[jax.Device]] = None) -> np.ndarray:
  """num images [num, S, S, C] in [-1, 1] from image_a to image_b: both inverted, their noises
  slerped, the path decoded by deterministic DDIM. Defaults: config.edit (num, num_steps)."""
  s, chain, e = _settings(config, None)
  num = e.num if num is None else num
  _check_int("num", num, 2)
  ends = np.concatenate([model_images(image_a, s.data.image_shape, "image_a"),
                         model_images(image_b, s.data.image_shape, "image_b")])
  if len(ends) != 2:
    raise UserError(f"interpolate takes one image_a and one image_b, got {len(ends)} images.")
  noise = invert(params, ends, config=config, num_steps=num_steps, labels=labels,
                 devices=devices)
  path = np.asarray(editing.slerp(noise[0], noise[1], np.linspace(0.0, 1.0, num)))
  num_steps = e.num_steps if num_steps is None else num_steps
  chain = dataclasses.replace(chain, eta=0.0)
  out = _run(params, jax.random.PRNGKey(0), path, None, config=config, s=s, chain=chain,
             task=_Task("decode", num_steps=num_steps), labels=labels, draw_labels=False,
             first_index=0, devices=devices)
  return np.clip(out, -1.0, 1.0)


def _check_steps(num_steps, s) -> None:
  T = s.diffusion.num_timesteps
  _check_int("num_steps", num_steps, 1, T, f" (the run's num_timesteps is {T})")


def _checked(e: EditSettings, s, sampler, num_steps, *, inpaint: bool):
  """(sampler, num_steps) of an inpaint or SDEdit call, checked."""
  if sampler is None:  # config.edit's "repaint" (inpainting's default) is DDIM for SDEdit
    sampler = "ddim" if not inpaint and e.sampler == "repaint" else e.sampler
  accepted = ("repaint", "ancestral", "ddim", "dpm_solver") if inpaint else editing.EDIT_SAMPLERS
  if sampler not in accepted:
    raise UserError(f"sampler={sampler!r} cannot {'inpaint' if inpaint else 'edit'}; accepted: "
                    f"{', '.join(accepted)}.")
  num_steps = e.num_steps if num_steps is None else num_steps
  _check_steps(num_steps, s)
  if sampler == "dpm_solver":
    solvers.check_solver_options(s.diffusion.num_timesteps, num_steps, 2)
  return sampler, int(num_steps)
