"""The command line: README's commands as typed, every config field overridable, and every bad
input one sentence on stderr with a non-zero exit, before anything is written.

The README commands are made cheap by overrides that turn every config into the same smoke-sized
run (`RUN_OVERRIDES`), so they share one workdir. They run in this process through main's own
parser, main.execute and main.report_user_errors (tests/main_in_process.py), which reuses the
session's compiled programs; one of them, the first `--mode=sample`, runs as a real
`python main.py` in a subprocess, so absl's app.run, main.py's __main__ and a real exit status
stay covered. The many bad-input cases run in this process too.
"""
import glob
import importlib
import json
import os
import re
import shlex
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

import main
from configs import smoke
from ddpm_jax import settings
from ddpm_jax.errors import UserError
from tests import main_in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not p.endswith("__init__.py"))


def _leaves(tree, prefix=""):
  for key, value in tree.items():
    if hasattr(value, "items"):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _flag_value(value) -> str:
  return str(tuple(value)) if isinstance(value, (tuple, list)) else str(value)


# Every fixed field set to configs/smoke.py's value, whatever the --config: each README command
# then describes the same small run (and may resume it), on the bundled digits.
RUN_OVERRIDES = [f"--config.{k}={_flag_value(v)}" for k, v in _leaves(smoke.get_config())
                 if not settings.is_changeable(k) and v is not None]
RUN_OVERRIDES += ["--config.training.batch_size=16",  # not smoke.py's 8: problem 8 below
                  "--config.training.num_train_steps=2", "--config.training.sample_every=0",
                  "--config.sampling.num_steps=5", "--config.sampling.num_samples=4",
                  "--config.eval.metrics=bpd", "--config.eval.bpd_num_examples=8"]


def readme_commands():
  """The arguments of every `python main.py ...` in README.md: fenced bash lines (with their
  backslash continuations) and inline code spans (which may wrap across lines)."""
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  commands = []
  fenced = re.findall(r"```bash\n(.*?)```", text, re.S)
  for block in fenced:
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
      line = line.split(" #")[0].strip()
      if line.startswith("python main.py"):
        commands.append(shlex.split(line)[2:])
  inline = re.sub(r"```.*?```", "", text, flags=re.S)
  for span in re.findall(r"`([^`]*python main\.py[^`]*)`", inline):
    span = " ".join(span.split())
    commands.append(shlex.split(span[span.index("python main.py"):].split('"')[0])[2:])
  return [c for c in commands if c]  # a bare `python main.py` is prose, not a command


def _env():
  # One CPU device: the smallest programs; the session's compilation cache (conftest) is shared.
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def edit_inputs(root):
  """{flag: flag=folder} of 3 grey 8x8 images and their masks, for README's --mode=edit."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  for sub in ("images", "masks"):
    os.makedirs(root / sub)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    Image.fromarray(np.where(np.arange(8) < 4, 255, 0).astype(np.uint8)[None].repeat(8, 0)
                    ).save(root / "masks" / f"{i}.png")
  return {"--config.edit.input": f"--config.edit.input={root / 'images'}",
          "--config.edit.masks": f"--config.edit.masks={root / 'masks'}"}


def _is_first_sample_command(args, earlier):
  return "--mode=sample" in args and not any("--mode=sample" in a for a in earlier)


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory, weights_file):
  """Runs README's commands in order, all in one workdir: [(args, exit status, stderr, how)],
  `how` "subprocess" for the one real `python main.py`, else "in-process"."""
  workdir = str(tmp_path_factory.mktemp("readme_run"))
  edits = edit_inputs(tmp_path_factory.mktemp("edit_inputs"))
  results = []
  for args in readme_commands():
    args = [f"--workdir={workdir}" if a.startswith("--workdir=") else
            f"--config.eval.inception_weights={weights_file}"
            if a.startswith("--config.eval.inception_weights=") else
            edits.get(a.split("=")[0], a) for a in args]
    earlier = [r[0] for r in results]
    if args in earlier:  # e.g. the TPU command is the CIFAR-10 one once its workdir is ours
      continue
    if _is_first_sample_command(args, earlier):
      proc = subprocess.run([sys.executable, "main.py", *args, *RUN_OVERRIDES], cwd=ROOT,
                            env=_env(), capture_output=True, text=True, timeout=600)
      results.append((args, proc.returncode, proc.stderr, "subprocess"))
    else:
      results.append((args, *main_in_process.run(*args, *RUN_OVERRIDES), "in-process"))
  return workdir, results


def test_every_readme_command_runs_as_typed(readme_runs):
  workdir, results = readme_runs
  modes = {next((a for a in args if a.startswith("--mode=")), "--mode=train")
           for args, _, _, _ in results}
  assert modes == {"--mode=train", "--mode=sample", "--mode=eval", "--mode=edit"}
  assert len(results) >= 6
  assert [how for _, _, _, how in results].count("subprocess") == 1
  for args, status, stderr, _ in results:
    assert status == 0 and "Traceback" not in stderr, (args, stderr[-3000:])
  # What the commands made: the run, its samples (the subprocess's ancestral ones among them)
  # and the bits/dim of --mode=eval.
  assert os.path.isdir(os.path.join(workdir, "samples", "00000002_ancestral5"))
  assert os.path.exists(os.path.join(workdir, "eval", "00000002.json"))


# ----------------------------------------------------------------------------- in-process parsing


def parse(*args):
  """main's flags parsed from `python main.py *args` on a fresh FlagValues."""
  return main_in_process.parse(*args)


