"""The training loop end to end: main.py, checkpoints, signals, resume, several hosts, bad input."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from PIL import Image

from configs import smoke
from ddpm_jax import checkpoint, data, train
from ddpm_jax.errors import UserError
from tests.test_checkpoint import damage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(**overrides):
  """configs/smoke.py with dotted overrides, e.g. **{"training.batch_size": 16}."""
  config = smoke.get_config()
  config.update_from_flattened_dict(overrides)
  return config


def random_params(config):
  """(model, params) of the config's UNet with random weights (not the UNet's init: its zero
  output layer predicts eps = 0, for which many chains are exact), 1 / sqrt(fan-in) scaled."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from ddpm_jax import settings  # pylint: disable=import-outside-toplevel
  s = settings.Settings.from_config(config)
  model = s.model.make_model()
  y = jnp.zeros((1,), jnp.int32) if s.model.num_classes else None
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(s.data.image_shape)),
      jnp.zeros((1,), jnp.int32), y=y))["params"]
  leaves, tree = jax.tree_util.tree_flatten(shapes)
  rng = np.random.default_rng(0)
  return model, jax.tree_util.tree_unflatten(tree, [
      rng.normal(0.0, 1.0 / np.sqrt(np.prod(x.shape[:-1])) if len(x.shape) > 1 else 0.1,
                 x.shape).astype(np.float32) for x in leaves])


def run_main(workdir, *flags, devices=8, env=None, wait=True):
  """python main.py --config=configs/smoke.py in a fresh process with `devices` CPU devices."""
  cmd = [sys.executable, "main.py", "--config=configs/smoke.py", f"--workdir={workdir}", *flags]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env or {}))
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  return out


def restored_params(workdir, step=None):
  tree, meta = checkpoint.Checkpointer(workdir, keep=10).restore(step)
  return tree, meta


def leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def progress_steps(console):
  """The steps of the console's progress lines."""
  return [int(m) for m in re.findall(r"^step (\d+)/", console, re.M)]


def test_train_checkpoint_resume_and_sample_grid(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  state = train.train_and_evaluate(smoke_config(), workdir, progress_every_s=0.0)
  assert int(state.step) == 6
  console = capsys.readouterr().err
  assert "Compiling the train step" in console
  assert re.search(r"Compiled the train step in \d+\.\d s\.", console)
  # log_every=2, and a line whenever progress_every_s has passed: here, after every step.
  assert progress_steps(console) == [1, 2, 3, 4, 5, 6]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["training"]["num_train_steps"] == 6
  ckpt = checkpoint.Checkpointer(workdir, keep=2)
  assert ckpt.all_steps() == [3, 6]  # every 3 steps, the newest 2 kept
  grid = Image.open(os.path.join(workdir, "samples", "ema_00000006.png"))
  assert grid.size == (8 * (2 * 9 + 1),) * 2  # 4 samples of 8x8 in a 2x2 grid, 1-pixel gaps, 8x
  assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))
  tree, meta = ckpt.restore()
  assert meta["step"] == 6 and int(np.asarray(tree["step"])) == 6
  for a, b in zip(leaves(tree["ema_params"]), leaves(state.ema_params)):
    np.testing.assert_array_equal(a, b)
  # A longer run in the same workdir resumes from step 6.
  state = train.train_and_evaluate(smoke_config(**{"training.num_train_steps": 9}), workdir,
                                   progress_every_s=1e9)
  assert int(state.step) == 9
  assert progress_steps(capsys.readouterr().err) == [8, 9]  # log_every only, and the last step
  assert checkpoint.Checkpointer(workdir, keep=2).all_steps() == [6, 9]


