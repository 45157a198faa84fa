"""Tests of ddpm_jax/inception.py and ddpm_jax/fid.py.

The real weights cannot be downloaded here, so the loading path runs on files the tests write
(random weights in the right shapes) and the torch-name mapping on a fake torch-style state dict
of NumPy arrays (tests/test_fid_reference.py runs pytorch-fid's own network's reference). The full-size network goes through jax.eval_shape for shapes and counts; one
jit-compiled forward function (batch of 2, 299x299 after the protocol's resize) runs a few times.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.special

from ddpm_jax import fid, inception
from ddpm_jax.inception import InceptionV3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# The FID Inception's layers, written out from torchvision's Inception3 / InceptionA..E
# definitions and pytorch-fid's fid_inception_v3() (num_classes=1008, aux_logits=False), without
# looking at ddpm_jax/inception.py: (torch module prefix, in channels, out channels, kh, kw) for
# every BasicConv2d (a bias-free conv + BatchNorm).

def _inception_a(p, cin, pool_features):
  return [(f"{p}.branch1x1", cin, 64, 1, 1), (f"{p}.branch5x5_1", cin, 48, 1, 1),
          (f"{p}.branch5x5_2", 48, 64, 5, 5), (f"{p}.branch3x3dbl_1", cin, 64, 1, 1),
          (f"{p}.branch3x3dbl_2", 64, 96, 3, 3), (f"{p}.branch3x3dbl_3", 96, 96, 3, 3),
          (f"{p}.branch_pool", cin, pool_features, 1, 1)]


def _inception_b(p, cin):
  return [(f"{p}.branch3x3", cin, 384, 3, 3), (f"{p}.branch3x3dbl_1", cin, 64, 1, 1),
          (f"{p}.branch3x3dbl_2", 64, 96, 3, 3), (f"{p}.branch3x3dbl_3", 96, 96, 3, 3)]


def _inception_c(p, cin, c7):
  return [(f"{p}.branch1x1", cin, 192, 1, 1), (f"{p}.branch7x7_1", cin, c7, 1, 1),
          (f"{p}.branch7x7_2", c7, c7, 1, 7), (f"{p}.branch7x7_3", c7, 192, 7, 1),
          (f"{p}.branch7x7dbl_1", cin, c7, 1, 1), (f"{p}.branch7x7dbl_2", c7, c7, 7, 1),
          (f"{p}.branch7x7dbl_3", c7, c7, 1, 7), (f"{p}.branch7x7dbl_4", c7, c7, 7, 1),
          (f"{p}.branch7x7dbl_5", c7, 192, 1, 7), (f"{p}.branch_pool", cin, 192, 1, 1)]


def _inception_d(p, cin):
  return [(f"{p}.branch3x3_1", cin, 192, 1, 1), (f"{p}.branch3x3_2", 192, 320, 3, 3),
          (f"{p}.branch7x7x3_1", cin, 192, 1, 1), (f"{p}.branch7x7x3_2", 192, 192, 1, 7),
          (f"{p}.branch7x7x3_3", 192, 192, 7, 1), (f"{p}.branch7x7x3_4", 192, 192, 3, 3)]


def _inception_e(p, cin):
  return [(f"{p}.branch1x1", cin, 320, 1, 1), (f"{p}.branch3x3_1", cin, 384, 1, 1),
          (f"{p}.branch3x3_2a", 384, 384, 1, 3), (f"{p}.branch3x3_2b", 384, 384, 3, 1),
          (f"{p}.branch3x3dbl_1", cin, 448, 1, 1), (f"{p}.branch3x3dbl_2", 448, 384, 3, 3),
          (f"{p}.branch3x3dbl_3a", 384, 384, 1, 3), (f"{p}.branch3x3dbl_3b", 384, 384, 3, 1),
          (f"{p}.branch_pool", cin, 192, 1, 1)]


FID_CONV_LAYERS = (
    [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3),
     ("Conv2d_2b_3x3", 32, 64, 3, 3), ("Conv2d_3b_1x1", 64, 80, 1, 1),
     ("Conv2d_4a_3x3", 80, 192, 3, 3)]
    + _inception_a("Mixed_5b", 192, 32) + _inception_a("Mixed_5c", 256, 64)
    + _inception_a("Mixed_5d", 288, 64) + _inception_b("Mixed_6a", 288)
    + _inception_c("Mixed_6b", 768, 128) + _inception_c("Mixed_6c", 768, 160)
    + _inception_c("Mixed_6d", 768, 160) + _inception_c("Mixed_6e", 768, 192)
    + _inception_d("Mixed_7a", 768) + _inception_e("Mixed_7b", 1280)
    + _inception_e("Mixed_7c", 2048))
FC_IN, FC_OUT = 2048, 1008


def _table_counts(conv_layers, fc_out):
  """(trainable parameters, BatchNorm running-statistic values) of a layer table + fc."""
  trainable = sum(cin * cout * kh * kw + 2 * cout for _, cin, cout, kh, kw in conv_layers)
  stats = sum(2 * cout for _, _, cout, _, _ in conv_layers)
  return trainable + FC_IN * fc_out + fc_out, stats


def test_layer_table_reproduces_the_published_counts():
  trainable, stats = _table_counts(FID_CONV_LAYERS, FC_OUT)
  assert len(FID_CONV_LAYERS) == 94
  assert trainable == 23_850_960  # sum(p.numel() for p in fid_inception_v3().parameters())
  # The float values stored in pt_inception-2015-12-05-6726825d.pth: parameters plus the
  # BatchNorm running mean/var (its num_batches_tracked counters aside).
  assert trainable + stats == 23_885_392
  # The same table with torchvision's defaults (1000 classes, the auxiliary classifier: a 1x1
  # conv 768->128, a 5x5 conv 128->768, fc 768->1000) gives torchvision's published
  # inception_v3 count, a check on the table itself.
  aux = [("AuxLogits.conv0", 768, 128, 1, 1), ("AuxLogits.conv1", 128, 768, 5, 5)]
  tv_trainable, _ = _table_counts(FID_CONV_LAYERS + aux, 1000)
  assert tv_trainable + 768 * 1000 + 1000 == 27_161_264


def test_model_matches_the_layer_table_key_by_key():
  shapes = inception.param_shapes()
  expected = {"fc/kernel": (FC_IN, FC_OUT), "fc/bias": (FC_OUT,)}
  for name, cin, cout, kh, kw in FID_CONV_LAYERS:
    prefix = name.replace(".", "/")
    expected[f"{prefix}/conv/kernel"] = (kh, kw, cin, cout)
    for leaf in ("scale", "bias", "mean", "var"):
      expected[f"{prefix}/bn/{leaf}"] = (cout,)
  assert shapes == expected
  trainable, stats = _table_counts(FID_CONV_LAYERS, FC_OUT)
  assert inception.count_params() == trainable == inception.NUM_PARAMS == 23_850_960
  assert sum(int(np.prod(s)) for s in shapes.values()) == trainable + stats == 23_885_392
  assert inception.NUM_VALUES == 23_885_392


@pytest.mark.parametrize("size", [299, inception.MIN_INPUT_SIZE])
def test_output_shapes_without_weights(size):
  x = jax.ShapeDtypeStruct((3, size, size, 3), jnp.float32)
  variables = jax.eval_shape(InceptionV3().init, jax.random.key(0), x)
  assert set(variables) == {"params", "batch_stats"}
  pool, logits = jax.eval_shape(InceptionV3().apply, variables, x)
  assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
  assert pool.dtype == logits.dtype == jnp.float32


def test_too_small_input_is_rejected():
  x = jax.ShapeDtypeStruct((1, 74, 74, 3), jnp.float32)
  with pytest.raises(ValueError, match="H, W >= 75"):
    jax.eval_shape(InceptionV3().init, jax.random.key(0), x)


# ---------------------------------------------------------------------------------------------
# Resize.

def _torch_bilinear_reference(x, out_h, out_w):
  """float64 loop version of ATen's upsample_bilinear2d, align_corners=False, [H, W, C]."""
  in_h, in_w = x.shape[:2]

  def source(dst, in_size, out_size):
    src = max((in_size / out_size) * (dst + 0.5) - 0.5, 0.0)
    i0 = int(src)
    i1 = i0 + 1 if i0 < in_size - 1 else i0
    lam1 = src - i0
    return i0, i1, 1.0 - lam1, lam1

  out = np.zeros((out_h, out_w, x.shape[2]))
  for oy in range(out_h):
    y0, y1, wy0, wy1 = source(oy, in_h, out_h)
    for ox in range(out_w):
      x0, x1, wx0, wx1 = source(ox, in_w, out_w)
      out[oy, ox] = (wy0 * (wx0 * x[y0, x0] + wx1 * x[y0, x1])
                     + wy1 * (wx0 * x[y1, x0] + wx1 * x[y1, x1]))
  return out


