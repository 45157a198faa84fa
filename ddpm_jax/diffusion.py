"""The diffusion math of Ho et al. (2020) as pure functions: jit- and vmap-able, no state.

Shapes: x0, x_t, noise are [B, ...] (images are [B, H, W, C] in [-1, 1]); t is an int array of
shape [B] or a scalar, 0-based (t = 0 is the paper's t = 1). `sched` is a `Schedule`.
A model function is `model_fn(x_t, t) -> output` with C channels (eps / x0 / v), or 2C for
var_type="learned_range" (the mean output first, then the variance interpolation in [-1, 1]).

Shape and name checks happen at trace time (they need no concrete values), so they also raise
under jit. Losses and the variational bound are in bits per dimension where they are likelihoods.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

from ddpm_jax import rng
from ddpm_jax.errors import UserError
from ddpm_jax.schedules import Schedule

MEAN_TYPES = ("eps", "x0", "v")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned_range")
LOSS_TYPES = ("mse", "kl", "hybrid")
HYBRID_VLB_WEIGHT = 0.001  # lambda of Improved DDPM's L_hybrid = L_simple + lambda * L_vlb

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


# ----------------------------------------------------------------------------- checks & helpers


def check_choice(kind: str, value, accepted) -> None:
  if value not in accepted:
    raise UserError(f"Unknown {kind} {value!r}; accepted: {', '.join(accepted)}.")


def check_options(mean_type: str, var_type: str, loss_type: Optional[str] = None) -> None:
  """Raises one clear ValueError for an unknown mean, variance or loss type."""
  check_choice("mean_type", mean_type, MEAN_TYPES)
  check_choice("var_type", var_type, VAR_TYPES)
  if loss_type is not None:
    check_choice("loss_type", loss_type, LOSS_TYPES)


def _check_t(sched: Schedule, x: jnp.ndarray, t) -> jnp.ndarray:
  """Checks t's dtype and shape against x (at trace time) and, when concrete, its range."""
  if not isinstance(t, jax.core.Tracer):
    values = np.asarray(t)
    if values.size and np.issubdtype(values.dtype, np.integer) and (
        values.min() < 0 or values.max() >= sched.num_timesteps):
      bad = values.min() if values.min() < 0 else values.max()
      raise ValueError(f"Timestep {bad} is out of range; accepted: 0 to "
                       f"{sched.num_timesteps - 1} (0-based, num_timesteps = {sched.num_timesteps}).")
  t = jnp.asarray(t)
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise ValueError(f"t must hold integer timesteps, got dtype {t.dtype}.")
  if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x.shape[0]):
    raise ValueError(
        f"t must be a scalar or of shape [B] = [{x.shape[0]}] to match x's batch size, "
        f"got shape {tuple(t.shape)}.")
  return t


def _extract(arr: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
  """arr[t], shaped [B, 1, ..., 1] (or [1, ..., 1] for scalar t) to broadcast against rank ndim."""
  out = arr[t]
  return out.reshape(out.shape + (1,) * (ndim - out.ndim))


def _check_same_shape(name_a, a, name_b, b) -> None:
  if a.shape != b.shape:
    raise ValueError(f"{name_b} must have the shape of {name_a} {tuple(a.shape)}, "
                     f"got {tuple(b.shape)}.")


def mean_flat(x: jnp.ndarray) -> jnp.ndarray:
  """Mean over every axis but the first: [B, ...] -> [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------- forward process


def q_mean_variance(sched: Schedule, x0, t):
  """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I): (mean, variance, log_variance), x0's shape."""
  t = _check_t(sched, x0, t)
  mean = _extract(sched.sqrt_alphas_cumprod, t, x0.ndim) * x0
  variance = jnp.broadcast_to(_extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.ndim) ** 2,
                              x0.shape)
  log_variance = jnp.broadcast_to(_extract(sched.log_one_minus_alphas_cumprod, t, x0.ndim),
                                  x0.shape)
  return mean, variance, log_variance


