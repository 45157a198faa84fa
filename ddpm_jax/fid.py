"""FID and Inception Score: Inception features in JAX, statistics and scores in float64 NumPy.

    variables = load_inception_params(config.eval.inception_weights)
    pool, logits = inception_features(variables, images, batch_size=100)  # images in [-1, 1]
    mu, sigma = feature_statistics(pool)
    ref_mu, ref_sigma = load_statistics("fid_stats_cifar10_train.npz")
    fid = frechet_distance(mu, sigma, ref_mu, ref_sigma)
    is_mean, is_std = inception_score(logits, splits=10)

Only `inception_features` runs JAX (the network, jit-compiled once per batch shape); the
statistics and both scores are float64 NumPy/SciPy, as in pytorch-fid and the original
Inception Score code, so they give the same numbers on any backend.
"""
import os
import tempfile
from typing import Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special

from ddpm_jax import placement
from ddpm_jax.inception import PRECISION, InceptionV3, preprocess


@jax.jit
def _forward(variables, images):
  """images [B, H, W, C] in [-1, 1] -> (pool, logits with the fc bias, logits without it)."""
  pool, logits = InceptionV3().apply(variables, preprocess(images))
  unbiased = jnp.dot(pool, variables["params"]["fc"]["kernel"], precision=PRECISION)
  return pool, logits, unbiased


