"""Our FID Inception against pytorch-fid's, through a .pth read without torch.

benchmarks/pytorch_fid_fixture.py ran pytorch-fid's InceptionV3 (the FID variant,
resize_input=True, normalize_input=True) on random weights from a fixed NumPy seed and kept its
pool3 features and calculate_frechet_distance (tests/fixtures/pytorch_fid/reference.npz). Here the
same weights are rebuilt with the script's NumPy function, written as a .pth by ddpm_jax.pth,
loaded by ddpm_jax.inception.load_inception_params, and run through our preprocessing and network.
"""
import importlib.util
import os

import numpy as np
import pytest

from ddpm_jax import fid, inception, pth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "tests", "fixtures", "pytorch_fid", "reference.npz")


def _fixture_script():
  """benchmarks/pytorch_fid_fixture.py (torch is imported only inside its main())."""
  spec = importlib.util.spec_from_file_location(
      "pytorch_fid_fixture", os.path.join(ROOT, "benchmarks", "pytorch_fid_fixture.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def reference():
  with np.load(REFERENCE) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def ours(reference, tmp_path_factory):
  """(our pool3 features of the fixture's images in its order, [(set name, count)])."""
  script = _fixture_script()
  shapes = [tuple(int(d) for d in row if d >= 0) for row in reference["shapes"]]
  state = script.random_state_dict([str(n) for n in reference["names"]], shapes)
  path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
  pth.write_state_dict(path, state)
  del state
  variables = inception.load_inception_params(path)
  sets = script.fixture_images()
  # The protocol's input step per set (gray repeat, resize to 299), then one batch through the
  # network: one compilation instead of one per input shape.
  inputs = np.concatenate([
      np.asarray(inception.preprocess(images.astype(np.float32) / 127.5 - 1.0))
      for _, images in sets])
  pool, _ = fid.inception_features(variables, inputs, batch_size=len(inputs))
  return pool, [(name, len(images)) for name, images in sets]


def test_pool3_features_match_pytorch_fid(reference, ours):
  pool, sets = ours
  ref = reference["pool"].astype(np.float64)
  assert pool.shape == ref.shape == (sum(n for _, n in sets), 2048)
  scale = np.abs(ref).max()
  assert scale > 0.1 and ref.std() > 1e-3  # the random network is not degenerate
  # float32 networks summing in different orders over 94 layers: measured 1.2e-6 .. 3.0e-6
  # (2.6e-7 .. 6.6e-7 of the features' scale, 4.5) per set (benchmarks/inception_features.py),
  # so 5e-6 of the scale leaves a margin for other CPUs' summation orders; a wrong layer, pool
  # or resize gives differences of order 1e-2 and more.
  start = 0
  for name, n in sets:
    err = np.abs(pool[start:start + n] - ref[start:start + n]).max()
    assert err <= 5e-6 * scale, f"{name}: max |ours - pytorch-fid| = {err:.3g}"
    start += n


def test_frechet_distance_matches_pytorch_fid(reference, ours):
  pool, sets = ours
  offsets = np.cumsum([0] + [n for _, n in sets])
  index = {name: slice(offsets[i], offsets[i + 1]) for i, (name, _) in enumerate(sets)}
  ref = reference["pool"].astype(np.float64)
  # Our Fréchet distance on pytorch-fid's own features: the same float64 formula, but 5 samples
  # in 2048 dimensions make sigma_a @ sigma_b singular, where scipy's sqrtm is accurate to
  # ~1e-7 relative only (5.8e-8 seen between the two products' roundings).
  theirs = fid.frechet_distance(*fid.feature_statistics(ref[index["a"]]),
                                *fid.feature_statistics(ref[index["b"]]))
  np.testing.assert_allclose(theirs, float(reference["fid"]), rtol=1e-6)
  # And on our features: the whole pipeline. Measured 7.1e-7 relative (197.452747 against
  # 197.452886): the feature differences above, amplified by the singular sqrtm.
  distance = fid.frechet_distance(*fid.feature_statistics(pool[index["a"]]),
                                  *fid.feature_statistics(pool[index["b"]]))
  np.testing.assert_allclose(distance, float(reference["fid"]), rtol=1e-5)
