"""Editing with a trained model, without retraining: inpainting (RePaint, and replacement with
DDIM or DPM-Solver++), SDEdit, DDIM inversion and interpolation of the inverted noises.

Every chain is one `lax.scan` (its body traced once, whatever the number of steps), pure and
traceable: wrap it in `jax.jit` with the model function closed over, as for the samplers.
Images are float32 [B, H, W, C] in [-1, 1]; a model function is `model_fn(x_t, t)` as in
sampling.py, with the same mean_type / var_type / clip_denoised options.

Inpainting: `mask` broadcasts against the image (per pixel [B, H, W, 1] or [H, W, 1], or per
pixel and channel); mask == 1 keeps `known`, mask == 0 is filled in by the model. At each step
the known pixels are `known` noised to the chain's current level by q(x_t | known), the others
come from the model; the last step puts `known` back exactly, so every output equals `known`
where mask == 1. Which to use:
- `repaint_sample_loop` (Lugmayr et al., 2022): ancestral steps with resampling jumps, which let
  the model's pixels agree with the known ones; about jump_n_sample times the model calls of a
  plain chain. The best fill; needed where the hole depends strongly on its surroundings.
  jump_n_sample=1 is plain replacement.
- `ddim_inpaint_loop`, `dpm_solver_inpaint_loop`: replacement at every step of a short DDIM or
  DPM-Solver++ chain (tens of model calls): fast previews and holes that depend little on
  their surroundings; their fill follows the known pixels less faithfully.

Keys: as the samplers: x_T comes from fold_in(key, 0) (unless given), step s of the chain
draws from fold_in(fold_in(key, 1), s); `key` may be one key per sample.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, rng, sampling, solvers
from ddpm_jax.diffusion import ModelFn
from ddpm_jax.errors import UserError
from ddpm_jax.respace import space_timesteps
from ddpm_jax.schedules import Schedule

EDIT_SAMPLERS = ("ancestral", "ddim", "dpm_solver")
# The samplers' own step, respacing and scan, shared so that the edits run the same chains.
_respaced = sampling._respaced  # pylint: disable=protected-access
_ddim_step = sampling._ddim_step  # pylint: disable=protected-access
_run_chain = sampling._run_chain  # pylint: disable=protected-access


# ----------------------------------------------------------------------------- helpers


def _check_mask(known, mask) -> jnp.ndarray:
  """mask as float32, checked to broadcast against known [B, ...] without changing its shape."""
  known, mask = jnp.asarray(known), jnp.asarray(mask, jnp.float32)
  if known.ndim < 2:
    raise ValueError(f"known must be images [B, H, W, C], got shape {known.shape}.")
  try:
    shape = jnp.broadcast_shapes(known.shape, mask.shape)
  except ValueError:
    shape = None
  if shape != known.shape:
    raise ValueError(f"mask of shape {mask.shape} does not broadcast against the images "
                     f"{known.shape}; accepted: per pixel such as {known.shape[:-1] + (1,)} or "
                     f"{known.shape[1:-1] + (1,)}, or per pixel and channel.")
  return mask


def _blend(mask, known_part, model_part):
  """mask * known_part + (1 - mask) * model_part: exactly known_part where mask == 1."""
  return mask * known_part + (1.0 - mask) * model_part


def _noised(alpha_bar, known, key):
  """A draw of q(x_t | known) with alphas_cumprod `alpha_bar` (scalar or [B]); known at 1."""
  ab = jnp.reshape(alpha_bar, jnp.shape(alpha_bar) + (1,) * (known.ndim - jnp.ndim(alpha_bar)))
  return jnp.sqrt(ab) * known + jnp.sqrt(1.0 - ab) * rng.normal(key, known.shape, known.dtype)


def _eps_prediction(sched: Schedule, output, x, t, mean_type: str, var_type: str):
  """The model's eps prediction at (x, t), whatever it predicts; a learned variance is dropped."""
  mean_output, _ = diffusion.split_model_output(output, x, var_type)
  if mean_type == "eps":
    return mean_output
  x0 = mean_output if mean_type == "x0" else diffusion.predict_x0_from_v(sched, x, t, mean_output)
  return diffusion.predict_eps_from_x0(sched, x, t, x0)


def _check_int(name, value, low):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")


# ----------------------------------------------------------------------------- inpainting