def inception_features(params: Mapping, images, batch_size: int = 50, *,
                       logits_bias: bool = False, devices: Optional[Sequence] = None
                       ) -> Tuple[np.ndarray, np.ndarray]:
  """Inception pool3 features and logits of images, float64 NumPy ([N, 2048], [N, 1008]).

  params: the Flax variables of `load_inception_params`. images: float [N, H, W, C] in [-1, 1],
  C = 1 (repeated to 3) or 3, any H, W; each is resized to 299x299 as `inception.preprocess`
  documents. Batches of `batch_size` go through one jit-compiled function, split over as many
  of `devices` (default: all local devices) as divide batch_size; each image's features do
  not depend on the split. The last batch is padded to full size (one compilation) and the
  padding dropped.

  logits_bias: the original Inception Score code (Salimans et al., openai/improved-gan) takes the
  softmax of pool3 @ W, the TF graph's "softmax/logits/MatMul" without its bias, and so do
  TTUR's, torch-fidelity's ("logits_unbiased") and OpenAI's guided-diffusion evaluator; that is
  the default here. logits_bias=True adds the fc bias (the graph's full "softmax/logits", as
  tensorflow_gan's classifier score uses).
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
    raise ValueError("inception_features takes images [N, H, W, C] with N >= 1 and C = 1 or 3, "
                     f"got shape {images.shape}.")
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"inception_features takes float images in [-1, 1], got dtype "
                     f"{images.dtype}; scale uint8 data with x / 127.5 - 1 first.")
  n = images.shape[0]
  batch_size = int(min(batch_size, n))
  devices = list(jax.local_devices() if devices is None else devices)
  # As many devices as divide the batch: no padding beyond the last batch's.
  devices = devices[:max(k for k in range(1, len(devices) + 1) if batch_size % k == 0)]
  sharding = placement.batch_sharding(devices)
  params = placement.replicate(params, devices)
  outputs = []
  for start in range(0, n, batch_size):
    batch = images[start:start + batch_size].astype(np.float32)
    if batch.shape[0] < batch_size:
      pad = np.zeros((batch_size - batch.shape[0],) + batch.shape[1:], np.float32)
      batch = np.concatenate([batch, pad])
    # Dispatched asynchronously; fetched below.
    outputs.append(_forward(params, jax.device_put(batch, sharding)))
  pool = np.concatenate([np.asarray(o[0], np.float64) for o in outputs])[:n]
  logits = np.concatenate([np.asarray(o[1 if logits_bias else 2], np.float64)
                           for o in outputs])[:n]
  return pool, logits


def feature_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
  """Mean [D] and covariance [D, D] (np.cov, rowvar=False: divided by N - 1) in float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"feature_statistics needs features [N, D] with N >= 2, got shape "
                     f"{features.shape}.")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _check_statistics(mu, sigma, name):
  mu = np.atleast_1d(np.asarray(mu, np.float64))
  sigma = np.atleast_2d(np.asarray(sigma, np.float64))
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"Statistics {name} need mu [D] and sigma [D, D], got shapes {mu.shape} "
                     f"and {sigma.shape}.")
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f"Statistics {name} contain NaN or Inf.")
  return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2), in float64 NumPy/SciPy (no JAX):
  ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)).

  As pytorch-fid: when sqrtm of the product is not finite (a singular product, e.g. fewer samples
  than dimensions), eps * I is added to both covariances; imaginary parts that numerical error
  leaves in sqrtm are dropped when the diagonal's are below 1e-3, and larger ones are an error.
  """
  mu1, sigma1 = _check_statistics(mu1, sigma1, "1")
  mu2, sigma2 = _check_statistics(mu2, sigma2, "2")
  if mu1.shape != mu2.shape:
    raise ValueError(f"The two statistics have different dimensions: {mu1.shape[0]} and "
                     f"{mu2.shape[0]}.")
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.all(np.isfinite(covmean)):
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError("The matrix square root of sigma1 @ sigma2 has an imaginary component of "
                       f"{np.max(np.abs(covmean.imag)):.3g}: the covariances are not valid "
                       "(symmetric positive semi-definite) or far too ill-conditioned.")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits, splits: int = 10) -> Tuple[float, float]:
  """Inception Score of Salimans et al. (2016), as the original code computes it:
  p(y|x) = softmax(logits) over the 1008 classes; the N samples are cut into `splits` equal
  consecutive parts (sizes as i * N // splits); each part scores exp(mean_x KL(p(y|x) || p(y)))
  with p(y) its mean p(y|x); returns the (mean, std) of the part scores, in float64.
  (Computed from log-softmax, so a probability that underflows to 0 adds 0, not NaN.)
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or logits.shape[1] < 2:
    raise ValueError(f"inception_score takes logits [N, K], got shape {logits.shape}.")
  if isinstance(splits, bool) or not isinstance(splits, (int, np.integer)) or not (
      1 <= splits <= logits.shape[0]):
    raise ValueError(f"splits must be an integer in [1, N={logits.shape[0]}], got {splits!r}.")
  if not np.all(np.isfinite(logits)):
    raise ValueError("inception_score got NaN or Inf logits.")
  log_p = scipy.special.log_softmax(logits, axis=1)
  n = logits.shape[0]
  scores = []
  for i in range(splits):
    part = log_p[i * n // splits:(i + 1) * n // splits]
    log_py = scipy.special.logsumexp(part, axis=0) - np.log(part.shape[0])  # log mean p(y|x)
    kl = np.sum(np.exp(part) * (part - log_py[None, :]), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))


def save_statistics(path, mu, sigma) -> None:
  """Write reference statistics as .npz with float64 "mu" [D] and "sigma" [D, D] (the layout of
  pytorch-fid's and TTUR's precomputed files). Written to a temporary file first and renamed,
  so an existing file is never left half-written."""
  mu, sigma = _check_statistics(mu, sigma, f"for {os.fspath(path)!r}")
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_stats_", suffix=".npz")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, mu=mu, sigma=sigma)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load_statistics(path) -> Tuple[np.ndarray, np.ndarray]:
  """Read (mu, sigma) in float64 from an .npz with keys "mu" and "sigma" (ours, pytorch-fid's
  or TTUR's precomputed statistics)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"FID statistics file {path!r} does not exist; write one with "
                            "ddpm_jax.fid.save_statistics or use a precomputed pytorch-fid/TTUR "
                            ".npz with keys 'mu' and 'sigma'.")
  with np.load(path, allow_pickle=False) as f:
    missing = [k for k in ("mu", "sigma") if k not in f.files]
    if missing:
      raise ValueError(f"FID statistics file {path!r} lacks the key {missing[0]!r}; it holds "
                       f"{sorted(f.files)}, and 'mu' and 'sigma' are needed.")
    mu, sigma = f["mu"], f["sigma"]
  return _check_statistics(mu, sigma, f"in {path!r}")
