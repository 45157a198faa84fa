"""A Fréchet distance for scikit-learn's digits, in the feature space of a small classifier.

FID's idea at the digits' scale: fit one Gaussian to the features of real digits and one to
those of generated digits, and report the Fréchet distance between them. The features are the
hidden layer (64 ReLU units) of a scikit-learn MLPClassifier trained, with a fixed seed, on the
train split of the digits (the same split as ddpm_jax.data: the last 297 digits are the test
split). Its held-out accuracy is printed by `describe()`; the held-out digits' own distance is
the floor any model can hope for at that sample count.

    scorer = DigitsFrechet()
    scorer.distance(images)      # images uint8 [N, S, S(, 1)] in 0..255, S = 8 or a multiple
    scorer.floor()               # the 297 held-out digits' distance

Images larger than 8x8 (the 32x32 upsampled digits) are average-pooled back to 8x8 before the
classifier sees them. Runs wherever NumPy, SciPy and scikit-learn are installed (both the
project's environment and the peer's).
"""
import warnings

import numpy as np
import scipy.linalg

NUM_TEST = 297  # as ddpm_jax.data.DIGITS_NUM_TEST; kept here so the peer's side needs no JAX
SEED = 0


def digits_uint8():
  """scikit-learn's digits as ddpm_jax.data reads them: uint8 [1797, 8, 8, 1], int [1797]."""
  from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
  d = load_digits()
  return np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None], d.target


def split(images, labels):
  """(train images, train labels, test images, test labels): the last NUM_TEST are the test."""
  cut = len(images) - NUM_TEST
  return images[:cut], labels[:cut], images[cut:], labels[cut:]


def upsample(images, size):
  """uint8 [N, 8, 8, 1] -> uint8 [N, size, size, 1], bilinear (scipy.ndimage.zoom, order 1)."""
  import scipy.ndimage
  factor = size / images.shape[1]
  out = scipy.ndimage.zoom(images[..., 0].astype(np.float64), (1, factor, factor), order=1,
                           grid_mode=True, mode="nearest")
  return np.clip(np.round(out), 0, 255).astype(np.uint8)[..., None]


def to_vectors(images):
  """uint8 or float [N, S, S(, 1)] in 0..255 -> float64 [N, 64] in [0, 1], pooled to 8x8."""
  x = np.asarray(images, np.float64)
  if x.ndim == 4:
    x = x[..., 0]
  n, s = x.shape[0], x.shape[1]
  if s % 8 or x.shape[2] != s:
    raise ValueError(f"Expected square images whose size is a multiple of 8, got {x.shape}.")
  f = s // 8
  return x.reshape(n, 8, f, 8, f).mean(axis=(2, 4)).reshape(n, 64) / 255.0


def frechet_distance(mu1, sigma1, mu2, sigma2):
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64."""
  with warnings.catch_warnings():  # a singular product is handled below
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean, _ = scipy.linalg.sqrtm(sigma1 @ sigma2, disp=False)
  if not np.isfinite(covmean).all():  # singular product: regularise, as FID's reference code does
    eps = 1e-6 * np.eye(len(mu1))
    covmean = scipy.linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
  covmean = np.real(covmean)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def gaussian(features):
  """(mean [D], covariance [D, D]) of features [N, D]."""
  return features.mean(axis=0), np.cov(features, rowvar=False)


class DigitsFrechet:
  """The classifier (fitted on construction, about a second) and the train split's statistics."""

  def __init__(self, seed=SEED):
    from sklearn.neural_network import MLPClassifier
    images, labels = digits_uint8()
    self.train_x, train_y, self.test_x, test_y = split(images, labels)
    self.clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=seed)
    self.clf.fit(to_vectors(self.train_x), train_y)
    self.accuracy = float(self.clf.score(to_vectors(self.test_x), test_y))
    self.reference = gaussian(self.features(self.train_x))

  def features(self, images):
    """The classifier's hidden layer, float64 [N, 64]: relu(x W1 + b1)."""
    h = to_vectors(images) @ self.clf.coefs_[0] + self.clf.intercepts_[0]
    return np.maximum(h, 0.0)

  def distance(self, images):
    """Fréchet distance of images (uint8 [N, S, S(, 1)], 0..255) to the train split's digits."""
    return frechet_distance(*gaussian(self.features(images)), *self.reference)

  def floor(self, size=8):
    """The held-out digits' own distance (upsampled to size x size first, as the data were)."""
    test = self.test_x if size == 8 else upsample(self.test_x, size)
    return self.distance(test)

  def describe(self):
    return (f"Fréchet distance in the 64-d hidden layer of an MLPClassifier (seed {SEED}) fitted "
            f"on the {len(self.train_x)} train digits ({self.accuracy:.1%} accuracy on the "
            f"{len(self.test_x)} held-out digits), to the train digits' features")


def to_uint8(images):
  """float images in [-1, 1] -> uint8 0..255, as a PNG writer would round them."""
  return np.clip(np.round((np.asarray(images, np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
