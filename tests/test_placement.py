"""How many devices the host's CPU becomes (config.cpu_devices): the automatic rule, what it
defers to, and, through main.py in a subprocess, the refusal of a count that does not divide the
batch (its sentence names the 3 devices JAX was given)."""
import os
import subprocess
import sys

import pytest

from ddpm_jax import placement, settings
from ddpm_jax.errors import UserError
from configs import smoke
from tests.test_cli import ROOT


@pytest.mark.parametrize("batch, cores, expected", [
    (64, 2, 4),     # 2 per core
    (128, 2, 4),
    (64, 64, 8),    # at least 8 examples per device
    (20, 2, 2),     # 20 // 8 = 2 devices at most
    (36, 2, 4),
    (24, 8, 3),     # a divisor of the batch, not a power of 2
    (8, 2, 1),      # too small a batch to split
    (7, 16, 1),
    (64, 1, 2),
])
def test_auto_cpu_devices(batch, cores, expected):
  got = placement.auto_cpu_devices(batch, cores)
  assert got == expected
  assert batch % got == 0 and (got == 1 or batch // got >= placement.MIN_CPU_DEVICE_BATCH)


def test_an_explicit_count_wins_and_automatic_defers_to_the_users_own():
  assert placement.cpu_devices_wanted(3, 64, environ={}) == 3
  assert placement.cpu_devices_wanted(
      3, 64, environ={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}) == 3
  auto = placement.auto_cpu_devices(64, placement.usable_cores())
  assert placement.cpu_devices_wanted(0, 64, environ={}) == auto
  assert placement.cpu_devices_wanted(0, 64, environ={"XLA_FLAGS": "--xla_cpu_use_onednn=true"}) == auto
  assert placement.cpu_devices_wanted(
      0, 64, environ={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}) is None
  assert placement.cpu_devices_wanted(0, 64, environ={"JAX_NUM_CPU_DEVICES": "2"}) is None
  assert placement.cpu_devices_wanted(0, 64, environ={}, distributed=True) is None


def test_cpu_devices_is_checked_and_may_change_between_runs():
  config = smoke.get_config()
  assert settings.validate(config).cpu_devices == 0
  config.cpu_devices = -1
  with pytest.raises(UserError, match=r"config.cpu_devices=-1: the number of CPU devices"):
    settings.validate(config)
  assert settings.is_changeable("cpu_devices")


def test_a_count_that_does_not_divide_the_batch_is_one_sentence_before_any_file(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "main.py", "--config=configs/smoke.py", f"--workdir={workdir}",
       "--config.cpu_devices=3"], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      "config.cpu_devices=3: the batch (training.batch_size=8) must divide over the 3 CPU "
      "devices; use a divisor of the batch, or 0 (automatic).")
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()
