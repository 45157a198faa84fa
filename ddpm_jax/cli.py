"""ddpm_jax: train, sample from, or evaluate a DDPM run in one workdir.

The program behind `python main.py` in a checkout and the `ddpm-jax` command of an installed
package (the same flags; `ddpm-jax --config=cifar10` names a config shipped in the package).

    python main.py --config=configs/cifar10.py --workdir=/path/to/run               # train
    python main.py --workdir=/path/to/run --mode=sample      # the run's own config.json
    python main.py --config=configs/cifar10.py --workdir=/path/to/run --mode=eval
    python main.py --workdir=/path/to/run --mode=edit --config.edit.input=/path/to/images \
        --config.edit.task=inpaint --config.edit.mask=center     # or edit, invert, interpolate

Any config field can be overridden, e.g. --config.training.batch_size=256. Restarting the same
command resumes from the workdir's latest checkpoint (training) or keeps what is already
written (sampling).

--mode=sample, eval and edit start from the run's own config.json: the command line changes
only what may change between the runs of one workdir (sampling, eval, parallel, model.dtype,
data.data_dir ...; see ddpm_jax/settings.py), e.g. `--config.sampling.sampler=ddim` with or
without --config. A --config file's training and optimiser fields are ignored there (the run's
are kept); its model, diffusion or data fields must equal the run's, else one sentence names
the difference (the file is then for another run).

One process writes a run at a time: training holds workdir/lease.json, sampling its sample
folder's (ddpm_jax/lease.py); a second writer exits with a sentence naming the holder, and
--force_lease takes the lease over from a holder known to be gone.

On several hosts run the same command on every host: Cloud TPU pods and SLURM/Open MPI jobs are
detected; elsewhere pass --coordinator_address, --num_processes and --process_id.

A user's mistake (ddpm_jax.errors.UserError, and a flag the parser refuses) ends the program
with its one sentence on stderr and exit status 2, without a traceback; any other exception is
a bug and keeps its traceback.
"""
import difflib
import importlib.util
import logging as std_logging
import os
import re
import sys
from typing import Any, Callable

from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import config_files, console, failed_writes
from ddpm_jax.errors import UserError

# The schema that `--config.<field>=...` overrides are parsed against when --mode=sample/eval
# is given no --config: the run's own config.json is the base, these overrides change it.
DEFAULT_CONFIG = os.path.join(config_files.configs_dir(), "default.py")
USER_ERROR_STATUS = 2


def define_flags(fv: flags.FlagValues) -> None:
  """The command line's flags, on `fv` (flags.FLAGS here; a fresh FlagValues in tests)."""
  config_flags.DEFINE_config_file("config", None, "A config file, e.g. configs/cifar10.py.",
                                  flag_values=fv, lock_config=True)
  flags.DEFINE_string("workdir", None, "The run's directory (checkpoints, logs, samples).",
                      flag_values=fv)
  flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "edit"], "What to do.",
                    flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host "
                      "runs that are not detected automatically.", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-host run.",
                       flag_values=fv)
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.",
                       flag_values=fv)
  flags.DEFINE_integer("step", None, "--mode=sample/eval: the checkpoint step (default: "
                       "latest).", flag_values=fv)
  flags.DEFINE_boolean("force_lease", False, "Take over the lease (lease.json) of the workdir "
                       "(training) or of the sample folder (--mode=sample) even though its "
                       "holder seems alive: only when that process is known to be gone.",
                       flag_values=fv)
  flags.DEFINE_bool("verbose", False, "Also print the libraries' INFO logs (absl, orbax, "
                    "TensorFlow) on the console; they always go to the workdir's log.txt.",
                    flag_values=fv)
  flags.mark_flags_as_required(["workdir"], flag_values=fv)


FLAGS = flags.FLAGS
define_flags(FLAGS)

# Environment variables that mean "this is one process of several" on the clusters jax detects.
_CLUSTER_HINTS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")
_CONFIG_FILE = config_files.CONFIG_FLAG


# ----------------------------------------------------------------------------- flags


def _config_path(argv):
  """The --config value in argv (None if absent)."""
  for i, arg in enumerate(argv):
    m = _CONFIG_FILE.match(arg)
    if m:
      return m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else "")
  return None


