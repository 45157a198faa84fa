"""pytorch-fid's FID Inception on random weights: the reference our Inception is checked against.

Runs in the peer's environment (torch and pytorch-fid, benchmarks/requirements-peer.txt):

    python benchmarks/pytorch_fid_fixture.py        # regenerates tests/fixtures/pytorch_fid/
    python benchmarks/pytorch_fid_fixture.py --small_only   # only the small .pth files

The weights come from `random_state_dict()` below: NumPy only, a fixed seed per tensor name,
so tests/test_fid_reference.py rebuilds the same 96 MB of weights without torch, writes them as a
.pth with ddpm_jax.pth and loads them through ddpm_jax.inception. Only small files are
committed:

  reference.npz
    names  str [K]           the state dict's keys in pytorch-fid's order
    shapes int [K, 4]        their shapes, padded with -1
    pool   float32 [N, 2048] pytorch-fid's pool3 features of `fixture_images()` (InceptionV3
                             with output_blocks=[3], resize_input=True, normalize_input=True,
                             use_fid_inception=True, the FID variant), in that order
    fid    float64 []        calculate_frechet_distance of set "a" and set "b" (np.mean and
                             np.cov of their pool3 features, as pytorch-fid's
                             calculate_activation_statistics)
  torch_zip.pth, torch_legacy.pth   a few tensors saved by torch.save (zip format, and
                             _use_new_zipfile_serialization=False), with expected.npz: the
                             reader's own test of both formats on torch's real output.

It also checks that torch.load(weights_only=True) reads what ddpm_jax.pth.write_state_dict
writes, in both formats.

torchvision: pytorch-fid imports `torchvision.models.inception` (pure Python), but the
torchvision wheel from PyPI is built against CUDA torch and its package __init__ fails to load
beside the CPU torch. `_import_torchvision_models()` imports torchvision's subpackages without
running that __init__ (which only loads the compiled ops that the Inception does not use).
"""
import importlib.metadata
import importlib.util
import os
import sys
import types
import zlib

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "fixtures", "pytorch_fid")
SEED = 20151205

# name -> (shape, channels): the images, uint8 from fixed seeds. Sets "a" and "b" (32x32 RGB)
# give the FID; the others cover gray, a size below 299 and one above it.
IMAGE_SETS = (("a", 5, (32, 32, 3)), ("b", 5, (32, 32, 3)), ("gray28", 1, (28, 28, 1)),
              ("rgb64", 1, (64, 64, 3)), ("rgb256", 1, (256, 256, 3)))