@pytest.mark.parametrize("in_hw,out_hw", [((4, 5), (9, 13)), ((7, 6), (3, 11)), ((5, 5), (5, 5))])
def test_resize_matches_torch_bilinear_reference(in_hw, out_hw):
  x = np.random.default_rng(0).uniform(-1, 1, (2,) + in_hw + (3,))
  got = np.asarray(inception.resize_bilinear(jnp.asarray(x, jnp.float32), out_hw))
  want = np.stack([_torch_bilinear_reference(xi, *out_hw) for xi in x])
  np.testing.assert_allclose(got, want, atol=2e-6)
  if all(o >= i for i, o in zip(in_hw, out_hw)):  # Upsampling: jax.image.resize agrees.
    ref = jax.image.resize(jnp.asarray(x, jnp.float32), (2,) + out_hw + (3,), "bilinear")
    np.testing.assert_allclose(got, np.asarray(ref), atol=2e-6)


def test_preprocess_resizes_to_299_and_repeats_gray():
  x = np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
  out = inception.preprocess(jnp.asarray(x))
  assert out.shape == (2, 299, 299, 3)
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  np.testing.assert_allclose(out[:, 0, 0, 0], x[:, 0, 0, 0], atol=1e-6)  # Corners are copies.
  with pytest.raises(ValueError, match="C = 1 or 3"):
    inception.preprocess(jnp.zeros((2, 8, 8, 4)))