def with_default_config(argv):
  """argv with --config=configs/default.py first if it has --config.* overrides but no
  --config: they are then parsed (and type-checked) against the default schema. A --config
  naming a shipped config (`cifar10`, or configs/cifar10.py where no such file is) becomes its
  path (config_files.resolve)."""
  if _config_path(argv) is None and any(_OVERRIDE.match(a) for a in argv[1:]):
    return argv[:1] + [f"--config={DEFAULT_CONFIG}"] + argv[1:]
  return config_files.with_resolved_config(argv)


def _leaves(tree, prefix=""):
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if hasattr(value, "items"):
      yield from _leaves(value, path + ".")
    else:
      yield path


def _exec_config(path):
  """The config of a config file (path[:argument]); raises what loading it raises."""
  spec = importlib.util.spec_from_file_location("_config_for_names", path.split(":")[0])
  module = importlib.util.module_from_spec(spec)
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())  # configs import `configs.default` from the checkout
  spec.loader.exec_module(module)
  return module.get_config(*path.split(":")[1:])


def _load_config(path):
  """The config of a config file, for naming fields in an error (None if it cannot load)."""
  try:
    return _exec_config(path)
  except Exception:  # pylint: disable=broad-except
    return None  # the original parse error is reported instead


def missing_config_sentence(argv):
  """One sentence if the --config file does not exist (config_flags fails only later)."""
  path = _config_path(argv)
  if path is not None and not os.path.isfile(path.split(":")[0]):
    return (f"--config={path}: there is no such file; pass a config file such as "
            "configs/cifar10.py.")
  return None


def broken_config_sentence(argv):
  """One sentence saying why the --config file does not load; None if it loads."""
  path = _config_path(argv)
  try:
    _exec_config(path)
  except Exception as e:  # pylint: disable=broad-except  (any error of the user's file)
    return (f"--config={path} does not load: {type(e).__name__}: {e}; fix it, or pass "
            "another config file such as configs/cifar10.py.")
  return None


def unknown_field_sentence(argv):
  """One sentence naming the first --config.* override that is not a field of the config, with
  the closest field names; None if every override names a field (or the config won't load)."""
  path = _config_path(argv)
  config = _load_config(path) if path else None
  if config is None:
    return None
  fields = list(_leaves(config))
  sections = {f.rsplit(".", 1)[0] for f in fields if "." in f}
  for arg in argv[1:]:
    m = _OVERRIDE.match(arg)
    if m and m.group(1) not in fields and m.group(1) not in sections:
      name = m.group(1)
      close = difflib.get_close_matches(name, fields, n=3, cutoff=0.6) or difflib.get_close_matches(
          name.rsplit(".", 1)[-1], [f.rsplit(".", 1)[-1] for f in fields], n=3, cutoff=0.6)
      hint = (f"; the closest are {', '.join(close)}" if close else
              "; configs/default.py declares every field")
      return f"--config.{name}: the config {path} has no field {name}{hint}."
  return None


def parse_flags(argv, fv: flags.FlagValues = FLAGS):
  """absl's flag parsing, with every refusal turned into one sentence (a UserError).

  config_flags reads the overrides from sys.argv: argv must be sys.argv (or a copy of it)."""
  argv = with_default_config(list(argv))
  sentence = missing_config_sentence(argv)
  if sentence:
    raise UserError(sentence)
  try:
    return fv(argv)
  except flags.Error as e:
    sentence = (unknown_field_sentence(argv) or
                ("Error whilst parsing config file" in str(e) and broken_config_sentence(argv))
                or " ".join(str(e).split()))
    raise UserError(sentence) from e
  except (AttributeError, KeyError) as e:  # config_flags on an override of an unknown field
    sentence = unknown_field_sentence(argv) or broken_config_sentence(argv)
    if sentence is None:
      raise
    raise UserError(sentence) from e
  except Exception as e:  # pylint: disable=broad-except  (the config file's own error)
    sentence = broken_config_sentence(argv) if _config_path(argv) else None
    if sentence is None:
      raise
    raise UserError(sentence) from e


