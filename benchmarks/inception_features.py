"""FID Inception features: agreement with pytorch-fid, img/s, and several devices == one.

    python benchmarks/inception_features.py                      # all three, CPU devices 1 and 8
    python benchmarks/inception_features.py --sections=speed --devices=1,4 --batch=32

- equality: the random-weight network of tests/fixtures/pytorch_fid (written by
  benchmarks/pytorch_fid_fixture.py with pytorch-fid itself) through ddpm_jax.pth and
  ddpm_jax.inception: the largest feature difference, absolute and relative to the features'
  scale, and the Fréchet distance of the two image sets, ours against pytorch-fid's.
- speed: images/s of fid.inception_features on 32x32 RGB inputs (resized to 299x299 inside, as
  for CIFAR-10), after one warm-up call, on N XLA devices of this machine (on the CPU, N from
  --xla_force_host_platform_device_count; each N runs in its own process).
- devices: the features of 8 images on N devices against 1 device (max |difference|).
Random weights throughout: speed does not depend on their values.
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(batch: int, repeats: int) -> dict:
  """In a process whose device count is set: img/s and the features of 8 fixed images."""
  sys.path.insert(0, REPO)
  import jax
  import numpy as np
  from ddpm_jax import fid, inception

  shapes = inception.param_shapes()
  rng = np.random.default_rng(0)
  flat = {k: (rng.standard_normal(s) * (0.1 if k.endswith("kernel") else 0.01)
              + (1.0 if k.endswith(("scale", "var")) else 0.0)).astype(np.float32)
          for k, s in shapes.items()}
  variables = inception.variables_from_flat(flat)
  images = rng.uniform(-1, 1, (batch, 32, 32, 3)).astype(np.float32)
  start = time.perf_counter()
  fid.inception_features(variables, images, batch_size=batch)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(repeats):
    fid.inception_features(variables, images, batch_size=batch)
  seconds = (time.perf_counter() - start) / repeats
  fixed = np.random.default_rng(1).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
  pool, _ = fid.inception_features(variables, fixed, batch_size=8)
  return dict(devices=len(jax.local_devices()), platform=jax.default_backend(),
              img_per_s=batch / seconds, first_call_s=compile_s, pool=pool.tolist())


def equality() -> None:
  sys.path.insert(0, REPO)
  import importlib.util
  import tempfile

  import numpy as np
  from ddpm_jax import fid, inception, pth

  spec = importlib.util.spec_from_file_location(
      "pytorch_fid_fixture", os.path.join(REPO, "benchmarks", "pytorch_fid_fixture.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  with np.load(os.path.join(REPO, "tests", "fixtures", "pytorch_fid", "reference.npz")) as f:
    ref = {k: f[k] for k in f.files}
  shapes = [tuple(int(d) for d in row if d >= 0) for row in ref["shapes"]]
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "random.pth")
    pth.write_state_dict(path, script.random_state_dict([str(n) for n in ref["names"]], shapes))
    variables = inception.load_inception_params(path)
  sets = script.fixture_images()
  inputs = np.concatenate([np.asarray(inception.preprocess(x.astype(np.float32) / 127.5 - 1))
                           for _, x in sets])
  pool, _ = fid.inception_features(variables, inputs, batch_size=len(inputs))
  theirs = ref["pool"].astype(np.float64)
  scale = np.abs(theirs).max()
  print(f"equality with pytorch-fid ({len(pool)} images, features up to {scale:.3f}):")
  start = 0
  for name, x in sets:
    err = np.abs(pool[start:start + len(x)] - theirs[start:start + len(x)]).max()
    print(f"  {name:7s} {str(x.shape[1:]):15s} max |ours - pytorch-fid| = {err:.3g} "
          f"({err / scale:.2g} of the scale)")
    start += len(x)
  a, b = slice(0, 5), slice(5, 10)
  ours_fid = fid.frechet_distance(*fid.feature_statistics(pool[a]),
                                  *fid.feature_statistics(pool[b]))
  print(f"  FID(a, b): ours {ours_fid:.6f}, pytorch-fid {float(ref['fid']):.6f}, relative "
        f"difference {abs(ours_fid / float(ref['fid']) - 1):.2g}")


def run_devices(counts, batch, repeats):
  results = {}
  for n in counts:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    env.setdefault("JAX_PLATFORMS", "cpu")
    proc = subprocess.run([sys.executable, __file__, "--worker", f"--batch={batch}",
                           f"--repeats={repeats}"], env=env, capture_output=True, text=True)
    if proc.returncode:
      raise SystemExit(proc.stderr[-3000:])
    results[n] = json.loads(proc.stdout.strip().splitlines()[-1])
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sections", default="equality,speed,devices")
  parser.add_argument("--devices", default="1,8", help="device counts (CPU: forced)")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(_worker(args.batch, args.repeats)))
    return
  sections = args.sections.split(",")
  if "equality" in sections:
    equality()
  if "speed" in sections or "devices" in sections:
    import numpy as np
    results = run_devices([int(n) for n in args.devices.split(",")], args.batch, args.repeats)
    base = np.array(results[min(results)]["pool"])
    for n, r in results.items():
      line = (f"{r['platform']} x{n}: {r['img_per_s']:.2f} img/s (32x32 -> 299x299, batch "
              f"{args.batch}; first call {r['first_call_s']:.1f} s)")
      if "devices" in sections and n != min(results):
        line += (f"; features vs {min(results)} device(s): max |diff| "
                 f"{np.abs(np.array(r['pool']) - base).max():.3g}")
      print(line)


if __name__ == "__main__":
  main()
