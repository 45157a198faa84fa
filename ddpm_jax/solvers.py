"""DPM-Solver++ multistep (Lu et al., 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", algorithm 2 and its third-order extension): the diffusion ODE
solved in the data-prediction form, the whole chain in one `lax.scan`.

With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and lambda_t = log(alpha_t / sigma_t),
a step from s to t (h = lambda_t - lambda_s) is exact for a data prediction x0(x, s) that is
polynomial in lambda; order k fits the polynomial through the last k predictions. Every step is
therefore a fixed linear combination

    x_t = c_x * x_s + c_0 * m_0 + c_1 * m_1 + c_2 * m_2      (m_j: the j-th latest prediction)

whose four coefficients depend only on the timesteps. They are computed once in float64 NumPy on
the host and fed to the scan as data, so the traced step is the same for every num_steps.

Timesteps, orders and the final step follow diffusers' DPMSolverMultistepScheduler defaults
(algorithm_type="dpmsolver++", solver_type="midpoint", timestep_spacing="linspace",
lower_order_final=True, final_sigmas_type="zero"): N timesteps round(linspace(0, T-1, N+1))
from the top, without the last one (t = 0); the first steps use the orders that the history
allows; the final step goes to sigma = 0 (x_0 is the last data prediction) with order 1; with
N < 15 the step before it has order 2 at most.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, rng
from ddpm_jax.diffusion import ModelFn
from ddpm_jax.errors import UserError
from ddpm_jax.schedules import Schedule

ORDERS = (1, 2, 3)


def dpm_solver_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """diffusers' "linspace" timesteps: int32 [n], distinct, descending from T - 1, all > 0.

  n = num_steps, except at num_steps = T: the rounded grid then repeats a timestep (a zero-length
  step, whose coefficients are NaN), and the repeat is dropped as diffusers does, leaving T - 1."""
  grid = np.linspace(0, num_timesteps - 1, num_steps + 1).round()[::-1][:-1]
  return grid[np.append(True, np.diff(grid) != 0)].astype(np.int32)


def step_orders(num_steps: int, order: int) -> np.ndarray:
  """The order each step uses: int [num_steps] (see the module docstring)."""
  orders = np.minimum(np.arange(num_steps) + 1, order)
  if num_steps >= 2 and num_steps < 15:
    orders[-2] = min(orders[-2], 2)
  orders[-1] = 1
  return orders


def dpm_solver_coefficients(alphas_cumprod: np.ndarray, timesteps: np.ndarray,
                            order: int) -> np.ndarray:
  """float64 [N, 4]: (c_x, c_0, c_1, c_2) of each step from timesteps[i] to timesteps[i + 1]
  (to sigma = 0 after the last), for DPM-Solver++ of `order` (diffusers' midpoint form)."""
  abar = np.asarray(alphas_cumprod, np.float64)[timesteps]
  alpha = np.append(np.sqrt(abar), 1.0)
  sigma = np.append(np.sqrt(1.0 - abar), 0.0)
  lam = np.log(alpha[:-1]) - np.log(sigma[:-1])
  orders = step_orders(len(timesteps), order)
  coefs = np.zeros((len(timesteps), 4))
  for i, k in enumerate(orders):
    if i == len(timesteps) - 1:  # to sigma = 0: x_0 is the data prediction (order 1, h = inf)
      coefs[i] = (0.0, 1.0, 0.0, 0.0)
      continue
    h = lam[i + 1] - lam[i]
    phi1 = -np.expm1(-h)  # 1 - e^{-h}
    a_t = alpha[i + 1]
    # The update in terms of D0 = m0, D1 (first divided difference), D2 (second), then
    # D1 and D2 written out in m0, m1, m2.
    x_coef, d = sigma[i + 1] / sigma[i], np.zeros((3, 3))
    d[0] = (1.0, 0.0, 0.0)
    if k == 2:
      r0 = (lam[i] - lam[i - 1]) / h
      d[1] = np.array([1.0, -1.0, 0.0]) / r0
      # midpoint: x_t = x_coef x_s + a_t phi1 (D0 + D1 / 2)
      w = a_t * phi1 * (d[0] + 0.5 * d[1])
    elif k == 3:
      r0 = (lam[i] - lam[i - 1]) / h
      r1 = (lam[i - 1] - lam[i - 2]) / h
      d1_0 = np.array([1.0, -1.0, 0.0]) / r0
      d1_1 = np.array([0.0, 1.0, -1.0]) / r1
      d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
      d2 = (d1_0 - d1_1) / (r0 + r1)
      phi2 = phi1 / h - 1.0  # ((1 - e^{-h}) / h - 1), diffusers' -((e^{-h} - 1) / h + 1)
      phi3 = (h - phi1) / h ** 2 - 0.5  # (e^{-h} - 1 + h) / h^2 - 1/2
      w = a_t * phi1 * d[0] - a_t * phi2 * d1 - a_t * phi3 * d2
    else:
      w = a_t * phi1 * d[0]
    coefs[i] = (x_coef, *w)
  return coefs


def dynamic_threshold(x0: jnp.ndarray, ratio: float, max_value: float) -> jnp.ndarray:
  """Imagen's dynamic thresholding (Saharia et al., 2022, section 2.3) of x0 [B, ...]: per
  sample, s = the `ratio` quantile of |x0|, held in [1, max_value]; x0 is clipped to [-s, s]
  and divided by s, so the result is in [-1, 1] (max_value = 1 is plain clipping)."""
  flat = jnp.abs(x0.reshape(x0.shape[0], -1))
  s = jnp.clip(jnp.quantile(flat, ratio, axis=1), 1.0, max_value)
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.clip(x0, -s, s) / s


def _data_prediction(sched: Schedule, output, x, t, mean_type: str, var_type: str):
  """x0 predicted from the model output; a learned variance half is dropped."""
  mean_output, _ = diffusion.split_model_output(output, x, var_type)
  if mean_type == "eps":
    return diffusion.predict_x0_from_eps(sched, x, t, mean_output)
  if mean_type == "v":
    return diffusion.predict_x0_from_v(sched, x, t, mean_output)
  return mean_output


def check_solver_options(num_timesteps: int, num_steps, order, thresholding_ratio=0.995,
                         thresholding_max=1.0) -> None:
  """One UserError, naming the config field, for a bad order, num_steps or thresholding value."""
  if (isinstance(order, bool) or not isinstance(order, (int, np.integer))
      or order not in ORDERS):
    raise UserError(f"config.sampling.order={order!r} is not a DPM-Solver++ order; accepted: "
                    "1, 2 or 3.")
  if (isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer))
      or not 1 <= num_steps <= num_timesteps):
    raise UserError(f"config.sampling.num_steps={num_steps!r} is not a number of solver steps; "
                    f"accepted: an integer in [1, {num_timesteps}] (the run's num_timesteps).")
  if not 0.0 < thresholding_ratio <= 1.0:
    raise UserError(f"config.sampling.thresholding_ratio={thresholding_ratio!r} is not a "
                    "quantile; accepted: a number in (0, 1], e.g. 0.995.")
  if not thresholding_max >= 1.0:
    raise UserError(f"config.sampling.thresholding_max={thresholding_max!r} would shrink images "
                    "below [-1, 1]; accepted: a number >= 1 (1 is plain clipping).")


