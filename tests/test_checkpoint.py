"""Run directories: config.json checks, orbax checkpoints (atomic, keep-K, multi-process), load()."""
import glob
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import default
from ddpm_jax import checkpoint, loading, rundir
from ddpm_jax.errors import UserError

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_checkpoint_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
  return env


def _leaves_equal(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb, (ta, tb)
  for x, y in zip(la, lb):
    assert isinstance(x, np.ndarray), type(x)
    assert x.dtype == np.asarray(y).dtype and x.shape == np.shape(y)
    np.testing.assert_array_equal(x, np.asarray(y))


def _train_state(step, num_emas=2):
  """A state like flax.serialization.to_state_dict(TrainState): EMA tuple -> {"0": ..., ...}."""
  rng = np.random.default_rng(step)
  params = {"conv_in": {"kernel": rng.standard_normal((3, 3, 1, 4)).astype(np.float32),
                        "bias": np.zeros(4, np.float32)},
            "dense": {"kernel": rng.standard_normal((4, 2)).astype(np.float32)}}
  emas = tuple(jax.tree_util.tree_map(lambda p, i=i: p * (i + 2), params) for i in range(num_emas))
  state = {"step": jnp.asarray(step, jnp.int32), "params": params, "ema_params": emas,
           "opt_state": ((), {"count": jnp.asarray(step, jnp.int32),
                              "mu": jax.tree_util.tree_map(np.zeros_like, params)}),
           "nonfinite_steps": jnp.zeros((), jnp.int32)}
  return flax.serialization.to_state_dict(state)


# ----------------------------------------------------------------------------- config.json


def test_config_is_written_once_and_read_back_with_tuples(tmp_path):
  workdir = str(tmp_path / "a" / "run")  # parents are created
  config = default.get_config()
  assert rundir.write_or_check_config(workdir, config) is config
  text = (tmp_path / "a" / "run" / "config.json").read_text()
  assert json.loads(text) == json.loads(config.to_json(indent=2, sort_keys=True))
  assert not [f for f in os.listdir(workdir) if f != "config.json"]  # no temporary file left

  back = rundir.read_config(workdir)
  assert back.to_dict() == config.to_dict()
  assert back.model.ch_mult == (1, 2, 2, 2) and isinstance(back.model.ch_mult, tuple)
  assert back.model.attn_resolutions == (16,)
  assert back.training.extra_ema_decays == ()
  assert dict(back.model) == dict(config.model)  # UNet(**config.model) sees the same values
  assert back.data.data_dir is None and back.eval.inception_weights is None

  # Same config again: nothing to do, same file.
  rundir.write_or_check_config(workdir, default.get_config())
  assert (tmp_path / "a" / "run" / "config.json").read_text() == text


def test_compatible_changes_update_config_json(tmp_path):
  workdir = str(tmp_path)
  rundir.write_or_check_config(workdir, default.get_config())
  new = default.get_config()
  new.training.num_train_steps = 5
  new.training.checkpoint_every = 7
  new.training.keep_checkpoints = 9
  new.sampling.sampler = "ddim"
  new.eval.inception_weights = "/weights/inception.pkl"
  new.data.data_dir = "/data"
  new.parallel = "shard_map"
  assert rundir.write_or_check_config(workdir, new) is new
  stored = rundir.read_config(workdir)
  assert stored.to_dict() == new.to_dict()
  assert stored.sampling.sampler == "ddim" and stored.data.data_dir == "/data"


def test_incompatible_changes_are_refused_naming_key_and_values(tmp_path):
  workdir = str(tmp_path)
  rundir.write_or_check_config(workdir, default.get_config())
  before = (tmp_path / "config.json").read_text()
  new = default.get_config()
  new.model.ch = 64
  new.model.ch_mult = (1, 2)
  new.optim.learning_rate = 1e-3
  new.training.num_train_steps = 5  # compatible; not listed, and nothing is written
  with pytest.raises(ValueError) as e:
    rundir.write_or_check_config(workdir, new)
  msg = str(e.value)
  assert "model.ch: 128 in the run, 64 now" in msg
  assert "model.ch_mult: (1, 2, 2, 2) in the run, (1, 2) now" in msg
  assert "optim.learning_rate: 0.0002 in the run, 0.001 now" in msg
  assert "num_train_steps" not in msg and "new --workdir" in msg and workdir in msg
  assert (tmp_path / "config.json").read_text() == before

  for change in [lambda c: setattr(c, "seed", 1),
                 lambda c: setattr(c.training, "batch_size", 256),
                 lambda c: setattr(c.training, "ema_decay", 0.999),
                 lambda c: setattr(c.diffusion, "beta_schedule", "cosine"),
                 lambda c: setattr(c.data, "dataset", "celeba")]:
    c = default.get_config()
    change(c)
    with pytest.raises(ValueError, match="change what is trained"):
      rundir.write_or_check_config(workdir, c)


def test_keys_absent_from_the_stored_config(tmp_path):
  workdir = str(tmp_path)
  stored = default.get_config().to_dict()
  del stored["training"]["eval_every"]  # compatible: accepted, file updated
  (tmp_path / "config.json").write_text(json.dumps(stored))
  rundir.write_or_check_config(workdir, default.get_config())
  assert rundir.read_config(workdir).training.eval_every == 0

  del stored["diffusion"]["min_snr_gamma"]  # a value other than the default changes the loss
  (tmp_path / "config.json").write_text(json.dumps(stored))
  weighted = default.get_config()
  weighted.diffusion.min_snr_gamma = 5.0
  with pytest.raises(ValueError, match=r"diffusion\.min_snr_gamma: <absent> in the run, 5\.0 now"):
    rundir.write_or_check_config(workdir, weighted)


def test_unwritable_workdir_is_one_clear_error(tmp_path):
  regular_file = tmp_path / "file.txt"
  regular_file.write_text("not a directory")
  workdir = str(regular_file / "run")  # even root cannot create a directory under a file
  with pytest.raises(ValueError, match="Cannot write the run directory") as e:
    rundir.write_or_check_config(workdir, default.get_config())
  assert workdir in str(e.value)
  with pytest.raises(ValueError, match="Cannot write the run directory"):
    rundir.write_or_check_config(str(regular_file), default.get_config())


_READ_ONLY_CHECK = """
import sys
from configs import default
from ddpm_jax import checkpoint, rundir
try:
  rundir.write_or_check_config(sys.argv[1], default.get_config())
except ValueError as e:
  print(e)
print(tuple(rundir.read_config(sys.argv[1]).model.ch_mult))
"""


def test_read_only_workdir_is_one_clear_error(tmp_path):
  """An existing run that can no longer be written: reading still works, writing says why."""
  src = tmp_path / "src"
  src.mkdir()
  rundir.write_or_check_config(str(src), default.get_config())
  if os.geteuid() != 0:
    os.chmod(src, 0o555)
    try:
      with pytest.raises(ValueError, match=f"Cannot write the run directory {src}"):
        rundir.write_or_check_config(str(src), default.get_config())
    finally:
      os.chmod(src, 0o755)
    return
  # root writes into read-only directories, so use a read-only bind mount in a private mount
  # namespace (nothing leaks out of the test).
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  script = (f"mount --bind {src} {mnt} && mount -o remount,bind,ro {mnt} && "
            f"{sys.executable} -c '{_READ_ONLY_CHECK}' {mnt}")
  proc = subprocess.run(["unshare", "-m", "sh", "-c", script], env=_env(), cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Cannot write the run directory {mnt} (Read-only file system" in proc.stdout
  assert proc.stdout.strip().endswith("(1, 2, 2, 2)")  # reading still works


def test_read_config_of_a_directory_without_config_json(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a ddpm_jax run directory") as e:
    rundir.read_config(str(tmp_path))
  assert str(tmp_path / "config.json") in str(e.value)


# ----------------------------------------------------------------------------- Checkpointer


def test_save_restore_round_trip_with_and_without_target(tmp_path):
  devices = np.array(jax.devices())
  sharded = jax.device_put(jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3),
                           NamedSharding(Mesh(devices, ("d",)), PartitionSpec("d")))
  state = {"step": jnp.asarray(7, jnp.int32),
           "nested": {"a": {"b": np.arange(6, dtype=np.int64).reshape(2, 3)},
                      "bf16": jnp.linspace(0, 1, 5, dtype=jnp.bfloat16),
                      "sharded": sharded},
           "tup": (np.float32(1.5), np.array([1, 2], np.uint32), {"c": np.ones((2, 2), np.float32)}),
           "empty": {}}
  meta = {"step": 7, "key": np.array([0, 42], np.uint32), "data_step": np.int64(7),
          "note": "x", "nested": {"f": 0.5}}
  with checkpoint.Checkpointer(str(tmp_path), keep=3) as ckpt:
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    ckpt.save(7, state, meta)
    ckpt.wait()
    assert ckpt.latest_step() == 7 and ckpt.all_steps() == [7]
    host = jax.tree_util.tree_map(np.asarray, state)

    tree, got_meta = ckpt.restore()  # the saved structure: tuples come back as lists
    assert got_meta == {"step": 7, "key": [0, 42], "data_step": 7, "note": "x",
                        "nested": {"f": 0.5}}
    assert isinstance(tree["tup"], list) and tree["empty"] == {}
    _leaves_equal(tree["nested"], host["nested"])
    _leaves_equal(tree["tup"], list(host["tup"]))
    np.testing.assert_array_equal(tree["step"], 7)

    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), state)
    tree, _ = ckpt.restore(7, target=target)  # the target's structure: tuples stay tuples
    assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(host)
    _leaves_equal(tree, host)
    tree, _ = ckpt.restore(target=host)  # a tree of arrays works as a target too
    _leaves_equal(tree, host)


def test_restore_into_a_mismatched_target_names_the_difference(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path), keep=1) as ckpt:
    ckpt.save(1, _train_state(1))
    good = _train_state(0)
    bad = _train_state(0)
    bad["params"]["dense"]["kernel"] = np.zeros((8, 2), np.float32)
    with pytest.raises(ValueError, match=r"params/dense/kernel has shape \(4, 2\), expected "
                                         r"\(8, 2\)"):
      ckpt.restore(target=bad)
    bad = _train_state(0, num_emas=1)
    with pytest.raises(ValueError, match=r"unexpected ema_params/1/"):
      ckpt.restore(target=bad)
    tree, _ = ckpt.restore(target=good)
    _leaves_equal(tree, jax.tree_util.tree_map(np.asarray, _train_state(1)))


