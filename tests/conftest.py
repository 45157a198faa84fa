"""Test-wide setup: 8 CPU devices, so multi-device code runs in one process (1 vs 8 devices),
and one persistent compilation cache for the whole session.

Set before JAX initialises its backend; a value already in XLA_FLAGS wins.
"""
import atexit
import os
import shutil
import tempfile

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Many tests build the same programs again (a new closure is a new jit), and the main.py tests
# start fresh processes that compile the same train step: JAX's persistent cache (programs
# that took >= 1 s to compile) lets them load it instead. A fresh directory per session, so
# every test run still compiles everything once; subprocesses inherit it through os.environ.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="ddpm_jax_test_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache


# Shared fixtures: imported after the XLA flags above, so JAX starts with 8 CPU devices.
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ddpm_jax import inception  # noqa: E402


@pytest.fixture(scope="session")
def random_weights():
  """He-initialised kernels, BatchNorm near identity, fc = identity on the first 1008 pool
  features plus a known bias: so unbiased logits == pool[:, :1008] and biased ones add it."""
  rng = np.random.default_rng(0)
  arrays = {}
  for key, shape in inception.param_shapes().items():
    leaf = key.rsplit("/", 1)[1]
    if key == "fc/kernel":
      arrays[key] = np.eye(*shape, dtype=np.float32)
    elif key == "fc/bias":
      arrays[key] = np.linspace(-3, 3, shape[0], dtype=np.float32)
    elif leaf == "kernel":
      std = np.sqrt(2.0 / np.prod(shape[:3]))
      arrays[key] = (std * rng.standard_normal(shape)).astype(np.float32)
    elif leaf in ("scale", "var"):
      arrays[key] = rng.uniform(0.8, 1.2, shape).astype(np.float32)
    else:  # bn bias, bn mean
      arrays[key] = rng.uniform(-0.1, 0.1, shape).astype(np.float32)
  return arrays


@pytest.fixture(scope="session")
def weights_file(random_weights, tmp_path_factory):
  path = tmp_path_factory.mktemp("inception") / "weights.npz"
  np.savez(path, **random_weights)
  return str(path)


def run_main(monkeypatch, capsys, *args):
  """(exit status, stderr) of `python main.py *args` through main's in-process path: its flag
  parser on a fresh FlagValues, then main.execute under main.report_user_errors."""
  import sys  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  import main  # pylint: disable=import-outside-toplevel
  argv = ["main.py", *args]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
  fv = flags.FlagValues()
  main.define_flags(fv)

  def command():
    main.parse_flags(argv, fv)
    main.execute(fv)
  status = 0
  try:
    main.report_user_errors(command)
  except SystemExit as e:
    status = e.code
  return status, capsys.readouterr().err


TRAINED_RUN_FLAGS = ["--config=configs/smoke.py", "--config.training.num_train_steps=2",
                     "--config.training.sample_every=0", "--config.training.checkpoint_every=2"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """A smoke run trained to its last step (2) through main's in-process path: copy it before
  changing it. Resuming a copy with TRAINED_RUN_FLAGS restores its checkpoint and stops."""
  import sys  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  import main  # pylint: disable=import-outside-toplevel
  workdir = tmp_path_factory.mktemp("trained_run") / "run"
  argv = ["main.py", f"--workdir={workdir}", *TRAINED_RUN_FLAGS]
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
    fv = flags.FlagValues()
    main.define_flags(fv)
    main.parse_flags(argv, fv)
    main.execute(fv)
  return workdir