# ---------------------------------------------------------------------------------------------
# Weights: loading, errors, and the network run on loaded weights.

def test_loaded_values_land_in_their_collections(weights_file, random_weights):
  variables = inception.load_inception_params(weights_file)
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]) == {"mean", "var"}
  assert set(variables["params"]["Mixed_7c"]["branch_pool"]["bn"]) == {"scale", "bias"}
  flat = inception.flat_from_variables(variables)
  assert set(flat) == set(random_weights)
  for key, value in random_weights.items():
    np.testing.assert_array_equal(flat[key], value, err_msg=key)
  # The tree is what the model itself initialises (same structure and shapes).
  init = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32))
  assert jax.tree.structure(init) == jax.tree.structure(variables)


def test_features_on_loaded_weights(weights_file, random_weights):
  variables = inception.load_inception_params(weights_file)
  images = np.random.default_rng(2).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  # 3 images in batches of 2: the last batch is padded (one compilation for all calls below).
  pool, logits = fid.inception_features(variables, images, batch_size=2)
  assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
  assert pool.dtype == logits.dtype == np.float64
  assert np.all(np.isfinite(pool)) and np.all(pool >= 0) and pool.std() > 1e-3  # ReLU output.
  # fc kernel = identity: unbiased logits are the first 1008 features; the bias adds exactly.
  np.testing.assert_allclose(logits, pool[:, :1008], rtol=1e-6, atol=1e-6)
  pool_b, logits_b = fid.inception_features(variables, images, batch_size=2, logits_bias=True)
  np.testing.assert_array_equal(pool_b, pool)
  np.testing.assert_allclose(logits_b - logits, np.broadcast_to(random_weights["fc/bias"],
                                                                 (3, 1008)), atol=1e-5)
  # Order and padding: the same images in another order and batch grouping give the same rows.
  pool_r, _ = fid.inception_features(variables, images[::-1], batch_size=2)
  np.testing.assert_allclose(pool_r[::-1], pool, rtol=1e-5, atol=1e-6)
  # Images of different contents give different features.
  assert np.abs(pool[0] - pool[1]).max() > 1e-3