def q_sample(sched: Schedule, x0, t, noise):
  """Draws x_t ~ q(x_t | x_0) with the given standard normal noise (same shape as x0)."""
  t = _check_t(sched, x0, t)
  _check_same_shape("x0", x0, "noise", noise)
  return (_extract(sched.sqrt_alphas_cumprod, t, x0.ndim) * x0
          + _extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def q_posterior_mean_variance(sched: Schedule, x0, x_t, t):
  """q(x_{t-1} | x_t, x_0): (mean, variance, log_variance_clipped), each of x_t's shape."""
  t = _check_t(sched, x_t, t)
  _check_same_shape("x_t", x_t, "x0", x0)
  mean = (_extract(sched.posterior_mean_coef1, t, x_t.ndim) * x0
          + _extract(sched.posterior_mean_coef2, t, x_t.ndim) * x_t)
  variance = jnp.broadcast_to(_extract(sched.posterior_variance, t, x_t.ndim), x_t.shape)
  log_variance = jnp.broadcast_to(
      _extract(sched.posterior_log_variance_clipped, t, x_t.ndim), x_t.shape)
  return mean, variance, log_variance


# ----------------------------------------------------------------------------- parameterisations


def predict_x0_from_eps(sched: Schedule, x_t, t, eps):
  """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
  t = _check_t(sched, x_t, t)
  return (_extract(sched.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
          - _extract(sched.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)


def predict_eps_from_x0(sched: Schedule, x_t, t, x0):
  """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
  t = _check_t(sched, x_t, t)
  return ((_extract(sched.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0)
          / _extract(sched.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))


def get_v(sched: Schedule, x0, eps, t):
  """The v target of Salimans & Ho (2022): v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
  t = _check_t(sched, x0, t)
  return (_extract(sched.sqrt_alphas_cumprod, t, x0.ndim) * eps
          - _extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)


def predict_x0_from_v(sched: Schedule, x_t, t, v):
  """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
  t = _check_t(sched, x_t, t)
  return (_extract(sched.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
          - _extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v)


# ----------------------------------------------------------------------------- reverse process


def split_model_output(model_output, x_t, var_type: str):
  """Checks the channel count and splits off the variance half: (mean_output, var_values|None)."""
  channels = x_t.shape[-1]
  expected = 2 * channels if var_type == "learned_range" else channels
  if model_output.shape != x_t.shape[:-1] + (expected,):
    raise ValueError(
        f"The model output has shape {tuple(model_output.shape)} but var_type={var_type!r} needs "
        f"{tuple(x_t.shape[:-1] + (expected,))}: {expected} channels for x_t with {channels}.")
  if var_type == "learned_range":
    return model_output[..., :channels], model_output[..., channels:]
  return model_output, None


def _model_log_variance(sched: Schedule, var_values, x_t, t, var_type: str):
  ndim = x_t.ndim
  if var_type == "fixedsmall":
    log_variance = _extract(sched.posterior_log_variance_clipped, t, ndim)
  elif var_type == "fixedlarge":
    # beta_t, but at t = 0 the clipped posterior variance, for a better decoder likelihood
    # (as the original code).
    table = jnp.log(sched.betas).at[0].set(sched.posterior_log_variance_clipped[0])
    log_variance = _extract(table, t, ndim)
  else:  # learned_range: interpolate in log space between beta~_t and beta_t (Improved DDPM)
    min_log = _extract(sched.posterior_log_variance_clipped, t, ndim)
    max_log = _extract(jnp.log(sched.betas), t, ndim)
    frac = (var_values + 1.0) / 2.0
    log_variance = frac * max_log + (1.0 - frac) * min_log
  return jnp.broadcast_to(log_variance, x_t.shape)


def p_mean_variance(sched: Schedule, model_output, x_t, t, *, mean_type: str = "eps",
                    var_type: str = "fixedlarge", clip_denoised: bool = True) -> dict:
  """p_theta(x_{t-1} | x_t) from a model output.

  Returns dict(mean, variance, log_variance, pred_x0), each of x_t's shape. pred_x0 is clipped to
  [-1, 1] when clip_denoised, and the mean is the posterior mean given that pred_x0.
  variance = exp(log_variance) for every var_type.
  """
  check_options(mean_type, var_type)
  t = _check_t(sched, x_t, t)
  mean_output, var_values = split_model_output(model_output, x_t, var_type)
  if mean_type == "eps":
    pred_x0 = predict_x0_from_eps(sched, x_t, t, mean_output)
  elif mean_type == "x0":
    pred_x0 = mean_output
  else:
    pred_x0 = predict_x0_from_v(sched, x_t, t, mean_output)
  if clip_denoised:
    pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
  mean, _, _ = q_posterior_mean_variance(sched, pred_x0, x_t, t)
  log_variance = _model_log_variance(sched, var_values, x_t, t, var_type)
  return dict(mean=mean, variance=jnp.exp(log_variance), log_variance=log_variance,
              pred_x0=pred_x0)


# ----------------------------------------------------------------------------- likelihoods


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
  # exp(d) - 1 - d as expm1(d) - d: no cancellation when the variances nearly agree.
  d = logvar1 - logvar2
  return 0.5 * (jnp.expm1(d) - d + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _log_prob_between(a, b):
  """log(Phi(b) - Phi(a)) for a < b, free of cancellation on either tail.

  Phi(b) - Phi(a) = Phi(-a) - Phi(-b), so the bin is mirrored onto the lower half, where
  log Phi(hi) + log(1 - Phi(lo) / Phi(hi)) is accurate even far out in the tail.
  """
  upper = (a + b) > 0
  lo = jnp.where(upper, -b, a)
  hi = jnp.where(upper, -a, b)
  log_hi = log_ndtr(hi)
  # min(., -1e-30) only guards log(0) when the bin is far narrower than float32 can resolve.
  return log_hi + jnp.log(-jnp.expm1(jnp.minimum(log_ndtr(lo) - log_hi, -1e-30)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log p(x) of data on the 256-level grid in [-1, 1] under N(means, exp(log_scales)^2).

  Each value owns the bin [x - 1/255, x + 1/255]; the edge bins are open: x = -1 owns
  (-inf, -1 + 1/255] and x = +1 owns [1 - 1/255, inf). Returns log-probabilities in nats, x's shape.
  """
  _check_same_shape("x", x, "means", means)
  inv_stdv = jnp.exp(-log_scales)
  centered = x - means
  a = inv_stdv * (centered - 1.0 / 255.0)
  b = inv_stdv * (centered + 1.0 / 255.0)
  return jnp.where(x < -0.999, log_ndtr(b),
                   jnp.where(x > 0.999, log_ndtr(-a), _log_prob_between(a, b)))


def _vb_terms_from_output(sched, model_output, x0, x_t, t, *, mean_type, var_type,
                          clip_denoised):
  """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, -log p(x_0|x_1) at t = 0; [B] bpd."""
  true_mean, _, true_log_variance = q_posterior_mean_variance(sched, x0, x_t, t)
  out = p_mean_variance(sched, model_output, x_t, t, mean_type=mean_type, var_type=var_type,
                        clip_denoised=clip_denoised)
  kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
  decoder_nll = -mean_flat(
      discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"]))
  return jnp.where(t == 0, decoder_nll, kl) / math.log(2.0)


def vb_terms_bpd(sched: Schedule, model_fn: ModelFn, x0, x_t, t, *, mean_type: str = "eps",
                 var_type: str = "fixedlarge", clip_denoised: bool = True):
  """One term of the variational bound for each example, in bits/dim: [B].

  For t > 0 the KL term L_{t-1}; at t = 0 the discretised decoder NLL L_0.
  """
  check_options(mean_type, var_type)
  t = _check_t(sched, x_t, t)
  _check_same_shape("x_t", x_t, "x0", x0)
  return _vb_terms_from_output(sched, model_fn(x_t, t), x0, x_t, t, mean_type=mean_type,
                               var_type=var_type, clip_denoised=clip_denoised)


def prior_bpd(sched: Schedule, x0):
  """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim: [B]. Not trained; ~0 for a good schedule."""
  t_last = jnp.full((x0.shape[0],), sched.num_timesteps - 1, dtype=jnp.int32)
  mean, _, log_variance = q_mean_variance(sched, x0, t_last)
  return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)


def bits_per_dim(sched: Schedule, model_fn: ModelFn, x0, key, *, mean_type: str = "eps",
                 var_type: str = "fixedlarge", clip_denoised: bool = True) -> dict:
  """The full variational bound of the DDPM paper on x0 [B, ...] (grid data in [-1, 1]).

  Every term L_0 ... L_{T-1} is evaluated at one draw of x_t ~ q(x_t | x_0), by a scan over t so
  that memory does not grow with T. The noise of step t is drawn from fold_in(key, t); `key` may
  be one key or one key per example ([B]), which makes each example's estimate independent of
  the batch it is evaluated in.
  Returns dict(total_bpd [B], prior_bpd [B], terms_bpd [B, T]); total = sum(terms) + prior.
  """
  check_options(mean_type, var_type)
  batch = x0.shape[0]

  def term(carry, t):
    noise = rng.normal(rng.fold_in(key, t), x0.shape, x0.dtype)
    t_b = jnp.full((batch,), t, dtype=jnp.int32)
    x_t = q_sample(sched, x0, t_b, noise)
    return carry, vb_terms_bpd(sched, model_fn, x0, x_t, t_b, mean_type=mean_type,
                               var_type=var_type, clip_denoised=clip_denoised)

  _, terms = jax.lax.scan(term, None, jnp.arange(sched.num_timesteps, dtype=jnp.int32))
  terms = terms.T  # [B, T]
  prior = prior_bpd(sched, x0)
  return dict(total_bpd=terms.sum(axis=1) + prior, prior_bpd=prior, terms_bpd=terms)


# ----------------------------------------------------------------------------- training losses


def min_snr_loss_weight(sched: Schedule, gamma: float = 5.0, mean_type: str = "eps"):
  """Min-SNR-gamma weights (Hang et al., 2023) per timestep, [T], for `training_losses`.

  They turn the L_simple of the given parameterisation into min(SNR_t, gamma)-weighted x0 error.
  """
  check_choice("mean_type", mean_type, MEAN_TYPES)
  # SNR = abar / (1 - abar), from the square roots: 1 - abar in float32 would cancel near t = 0.
  snr = jnp.square(sched.sqrt_alphas_cumprod / sched.sqrt_one_minus_alphas_cumprod)
  clipped = jnp.minimum(snr, gamma)
  return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1.0)}[mean_type]


def training_losses(sched: Schedule, model_fn: ModelFn, x0, t, noise, *, mean_type: str = "eps",
                    var_type: str = "fixedlarge", loss_type: str = "mse",
                    loss_weight: Optional[jnp.ndarray] = None):
  """The per-example training loss [B] at timesteps t with the given noise.

  mse:    L_simple, the mean squared error of the eps / x0 / v prediction (Ho et al.).
  kl:     the true variational-bound term L_{t-1} (L_0 at t = 0), in bits/dim.
  hybrid: L_simple + 0.001 * T * L_{t-1}, the VLB term seeing the mean output through
          stop_gradient so it trains only the variance (Improved DDPM). Needs learned_range.
  loss_weight: optional [T] per-timestep weights (e.g. `min_snr_loss_weight`); they multiply
  the L_simple term (mse, hybrid) or the VLB term (kl).
  """
  check_options(mean_type, var_type, loss_type)
  if loss_type == "mse" and var_type == "learned_range":
    raise ValueError("loss_type='mse' does not train a learned_range variance; use "
                     "loss_type='hybrid' or 'kl' with it, or a fixed var_type.")
  if loss_type == "hybrid" and var_type != "learned_range":
    raise ValueError(f"loss_type='hybrid' trains a learned variance but var_type={var_type!r}; "
                     "use var_type='learned_range' with it, or loss_type='mse'.")
  t = _check_t(sched, x0, t)
  x_t = q_sample(sched, x0, t, noise)
  model_output = model_fn(x_t, t)
  mean_output, var_values = split_model_output(model_output, x_t, var_type)
  weight = 1.0 if loss_weight is None else jnp.asarray(loss_weight)[t]
  vb_options = dict(mean_type=mean_type, var_type=var_type, clip_denoised=False)

  if loss_type == "kl":
    return weight * _vb_terms_from_output(sched, model_output, x0, x_t, t, **vb_options)
  if mean_type == "eps":
    target = noise
  elif mean_type == "x0":
    target = x0
  else:
    target = get_v(sched, x0, noise, t)
  loss = weight * mean_flat(jnp.square(target - mean_output))
  if loss_type == "hybrid":
    frozen = jnp.concatenate([jax.lax.stop_gradient(mean_output), var_values], axis=-1)
    vb = _vb_terms_from_output(sched, frozen, x0, x_t, t, **vb_options)
    loss = loss + HYBRID_VLB_WEIGHT * sched.num_timesteps * vb
  return loss
