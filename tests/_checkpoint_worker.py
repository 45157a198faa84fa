"""Subprocess helper of test_checkpoint.py (not a test module).

    python tests/_checkpoint_worker.py two_process PROCESS_ID PORT WORKDIR OUT.npz
        One of two JAX processes (2 CPU devices each, gloo collectives): both save the same state
        at steps 1, 2 and 3 (keep=2) into WORKDIR, restore steps 2 and 3, and write what they
        restored to OUT.npz; then process 1 alone calls load() (it must not wait for process 0).
    python tests/_checkpoint_worker.py crash WORKDIR
        Saves step 1, then dies (os._exit(17)) in the middle of saving step 2, after the arrays
        are written but before orbax's final rename.
    python tests/_checkpoint_worker.py hang WORKDIR
        Saves step 1, prints "saved 1", then saves a large step 2 and sleeps (for a SIGKILL).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def state(step):
  import numpy as np  # pylint: disable=import-outside-toplevel
  w = np.arange(12, dtype=np.float32).reshape(3, 4) + step
  return {
      "step": np.asarray(step, np.int32),
      "params": {"dense": {"kernel": w, "bias": np.full((4,), step, np.float32)}},
      "ema_params": ({"dense": {"kernel": w * 0.5, "bias": np.zeros(4, np.float32)}},),
      "opt_state": ((), {"count": np.asarray(step, np.int32), "mu": {"w": -w}}),
  }


def two_process(process_id, port, workdir, out):
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id, initialization_timeout=60)
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
  from ddpm_jax import checkpoint, loading, rundir  # pylint: disable=import-outside-toplevel
  assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(),
                                                                jax.device_count())

  def replicated(x):  # a global array over all 4 devices of both processes, fully replicated
    mesh = Mesh(np.array(jax.devices()), ("d",))
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, PartitionSpec()),
                                        lambda idx: x[idx])

  rundir.write_or_check_config(workdir, _config())
  ckpt = checkpoint.Checkpointer(workdir, keep=2)
  for step in (1, 2, 3):
    tree = state(step)
    tree["params"]["dense"]["kernel"] = replicated(tree["params"]["dense"]["kernel"])
    ckpt.save(step, tree, meta={"step": step, "key": [0, step], "process": 0})
  ckpt.wait()
  steps = ckpt.all_steps()
  restored = {}
  for step in (2, 3):
    tree, meta = ckpt.restore(step)
    restored[f"kernel{step}"] = tree["params"]["dense"]["kernel"]
    restored[f"mu{step}"] = tree["opt_state"][1]["mu"]["w"]
    restored[f"meta_key{step}"] = np.asarray(meta["key"])
  tree, _ = ckpt.restore(target=state(0))
  restored["target_kernel"] = tree["params"]["dense"]["kernel"]
  restored["steps"] = np.asarray(steps)
  ckpt.close()
  if process_id == 1:  # load() alone on one process: process-local, no barrier with process 0
    params, config = loading.load(workdir)
    restored["load_kernel"] = params["dense"]["kernel"]
    restored["load_ch_mult"] = np.asarray(config.model.ch_mult)
  np.savez(out, **restored)
  jax.distributed.shutdown()


def _config():
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({"ch": 8, "ch_mult": (1, 2)})
  config.training = ml_collections.ConfigDict({"num_train_steps": 3})
  return config


def crash(workdir):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=import-outside-toplevel
  from ddpm_jax import checkpoint  # pylint: disable=import-outside-toplevel
  ckpt = checkpoint.Checkpointer(workdir, keep=1)
  ckpt.save(1, state(1), meta={"step": 1})
  ckpt.wait()

  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def die(self):
    """Finalizes the items (state/, meta/) as usual, then dies right before the rename of the
    step directory that would complete the save: every byte of step 2 is written, not committed."""
    if self.get_final().name != "2":
      return await finalize(self)
    written = [f for _, _, files in os.walk(self.get()) for f in files]
    assert "manifest.ocdbt" in written and "metadata" in written, written
    print("dying in finalize", flush=True)
    os._exit(17)  # pylint: disable=protected-access

  atomicity.AtomicRenameTemporaryPath.finalize = die
  big = state(2)
  big["params"]["big"] = np.ones((256, 1024), np.float32)
  ckpt.save(2, big, meta={"step": 2})
  ckpt.wait()
  sys.exit(0)  # not reached


def hang(workdir):
  import time  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from ddpm_jax import checkpoint  # pylint: disable=import-outside-toplevel
  ckpt = checkpoint.Checkpointer(workdir, keep=1)
  ckpt.save(1, state(1), meta={"step": 1})
  ckpt.wait()
  print("saved 1", flush=True)
  big = state(2)
  big["params"]["big"] = np.random.default_rng(0).standard_normal((16, 1024, 1024), np.float32)
  ckpt.save(2, big, meta={"step": 2})
  time.sleep(600)


if __name__ == "__main__":
  mode, args = sys.argv[1], sys.argv[2:]
  if mode == "two_process":
    two_process(int(args[0]), int(args[1]), args[2], args[3])
  elif mode == "crash":
    crash(args[0])
  elif mode == "hang":
    hang(args[0])
  else:
    raise SystemExit(f"unknown mode {mode!r}")