def test_features_on_several_devices_equal_one_device(weights_file):
  variables = inception.load_inception_params(weights_file)
  images = np.random.default_rng(4).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  devices = jax.local_devices()
  assert len(devices) >= 2  # conftest: 8 CPU devices
  one, _ = fid.inception_features(variables, images, batch_size=2, devices=devices[:1])
  several, _ = fid.inception_features(variables, images, batch_size=2)  # split over 2 devices
  np.testing.assert_allclose(several, one, rtol=1e-6, atol=1e-6)


def test_gray_images_equal_their_rgb_repeat(weights_file):
  variables = inception.load_inception_params(weights_file)
  gray = np.random.default_rng(3).uniform(-1, 1, (2, 16, 16, 1)).astype(np.float32)
  pool_g, _ = fid.inception_features(variables, gray, batch_size=2)
  pool_rgb, _ = fid.inception_features(variables, np.repeat(gray, 3, axis=-1), batch_size=2)
  np.testing.assert_allclose(pool_g, pool_rgb, rtol=1e-6, atol=1e-7)


def test_missing_weights_file_says_how_to_get_it(tmp_path):
  path = tmp_path / "nope.npz"
  with pytest.raises(FileNotFoundError) as e:
    inception.load_inception_params(path)
  msg = str(e.value)
  assert str(path) in msg and "docs/inception_weights.md" in msg
  assert "config.eval.inception_weights" in msg
  assert "pt_inception-2015-12-05-6726825d.pth" in msg


def test_weights_file_that_is_not_readable(tmp_path):
  path = tmp_path / "pt_inception.npz"
  path.write_bytes(b"PK\x03\x04 not really an archive")
  with pytest.raises(ValueError, match="not a readable .npz"):
    inception.load_inception_params(path)
  path = tmp_path / "pt_inception.pth"
  path.write_bytes(b"PK\x03\x04 not really an archive")
  with pytest.raises(ValueError, match="was refused: it is not a readable torch state dict"):
    inception.load_inception_params(path)


def test_bad_weights_give_one_clear_error(random_weights, tmp_path):
  missing = dict(random_weights)
  del missing["Mixed_6c/branch7x7_2/bn/var"]
  with pytest.raises(ValueError, match="lack 1 .*'Mixed_6c/branch7x7_2/bn/var'"):
    inception.variables_from_flat(missing)
  extra = dict(random_weights, **{"AuxLogits/conv0/conv/kernel": np.zeros((1, 1, 768, 128))})
  with pytest.raises(ValueError, match="'AuxLogits/conv0/conv/kernel'"):
    inception.variables_from_flat(extra)
  wrong = dict(random_weights, **{"fc/kernel": random_weights["fc/kernel"].T})
  with pytest.raises(ValueError, match=r"'fc/kernel' the shape \(1008, 2048\).*\(2048, 1008\)"):
    inception.variables_from_flat(wrong)
  bad = dict(random_weights, **{"fc/bias": np.full(1008, np.nan, np.float32)})
  with pytest.raises(ValueError, match="'fc/bias' non-finite"):
    inception.variables_from_flat(bad)
  path = tmp_path / "wrong.npz"  # The same errors through a file name the file.
  np.savez(path, **wrong)
  with pytest.raises(ValueError, match=f"{path}.*'fc/kernel'"):
    inception.load_inception_params(path)


# ---------------------------------------------------------------------------------------------
# The torch-name mapping, on a fake torch-style state dict of NumPy arrays.

def _fake_torch_state_dict(rng):
  sd = {}
  for name, cin, cout, kh, kw in FID_CONV_LAYERS:
    sd[f"{name}.conv.weight"] = rng.standard_normal((cout, cin, kh, kw), dtype=np.float32)
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      sd[f"{name}.bn.{leaf}"] = rng.standard_normal((cout,), dtype=np.float32)
    sd[f"{name}.bn.num_batches_tracked"] = np.array(0, np.int64)
  sd["fc.weight"] = rng.standard_normal((FC_OUT, FC_IN), dtype=np.float32)
  sd["fc.bias"] = rng.standard_normal((FC_OUT,), dtype=np.float32)
  return sd