def given_config(fv: flags.FlagValues):
  """The --config of the command line with its overrides, or None if there was no --config."""
  if fv.config is None or config_flags.get_config_filename(fv["config"]) == DEFAULT_CONFIG:
    return None
  return fv.config


def overrides(fv: flags.FlagValues):
  """{dotted field: value} of the --config.* flags given."""
  return dict(config_flags.get_override_values(fv["config"])) if fv.config else {}


# ----------------------------------------------------------------------------- main


def _is_multiprocess_environment() -> bool:
  if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    return True
  return any(int(os.environ.get(k, "1") or 1) > 1 for k in _CLUSTER_HINTS[:2])


def maybe_initialize_distributed(fv: flags.FlagValues) -> None:
  """jax.distributed.initialize() for multi-host runs; nothing for a single process."""
  import jax  # pylint: disable=import-outside-toplevel
  if fv.coordinator_address or (fv.num_processes or 1) > 1:
    # CPU-only processes need a collectives backend; GPUs and TPUs ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=fv.coordinator_address,
                               num_processes=fv.num_processes, process_id=fv.process_id)
  elif _is_multiprocess_environment():
    jax.distributed.initialize()


def main(argv):
  console.setup(verbose=FLAGS.verbose, tensorflow=FLAGS.mode != "sample")
  if len(argv) > 1:
    raise UserError(f"Unexpected arguments {' '.join(argv[1:])}: every setting is a flag, such "
                    "as --config.training.batch_size=256.")
  execute(FLAGS)


def run_config(fv: flags.FlagValues):
  """The validated config the command asks for; reads, never writes, the workdir."""
  from ddpm_jax import rundir, settings  # pylint: disable=import-outside-toplevel
  config = given_config(fv)
  if fv.mode == "train":
    if config is None:
      raise UserError("--mode=train needs --config, e.g. --config=configs/cifar10.py.")
    if fv.step is not None:
      raise UserError(f"--step={fv.step} is for --mode=sample and --mode=eval; training always "
                      "resumes from the workdir's newest intact checkpoint (drop --step, or "
                      "start a new --workdir).")
  else:
    config = rundir.config_for_use(fv.workdir, config, overrides(fv))
    undeclared = sorted(set(_leaves(config)) - set(_leaves(_load_config(DEFAULT_CONFIG))))
    if undeclared:  # written by another program or by hand: its meaning is unknown
      raise UserError(f"{os.path.join(fv.workdir, rundir.CONFIG_FILE)} has fields that "
                      f"configs/default.py does not declare ({', '.join(undeclared[:5])}"
                      f"{', ...' if len(undeclared) > 5 else ''}); remove them, or pass the "
                      "--workdir of a ddpm_jax training run.")
  settings.validate(config)  # train_and_evaluate checks the batch against the devices too
  return config


