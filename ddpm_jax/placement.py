"""Device placement: the mesh, replication, batch placement and the two ways of mapping work
over devices, for training, sampling and evaluation.

- Independent work per device (sampling chains, bits/dim of a batch): `map_over_devices`, a
  jit-compiled shard_map with the params replicated (`replicate`) and the batch split along its
  leading axis (`batch_sharding`); no communication.
- The train step, with collectives on the axis "batch" (`AXIS`): `data_parallel(kind)` gives a
  placement with `map_step`, `put_state`, `put_batch` and `get`, one class per kind:
  `PmapPlacement` (the default: state replicated with a leading device axis, a host batch
  [B_host, ...] split into [local devices, B_host / local devices, ...]) or
  `MeshPlacement` (shard_map: state one replicated global array on a 1-D mesh of all devices,
  the batch a global array sharded along its first axis).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax.settings import PARALLEL

AXIS = "batch"


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