class Console:
  """A subprocess's output (stdout and stderr), read by a thread, so the test can wait for a
  line while the process runs."""

  def __init__(self, proc):
    self.proc, self.lines = proc, []
    self._thread = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
    self._thread.start()

  def wait_for(self, pattern, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
      found = re.search(pattern, "".join(self.lines))
      if found:
        return found
      assert self.proc.poll() is None or self._thread.is_alive(), self.text()[-3000:]
      time.sleep(0.02)
    raise AssertionError(f"no {pattern!r} in:\n" + self.text()[-3000:])

  def finish(self, timeout=120):
    self.proc.wait(timeout=timeout)
    self._thread.join(timeout=30)
    return self.text()

  def text(self):
    return "".join(self.lines)


def test_resume_after_an_abrupt_exit_matches_an_uninterrupted_run(tmp_path, main_py):
  """A second Ctrl-C ends the run at once (os._exit: no clean-up runs, as after SIGKILL; a
  SIGKILL in the middle of a save is tested in test_checkpoint.py), possibly while it saves.
  The resumed and the uninterrupted runs go on in this process, with its compiled train step."""
  flags = ["--config.training.num_train_steps=60", "--config.training.checkpoint_every=10",
           "--config.training.log_every=10", "--config.training.sample_every=0"]
  killed = str(tmp_path / "killed")
  run = Console(run_main(killed, *flags, wait=False))
  ckpt_dir = os.path.join(killed, "checkpoints")
  deadline = time.time() + 240
  while time.time() < deadline and run.proc.poll() is None:
    if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
      break
    time.sleep(0.05)
  assert run.proc.poll() is None, "the run ended before it could be stopped: " + run.text()[-2000:]
  run.proc.send_signal(signal.SIGINT)
  run.wait_for(r"SIGINT: saving the checkpoint of the current step")
  run.proc.send_signal(signal.SIGINT)
  sent = time.time()
  out = run.finish(timeout=60)
  assert run.proc.returncode == 130 and time.time() - sent < 10, out[-3000:]
  assert "Second Ctrl-C: exiting now" in out and "Traceback" not in out, out[-3000:]
  steps = checkpoint.Checkpointer(killed, keep=10).all_steps()
  assert steps and max(steps) < 60
  status, out = main_py("--config=configs/smoke.py", f"--workdir={killed}", *flags)
  assert status == 0, out[-3000:]
  assert f"Resuming from the checkpoint of step {max(steps)}" in out
  straight = str(tmp_path / "straight")  # 8 devices, as the runs above
  train.train_and_evaluate(smoke_config(**{"training.num_train_steps": 60,
                                           "training.checkpoint_every": 10,
                                           "training.log_every": 10,
                                           "training.sample_every": 0}), straight)
  a, _ = restored_params(killed, 60)
  b, _ = restored_params(straight, 60)
  for x, y in zip(leaves(a), leaves(b)):  # same data order, same noise: the same state
    np.testing.assert_array_equal(x, y)


def test_sigterm_and_ctrl_c_save_the_current_step_and_exit_non_zero(tmp_path):
  """SIGTERM -> 143 and Ctrl-C -> 130, each after a checkpoint of the step the loop was on
  (at most 2 steps after the one running when the signal came, with log_every far away), with
  no traceback; a damaged latest checkpoint is set aside on resume. (A second Ctrl-C: see
  test_resume_after_an_abrupt_exit_matches_an_uninterrupted_run.)"""
  workdir = str(tmp_path / "run")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  flags = ["--config.training.num_train_steps=100000", "--config.training.checkpoint_every=7",
           "--config.training.sample_every=0", "--config.training.log_every=1000000"]
  stopped = r"{} arrived after step (\d+) had finished: saved the checkpoint of step (\d+)"

  run = Console(run_main(workdir, *flags, wait=False))
  run.wait_for(r"Compiled the train step in \d+\.\d s")
  while not os.path.isdir(os.path.join(ckpt_dir, "7")):  # in the loop, one checkpoint saved
    assert run.proc.poll() is None, run.text()[-3000:]
    time.sleep(0.01)
  run.proc.send_signal(signal.SIGTERM)
  out = run.finish()
  assert run.proc.returncode == 143, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  arrived, saved = map(int, re.search(stopped.format("SIGTERM"), out).groups())
  assert 7 <= arrived < saved <= arrived + 3, (arrived, saved)  # 2 steps in flight at most
  assert checkpoint.Checkpointer(workdir, keep=10).all_steps()[-1] == saved

  # Resume with the latest checkpoint damaged: one warning, it is moved aside, and the run goes
  # on from the previous one, without a traceback; then Ctrl-C.
  damage(workdir, saved, "truncated")
  run = Console(run_main(workdir, *flags, wait=False))
  resumed = int(run.wait_for(r"Resuming from the checkpoint of step (\d+)").group(1))
  assert resumed < saved
  run.wait_for(r"Compiled the train step")
  time.sleep(0.5)
  run.proc.send_signal(signal.SIGINT)
  out = run.finish()
  assert run.proc.returncode == 130, out[-3000:]
  assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
  assert "Event loop is closed" not in out
  assert len(re.findall(r"Checkpoint step \d+ in .* is damaged", out)) == 1
  assert f"Checkpoint step {saved} in" in out
  assert [d.split("-")[0] for d in os.listdir(os.path.join(workdir, "damaged_checkpoints"))] == [
      str(saved)]
  arrived, saved_again = map(int, re.search(stopped.format("SIGINT"), out).groups())
  assert resumed <= arrived < saved_again <= arrived + 3, (arrived, saved_again)
  assert checkpoint.Checkpointer(workdir, keep=10).all_steps()[-1] == saved_again


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path, capsys):
  """2 processes x 2 CPU devices (jax.distributed, gloo; shard_map over the global mesh) train
  the smoke config to the same state as 1 process x 8 devices (pmap; this process, while they
  run: its train step is usually already in the session's compilation cache)."""
  steps = {"training.num_train_steps": 2, "training.checkpoint_every": 2,
           "training.sample_every": 0, "training.log_every": 1}
  flags = [f"--config.{k}={v}" for k, v in steps.items()]
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  port = _free_port()
  procs = [run_main(multi, *flags, "--config.parallel=shard_map",
                    f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                    f"--process_id={i}", devices=2, wait=False) for i in range(2)]
  capsys.readouterr()
  train.train_and_evaluate(smoke_config(**steps), single)
  outs = []
  for proc in procs:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    outs.append(out)
  outs.append(capsys.readouterr().err)  # the progress lines go to stderr
  losses = [[line.split("loss ")[1].split()[0] for line in out.splitlines()
             if line.startswith("step ")] for out in outs]
  assert losses[0] == losses[2] and len(losses[0]) == 2  # process 0 reports, in step with one
  assert losses[1] == []  # process 1 writes no logs
  a, _ = restored_params(multi, 2)
  b, _ = restored_params(single, 2)
  # Same data, same noise: only the all-reduce's summation order differs.
  for x, y in zip(leaves(a), leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  real = data.create_input_iter

  def poisoned(config, **kw):
    for i, batch in enumerate(real(config, **kw), start=kw["start_step"] + 1):
      if i == 5:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      yield batch

  monkeypatch.setattr(train.data, "create_input_iter", poisoned)
  workdir = str(tmp_path / "run")
  config = smoke_config(**{"training.num_train_steps": 8, "training.checkpoint_every": 2,
                           "training.log_every": 1, "training.sample_every": 0})
  with pytest.raises(FloatingPointError, match=r"NaN/Inf between steps 4 and 5.*last good "
                     r"checkpoint is step 4") as stopped:
    train.train_and_evaluate(config, workdir)
  assert isinstance(stopped.value, UserError)  # main.py prints its sentence, no traceback
  ckpt = checkpoint.Checkpointer(workdir, keep=10)
  assert ckpt.all_steps() == [2, 4]
  tree, _ = ckpt.restore()
  assert all(np.isfinite(x).all() for x in leaves(tree))


def test_incompatible_config_is_refused_and_nothing_is_touched(tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(smoke_config(**{"training.sample_every": 0}), workdir)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with open(os.path.join(workdir, "config.json")) as f:
    saved = f.read()
  with pytest.raises(ValueError, match=r"model\.ch"):
    train.train_and_evaluate(smoke_config(**{"model.ch": 64}), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == saved


def test_bad_input(tmp_path):
  with pytest.raises(ValueError, match=r"does not divide over the 8 devices"):
    train.train_and_evaluate(smoke_config(**{"training.batch_size": 12}), str(tmp_path / "a"))
  with pytest.raises(ValueError, match=r"Unknown dataset config.data.dataset='imagenet'; accepted: cifar10"):
    train.train_and_evaluate(smoke_config(**{"data.dataset": "imagenet"}), str(tmp_path / "b"))
  assert not os.path.exists(tmp_path / "b" / "config.json")  # refused before writing anything
  not_prepared = smoke_config(**{"data.dataset": "cifar10", "data.image_size": 32,
                                 "data.num_channels": 3, "model.out_channels": 3,
                                 "model.attn_resolutions": (16,),  # a resolution at 32x32
                                 "data.data_dir": str(tmp_path / "no_data")})
  with pytest.raises(Exception, match=r"tfds build cifar10"):
    train.train_and_evaluate(not_prepared, str(tmp_path / "c"))
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(Exception, match=str(blocker)):
    train.train_and_evaluate(smoke_config(), str(blocker / "run"))


def test_main_refuses_unknown_mode(tmp_path, main_py):
  status, log = main_py("--config=configs/smoke.py", f"--workdir={tmp_path}", "--mode=serve")
  assert status == 2 and "--mode" in log