def repaint_schedule(num_steps: int, jump_length: int, jump_n_sample: int) -> np.ndarray:
  """RePaint's walk over the chain's levels (its `get_schedule_jump`): int32 [L, 2] rows
  (kind, level), level i being the state at the chain's index i (num_steps - 1 is x_T, -1 is
  x_0). kind 0: the reverse step at index `level`, to level - 1; kind 1: the forward step
  q(x_level | x_{level-1}) with beta at index `level`. Going down, at levels 0, jump_length,
  2 jump_length ... (below num_steps - jump_length) the walk goes back up jump_length levels,
  jump_n_sample - 1 times each, so the reverse steps above them are taken jump_n_sample times.
  """
  jumps = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
  level, levels = num_steps, []
  while level >= 1:
    level -= 1
    levels.append(level)
    if jumps.get(level, 0) > 0:
      jumps[level] -= 1
      for _ in range(jump_length):
        level += 1
        levels.append(level)
  levels.append(-1)  # levels[0] = num_steps - 1 is x_T's; level -1 is x_0
  rows = [(0, a) if b < a else (1, b) for a, b in zip(levels[:-1], levels[1:])]
  return np.array(rows, np.int32)


def repaint_sample_loop(sched: Schedule, model_fn: ModelFn, known, mask, key, *,
                        num_steps: Optional[int] = None, jump_length: int = 10,
                        jump_n_sample: int = 10, x_T=None, mean_type: str = "eps",
                        var_type: str = "fixedlarge", clip_denoised: bool = True):
  """RePaint (Lugmayr et al., 2022, algorithm 1 with its resampling jumps): fills the pixels of
  `known` [B, H, W, C] where mask == 0. Returns [B, H, W, C], equal to `known` where mask == 1.

  num_steps < T runs the respaced chain (see p_sample_loop). Reverse steps are p_sample's
  ancestral steps for the unknown pixels and q(x_{t-1} | known) for the known ones; a jump is
  x_t ~ q(x_t | x_{t-1}) on the whole image. jump_length and jump_n_sample: see
  `repaint_schedule` (the paper's j = 10, r = 10 by default; jump_n_sample=1 is replacement).
  """
  diffusion.check_options(mean_type, var_type)
  mask = _check_mask(known, mask)
  known = jnp.asarray(known, jnp.float32)
  _check_int("jump_length", jump_length, 1)
  _check_int("jump_n_sample", jump_n_sample, 1)
  sched_r, model_r = _respaced(sched, model_fn, num_steps, None)
  n = sched_r.num_timesteps
  if jump_n_sample > 1 and jump_length >= n:
    raise ValueError(f"jump_length={jump_length} leaves no room for a jump in a chain of {n} "
                     f"steps; accepted: jump_length < num_steps, or jump_n_sample=1.")
  walk = repaint_schedule(n, jump_length, jump_n_sample)
  x_T = sampling.start_noise(key, known.shape, x_T)
  chain_key = rng.fold_in(key, 1)
  batch = known.shape[0]
  common = dict(mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised)

  def reverse(x, level, k):
    model_part = sampling.p_sample(sched_r, model_r, x, jnp.full((batch,), level, jnp.int32),
                                   rng.fold_in(k, 0), **common)
    known_part = _noised(sched_r.alphas_cumprod_prev[level], known, rng.fold_in(k, 1))
    return _blend(mask, known_part, model_part)

  def forward(x, level, k):
    beta = sched_r.betas[level]
    return jnp.sqrt(1.0 - beta) * x + jnp.sqrt(beta) * rng.normal(k, x.shape, x.dtype)

  def body(x, step):
    s, kind, level = step
    k = rng.fold_in(chain_key, s)
    return jax.lax.cond(kind == 0, reverse, forward, x, level, k), None

  steps = (jnp.arange(len(walk), dtype=jnp.int32), jnp.asarray(walk[:, 0]),
           jnp.asarray(walk[:, 1]))
  x0 = jax.lax.scan(body, x_T, steps)[0]
  return _blend(mask, known, x0)


def ddim_inpaint_loop(sched: Schedule, model_fn: ModelFn, known, mask, key, *, num_steps: int,
                      timesteps=None, eta: float = 0.0, x_T=None, mean_type: str = "eps",
                      var_type: str = "fixedlarge", clip_denoised: bool = True):
  """Inpainting by replacement on a DDIM chain (as ddim_sample_loop: num_steps or timesteps,
  eta): after each step the known pixels become a fresh draw of q(x_t | known) at the level
  reached. Returns [B, H, W, C], equal to `known` where mask == 1."""
  diffusion.check_options(mean_type, var_type)
  mask = _check_mask(known, mask)
  known = jnp.asarray(known, jnp.float32)
  if num_steps is None and timesteps is None:
    raise ValueError("ddim_inpaint_loop needs num_steps (an integer in [1, T]) or timesteps.")
  sched_r, model_r = _respaced(sched, model_fn, num_steps, timesteps)

  def step(x, i, k):
    x = _ddim_step(sched_r, model_r, x, i, rng.fold_in(k, 0), eta=eta,
                            mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised)
    return _blend(mask, _noised(sched_r.alphas_cumprod_prev[i], known, rng.fold_in(k, 1)), x)

  x_T = sampling.start_noise(key, known.shape, x_T)
  x0 = _run_chain(step, x_T, sched_r.num_timesteps, rng.fold_in(key, 1), False, 1)
  return _blend(mask, known, x0)