def test_state_dict_mapping_covers_every_torch_key():
  sd = _fake_torch_state_dict(np.random.default_rng(4))
  out = inception.flat_from_state_dict(sd)
  shapes = inception.param_shapes()
  assert set(out) == set(shapes)  # All covered, num_batches_tracked dropped.
  for key, value in out.items():
    assert value.shape == shapes[key] and value.dtype == np.float32, key
  w = sd["Mixed_6b.branch7x7_2.conv.weight"]  # [out, in, kh, kw] = [128, 128, 1, 7]
  k = out["Mixed_6b/branch7x7_2/conv/kernel"]  # [kh, kw, in, out]
  assert k[0, 5, 3, 7] == w[7, 3, 0, 5]
  np.testing.assert_array_equal(k, w.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(out["fc/kernel"], sd["fc.weight"].T)
  np.testing.assert_array_equal(out["fc/bias"], sd["fc.bias"])
  np.testing.assert_array_equal(out["Conv2d_1a_3x3/bn/scale"], sd["Conv2d_1a_3x3.bn.weight"])
  np.testing.assert_array_equal(out["Conv2d_1a_3x3/bn/bias"], sd["Conv2d_1a_3x3.bn.bias"])
  np.testing.assert_array_equal(out["Mixed_7c/branch_pool/bn/mean"],
                                sd["Mixed_7c.branch_pool.bn.running_mean"])
  np.testing.assert_array_equal(out["Mixed_7c/branch_pool/bn/var"],
                                sd["Mixed_7c.branch_pool.bn.running_var"])
  inception.variables_from_flat(out)  # The loader accepts the converted arrays.


def test_state_dict_mapping_rejects_foreign_keys():
  with pytest.raises(ValueError, match="'AuxLogits.fc.weight'"):
    inception.flat_from_state_dict({"AuxLogits.fc.weight": np.zeros((1000, 768))})
  with pytest.raises(ValueError, match=r"'fc.weight' with shape \(1008,\)"):
    inception.flat_from_state_dict({"fc.weight": np.zeros((1008,))})


# ---------------------------------------------------------------------------------------------
# Statistics and the Fréchet distance.

def _random_spd(rng, dim):
  a = rng.standard_normal((dim, dim))
  return a @ a.T / dim + 0.1 * np.eye(dim)


def _reference_fd(mu1, s1, mu2, s2):
  """float64 SciPy reference: Tr sqrt(s1 s2) = sum of the square roots of the eigenvalues of the
  symmetric sqrt(s1) s2 sqrt(s1) (similar to s1 s2)."""
  r1 = scipy.linalg.sqrtm(s1).real
  eig = scipy.linalg.eigvalsh(r1 @ s2 @ r1)
  return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(eig))


def test_frechet_distance_matches_scipy_reference():
  rng = np.random.default_rng(5)
  mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
  s1, s2 = _random_spd(rng, 64), _random_spd(rng, 64)
  d = fid.frechet_distance(mu1, s1, mu2, s2)
  assert isinstance(d, float)
  np.testing.assert_allclose(d, _reference_fd(mu1, s1, mu2, s2), rtol=1e-9)
  np.testing.assert_allclose(fid.frechet_distance(mu2, s2, mu1, s1), d, rtol=1e-9)  # Symmetric.
  shift = rng.standard_normal(64)  # Invariant to a common shift of the means.
  np.testing.assert_allclose(fid.frechet_distance(mu1 + shift, s1, mu2 + shift, s2), d,
                             rtol=1e-9)
  # Equal covariances: only the squared mean distance is left.
  np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s1),
                             np.sum((mu1 - mu2) ** 2), rtol=1e-7)
  assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-6


def test_frechet_distance_of_sample_statistics():
  rng = np.random.default_rng(6)
  f1 = rng.standard_normal((500, 32))
  f2 = 1.5 * rng.standard_normal((400, 32)) + 0.3
  mu1, s1 = fid.feature_statistics(f1)
  mu2, s2 = fid.feature_statistics(f2)
  assert mu1.dtype == s1.dtype == np.float64 and s1.shape == (32, 32)
  np.testing.assert_allclose(mu1, f1.mean(0))
  np.testing.assert_allclose(s1, np.cov(f1, rowvar=False))
  np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2),
                             _reference_fd(mu1, s1, mu2, s2), rtol=1e-9)
  # Fewer samples than dimensions: singular covariances still give a finite, ~0 self-distance.
  mu3, s3 = fid.feature_statistics(rng.standard_normal((10, 32)))
  assert abs(fid.frechet_distance(mu3, s3, mu3, s3)) < 1e-4


