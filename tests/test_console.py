"""What a user sees: a quiet console (our lines; the libraries' INFO in workdir/log.txt), honest
progress and a closing summary, warnings for settings a short run defeats, config names that
the installed command resolves."""
import logging
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest

from configs import default, digits, small, smoke
from ddpm_jax import config_files, console, heartbeat, run_summary, short_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GLOG = re.compile(r"^[IWEF]\d{4} ")  # absl's (and TensorFlow's C++) line prefix
_INFO = re.compile(r"^I\d{4} ")


def _ours(lines):
  """The lines of a run's console that are fixed: without the waiting lines ("... so far")
  that slow compiles bring, and without XLA's own "Very slow compile?" alarm (E... lines and
  their banner), a warning of the machine's, not noise."""
  alarm = re.compile(r"^([WE]\d{4} .*|\**|\[Compiling module .*|The operation took .*)$")
  return [line for line in lines if not line.endswith("so far") and not alarm.match(line)]


def _main(*args, timeout=600):
  proc = subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr


def test_a_tiny_run_prints_only_our_lines_and_ends_with_a_summary(tmp_path):
  run = tmp_path / "run"
  err = _main("--config=configs/smoke.py", f"--workdir={run}", "--config.cpu_devices=1",
              "--config.training.ema_warmup=True")
  lines = err.strip().splitlines()
  fixed = _ours(lines)
  assert not [line for line in lines if _INFO.match(line) or "InitializeLog" in line], err
  assert fixed[0].startswith("Compiling the train step") and fixed[1].startswith("Compiled")
  assert [line.split()[1] for line in fixed if line.startswith("step ") and "ETA" in line] == [
      "2/6", "4/6", "6/6"]
  assert fixed[-7] == f"step 6: EMA samples written to {run}/samples/ema_00000006.png"
  assert fixed[-6].startswith("Training finished: 6 steps in ") and fixed[-6].endswith(
      "step 6 of 6.")
  assert fixed[-5:] == [
      f"  checkpoint   {run}/checkpoints (step 6)",
      f"  samples      {run}/samples/ema_00000006.png",
      f"  TensorBoard  tensorboard --logdir {run}/tensorboard",
      f"  log          {run}/log.txt (the libraries' messages too)",
      f"Next: python main.py --workdir={run} --mode=sample"]
  assert len(fixed) == 12, err
  # The libraries' INFO (orbax saving, TensorFlow's C++ start-up) is in the log file.
  log = (run / "log.txt").read_text()
  assert "checkpoint_manager.py" in log and "Saving checkpoint at step 6" in log
  # The grid is in TensorBoard too, as a PNG-encoded image summary named "samples".
  events = b"".join(p.read_bytes() for p in (run / "tensorboard").iterdir())
  assert b"samples" in events and b"\x89PNG" in events

  # Sample mode: its progress and where the samples are; no orbax "read only" warning.
  err = _main(f"--workdir={run}", "--mode=sample")
  lines = err.strip().splitlines()
  assert "read only" not in err and not [line for line in lines if _INFO.match(line)], err
  lines = _ours(lines)
  assert lines[-1] == f"Samples written to {run}/samples/00000006_ancestral20.", err
  assert len(lines) == 3, err


def _record(path, level, msg="m", **extra):
  record = logging.LogRecord("x", level, path, 1, msg, (), None)
  record.__dict__.update(extra)
  return record


def test_the_console_shows_our_records_and_library_warnings_only():
  ours = os.path.join(ROOT, "ddpm_jax", "train.py")
  theirs = os.path.join(ROOT, "..", "site-packages", "orbax", "checkpoint_manager.py")
  assert console.shown(_record(ours, logging.INFO), verbose=False)
  assert not console.shown(_record(ours, logging.INFO, console=False), verbose=False)
  assert not console.shown(_record(theirs, logging.INFO), verbose=False)
  assert console.shown(_record(theirs, logging.WARNING), verbose=False)
  assert not console.shown(_record(theirs, logging.WARNING, "Given directory is read only=%s"),
                           verbose=False)
  assert console.shown(_record(theirs, logging.INFO), verbose=True)
  formatter = console.ConsoleFormatter()
  assert formatter.format(_record(ours, logging.WARNING, "Careful.")) == "Warning: Careful."
  assert _GLOG.match(formatter.format(_record(theirs, logging.WARNING, "Careful.")))


def test_the_run_log_is_written_once_the_run_is_and_never_for_a_refused_command(tmp_path,
                                                                                capsys):
  handler = console.RunLogHandler()
  handler.log_to(str(tmp_path / "run"))
  handler.handle(_record("lib.py", logging.INFO, "before the workdir"))
  (tmp_path / "run").mkdir()
  handler.handle(_record("lib.py", logging.INFO, "before the run writes"))
  assert not (tmp_path / "run" / "log.txt").exists()  # still validating: nothing written
  handler.commit()
  handler.handle(_record("lib.py", logging.INFO, "after"))
  lines = (tmp_path / "run" / "log.txt").read_text().splitlines()
  assert [line.split("] ")[-1] for line in lines] == [
      "before the workdir", "before the run writes", "after"]
  handler.close()
  # Sampling or evaluating an existing run: written at exit; refused: never.
  for refused in (False, True):
    run = tmp_path / f"refused_{refused}"
    run.mkdir()
    handler = console.RunLogHandler()
    handler.log_to(str(run))
    handler.handle(_record("lib.py", logging.INFO, "held"))
    if refused:
      handler.discard()
    handler.close()
    assert (run / "log.txt").exists() != refused
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  (read_only / "log.txt").mkdir()  # cannot be opened as a file, even by root
  handler = console.RunLogHandler()
  handler.log_to(str(read_only))
  handler.commit()
  handler.handle(_record("lib.py", logging.INFO, "dropped, quietly"))
  handler.close()
  assert "Logging error" not in capsys.readouterr().err
  remote = console.RunLogHandler()  # a gs:// workdir: the log goes to a local temporary file
  assert os.path.dirname(remote.log_to("gs://bucket/run", 1)) == tempfile.gettempdir()
  remote.close()