def test_keep_latest_specific_steps_and_refusals(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path), keep=2) as ckpt:
    for step in (3, 6, 9):
      ckpt.save(step, _train_state(step), {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [6, 9] and ckpt.latest_step() == 9
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6", "9"]
    tree, meta = ckpt.restore(6)
    assert meta == {"step": 6} and int(tree["step"]) == 6
    _leaves_equal(tree["params"], _train_state(6)["params"])
    with pytest.raises(ValueError, match=r"No checkpoint of step 3 in .*available steps: 6, 9"):
      ckpt.restore(3)
    with pytest.raises(ValueError, match="step 9 already exists"):
      ckpt.save(9, _train_state(9))
    with pytest.raises(ValueError, match="precedes the latest checkpoint, step 9"):
      ckpt.save(8, _train_state(8))
    with pytest.raises(ValueError, match="JSON-serialisable"):
      ckpt.save(10, _train_state(10), {"bad": object()})
    with pytest.raises(ValueError, match="keep"):
      checkpoint.Checkpointer(str(tmp_path), keep=0)
  # A new Checkpointer (a resumed run) sees the same steps.
  with checkpoint.Checkpointer(str(tmp_path), keep=2) as ckpt:
    assert ckpt.all_steps() == [6, 9]
    ckpt.save(12, _train_state(12))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["12", "9"]  # close() waited


def test_save_copies_mutable_host_arrays(tmp_path):
  state = {"w": np.ones((256, 256), np.float32)}
  with checkpoint.Checkpointer(str(tmp_path), keep=1) as ckpt:
    ckpt.save(1, state)
    state["w"][:] = -1.0  # the caller reuses its buffer while the save may still be running
    ckpt.wait()
    tree, _ = ckpt.restore()
  np.testing.assert_array_equal(tree["w"], 1.0)


def test_restore_with_no_checkpoint_says_to_train_first(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path), keep=1) as ckpt:
    with pytest.raises(FileNotFoundError, match="No checkpoint in .*train first with `python "
                                                "main.py --config="):
      ckpt.restore()


# ----------------------------------------------------------------------------- load


@pytest.mark.parametrize("ema_form", ["state_dict", "list"])
def test_load_returns_the_first_ema_tree_and_the_config(tmp_path, ema_form):
  workdir = str(tmp_path / "run")
  config = default.get_config()
  config.model.ch_mult = (1, 2)
  rundir.write_or_check_config(workdir, config)
  with checkpoint.Checkpointer(workdir, keep=3) as ckpt:
    for step in (2, 4):
      state = _train_state(step)
      if ema_form == "list":
        state["ema_params"] = [state["ema_params"]["0"], state["ema_params"]["1"]]
      ckpt.save(step, state, {"step": step})

  params, got = loading.load(workdir)
  assert got.to_dict() == config.to_dict() and got.model.ch_mult == (1, 2)
  expected = jax.tree_util.tree_map(lambda p: p * 2, _train_state(4)["params"])
  assert set(params) == {"conv_in", "dense"}
  _leaves_equal(params, expected)
  assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(params))

  params, _ = loading.load(workdir, step=2)
  _leaves_equal(params, jax.tree_util.tree_map(lambda p: p * 2, _train_state(2)["params"]))
  with pytest.raises(ValueError, match=r"No checkpoint of step 3 in .*available steps: 2, 4\."):
    loading.load(workdir, step=3)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]  # read only


