"""Device placement: the mesh, replication, batch placement and the two ways of mapping work
over devices, for training, sampling and evaluation.

- Independent work per device (sampling chains, bits/dim of a batch): `map_over_devices`, a
  jit-compiled shard_map with the params replicated (`replicate`) and the batch split along its
  leading axis (`batch_sharding`); no communication.
- How many devices the host's CPU is, when JAX runs there: `set_cpu_devices` (config.cpu_devices),
  called by main.py before JAX starts.
- The train step, with collectives on the axis "batch" (`AXIS`): `data_parallel(kind)` gives a
  placement with `map_step`, `put_state`, `put_batch` and `get`, one class per kind:
  `PmapPlacement` (the default: state replicated with a leading device axis, a host batch
  [B_host, ...] split into [local devices, B_host / local devices, ...]) or
  `MeshPlacement` (shard_map: state one replicated global array on a 1-D mesh of all devices,
  the batch a global array sharded along its first axis).
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax.settings import PARALLEL

AXIS = "batch"
CPU_DEVICES_PER_CORE = 2
MIN_CPU_DEVICE_BATCH = 8  # below this per-device batch, the fixed cost per device dominates
_CPU_COUNT_FLAG = "xla_force_host_platform_device_count"
_RENDEZVOUS_FLAG = "xla_cpu_collective_call_terminate_timeout_seconds"
RENDEZVOUS_TIMEOUT_S = 3600


# ----------------------------------------------------------------------------- CPU devices


def usable_cores() -> int:
  """The CPU cores this process may run on (its affinity mask: taskset, cgroups' cpusets)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def auto_cpu_devices(per_host_batch: int, cores: int) -> int:
  """config.cpu_devices=0: the largest divisor of the per-host batch that is at most
  CPU_DEVICES_PER_CORE per core and leaves every device at least MIN_CPU_DEVICE_BATCH examples
  (1 when none does).

  Why several devices: XLA:CPU runs one program's ops largely one after another, each split over
  the cores, and on small images most ops are too small to split well; several devices run
  several programs at once. Measured on 2 cores (benchmarks/cpu_devices.py, BENCHMARKS.md): the
  train step of the digits model at batch 64 took 0.168, 0.134, 0.123 and 0.175 s on 1, 2, 4
  and 8 devices at 8x8, and 2.70, 1.96, 1.63 and 1.62 s at 32x32.
  """
  limit = min(CPU_DEVICES_PER_CORE * max(cores, 1), per_host_batch // MIN_CPU_DEVICE_BATCH)
  return max([d for d in range(1, limit + 1) if per_host_batch % d == 0] or [1])


def cpu_devices_wanted(requested: int, per_host_batch: int, environ=None,
                       distributed: bool = False) -> Optional[int]:
  """The CPU device count to set for config.cpu_devices=`requested`, or None to leave JAX's own.

  requested > 0 is taken as it is. 0 (automatic) defers to a count the user already chose
  (XLA_FLAGS' --xla_force_host_platform_device_count, JAX_NUM_CPU_DEVICES) and, in a multi-process
  run, to JAX's default; otherwise `auto_cpu_devices`.
  """
  environ = os.environ if environ is None else environ
  if requested > 0:
    return requested
  if (_CPU_COUNT_FLAG in environ.get("XLA_FLAGS", "") or environ.get("JAX_NUM_CPU_DEVICES")
      or distributed):
    return None
  return auto_cpu_devices(per_host_batch, usable_cores())


def set_cpu_devices(requested: int, per_host_batch: int) -> Optional[int]:
  """Makes the host's CPU `cpu_devices_wanted(...)` XLA devices; returns the count set, or None
  where JAX's own count stands. Call it before JAX starts its backends (main.py does).

  Only the CPU backend is affected: where JAX finds a GPU or TPU it computes there, and these
  CPU devices stay idle. The update of a global batch is the same on any number of devices (each
  example's randomness comes from its global index, see train.py), so this changes speed only.
  """
  count = cpu_devices_wanted(requested, per_host_batch,
                             distributed=jax.distributed.is_initialized())
  if count is None or jax.config.jax_num_cpu_devices == count:
    return count
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # the backends already run (a second command in one process): keep them
    return None
  flags = os.environ.get("XLA_FLAGS", "")
  if count > 1 and _RENDEZVOUS_FLAG not in flags:
    # The devices meet at every all-reduce; XLA aborts the process when one arrives more than 40 s
    # after the others, which happens on a CPU that other work starves (seen at nice 19 under a
    # test run). A late device is not a hang here: wait an hour.
    os.environ["XLA_FLAGS"] = f"{flags} --{_RENDEZVOUS_FLAG}={RENDEZVOUS_TIMEOUT_S}".strip()
  return count


def mesh(devices: Sequence[jax.Device]) -> Mesh:
  """A 1-D mesh of `devices` along AXIS."""
  return Mesh(np.array(devices), (AXIS,))


def batch_sharding(devices: Sequence[jax.Device]) -> NamedSharding:
  """Arrays split along their leading axis over `devices`."""
  return NamedSharding(mesh(devices), P(AXIS))


def replicate(tree, devices: Optional[Sequence[jax.Device]] = None):
  """`tree` copied onto every one of `devices` (default: the local ones); a no-op for a tree
  placed so already, so callers in a loop can place params once beforehand."""
  devices = tuple(jax.local_devices() if devices is None else devices)
  return jax.device_put(tree, NamedSharding(mesh(devices), P()))


def map_over_devices(fn: Callable, devices: tuple, num_batched: int) -> Callable:
  """jit(shard_map(fn)): fn(params, *batched) runs on every device with the params replicated
  and each of the `num_batched` arrays (and the outputs) split along the leading axis; no
  communication between devices."""
  mapped = jax.shard_map(fn, mesh=mesh(devices), in_specs=(P(),) + (P(AXIS),) * num_batched,
                         out_specs=P(AXIS), check_vma=False)
  return jax.jit(mapped)


def _own_buffers(state):
  """Host copies with a buffer per leaf (EMA trees start as the parameters themselves, and
  donated buffers must not be shared)."""
  return jax.tree_util.tree_map(np.array, jax.device_get(state))


class PmapPlacement:
  """jax.pmap over this host's devices: values carry a leading axis of local devices."""
  kind = "pmap"

  def __init__(self, devices: Sequence[jax.Device]):
    self.devices = list(devices)
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    self.sharding = batch_sharding(self.local_devices)  # one slice of the leading axis each

  def map_step(self, step_fn: Callable) -> Callable:
    """step(state, batch, key) over the devices; the state is donated."""
    subset = self.devices if len(self.devices) < jax.device_count() else None
    return jax.pmap(step_fn, axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=(0,),
                    devices=subset)

  def put_state(self, state):
    n = len(self.local_devices)
    stacked = jax.tree_util.tree_map(lambda x: np.stack([np.asarray(x)] * n),
                                     jax.device_get(state))
    return jax.device_put(stacked, self.sharding)

  def put_batch(self, batch):
    n = len(self.local_devices)
    return jax.device_put(
        jax.tree_util.tree_map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch),
        self.sharding)

  def get(self, tree):
    """Replicated values as host NumPy, read from this host's first device buffer (no
    computation, so no host waits on another); the shard keeps its device axis."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)


class MeshPlacement:
  """jit(shard_map) over a 1-D mesh of all devices: global arrays."""
  kind = "shard_map"

  def __init__(self, devices: Sequence[jax.Device]):
    self.devices = list(devices)
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    self.mesh = mesh(self.devices)

  def map_step(self, step_fn: Callable) -> Callable:
    # check_vma=False: per-device code as under pmap. (With it on, the gradient of the
    # replicated parameters would arrive already summed over devices, before our pmean.)
    mapped = jax.shard_map(step_fn, mesh=self.mesh, in_specs=(P(), P(AXIS), P()),
                           out_specs=(P(), P()), check_vma=False)
    return jax.jit(mapped, donate_argnums=(0,))

  def put_state(self, state):
    return jax.device_put(_own_buffers(state), NamedSharding(self.mesh, P()))

  def put_batch(self, batch):
    sharding = NamedSharding(self.mesh, P(AXIS))
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, x), batch)

  def get(self, tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_shards[0].data), tree)


def data_parallel(kind: str, devices: Optional[Sequence[jax.Device]] = None):
  """The placement of `kind` ("pmap" | "shard_map") over `devices` (default: all devices; a
  subset only in a single process, e.g. for tests)."""
  placements = {"pmap": PmapPlacement, "shard_map": MeshPlacement}
  if kind not in placements:
    raise ValueError(f"Unknown parallel mapping {kind!r}; accepted: {', '.join(PARALLEL)}.")
  return placements[kind](list(jax.devices() if devices is None else devices))
