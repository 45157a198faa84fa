"""ddpm_jax: train, sample from, or evaluate a DDPM run in one workdir.

    python main.py --config=configs/cifar10.py --workdir=/path/to/run               # train
    python main.py --workdir=/path/to/run --mode=sample      # the run's own config.json
    python main.py --config=configs/cifar10.py --workdir=/path/to/run --mode=eval \
        --config.eval.inception_weights=/path/to/pt_inception-2015-12-05.npz

Any config field can be overridden, e.g. --config.training.batch_size=256. Restarting the same
command resumes from the workdir's latest checkpoint (training) or keeps what is already
written (sampling). --mode=sample and --mode=eval read the run's config.json when --config is
not given; with --config, its model and diffusion fields must match the run's, and its
sampling/eval fields are used (e.g. --config.sampling.sampler=ddim). On several hosts run the same command on
every host: Cloud TPU pods and SLURM/Open MPI jobs are detected; elsewhere pass
--coordinator_address, --num_processes and --process_id.
"""
import os
import sys

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
flags.DEFINE_integer("step", None, "--mode=sample/eval: the checkpoint step (default: latest).")
flags.mark_flags_as_required(["workdir"])
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
    if config is None:
      raise app.UsageError("Training needs --config, e.g. --config=configs/cifar10.py.")
    from ddpm_jax import train  # pylint: disable=import-outside-toplevel
    try:
      train.train_and_evaluate(config, FLAGS.workdir)
    except train.Interrupted as e:  # saved and logged; 143 after SIGTERM, 130 after Ctrl-C
      sys.exit(e.exit_status)
    return
  from ddpm_jax import checkpoint  # pylint: disable=import-outside-toplevel
  if config is None:
    config = checkpoint.read_config(FLAGS.workdir)
  else:
    checkpoint.check_config(FLAGS.workdir, config)
  if FLAGS.mode == "sample":
    from ddpm_jax import generate  # pylint: disable=import-outside-toplevel
    directory = generate.generate(config, FLAGS.workdir, step=FLAGS.step)
    logging.info("Samples written to %s.", directory)
  else:
    from ddpm_jax import evaluation  # pylint: disable=import-outside-toplevel
    evaluation.evaluate(config, FLAGS.workdir, step=FLAGS.step)


if __name__ == "__main__":
  app.run(main)
