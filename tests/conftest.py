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
# that need a fresh process compile the same train step: JAX's persistent cache lets them load
# it instead. A fresh directory per session, so every test run still compiles everything once;
# subprocesses inherit it through os.environ.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="ddpm_jax_test_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
# JAX's default keeps only programs that took >= 1 s; many tests rebuild smaller ones (a sampler
# chain or an evaluation step around a new closure), and a loaded CPU makes every compile slower.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")


# Shared fixtures: imported after the XLA flags above, so JAX starts with 8 CPU devices.
import logging  # noqa: E402

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
  """(exit status, stderr) of `python main.py *args` in this process (tests/main_in_process.py).
  `monkeypatch` and `capsys` are kept for the callers' signature; stderr is captured there."""
  del monkeypatch, capsys
  from tests import main_in_process  # pylint: disable=import-outside-toplevel
  return main_in_process.run(*args)


TRAINED_RUN_FLAGS = ["--config=configs/smoke.py", "--config.training.num_train_steps=2",
                     "--config.training.sample_every=0", "--config.training.checkpoint_every=2"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """A smoke run trained to its last step (2) through main's in-process path: copy it before
  changing it. Resuming a copy with TRAINED_RUN_FLAGS restores its checkpoint and stops."""
  from tests import main_in_process  # pylint: disable=import-outside-toplevel
  import main  # pylint: disable=import-outside-toplevel
  workdir = tmp_path_factory.mktemp("trained_run") / "run"
  main.execute(main_in_process.parse(f"--workdir={workdir}", *TRAINED_RUN_FLAGS))
  return workdir


@pytest.fixture
def main_py(caplog):
  """`python main.py *args` in this process (tests/main_in_process.py): returns (exit status,
  what it wrote on stderr followed by what it logged)."""
  from tests import main_in_process  # pylint: disable=import-outside-toplevel
  caplog.set_level(logging.INFO, logger="absl")

  def run(*args):
    caplog.clear()
    status, err = main_in_process.run(*args)
    return status, err + "".join(f"{r.getMessage()}\n" for r in caplog.records)

  return run
