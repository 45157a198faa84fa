"""One writer per run directory (ddpm_jax/lease.py): a second launch on a live lease is refused
with one sentence, a dead holder's lease is taken over with one warning, --force_lease takes
over at once, and nothing of the run (temporary checkpoint folders included) is touched by a
refused launch. The process boundary is the point of the first test: the holder is a real
process, the refused launch the real `python main.py`."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from ddpm_jax import lease
from ddpm_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from tests.conftest import TRAINED_RUN_FLAGS as SMOKE, run_main

_HOLDER = """
import sys, time
from ddpm_jax import lease
held = lease.acquire(sys.argv[1], purpose="training")
print("held", flush=True)
time.sleep(600)
"""


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _holder(folder):
  """A real process that takes the lease of `folder` and keeps it (until killed)."""
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


_run = run_main


def _copy(trained_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained_run, workdir)
  return workdir


def _write_lease(folder, **fields):
  record = dict(host="another-host", pid=4242, token="theirs", purpose="training",
                started=time.time(), heartbeat=time.time())
  record.update(fields)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, lease.LEASE_FILE), "w") as f:
    json.dump(record, f)
  return record


def test_a_second_launch_is_refused_and_a_killed_holders_lease_is_taken_over(
    trained_run, tmp_path, monkeypatch, capsys, caplog):
  workdir = _copy(trained_run, tmp_path)
  tmp_checkpoint = workdir / "checkpoints" / "4.orbax-checkpoint-tmp-1796690000"
  tmp_checkpoint.mkdir(parents=True)  # the holder's save in flight
  (tmp_checkpoint / "part").write_text("x")
  holder = _holder(workdir)
  try:
    proc = subprocess.run([sys.executable, "main.py", f"--workdir={workdir}", *SMOKE], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{workdir} is in use by process {holder.pid} on host "
                           f"{socket.gethostname()} (training, last heartbeat "), last
    assert "--force_lease" in last and "Traceback" not in proc.stderr
    assert os.listdir(workdir / "checkpoints") == ["2", tmp_checkpoint.name]
    assert (tmp_checkpoint / "part").read_text() == "x"  # the temporary folder is untouched
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # Its process is gone (this host): the next launch takes over at once, with one warning.
  status, err = _run(monkeypatch, capsys, f"--workdir={workdir}", *SMOKE)
  assert status == 0, err
  warnings = [r.getMessage() for r in caplog.records if "Taking over the lease" in r.getMessage()]
  assert len(warnings) == 1 and f"its process {holder.pid} on this host no longer runs" in (
      warnings[0])
  assert os.listdir(workdir / "checkpoints") == ["2"]  # the dead run's temporary folder cleaned
  assert not (workdir / lease.LEASE_FILE).exists()  # released on exit


def test_a_live_lease_of_another_host_is_refused_then_forced(tmp_path, monkeypatch, capsys,
                                                            caplog, trained_run):
  workdir = tmp_path / "run"
  _write_lease(workdir, heartbeat=time.time() - 30)  # a fresh workdir: nothing else written
  status, err = _run(monkeypatch, capsys, f"--workdir={workdir}", *SMOKE)
  assert status == 2 and err.count("\n") == 1, err
  assert err.startswith(f"{workdir} is in use by process 4242 on host another-host (training, "
                        "last heartbeat 30 s ago): one writer at a time"), err
  assert os.listdir(workdir) == [lease.LEASE_FILE]
  shutil.rmtree(workdir)
  shutil.copytree(trained_run, workdir)
  _write_lease(workdir, heartbeat=time.time() - 30)
  status, err = _run(monkeypatch, capsys, f"--workdir={workdir}", *SMOKE, "--force_lease")
  assert status == 0, err
  assert any("Taking over the lease" in r.getMessage() and "--force_lease was given" in
             r.getMessage() for r in caplog.records)
  assert os.listdir(workdir / "checkpoints") == ["2"] and not (workdir / lease.LEASE_FILE).exists()


def test_a_stale_or_unreadable_lease_is_taken_over_with_one_warning(tmp_path, caplog):
  _write_lease(tmp_path, heartbeat=time.time() - lease.STALE_AFTER_S - 5)
  lease.acquire(tmp_path, purpose="training").release()
  assert "its last heartbeat was 2 min ago (more than 120 s)" in caplog.text
  damaged = tmp_path / lease.LEASE_FILE
  damaged.write_text('{"host": ')  # young: maybe still being written, so not taken yet
  with pytest.raises(UserError, match="it kept changing"):
    lease.acquire(tmp_path, purpose="training")
  os.utime(damaged, (time.time() - 60, time.time() - 60))  # old and damaged: it names nobody
  lease.acquire(tmp_path, purpose="training").release()
  assert "its lease file is unreadable" in caplog.text
  assert os.listdir(tmp_path) == []


def test_the_heartbeat_renews_and_notices_a_takeover(tmp_path):
  held = lease.acquire(tmp_path, purpose="sampling", heartbeat_s=0.05)
  try:
    first = lease.read(tmp_path)["heartbeat"]
    time.sleep(0.3)
    assert lease.read(tmp_path)["heartbeat"] > first and not held.lost
    held.check()
    _write_lease(tmp_path)  # another process forced it
    time.sleep(0.3)
    assert held.lost
    with pytest.raises(UserError, match="Another process took over the lease"):
      held.check()
  finally:
    held.release()
  assert lease.read(tmp_path)["token"] == "theirs"  # not ours to delete


def test_sampling_holds_its_own_folder_only(trained_run, tmp_path, monkeypatch, capsys):
  """Sampling may run while the run trains (the workdir's lease is not the sample folder's),
  but a second sampler of one folder is refused."""
  workdir = _copy(trained_run, tmp_path)
  _write_lease(workdir)  # a training of this run is live
  sample = ["--mode=sample", f"--workdir={workdir}", "--config.sampling.num_steps=2",
            "--config.sampling.sampler=ddim", "--config.sampling.num_samples=2"]
  status, err = _run(monkeypatch, capsys, *sample)
  assert status == 0, err
  folder = workdir / "samples" / "00000002_ddim2_eta0"
  assert sorted(os.listdir(folder)) == ["grid.png", "sampling.json", "shard_000000.npz"]
  _write_lease(folder, purpose="sampling")
  status, err = _run(monkeypatch, capsys, *sample, "--config.sampling.num_samples=8")
  assert status == 2 and err.startswith(f"{folder} is in use by process 4242 on host "
                                        "another-host (sampling, last heartbeat"), err
  assert sorted(os.listdir(folder)) == ["grid.png", lease.LEASE_FILE, "sampling.json",
                                        "shard_000000.npz"]


def test_an_unwritable_path_is_one_sentence_in_training_and_sampling(trained_run, tmp_path,
                                                                     monkeypatch, capsys):
  """(The tests run as root, for whom permissions do not stop writes: the paths below cannot be
  created whoever runs them, as a file stands where a folder must be.)"""
  (tmp_path / "a_file").write_text("")
  status, err = _run(monkeypatch, capsys, f"--workdir={tmp_path}/a_file/run", *SMOKE)
  assert status == 2 and err == (f"Cannot write the run directory {tmp_path}/a_file/run (Not a "
                                 "directory); pass a --workdir you can create and write.\n"), err
  workdir = _copy(trained_run, tmp_path)
  (workdir / "samples" / "00000002_ddim2_eta0").write_text("")  # where the samples would go
  status, err = _run(monkeypatch, capsys, f"--workdir={workdir}", "--mode=sample",
                     "--config.sampling.sampler=ddim", "--config.sampling.num_steps=2")
  assert status == 2 and err.count("\n") == 1, err
  assert err == (f"Cannot write the run directory {workdir}/samples/00000002_ddim2_eta0 (File "
                 "exists); pass a --workdir you can create and write.\n"), err