def dpm_solver_inpaint_loop(sched: Schedule, model_fn: ModelFn, known, mask, key, *,
                            num_steps: int, order: int = 2, x_T=None, mean_type: str = "eps",
                            var_type: str = "fixedlarge", clip_denoised: bool = True,
                            **solver_options):
  """Inpainting by replacement on a DPM-Solver++ chain (as dpm_solver_sample_loop, whose
  thresholding options pass through): after each step the known pixels become a fresh draw of
  q(x_t | known) at the timestep reached. Returns [B, H, W, C], equal to `known` where
  mask == 1."""
  mask = _check_mask(known, mask)
  known = jnp.asarray(known, jnp.float32)
  x_T = sampling.start_noise(key, known.shape, x_T)
  chain_key = rng.fold_in(key, 1)

  def after_step(x, i, t_next):
    alpha_bar = jnp.where(t_next >= 0, sched.alphas_cumprod[jnp.maximum(t_next, 0)], 1.0)
    return _blend(mask, _noised(alpha_bar, known, rng.fold_in(chain_key, i)), x)

  x0 = solvers.dpm_solver_chain(sched, model_fn, x_T, num_steps=num_steps, order=order,
                                after_step=after_step, mean_type=mean_type, var_type=var_type,
                                clip_denoised=clip_denoised, **solver_options)
  return _blend(mask, known, x0)


# ----------------------------------------------------------------------------- SDEdit


def sdedit_timesteps(num_timesteps: int, num_steps: int, strength: float,
                     sampler: str) -> np.ndarray:
  """The timesteps of SDEdit's chain: the last round(strength * num_steps) of the sampler's
  num_steps-step chain (diffusers' img2img convention), ascending for ancestral/ddim and
  descending for dpm_solver (as their loops take them); empty at strength 0."""
  m = int(round(strength * num_steps))
  if sampler == "dpm_solver":
    timesteps = solvers.dpm_solver_timesteps(num_timesteps, num_steps)  # T - 1 of them at T
    return timesteps[max(len(timesteps) - m, 0):]
  return space_timesteps(num_timesteps, num_steps)[:m]


def sdedit(sched: Schedule, model_fn: ModelFn, x0, key, *, strength: float,
           sampler: str = "ddim", num_steps: int, eta: float = 0.0, order: int = 2,
           mean_type: str = "eps", var_type: str = "fixedlarge", clip_denoised: bool = True,
           **solver_options):
  """SDEdit (Meng et al., 2022): x0 [B, H, W, C] noised by q_sample to the timestep t_s at
  `strength` of the chain, then denoised from there by `sampler` (ancestral | ddim | dpm_solver).

  The chain is the last round(strength * num_steps) steps of the sampler's num_steps-step
  chain (`sdedit_timesteps`), t_s its first (highest) timestep. strength 1 is the whole chain
  from x_T = q_sample(x0, T - 1, z), i.e. plain sampling (x0 keeps a weight sqrt(abar_{T-1}),
  0.006 for the linear schedule); strength 0 returns x0. The noise z is drawn from
  fold_in(key, 0), the chain's from fold_in(key, 1) as the samplers do.
  """
  diffusion.check_choice("sampler", sampler, EDIT_SAMPLERS)
  if isinstance(strength, bool) or not isinstance(strength, (int, float)) \
      or not 0.0 <= strength <= 1.0:
    raise UserError(f"strength must be a number in [0, 1] (0 keeps the image, 1 samples anew), "
                    f"got {strength!r}.")
  x0 = jnp.asarray(x0, jnp.float32)
  T = sched.num_timesteps
  if sampler == "dpm_solver":
    solvers.check_solver_options(T, num_steps, order)
  else:
    space_timesteps(T, num_steps)  # checks num_steps
  timesteps = sdedit_timesteps(T, num_steps, strength, sampler)
  if len(timesteps) == 0:
    return x0
  t_start = int(timesteps.max())
  x_start = diffusion.q_sample(sched, x0, jnp.full((x0.shape[0],), t_start, jnp.int32),
                               rng.normal(rng.fold_in(key, 0), x0.shape, x0.dtype))
  common = dict(mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised)
  if sampler == "dpm_solver":
    return solvers.dpm_solver_chain(sched, model_fn, x_start, num_steps=len(timesteps),
                                    order=order, timesteps=timesteps, **common, **solver_options)
  if sampler == "ddim":
    return sampling.ddim_sample_loop(sched, model_fn, x0.shape, key, num_steps=None,
                                     timesteps=timesteps, eta=eta, x_T=x_start, **common)
  return sampling.p_sample_loop(sched, model_fn, x0.shape, key, timesteps=timesteps,
                                x_T=x_start, **common)