def fixture_images():
  """[(set name, uint8 [n, H, W, C])] for IMAGE_SETS: smooth random colour fields with noise,
  set "b" brighter and smoother than "a" so the two sets differ."""
  out = []
  for i, (name, n, (h, w, c)) in enumerate(IMAGE_SETS):
    rng = np.random.default_rng([SEED, i])
    coarse = rng.uniform(0, 255, (n, max(h // 8, 2), max(w // 8, 2), c))
    rows = np.linspace(0, coarse.shape[1] - 1, h).round().astype(int)
    cols = np.linspace(0, coarse.shape[2] - 1, w).round().astype(int)
    x = coarse[:, rows][:, :, cols] + rng.normal(0, 40 if name != "b" else 10, (n, h, w, c))
    if name == "b":
      x = 0.6 * x + 100
    out.append((name, np.clip(np.round(x), 0, 255).astype(np.uint8)))
  return out


def random_tensor(name: str, shape) -> np.ndarray:
  """The random value of state-dict entry `name`: NumPy's generator seeded by (SEED, crc32 of
  the name), scaled so activations stay of order one through the 94 conv + BN + ReLU layers."""
  rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
  shape = tuple(int(s) for s in shape)
  leaf = name.rsplit(".", 1)[-1]
  if name.endswith("num_batches_tracked"):
    return np.zeros(shape, np.int64)
  if name == "fc.weight":
    return (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
  if leaf == "weight" and len(shape) == 4:  # conv [out, in, kh, kw]: He initialisation
    return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)
  if leaf in ("weight", "running_var"):  # BN scale, variance
    return rng.uniform(0.8, 1.2, shape).astype(np.float32)
  return rng.uniform(-0.1, 0.1, shape).astype(np.float32)  # biases, running means


def random_state_dict(names, shapes):
  """{name: random_tensor(name, shape)} in the given order."""
  return {n: random_tensor(n, s) for n, s in zip(names, shapes)}


def small_tensors():
  """The tensors of torch_zip.pth / torch_legacy.pth (numpy, before torch views them)."""
  rng = np.random.default_rng([SEED, 7])
  return dict(
      f32=rng.standard_normal((2, 3, 4)).astype(np.float32),
      f64=rng.standard_normal(5),
      f16=rng.standard_normal((3,)).astype(np.float16),
      i64=np.array(7, np.int64),
      u8=rng.integers(0, 255, (4,), np.uint8),
      flag=np.array([True, False]),
      empty=np.zeros((0, 3), np.float32))


def _load_pth_module():
  """ddpm_jax/pth.py by file path (the package's __init__ needs JAX, not installed here)."""
  spec = importlib.util.spec_from_file_location("ddpm_jax_pth",
                                                os.path.join(REPO, "ddpm_jax", "pth.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _import_torchvision_models():
  spec = importlib.util.find_spec("torchvision")
  package = types.ModuleType("torchvision")
  package.__path__ = list(spec.submodule_search_locations)
  package.__version__ = importlib.metadata.version("torchvision")  # pytorch-fid reads it
  sys.modules["torchvision"] = package
  import torchvision.models.inception  # noqa: F401


def main():
  _import_torchvision_models()
  import torch
  if "--small_only" not in sys.argv:  # --small_only: the .pth fixtures alone (seconds)
    _write_reference(torch)
  _write_small(torch)


def _write_reference(torch):
  from pytorch_fid import inception as fid_inception
  from pytorch_fid.fid_score import calculate_frechet_distance

  template = fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  names = list(template.state_dict())
  shapes = [tuple(v.shape) for v in template.state_dict().values()]
  state = {k: torch.from_numpy(v) for k, v in random_state_dict(names, shapes).items()}
  # fid_inception_v3() loads FID_WEIGHTS_URL; hand it the random weights instead.
  fid_inception.load_state_dict_from_url = lambda url, **kw: state
  model = fid_inception.InceptionV3([3], resize_input=True, normalize_input=True,
                                    use_fid_inception=True).eval()
  # (fid_inception_v3 loads the state with strict=True: every name and shape matched.)

  pools, sets = [], {}
  for name, images in fixture_images():
    x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
      x = x.repeat(1, 3, 1, 1)  # as PIL's convert("RGB") in pytorch-fid's dataset
    with torch.no_grad():
      pool = model(x)[0][:, :, 0, 0].numpy()
    pools.append(pool)
    sets[name] = pool
  stats = [(np.mean(sets[s], axis=0), np.cov(sets[s], rowvar=False)) for s in ("a", "b")]
  fid = calculate_frechet_distance(*stats[0], *stats[1])
  os.makedirs(OUT, exist_ok=True)
  max_dim = 4
  shape_table = np.array([list(s) + [-1] * (max_dim - len(s)) for s in shapes], np.int64)
  np.savez_compressed(os.path.join(OUT, "reference.npz"), names=np.array(names),
                      shapes=shape_table, pool=np.concatenate(pools).astype(np.float32),
                      fid=np.float64(fid))
  print(f"pool3 of {sum(len(p) for p in pools)} images, |pool| max "
        f"{np.abs(np.concatenate(pools)).max():.4f}; FID(a, b) = {fid:.6f}")


def _write_small(torch):
  # torch.save's own files in both formats, with views and shared storages.
  small = small_tensors()
  # A module's state dict (an OrderedDict with torch's _metadata attribute) plus views.
  tensors = torch.nn.BatchNorm2d(2).state_dict()
  tensors.update({k: torch.from_numpy(v.copy()) for k, v in small.items()})
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  tensors["transposed"] = base.t()  # a strided view of base's storage
  tensors["slice"] = base[1:3, 2:5]  # an offset view of the same storage
  tensors["base"] = base
  expected = {k: v.numpy() for k, v in tensors.items()}
  torch.save(tensors, os.path.join(OUT, "torch_zip.pth"))
  torch.save(tensors, os.path.join(OUT, "torch_legacy.pth"),
             _use_new_zipfile_serialization=False)
  np.savez(os.path.join(OUT, "expected.npz"), **expected)

  # Our writer, read by torch.
  pth = _load_pth_module()
  for legacy in (False, True):
    path = os.path.join("/tmp", f"ours_{legacy}.pth")
    pth.write_state_dict(path, {k: v for k, v in small.items() if k != "empty"} | {
        "conv": random_tensor("Conv2d_1a_3x3.conv.weight", (32, 3, 3, 3))}, legacy=legacy)
    back = torch.load(path, weights_only=True)
    for k, v in back.items():
      ref = small.get(k, random_tensor("Conv2d_1a_3x3.conv.weight", (32, 3, 3, 3)))
      assert np.array_equal(v.numpy(), ref), k
    for a, b in ((os.path.join(OUT, "torch_zip.pth"), False),
                 (os.path.join(OUT, "torch_legacy.pth"), True)):
      got = pth.read_state_dict(a)
      assert all(np.array_equal(got[k], expected[k]) for k in expected), a
    os.remove(path)
  print("torch.load reads ddpm_jax.pth's zip and legacy files; ddpm_jax.pth reads torch's")
  print(f"written to {OUT}")


if __name__ == "__main__":
  main()
