"""Test-wide setup: 8 CPU devices, so multi-device code runs in one process (1 vs 8 devices).

Set before JAX initialises its backend; a value already in XLA_FLAGS wins.
"""
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
