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


# ----------------------------------------------------------------------------- Gaussian images


def correlated_gaussian(height, width, *, length, sd):
  """(mu [D], Sigma [D, D]) of an image of D = height * width pixels whose covariance is the
  squared-exponential kernel sd^2 exp(-|p - q|^2 / (2 length^2)) over pixel positions (plus
  1e-3 on the diagonal), and whose mean ramps from -0.2 to 0.2."""
  yy, xx = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  p = np.stack([yy.ravel(), xx.ravel()], 1)
  d2 = ((p[:, None] - p[None]) ** 2).sum(-1)
  sigma = sd ** 2 * np.exp(-d2 / (2.0 * length ** 2)) + 1e-3 * np.eye(height * width)
  return np.linspace(-0.2, 0.2, height * width), sigma


def gaussian_conditional(mu, sigma, known, x):
  """Mean and covariance of x[~known] given x[known] for x ~ N(mu, sigma); known: bool [D]."""
  k, u = known, ~known
  gain = np.linalg.solve(sigma[np.ix_(k, k)], sigma[np.ix_(k, u)]).T
  return (mu[u] + gain @ (x[k] - mu[k]),
          sigma[np.ix_(u, u)] - gain @ sigma[np.ix_(k, u)])


def repaint_moments(mu, sigma, abar, walk, mask, known):
  """Exact mean [D] and covariance [D, D] of RePaint's output (Lugmayr et al., 2022, alg. 1
  with its jumps) for N(mu, sigma) data and the optimal denoiser, in float64.

  abar: the chain's alphas_cumprod [N]; walk: rows (kind, i) (0: the ancestral step at index i
  with the posterior mean given E[x0 | x_i] and variance beta_i, none at i = 0; the known
  pixels ~ q(x_{i-1} | known); 1: x_i ~ q(x_i | x_{i-1})); mask: 1 for known pixels [D].
  Every step is x' = A x + b + noise, so the moments propagate exactly.
  """
  d = len(mu)
  abar = np.asarray(abar, np.float64)
  abar_prev = np.append(1.0, abar[:-1])
  beta = 1.0 - abar / abar_prev
  m_k, eye = np.diag(mask), np.eye(d)
  m_u = eye - m_k
  mean, cov = np.zeros(d), eye
  for kind, i in walk:
    if kind == 1:
      mean, cov = np.sqrt(1 - beta[i]) * mean, (1 - beta[i]) * cov + beta[i] * eye
      continue
    gain = np.sqrt(abar[i]) * sigma @ np.linalg.inv(abar[i] * sigma + (1 - abar[i]) * eye)
    c1 = beta[i] * np.sqrt(abar_prev[i]) / (1 - abar[i])  # Ho et al. eq. 7
    c2 = (1 - abar_prev[i]) * np.sqrt(1 - beta[i]) / (1 - abar[i])
    a = c1 * gain + c2 * eye
    b = c1 * (mu - gain @ (np.sqrt(abar[i]) * mu))
    noise = beta[i] if i > 0 else 0.0
    mean = m_k @ (np.sqrt(abar_prev[i]) * known) + m_u @ (a @ mean + b)
    cov = (1 - abar_prev[i]) * m_k + noise * m_u + m_u @ a @ cov @ a.T @ m_u
  return mean, cov


def ddim_inversion(mu, sigma, abar, x0):
  """DDIM's deterministic ODE run forward (eta = 0; eps taken at the state each step starts
  from, at the chain's first timestep for x0) with the optimal denoiser of N(mu, sigma) data,
  in float64: x0 [B, D] -> x_T [B, D]. abar: the chain's alphas_cumprod [N]."""
  abar = np.asarray(abar, np.float64)
  abar_from = np.append(1.0, abar[:-1])
  eye, x = np.eye(len(mu)), np.asarray(x0, np.float64)
  for i in range(len(abar)):
    ab = abar[max(i - 1, 0)]  # the timestep the model is asked at
    gain = np.sqrt(ab) * sigma @ np.linalg.inv(ab * sigma + (1 - ab) * eye)
    x0_model = mu + (x - np.sqrt(ab) * mu) @ gain.T
    eps = (x - np.sqrt(ab) * x0_model) / np.sqrt(1 - ab)
    x0_hat = (x - np.sqrt(1 - abar_from[i]) * eps) / np.sqrt(abar_from[i])
    x = np.sqrt(abar[i]) * x0_hat + np.sqrt(1 - abar[i]) * eps
  return x