def test_native_stderr_is_logged_line_by_line_at_its_level(caplog):
  logger = logging.getLogger("ddpm_jax.test_native")
  with caplog.at_level(logging.INFO, logger="ddpm_jax.test_native"):
    with console.native_stderr_to_log(logger):
      os.write(2, b"I0000 00:00:1.0 1 port.cc:153] oneDNN custom operations are on.\n"
                  b"E0000 00:00:1.0 1 cuda.cc:1] Unable to register cuDNN factory\n")
  assert [(r.levelno, r.getMessage()[:5], r.console) for r in caplog.records] == [
      (logging.INFO, "I0000", False), (logging.ERROR, "E0000", True)]


def _with(config, **fields):
  for name, value in fields.items():
    section, field = name.split("__")
    config[section][field] = value
  return config


def test_short_runs_are_warned_about_what_their_settings_defeat():
  assert short_run.warnings_for(digits.get_config()) == []
  assert short_run.warnings_for(default.get_config()) == []
  # The own-images preset cut to 200 steps: its 1,000-step warm-up never ends, and the one
  # checkpoint and grid come at the end.
  warned = short_run.warnings_for(_with(small.get_config(), training__num_train_steps=200))
  assert warned[0].startswith("optim.warmup_steps=1000 is not below training.num_train_steps="
                              "200: the learning rate never reaches optim.learning_rate=0.0002 "
                              "(it ends at 4e-05)")
  assert [w.split(":")[0] for w in warned[1:]] == [
      "training.checkpoint_every=5000 exceeds training.num_train_steps=200",
      "training.sample_every=10000 exceeds training.num_train_steps=200"]
  # A fixed EMA longer than the run: its samples still look like the initialisation.
  warned = short_run.warnings_for(_with(default.get_config(), training__num_train_steps=10_000,
                                        optim__warmup_steps=100, training__checkpoint_every=1000,
                                        training__sample_every=1000))
  assert len(warned) == 1 and warned[0].startswith("training.ema_decay=0.9999 averages about "
                                                   "the last 10,000 steps")
  assert short_run.warnings_for(_with(smoke.get_config(), training__ema_warmup=True)) == []


def test_the_summary_says_where_everything_is_and_what_to_run_next():
  lines = run_summary.training_summary(
      "/runs/a", first_step=10, step=16, num_steps=20, seconds=75.0, compile_seconds=30.0,
      checkpoint_step=16, last_grid=None, tensorboard_dir="/runs/a/tensorboard",
      stopped_by="SIGTERM", argv=["main.py", "--config=configs/smoke.py", "--workdir=/runs/a"])
  assert lines == [
      "Training stopped by SIGTERM at step 16 of 20: 6 steps in 0:01:15 (0:00:30 of it "
      "compiling).",
      "  checkpoint   /runs/a/checkpoints (step 16)",
      "  TensorBoard  tensorboard --logdir /runs/a/tensorboard",
      "Next: resume with the same command: python main.py --config=configs/smoke.py "
      "--workdir=/runs/a"]
  assert run_summary.program("/venv/bin/ddpm-jax") == "ddpm-jax"
  assert run_summary.program("main.py") == "python main.py"


def test_a_heartbeat_prints_while_nothing_else_does(capsys):
  with heartbeat.Heartbeat(lambda s: "still working", every_s=0.05):
    time.sleep(0.5)
  assert "still working" in capsys.readouterr().err

  def fails_midway():
    heartbeat.Heartbeat(lambda s: "left behind", every_s=0.05, while_running=sys._getframe())
    raise RuntimeError("mid-way")
  with pytest.raises(RuntimeError) as e:
    fails_midway()
  time.sleep(0.5)  # the traceback (e) keeps the frame alive; the heartbeat sees it has left
  capsys.readouterr()
  time.sleep(0.3)
  assert "left behind" not in capsys.readouterr().err and e.value
  assert heartbeat.duration(3725.9) == "1:02:05" and heartbeat.duration(float("inf")) == "?"


def test_config_names_resolve_to_the_shipped_files(tmp_path, monkeypatch):
  shipped = os.path.join(config_files.configs_dir(), "digits.py")
  assert os.path.exists(shipped)
  monkeypatch.chdir(tmp_path)  # no configs/ here, as for the installed command
  assert config_files.resolve("digits") == shipped
  assert config_files.resolve("configs/digits.py") == shipped
  assert config_files.resolve("configs/digits.py:arg") == shipped + ":arg"
  assert config_files.resolve("nope") == "nope"
  (tmp_path / "mine.py").write_text("")
  assert config_files.resolve("mine.py") == "mine.py"


def test_a_reporter_leaves_time_aside_out_of_the_rate(tmp_path, monkeypatch):
  from ddpm_jax import reporting  # pylint: disable=import-outside-toplevel
  clock = [100.0]
  monkeypatch.setattr(reporting.time, "perf_counter", lambda: clock[0])
  reporter = reporting.Reporter(str(tmp_path / "run"), num_steps=10, start_step=0, batch_size=8,
                                progress_every_s=0)
  clock[0] += 10.0  # 5 steps of training in 10 s ...
  with reporter.aside("sampling a grid"):
    clock[0] += 90.0  # ... and 90 s of sampling
  assert reporter._rate(5) == pytest.approx(0.5)  # pylint: disable=protected-access
  reporter.close()