def host_planned_start(loop: str, sched: Schedule, shape, key, x_T):
  """(shape, x_T) of a loop whose steps are planned on the host from a concrete sched: x_T is
  checked against shape, or drawn from fold_in(key, 0)."""
  if isinstance(sched.betas, jax.core.Tracer):
    raise ValueError(f"{loop} needs a concrete Schedule: close over it instead of passing it as "
                     "a traced jit argument.")
  shape = tuple(shape)
  if x_T is None:
    x_T = rng.normal(rng.fold_in(key, 0), shape)
  elif tuple(x_T.shape) != shape:
    raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape is {shape}.")
  return shape, x_T


def dpm_solver_sample_loop(sched: Schedule, model_fn: ModelFn, shape: Sequence[int], key, *,
                           num_steps: int, order: int = 2, x_T: Optional[jnp.ndarray] = None,
                           timesteps: Optional[Sequence[int]] = None,
                           mean_type: str = "eps", var_type: str = "fixedlarge",
                           clip_denoised: bool = True, thresholding: bool = False,
                           thresholding_ratio: float = 0.995, thresholding_max: float = 1.5):
  """DPM-Solver++ multistep of `order` (1, 2 or 3) over num_steps model calls: x_T -> x_0 [B, ...].

  sched must be concrete (closed over, not a jit argument): the coefficients are computed from
  it on the host. x_T: the starting noise of `shape` (else drawn from fold_in(key, 0), as
  ddim_sample_loop does, and then key is not used for anything else; with x_T given, key is
  not used at all). The chain is deterministic given x_T.
  timesteps: the chain's descending timesteps (default `dpm_solver_timesteps(T, num_steps)`),
  e.g. the last ones of a longer chain to start from a partly noised image (SDEdit); x_T is
  then the state at timesteps[0].
  mean_type: eps | x0 | v; with var_type="learned_range" the mean half of the output is used.
  clip_denoised clips every data prediction to [-1, 1]; thresholding replaces that clip by
  `dynamic_threshold(x0, thresholding_ratio, thresholding_max)`. Order 1 is DDIM with eta = 0
  on the same timesteps (`dpm_solver_timesteps`).
  """
  _, x_T = host_planned_start("dpm_solver_sample_loop", sched, shape, key, x_T)
  return dpm_solver_chain(sched, model_fn, x_T, num_steps=num_steps, order=order,
                          timesteps=timesteps, mean_type=mean_type, var_type=var_type,
                          clip_denoised=clip_denoised, thresholding=thresholding,
                          thresholding_ratio=thresholding_ratio,
                          thresholding_max=thresholding_max)