def refused(*args) -> str:
  """The one line that main prints for `python main.py *args`, which must exit with status 2."""
  status, err = main_in_process.run(*args)
  assert status == main.USER_ERROR_STATUS, (status, err[-3000:])
  lines = err.splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_leaf_of_every_config_can_be_overridden(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  want = {}
  for key, value in _leaves(config):
    if value is None:  # an optional path (placeholder)
      want[key] = "/some/path"
    elif isinstance(value, bool):
      want[key] = not value
    elif isinstance(value, int):
      want[key] = value + 1
    elif isinstance(value, float):
      want[key] = value / 2 + 0.25
    elif isinstance(value, tuple):
      want[key] = tuple(value) + tuple(value[:1])
    else:
      want[key] = value + "_x"
  fv = parse(f"--config=configs/{name}.py", "--workdir=/unused",
             *[f"--config.{k}={_flag_value(v)}" for k, v in want.items()])
  got = dict(_leaves(fv.config))
  assert got == want


def test_unknown_field_names_the_closest_fields(tmp_path):
  line = refused("--config=configs/smoke.py", f"--workdir={tmp_path}/w",
                 "--config.training.bogus=3")
  assert line.startswith("--config.training.bogus: ") and "training.log_every" in line
  line = refused("--config=configs/smoke.py", f"--workdir={tmp_path}/w",
                 "--config.training.ema_decy=0.9")
  assert "closest are training.ema_decay" in line
  line = refused("--config=configs/smoke.py", f"--workdir={tmp_path}/w",
                 "--config.training.batch_size=abc")
  assert "--config.training.batch_size=abc" in line
  assert not os.path.exists(tmp_path / "w")


BAD_VALUES = [  # (config, override, the field the sentence must name)
    ("smoke", "training.ema_decay=1.5", "config.training.ema_decay=1.5"),
    ("smoke", "data.image_size=7", "config.data.image_size=7"),
    ("cifar10", "data.image_size=30", "config.data.image_size=30"),
    ("smoke", "diffusion.num_timesteps=0", "config.diffusion.num_timesteps=0"),
    ("smoke", "diffusion.beta_end=2.0", "config.diffusion.beta_end=2.0"),
    ("smoke", "diffusion.beta_schedule=bogus", "config.diffusion.beta_schedule='bogus'"),
    ("smoke", "diffusion.mean_type=bogus", "config.diffusion.mean_type='bogus'"),
    ("smoke", "diffusion.var_type=bogus", "config.diffusion.var_type='bogus'"),
    ("smoke", "diffusion.loss_type=bogus", "config.diffusion.loss_type='bogus'"),
    ("smoke", "optim.learning_rate=-1.0", "config.optim.learning_rate=-1.0"),
    ("smoke", "training.num_train_steps=-1", "config.training.num_train_steps=-1"),
    ("smoke", "training.batch_size=12", "config.training.batch_size=12"),  # 8 devices
    ("smoke", "sampling.sampler=bogus", "config.sampling.sampler='bogus'"),
    ("smoke", "sampling.num_steps=21", "config.sampling.num_steps=21"),
    ("smoke", "model.dtype=float16", "config.model.dtype='float16'"),
    ("smoke", "parallel=bogus", "config.parallel='bogus'"),
    ("smoke", "eval.metrics=('bogus',)", "config.eval.metrics=('bogus',)"),
    ("smoke", "model.out_channels=3", "config.model.out_channels=3"),
]


def test_bad_values_are_one_sentence_and_write_nothing(tmp_path):
  for name, override, field in BAD_VALUES:
    workdir = tmp_path / override.split("=")[0]
    line = refused(f"--config=configs/{name}.py", f"--workdir={workdir}",
                   f"--config.{override}")
    assert line.startswith(field + ": "), (override, line)
    assert not workdir.exists(), override  # nothing written: a corrected rerun starts afresh


def test_a_run_refuses_bad_input_and_keeps_its_files(readme_runs, tmp_path, monkeypatch):
  workdir, _ = readme_runs
  def files():
    return {p: os.path.getmtime(p) for p in glob.glob(f"{workdir}/**", recursive=True)
            if os.path.isfile(p)}
  before = files()
  config_json = open(os.path.join(workdir, "config.json")).read()
  run = ["--config=configs/smoke.py", f"--workdir={workdir}", *RUN_OVERRIDES]
  line = refused(*run, "--config.training.ema_decay=1.5")
  assert line.startswith("config.training.ema_decay=1.5: ")
  line = refused(*run, "--config.optim.learning_rate=0.5")
  assert "optim.learning_rate: 0.001 in the run, 0.5 now" in line
  line = refused(f"--workdir={workdir}", "--mode=sample",
                 "--config.sampling.sampler=bogus")
  assert line.startswith("config.sampling.sampler='bogus': ")
  line = refused(f"--workdir={workdir}", "--mode=sample", "--step=7")
  assert line == f"No checkpoint of step 7 in {workdir}/checkpoints; available steps: 2."
  line = refused(f"--workdir={tmp_path}/none", "--mode=sample")
  assert "is not a ddpm_jax run directory" in line
  monkeypatch.setenv("DDPM_JAX_CACHE", str(tmp_path / "cache"))  # offline: nothing listens
  monkeypatch.setenv("DDPM_JAX_MIRROR", "http://127.0.0.1:9")
  line = refused(f"--workdir={workdir}", "--mode=eval",
                 "--config.eval.metrics=('fid',)")
  assert line.startswith("Could not download http://127.0.0.1:9/pt_inception-2015-12-05-")
  assert line.endswith("or pass --config.eval.inception_weights=/path/to/"
                       "pt_inception-2015-12-05-6726825d.pth.")
  line = refused(f"--workdir={workdir}", "--mode=sample",
                 "--config.model.ch=64")
  assert "model.ch: 32 in the run, 64 now" in line
  line = refused(f"--workdir={workdir}", "--mode=sample",
                 "--config=configs/digits.py")  # a config file of another model
  assert "model.num_res_blocks: 1 in the run, 2 now" in line
  line = refused("--workdir=/unused", "--mode=train")
  assert line.startswith("--mode=train needs --config")
  assert open(os.path.join(workdir, "config.json")).read() == config_json
  assert files() == before


def test_sample_mode_starts_from_the_runs_config(readme_runs):
  """Problem 8: the run was trained with training.batch_size=16, configs/smoke.py says 8: the
  file's training fields are the run's business, only sampling/eval fields apply."""
  workdir, _ = readme_runs
  for args in (["--config=configs/smoke.py"], []):
    fv = parse(*args, f"--workdir={workdir}", "--mode=sample",
               "--config.sampling.sampler=ddim", "--config.data.data_dir=/data/tfds")
    config = main.run_config(fv)
    assert config.sampling.sampler == "ddim" and config.training.batch_size == 16
    assert config.data.data_dir == "/data/tfds"  # where the data live may change
    assert config.sampling.num_steps == (20 if args else 5)  # the file's, else the run's
    settings.Settings.from_config(config)


def test_user_errors_lose_their_traceback_and_bugs_keep_theirs(capsys):
  def mistake():
    raise UserError("config.x=1: no.")
  with pytest.raises(SystemExit) as e:
    main.report_user_errors(mistake)
  assert e.value.code == 2 and capsys.readouterr().err == "config.x=1: no.\n"
  with pytest.raises(KeyError):
    main.report_user_errors(lambda: {}["bug"])


def test_is_changeable_follows_the_sections():
  fixed = ["seed", "model.ch", "diffusion.beta_end", "data.dataset", "data.image_size",
           "optim.learning_rate", "training.batch_size", "training.ema_decay",
           "training.extra_ema_decays", "model.a_new_field"]
  changeable = ["parallel", "sampling.sampler", "sampling.a_new_field", "eval.metrics",
                "model.dtype", "model.remat", "data.data_dir", "training.num_train_steps",
                "training.log_every", "training.eval_every"]
  assert not any(settings.is_changeable(k) for k in fixed)
  assert all(settings.is_changeable(k) for k in changeable)


def test_every_config_file_validates_and_reads_back_from_json_alike():
  for name in CONFIGS:
    config = importlib.import_module(f"configs.{name}").get_config()
    stored = ml_collections.ConfigDict(json.loads(config.to_json()))  # tuples become lists
    s = settings.Settings.from_config(config, device_count=8)
    assert settings.Settings.from_config(stored, device_count=8) == s
    assert s.model.ch_mult == tuple(config.model.ch_mult)


def test_an_unchecked_config_json_is_named_not_restored(tmp_path):
  """A config.json with a value that was never checked (written before validation existed) is
  not what a corrected command must restore: the sentence says to move it away."""
  from ddpm_jax import rundir
  bad = smoke.get_config()
  bad.training.ema_decay = 1.5
  (tmp_path / "config.json").write_text(bad.to_json())
  with pytest.raises(UserError, match=r"config.json holds a config that cannot train \(config"
                                      r"\.training\.ema_decay=1\.5: .*move it away"):
    rundir.write_or_check_config(str(tmp_path), smoke.get_config())


def test_an_unretrieved_asyncio_task_exception_is_one_line_and_other_records_pass():
  import logging
  try:
    raise RuntimeError("cancelled {'a': 'b'}")
  except RuntimeError as e:
    exc_info = (type(e), e, e.__traceback__)
  record = logging.LogRecord("asyncio", logging.ERROR, __file__, 1,
                             "Task exception was never retrieved\nfuture: <Task finished>", (),
                             exc_info)
  other = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "Unclosed %s", ("client",),
                            exc_info)
  quiet = main.UnretrievedTaskInOneLine()
  assert quiet.filter(record) and quiet.filter(other)
  formatted = logging.Formatter().format(record)
  assert "Traceback" not in formatted and "\n" not in formatted
  assert formatted.endswith("nobody awaited: RuntimeError: cancelled {'a': 'b'}")
  assert other.exc_info is exc_info and "Traceback" in logging.Formatter().format(other)


def test_only_the_closed_event_loop_message_is_dropped():
  """The unraisable hook main.py installs drops orbax's harmless "Event loop is closed" only."""
  seen = []
  hook = main.quiet_closed_event_loop(seen.append)

  class Unraisable:
    def __init__(self, e):
      self.exc_value = e

  hook(Unraisable(RuntimeError("Event loop is closed")))
  other = Unraisable(RuntimeError("something else"))
  hook(other)
  assert seen == [other]