def test_load_error_messages(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist") as e:
    loading.load(str(tmp_path / "nope"))
  assert str(tmp_path / "nope") in str(e.value)

  with pytest.raises(FileNotFoundError, match="not a ddpm_jax run directory: it has no "
                                              "config.json"):
    loading.load(str(tmp_path))

  rundir.write_or_check_config(str(tmp_path), default.get_config())
  for _ in range(2):  # no checkpoints/ at all, then an empty checkpoints/
    with pytest.raises(FileNotFoundError) as e:
      loading.load(str(tmp_path))
    assert "No checkpoint in" in str(e.value)
    assert f"python main.py --config=configs/<dataset>.py --workdir={tmp_path}" in str(e.value)
    (tmp_path / "checkpoints").mkdir(exist_ok=True)

  with checkpoint.Checkpointer(str(tmp_path), keep=1) as ckpt:
    ckpt.save(1, {"params": {"w": np.zeros(2, np.float32)}})
  with pytest.raises(ValueError, match=r"has no ema_params\[0\] .*not a ddpm_jax training state"):
    loading.load(str(tmp_path))


def test_restore_params_only_reads_one_tree_as_float32(tmp_path):
  state = _train_state(5)
  state["ema_params"]["1"]["dense"]["kernel"] = jnp.asarray(
      state["ema_params"]["1"]["dense"]["kernel"], jnp.bfloat16)
  with checkpoint.Checkpointer(str(tmp_path), keep=1) as ckpt:
    ckpt.save(5, state)
    ckpt.wait()
    ema1 = ckpt.restore_params_only(ema_index=1)
    raw = ckpt.restore_params_only(5, ema_index=None)
  assert ema1["dense"]["kernel"].dtype == np.float32
  np.testing.assert_array_equal(
      ema1["dense"]["kernel"],
      np.asarray(state["ema_params"]["1"]["dense"]["kernel"]).astype(np.float32))
  _leaves_equal(raw, state["params"])


def damage(workdir, step, how):
  """Damages checkpoint `step` as a full disk or a careless copy would: "truncated" cuts the
  state's data file(s) to 10 bytes, "no_metadata" deletes the state's _METADATA."""
  state = os.path.join(workdir, "checkpoints", str(step), "state")
  if how == "truncated":
    files = glob.glob(os.path.join(state, "d", "*"))
    assert files
    for f in files:
      os.truncate(f, 10)
  else:
    os.remove(os.path.join(state, "_METADATA"))


def _damage_warnings(caplog):
  return [r.getMessage() for r in caplog.records
          if r.levelno >= logging.WARNING and " is damaged " in r.getMessage()]


def _saved_run(workdir, steps):
  rundir.write_or_check_config(workdir, default.get_config())
  with checkpoint.Checkpointer(workdir, keep=None) as ckpt:
    for step in steps:
      ckpt.save(step, _train_state(step), {"step": step})


def _ema(step):
  return jax.tree_util.tree_map(lambda p: p * 2, _train_state(step)["params"])


@pytest.mark.parametrize("how", ["truncated", "no_metadata"])
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_newest_intact_one_used(tmp_path, how,
                                                                                   caplog):
  workdir = str(tmp_path / "run")
  _saved_run(workdir, (1, 2, 3))
  damage(workdir, 3, how)
  caplog.set_level(logging.WARNING)
  params, _ = loading.load(workdir)
  _leaves_equal(params, _ema(2))
  warnings = _damage_warnings(caplog)
  assert len(warnings) == 1 and "Checkpoint step 3 in" in warnings[0], warnings
  assert ("_METADATA is missing" if how == "no_metadata" else "OUT_OF_RANGE") in warnings[0]
  assert not any("not a dict" in r.getMessage() for r in caplog.records)
  # Moved out of the manager's view, whole, never deleted.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
  aside = os.listdir(os.path.join(workdir, "damaged_checkpoints"))
  assert len(aside) == 1 and aside[0].startswith("3-"), aside
  assert os.path.exists(os.path.join(workdir, "damaged_checkpoints", aside[0], "meta"))
  caplog.clear()
  _leaves_equal(loading.load(workdir)[0], _ema(2))
  assert not _damage_warnings(caplog)

  # The full restore (resuming training) falls back in the same way, and says which step.
  damage(workdir, 2, "truncated" if how == "no_metadata" else "no_metadata")
  with checkpoint.Checkpointer(workdir, keep=3) as ckpt:
    step, (tree, meta) = ckpt.restore_with_step(target=_train_state(1))
    assert step == 1 and meta == {"step": 1} and ckpt.all_steps() == [1]
    _leaves_equal(tree["params"], _train_state(1)["params"])
    ckpt.save(2, _train_state(2), {"step": 2})  # the step can be trained and saved again
  assert len(_damage_warnings(caplog)) == 1
  assert len(os.listdir(os.path.join(workdir, "damaged_checkpoints"))) == 2


def test_a_damaged_step_asked_for_by_number_is_a_user_error(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  _saved_run(workdir, (1, 2))
  damage(workdir, 1, "truncated")
  with pytest.raises(UserError, match=r"Checkpoint step 1 in .* is damaged \(ValueError: "
                                      r"OUT_OF_RANGE: .*\); pass another step \(the others: 2\)"):
    loading.load(workdir, step=1)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]  # not moved
  _leaves_equal(loading.load(workdir)[0], _ema(2))
  # Nothing intact at all: one sentence, and everything is kept aside.
  damage(workdir, 2, "no_metadata")
  with pytest.raises(UserError, match=r"No intact checkpoint in .*moved to .*damaged_checkpoints"):
    loading.load(workdir)
  assert len(os.listdir(os.path.join(workdir, "damaged_checkpoints"))) == 2


# ----------------------------------------------------------------------------- processes


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_save_and_restore_the_same_checkpoints(tmp_path):
  workdir = str(tmp_path / "run")
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, WORKER, "two_process", str(i), str(port), workdir,
                             str(tmp_path / f"out{i}.npz")], env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=120)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail("the two processes hung:\n" + "\n".join(p.communicate()[0][-3000:] for p in procs))
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-5000:]

  res = [dict(np.load(tmp_path / f"out{i}.npz")) for i in range(2)]
  from tests._checkpoint_worker import state  # pylint: disable=import-outside-toplevel
  for r in res:
    np.testing.assert_array_equal(r["steps"], [2, 3])
    for step in (2, 3):
      np.testing.assert_array_equal(r[f"kernel{step}"], state(step)["params"]["dense"]["kernel"])
      np.testing.assert_array_equal(r[f"mu{step}"], state(step)["opt_state"][1]["mu"]["w"])
      np.testing.assert_array_equal(r[f"meta_key{step}"], [0, step])
    np.testing.assert_array_equal(r["target_kernel"], state(3)["params"]["dense"]["kernel"])
  for k in res[0]:
    np.testing.assert_array_equal(res[0][k], res[1][k])
  np.testing.assert_array_equal(res[1]["load_kernel"], state(3)["ema_params"][0]["dense"]["kernel"])
  np.testing.assert_array_equal(res[1]["load_ch_mult"], [1, 2])

  # One checkpoint directory per step, no leftovers, and one config.json.
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert sorted(os.listdir(ckpt_dir)) == ["2", "3"]
  assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json"]
  for step in ("2", "3"):
    assert sorted(os.listdir(os.path.join(ckpt_dir, step))) == [
        "_CHECKPOINT_METADATA", "commit_success.txt", "meta", "state"]

  # Saved on 2 x 2 devices, restored here on 8.
  with checkpoint.Checkpointer(workdir, keep=2) as ckpt:
    tree, meta = ckpt.restore()
  assert meta == {"step": 3, "key": [0, 3], "process": 0}
  np.testing.assert_array_equal(tree["params"]["dense"]["kernel"],
                                state(3)["params"]["dense"]["kernel"])