def test_frechet_distance_bad_input():
  mu, s = np.zeros(4), np.eye(4)
  with pytest.raises(ValueError, match="imaginary component"):
    fid.frechet_distance(mu, -s, mu, s)  # Not a covariance.
  with pytest.raises(ValueError, match="different dimensions"):
    fid.frechet_distance(mu, s, np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match=r"mu \[D\] and sigma \[D, D\]"):
    fid.frechet_distance(mu, np.eye(3), mu, s)
  with pytest.raises(ValueError, match="NaN or Inf"):
    fid.frechet_distance(mu * np.nan, s, mu, s)
  with pytest.raises(ValueError, match="N >= 2"):
    fid.feature_statistics(np.zeros((1, 4)))


def test_statistics_round_trip_and_reference_files(tmp_path):
  rng = np.random.default_rng(7)
  mu, sigma = rng.standard_normal(16), _random_spd(rng, 16)
  path = tmp_path / "sub" / "stats.npz"
  fid.save_statistics(path, mu, sigma)
  with np.load(path) as f:
    assert sorted(f.files) == ["mu", "sigma"]
  mu2, sigma2 = fid.load_statistics(path)
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  # A pytorch-fid/TTUR-style file (np.savez with mu and sigma, here float32).
  ttur = tmp_path / "fid_stats_ttur.npz"
  np.savez(ttur, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
  mu3, sigma3 = fid.load_statistics(ttur)
  assert mu3.dtype == sigma3.dtype == np.float64
  np.testing.assert_allclose(sigma3, sigma, rtol=1e-6)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    fid.load_statistics(tmp_path / "missing.npz")
  np.savez(tmp_path / "bad.npz", mean=mu)
  with pytest.raises(ValueError, match="lacks the key 'mu'"):
    fid.load_statistics(tmp_path / "bad.npz")


# ---------------------------------------------------------------------------------------------
# Inception Score.

def _reference_is(logits, splits):
  """The original improved-gan code, on probabilities (needs no zero probabilities)."""
  preds = scipy.special.softmax(np.asarray(logits, np.float64), axis=1)
  scores = []
  for i in range(splits):
    part = preds[(i * preds.shape[0] // splits):((i + 1) * preds.shape[0] // splits), :]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return np.mean(scores), np.std(scores)


def test_inception_score_uniform_is_one():
  mean, std = fid.inception_score(np.full((100, 1008), 3.0), splits=10)
  assert abs(mean - 1.0) < 1e-12 and std < 1e-12


@pytest.mark.parametrize("k", [1, 7, 10, 1008])
def test_inception_score_confident_even_classes_is_k(k):
  n = 10 * k
  logits = np.zeros((n, 1008))
  logits[np.arange(n), np.arange(n) % k] = 100.0  # Each split holds every class once.
  mean, std = fid.inception_score(logits, splits=10)
  np.testing.assert_allclose(mean, k, rtol=1e-6)
  assert std < 1e-6 * k


def test_inception_score_matches_original_formula():
  logits = 3.0 * np.random.default_rng(8).standard_normal((103, 1008))  # Uneven splits.
  np.testing.assert_allclose(fid.inception_score(logits, splits=10), _reference_is(logits, 10),
                             rtol=1e-10)
  np.testing.assert_allclose(fid.inception_score(logits, splits=1), _reference_is(logits, 1),
                             rtol=1e-10)
  with pytest.raises(ValueError, match="splits"):
    fid.inception_score(logits, splits=104)
  with pytest.raises(ValueError, match="logits"):
    fid.inception_score(np.zeros(10))


def test_inception_features_bad_input():
  with pytest.raises(ValueError, match="batch_size"):
    fid.inception_features({}, np.zeros((2, 8, 8, 3), np.float32), batch_size=0)
  with pytest.raises(ValueError, match="C = 1 or 3"):
    fid.inception_features({}, np.zeros((2, 8, 8, 2), np.float32))
  with pytest.raises(ValueError, match="x / 127.5 - 1"):
    fid.inception_features({}, np.zeros((2, 8, 8, 3), np.uint8))