def execute(fv: flags.FlagValues) -> None:
  """Trains, samples or evaluates as the parsed flags `fv` say."""
  config = run_config(fv)  # before anything is written
  maybe_initialize_distributed(fv)
  import jax  # pylint: disable=import-outside-toplevel
  from ddpm_jax import placement  # pylint: disable=import-outside-toplevel
  requested = config.get("cpu_devices", 0)  # validated by run_config
  # Before anything asks JAX for its devices (process_index too): that starts the backend.
  cpu_devices = placement.set_cpu_devices(requested, config.training.batch_size)
  console.log_to(fv.workdir, jax.process_index())
  logging.info("Process %d of %d, %d local devices of %d: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind, extra={"console": jax.process_count() > 1})
  on_cpu = jax.default_backend() == "cpu"
  if on_cpu and cpu_devices and config.training.batch_size % jax.device_count():
    raise UserError(f"config.cpu_devices={requested}: the batch "
                    f"(training.batch_size={config.training.batch_size}) must divide over the "
                    f"{jax.device_count()} CPU devices; use a divisor of the batch, or 0 "
                    "(automatic).")
  if on_cpu and cpu_devices:
    # On the console only when chosen automatically: a count the user set needs no telling.
    logging.info("JAX runs on the CPU (%d usable cores) as %d devices (config.cpu_devices=%d%s).",
                 placement.usable_cores(), cpu_devices, requested,
                 "" if requested else ": automatic", extra={"console": not requested})
  if fv.mode == "train":
    from ddpm_jax import train  # pylint: disable=import-outside-toplevel
    try:
      train.train_and_evaluate(config, fv.workdir, force_lease=fv.force_lease)
    except train.Interrupted as e:  # saved and logged; 143 after SIGTERM, 130 after Ctrl-C
      sys.exit(e.exit_status)
  elif fv.mode == "sample":
    from ddpm_jax import generate  # pylint: disable=import-outside-toplevel
    directory = generate.generate(config, fv.workdir, step=fv.step, force_lease=fv.force_lease)
    logging.info("Samples written to %s.", directory)
  elif fv.mode == "edit":
    from ddpm_jax import edit_mode  # pylint: disable=import-outside-toplevel
    directory = edit_mode.run(config, fv.workdir, step=fv.step)
    logging.info("Edits written to %s.", directory)
  else:
    from ddpm_jax import evaluation  # pylint: disable=import-outside-toplevel
    evaluation.evaluate(config, fv.workdir, step=fv.step)


def report_user_errors(fn: Callable[[], Any]) -> Any:
  """fn(), where a UserError ends the program: its sentence alone on stderr, exit status 2.
  Every other exception is a bug and keeps its traceback."""
  try:
    return fn()
  except UserError as e:
    console.discard_log()  # a refused command leaves the workdir as it was
    for handler in std_logging.getLogger().handlers:  # their lines first: the sentence is last
      handler.flush()
    # On a terminal, a blank line sets the sentence apart from the INFO lines above it.
    sys.stderr.write(f"{chr(10) if sys.stderr.isatty() else ''}{e}\n")
    sys.exit(USER_ERROR_STATUS)
  except KeyboardInterrupt:  # Ctrl-C before the train loop's handler (imports, checks): no save
    console.discard_log()
    sys.stderr.write("Interrupted (Ctrl-C) before training started; nothing was saved.\n")
    sys.exit(130)


def quiet_closed_event_loop(hook: Callable[[Any], None]) -> Callable[[Any], None]:
  """sys.unraisablehook without one harmless message: when orbax fails to read a damaged
  checkpoint (which is then moved aside, with a warning), a callback of its asyncio machinery
  can still fire on the closed loop and print "RuntimeError: Event loop is closed" with a
  traceback. Everything else goes to `hook`."""
  def filtered(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
      return
    hook(unraisable)
  return filtered


class UnretrievedTaskInOneLine(std_logging.Filter):
  """For the "asyncio" logger: "Task exception was never retrieved" (seen once from orbax's
  background checkpoint tasks at exit after Ctrl-C, once the checkpoint had been saved) becomes
  one line naming the exception, without the traceback that reads like a crash of ours. We run
  no asyncio code; every other record passes unchanged."""

  def filter(self, record):
    if record.exc_info and str(record.msg).startswith("Task exception was never retrieved"):
      e = record.exc_info[1]
      record.msg = ("A library's asyncio task (orbax's checkpointing) ended with an exception "
                    f"nobody awaited: {type(e).__name__}: {e}")
      record.args, record.exc_info, record.exc_text = (), None, None
    return True


class WriteFailuresInOneLine(std_logging.Filter):
  """For the "absl" logger (orbax's): a failed write of a checkpoint (disk full, no permission)
  is logged by each of orbax's background threads with a traceback; they become one line each,
  as the run ends with one sentence about it (failed_writes.py). Every other record passes."""

  def filter(self, record):
    error = record.exc_info[1] if record.exc_info else None
    while error is not None:
      if failed_writes.reason(error):
        record.exc_info, record.exc_text = None, None
        break
      error = error.__cause__ or error.__context__
    return True


def run() -> None:
  """The program: `python main.py ...` and the installed `ddpm-jax ...` command."""
  for flag in FLAGS.get_key_flags_for_module(sys.modules[__name__]):  # --help lists them
    FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  sys.unraisablehook = quiet_closed_event_loop(sys.unraisablehook)
  std_logging.getLogger("asyncio").addFilter(UnretrievedTaskInOneLine())
  std_logging.getLogger("absl").addFilter(WriteFailuresInOneLine())
  report_user_errors(lambda: app.run(main, flags_parser=parse_flags))


if __name__ == "__main__":
  run()