def _assert_recovers(workdir, latest):
  """The workdir restores `latest` and step 1 exactly, and the next save goes through."""
  from tests._checkpoint_worker import state  # pylint: disable=import-outside-toplevel
  ro = checkpoint.Checkpointer(workdir, keep=None, read_only=True)
  assert ro.latest_step() == latest
  ro.close()
  with checkpoint.Checkpointer(workdir, keep=5) as ckpt:
    assert ckpt.latest_step() == latest and ckpt.all_steps()[0] == 1
    tree, meta = ckpt.restore(1)
    assert meta == {"step": 1}
    _leaves_equal(tree["params"], state(1)["params"])
    tree, meta = ckpt.restore()
    assert meta == {"step": latest}
    np.testing.assert_array_equal(tree["params"]["dense"]["kernel"],
                                  state(latest)["params"]["dense"]["kernel"])
    ckpt.save(latest + 1, state(latest + 1), {"step": latest + 1})
    ckpt.wait()
    assert ckpt.all_steps()[-1] == latest + 1
  assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d]


def test_a_crash_before_the_commit_keeps_the_previous_checkpoint(tmp_path):
  workdir = str(tmp_path)
  proc = subprocess.run([sys.executable, WORKER, "crash", workdir], env=_env(), cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 17, proc.stdout[-3000:] + proc.stderr[-3000:]
  ckpt_dir = tmp_path / "checkpoints"
  assert sorted(os.listdir(ckpt_dir)) == ["1", "2.orbax-checkpoint-tmp"]
  # Even a tmp directory that looks committed is never taken for a checkpoint.
  (ckpt_dir / "2.orbax-checkpoint-tmp" / "commit_success.txt").write_text("done")
  _assert_recovers(workdir, latest=1)


def test_sigkill_during_a_save_keeps_a_complete_latest_checkpoint(tmp_path):
  workdir = str(tmp_path)
  proc = subprocess.Popen([sys.executable, WORKER, "hang", workdir], env=_env(), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    assert proc.stdout.readline().strip() == "saved 1"
    tmp = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp"
    deadline = time.time() + 60
    while time.time() < deadline and not (
        tmp.is_dir() and any(files for _, _, files in os.walk(tmp / "state.orbax-checkpoint-tmp"))):
      time.sleep(0.001)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  # Killed while writing step 2 (or, on a very fast disk, just after it completed).
  latest = 2 if (tmp_path / "checkpoints" / "2").is_dir() else 1
  _assert_recovers(workdir, latest=latest)


def test_a_run_from_before_a_new_field_resumes_with_its_default(tmp_path):
  """A config.json written before a field existed means that field's default: resuming with the
  default is the same run, another value is refused."""
  workdir = str(tmp_path / "run")
  config = default.get_config()
  rundir.write_or_check_config(workdir, config)
  path = tmp_path / "run" / "config.json"
  stored = json.loads(path.read_text())
  del stored["training"]["ema_warmup"]  # as written by a version without EMA warm-up
  path.write_text(json.dumps(stored))
  rundir.write_or_check_config(workdir, config)
  assert json.loads(path.read_text())["training"]["ema_warmup"] is False
  path.write_text(json.dumps(stored))
  config.training.ema_warmup = True
  with pytest.raises(UserError, match=r"training.ema_warmup: <absent> in the run, True now"):
    rundir.write_or_check_config(workdir, config)
