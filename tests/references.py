"""Float64 NumPy references written from the papers' equations, independent of ddpm_jax.

Ho et al. (2020), eq. 4: q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), abar_t = prod_s (1 - beta_s);
eq. 6-7: q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I) with
  mu~_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
  beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t.
Index 0 here is the paper's t = 1, with abar_{-1} = 1.
"""
import math

import numpy as np
from scipy import special, stats


def schedule(betas):
  """Every constant of the forward process, float64, by the paper's definitions."""
  with np.errstate(divide="ignore"):  # jsd's beta = 1 makes abar_{T-1} = 0
    return _schedule(np.asarray(betas, np.float64))


def _schedule(betas):
  T = len(betas)
  abar = np.array([np.prod(1.0 - betas[:i + 1]) for i in range(T)])
  abar_prev = np.array([1.0] + list(abar[:-1]))
  post_var = (1.0 - abar_prev) / (1.0 - abar) * betas
  # beta~ is 0 at the first step; its log is taken from the second step there (beta_1 if T = 1).
  clipped = post_var.copy()
  clipped[0] = post_var[1] if T > 1 else betas[0]
  return dict(
      betas=betas,
      alphas_cumprod=abar,
      alphas_cumprod_prev=abar_prev,
      sqrt_alphas_cumprod=np.sqrt(abar),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
      log_one_minus_alphas_cumprod=np.log(1.0 - abar),
      sqrt_recip_alphas_cumprod=1.0 / np.sqrt(abar),
      sqrt_recipm1_alphas_cumprod=np.sqrt((1.0 - abar) / abar),
      posterior_variance=post_var,
      posterior_log_variance_clipped=np.log(clipped),
      posterior_mean_coef1=np.sqrt(abar_prev) * betas / (1.0 - abar),
      posterior_mean_coef2=np.sqrt(1.0 - betas) * (1.0 - abar_prev) / (1.0 - abar),
  )


def bcast(v, t, ndim):
  """v[t] shaped [B, 1, ..., 1]."""
  return np.asarray(v)[np.asarray(t)].reshape((-1,) + (1,) * (ndim - 1))


def gaussian_kl(m1, v1, m2, v2):
  """KL(N(m1, v1) || N(m2, v2)) from variances, in nats."""
  return np.log(np.sqrt(v2) / np.sqrt(v1)) + (v1 + (m1 - m2) ** 2) / (2.0 * v2) - 0.5


def discretized_log_likelihood(x, mean, std):
  """log P(bin of x) for N(mean, std^2) on the 256-level grid in [-1, 1], open edge bins."""
  x, mean, std = np.broadcast_arrays(*(np.asarray(a, np.float64) for a in (x, mean, std)))
  upper = (x - mean + 1 / 255) / std
  lower = (x - mean - 1 / 255) / std
  out = np.empty(x.shape)
  for idx in np.ndindex(x.shape):
    lo, hi = lower[idx], upper[idx]
    if x[idx] < -0.999:
      out[idx] = stats.norm.logcdf(hi)
    elif x[idx] > 0.999:
      out[idx] = stats.norm.logsf(lo)
    elif stats.norm.cdf(hi) - stats.norm.cdf(lo) > 1e-9:  # float64 resolves the difference
      out[idx] = math.log(stats.norm.cdf(hi) - stats.norm.cdf(lo))
    else:  # far tails: log(Phi(hi) - Phi(lo)) on the lower tail (mirrored for the upper one)
      if lo + hi > 0:
        lo, hi = -hi, -lo
      log_hi, log_lo = special.log_ndtr(hi), special.log_ndtr(lo)
      out[idx] = log_hi + math.log(-math.expm1(log_lo - log_hi))
  return out
