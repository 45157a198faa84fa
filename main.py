"""ddpm_jax: train, sample from, or evaluate a DDPM run in one workdir.

    python main.py --config=configs/cifar10.py --workdir=/path/to/run               # train
    python main.py --config=configs/cifar10.py --workdir=/path/to/run --mode=sample
    python main.py --config=configs/cifar10.py --workdir=/path/to/run --mode=eval

Any config field can be overridden, e.g. --config.training.batch_size=256. Restarting the same
command resumes from the workdir's latest checkpoint. On several hosts run the same command on
every host: Cloud TPU pods and SLURM/Open MPI jobs are detected; elsewhere pass
--coordinator_address, --num_processes and --process_id.
"""
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "A config file, e.g. configs/cifar10.py.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The run's directory (checkpoints, logs, samples).")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"], "What to do.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs "
                    "that are not detected automatically.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS

# Environment variables that mean "this is one process of several" on the clusters jax detects.
_CLUSTER_HINTS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def _is_multiprocess_environment() -> bool:
  if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    return True
  return any(int(os.environ.get(k, "1") or 1) > 1 for k in _CLUSTER_HINTS[:2])


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() for multi-host runs; nothing for a single process."""
  if FLAGS.coordinator_address or (FLAGS.num_processes or 1) > 1:
    # CPU-only processes need a collectives backend; GPUs and TPUs ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif _is_multiprocess_environment():
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  maybe_initialize_distributed()
  logging.info("Process %d of %d, %d local devices of %d: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  config = FLAGS.config
  if FLAGS.mode == "train":
    from ddpm_jax import train  # pylint: disable=import-outside-toplevel
    train.train_and_evaluate(config, FLAGS.workdir)
  else:
    raise app.UsageError(
        f"--mode={FLAGS.mode} is not available yet: it lands with the sampling and evaluation "
        "issue. Meanwhile use ddpm_jax.load(workdir) and ddpm_jax.sample(...) from Python.")


if __name__ == "__main__":
  app.run(main)