def dpm_solver_chain(sched: Schedule, model_fn: ModelFn, x_T, *, num_steps: int, order: int,
                     timesteps=None, after_step: Optional[Callable] = None,
                     mean_type: str = "eps", var_type: str = "fixedlarge",
                     clip_denoised: bool = True, thresholding: bool = False,
                     thresholding_ratio: float = 0.995, thresholding_max: float = 1.5):
  """The scan of `dpm_solver_sample_loop` from a given x_T [B, ...].

  after_step(x, i, t_next) -> x, if given, is applied to the state after step i (int32 scalar;
  t_next: the timestep reached, -1 after the last step), e.g. to put back inpainting's known
  pixels.
  """
  diffusion.check_options(mean_type, var_type)
  T = sched.num_timesteps
  if timesteps is None:
    check_solver_options(T, num_steps, order, thresholding_ratio, thresholding_max)
    timesteps = dpm_solver_timesteps(T, num_steps)
  else:
    timesteps = np.asarray(timesteps, np.int32)
    check_solver_options(T, len(timesteps), order, thresholding_ratio, thresholding_max)
    if not (timesteps.ndim == 1 and np.all(np.diff(timesteps) < 0) and timesteps[-1] >= 0
            and timesteps[0] < T):
      raise ValueError(f"timesteps must be distinct descending integers in [0, {T - 1}], got "
                       f"{timesteps!r}.")
  if isinstance(sched.betas, jax.core.Tracer):
    raise ValueError("dpm_solver_sample_loop needs a concrete Schedule: close over it instead "
                     "of passing it as a traced jit argument.")
  abar = np.cumprod(1.0 - np.asarray(sched.betas, np.float64))
  coefs = dpm_solver_coefficients(abar, timesteps, order).astype(np.float32)
  t_next = np.append(timesteps[1:], -1).astype(np.int32)
  batch = x_T.shape[0]

  def denoise(x, t):
    x0 = _data_prediction(sched, model_fn(x, t), x, t, mean_type, var_type)
    if thresholding:
      return dynamic_threshold(x0, thresholding_ratio, thresholding_max)
    return jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0

  def body(carry, step):
    x, history = carry  # history: the order - 1 previous data predictions, latest first
    i, t, c, t_to = step
    m0 = denoise(x, jnp.full((batch,), t, jnp.int32))
    ms = (m0,) + history
    x = c[0] * x + sum(c[1 + j] * m for j, m in enumerate(ms))
    if after_step is not None:
      x = after_step(x, i, t_to)
    return (x, ms[:order - 1]), None

  history = tuple(jnp.zeros_like(x_T) for _ in range(order - 1))
  steps = (jnp.arange(len(timesteps), dtype=jnp.int32), jnp.asarray(timesteps),
           jnp.asarray(coefs), jnp.asarray(t_next))
  (x0, _), _ = jax.lax.scan(body, (x_T, history), steps)
  return x0