# ----------------------------------------------------------------------------- inversion


def ddim_invert(sched: Schedule, model_fn: ModelFn, x0, *, num_steps: Optional[int],
                timesteps=None, mean_type: str = "eps", var_type: str = "fixedlarge"):
  """x0 [B, H, W, C] -> x_T: the deterministic DDIM (eta = 0) ODE run forward over the same
  timesteps as `ddim_sample_loop(num_steps=..., timesteps=...)`, so that decoding x_T with it
  (eta 0, clip_denoised=False) gives x0 back up to the discretisation error, which shrinks as
  num_steps grows.

  Step i goes from the state at kept timestep k_{i-1} (x0 for i = 0) to k_i, with the model's
  eps taken at the state it starts from (at k_0 for x0): explicit Euler, the mirror of DDIM's
  sampling step. No clipping (an inverted image need not stay in [-1, 1]).
  """
  diffusion.check_options(mean_type, var_type)
  if num_steps is None and timesteps is None:
    raise ValueError("ddim_invert needs num_steps (an integer in [1, T]) or timesteps.")
  x0 = jnp.asarray(x0, jnp.float32)
  sched_r, model_r = _respaced(sched, model_fn, num_steps, timesteps)
  batch = x0.shape[0]

  def body(x, i):
    t_from = jnp.full((batch,), jnp.maximum(i - 1, 0), jnp.int32)
    eps = _eps_prediction(sched_r, model_r(x, t_from), x, t_from, mean_type, var_type)
    ab_from, ab_to = sched_r.alphas_cumprod_prev[i], sched_r.alphas_cumprod[i]
    x0_hat = (x - jnp.sqrt(1.0 - ab_from) * eps) / jnp.sqrt(ab_from)
    return jnp.sqrt(ab_to) * x0_hat + jnp.sqrt(1.0 - ab_to) * eps, None

  return jax.lax.scan(body, x0, jnp.arange(sched_r.num_timesteps, dtype=jnp.int32))[0]


# ----------------------------------------------------------------------------- interpolation


def slerp(a, b, alpha):
  """Spherical interpolation between arrays a and b (same shape, each taken as one vector):
  [*alpha.shape, *a.shape] for alpha a scalar or an array of weights (0 gives a, 1 gives b).
  Falls back to linear interpolation where a and b are (nearly) parallel."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  if a.shape != b.shape:
    raise ValueError(f"slerp needs a and b of one shape, got {a.shape} and {b.shape}.")
  alpha = jnp.asarray(alpha, jnp.float32)
  cos = jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))
  theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
  sin = jnp.sin(theta)
  w = alpha.reshape(alpha.shape + (1,) * a.ndim)
  parallel = sin < 1e-6
  safe = jnp.where(parallel, 1.0, sin)
  w_a = jnp.where(parallel, 1.0 - w, jnp.sin((1.0 - w) * theta) / safe)
  w_b = jnp.where(parallel, w, jnp.sin(w * theta) / safe)
  return w_a * a + w_b * b


def ddim_interpolate(sched: Schedule, model_fn: ModelFn, x0_a, x0_b, *, num: int,
                     num_steps: int, mean_type: str = "eps", var_type: str = "fixedlarge",
                     clip_denoised: bool = True):
  """num images [num, H, W, C] from x0_a to x0_b (each [H, W, C]): both inverted by
  `ddim_invert`, their noises slerped at alpha = linspace(0, 1, num), the path decoded by
  deterministic DDIM on the same num_steps timesteps."""
  _check_int("num", num, 2)
  x0_a, x0_b = jnp.asarray(x0_a, jnp.float32), jnp.asarray(x0_b, jnp.float32)
  if x0_a.shape != x0_b.shape or x0_a.ndim != 3:
    raise ValueError(f"ddim_interpolate needs two images [H, W, C] of one shape, got "
                     f"{x0_a.shape} and {x0_b.shape}.")
  common = dict(mean_type=mean_type, var_type=var_type)
  noise = ddim_invert(sched, model_fn, jnp.stack([x0_a, x0_b]), num_steps=num_steps, **common)
  path = slerp(noise[0], noise[1], jnp.linspace(0.0, 1.0, num))
  return sampling.ddim_sample_loop(sched, model_fn, path.shape, jax.random.key(0),
                                   num_steps=num_steps, x_T=path, clip_denoised=clip_denoised,
                                   **common)
