"""A write that fails (disk full) ends the run with one sentence: the path, why, the bytes
needed; the partial checkpoint is removed and the previous one still loads. The failure is
injected where orbax hands an array to tensorstore, with tensorstore's own message (as seen on
a full 2 MiB tmpfs)."""
import errno
import os
import shutil

import numpy as np
import pytest
from orbax.checkpoint._src.serialization import type_handlers

from ddpm_jax import failed_writes, loading, rundir
from tests.conftest import TRAINED_RUN_FLAGS, run_main

FULL = ("RESOURCE_EXHAUSTED: Error writing \"params.conv_in.bias/0\" in OCDBT database at local "
        "file \"{}\": Failed writing: \"{}\": Failed to write 7041024 bytes to file 5: No space "
        "left on device [os_error_code='28']")


@pytest.fixture
def run(trained_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained_run, workdir)
  return workdir


def test_a_checkpoint_that_cannot_be_written_is_one_sentence_and_the_last_one_loads(
    run, monkeypatch, capsys):
  want_params, _ = loading.load(str(run))

  async def disk_full(self, value, tspec, ts_context):
    raise ValueError(FULL.format(run, run))
  monkeypatch.setattr(type_handlers.NumpyHandler, "_open_and_write", disk_full)
  status, err = run_main(monkeypatch, capsys, f"--workdir={run}", *TRAINED_RUN_FLAGS,
                         "--config.training.num_train_steps=4")
  assert status == 2 and "Traceback" not in err, err
  err = err.splitlines()[-1] + "\n"  # after the progress lines
  assert err.startswith(f"Could not write the checkpoint of step 4 to {run}/checkpoints (no space "
                        "left on device; it needs about "), err
  assert err.endswith("the partial checkpoint was removed and the previous checkpoint, step 2, "
                      "is intact: free some space (or move the run to a larger disk), then run "
                      "the same command to resume.\n"), err
  assert os.listdir(run / "checkpoints") == ["2"]  # no temporary folder left
  assert not (run / "lease.json").exists()
  monkeypatch.undo()
  step, params, _ = loading.load_with_step(str(run))
  assert step == 2
  for a, b in zip(np.asarray(want_params["conv_in"]["kernel"]).ravel()[:5],
                  np.asarray(params["conv_in"]["kernel"]).ravel()[:5]):
    assert a == b


def test_a_sample_shard_that_cannot_be_written_is_the_same_sentence_as_training(
    run, monkeypatch, capsys):
  def disk_full(path, data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
  monkeypatch.setattr(rundir, "write_atomically", disk_full)
  status, err = run_main(monkeypatch, capsys, f"--workdir={run}", "--mode=sample",
                         "--config.sampling.sampler=ddim", "--config.sampling.num_steps=2",
                         "--config.sampling.num_samples=2")
  assert status == 2 and err == (f"Cannot write the run directory {run}/samples/"
                                 "00000002_ddim2_eta0 (No space left on device); pass a "
                                 "--workdir you can create and write.\n"), err
  assert os.listdir(run / "samples" / "00000002_ddim2_eta0") == []  # its lease released


def test_orbax_s_tracebacks_of_a_failed_write_become_one_line():
  import logging
  import main
  try:
    try:
      raise ValueError(FULL)
    except ValueError as e:
      raise RuntimeError("Failed to run 4 Handler Commit operations") from e
  except RuntimeError as e:
    exc_info = (type(e), e, e.__traceback__)
  record = logging.LogRecord("absl", logging.ERROR, __file__, 1, "Save failed", (), exc_info)
  other = logging.LogRecord("absl", logging.ERROR, __file__, 1, "A bug", (),
                            (KeyError, KeyError("x"), None))
  quiet = main.WriteFailuresInOneLine()
  assert quiet.filter(record) and quiet.filter(other)
  assert record.exc_info is None and other.exc_info is not None


def test_write_failures_are_recognised_and_others_are_not():
  assert failed_writes.reason(ValueError(FULL)) == "no space left on device"
  assert failed_writes.reason(OSError(errno.EROFS, "Read-only file system")) == (
      "read-only file system")
  assert failed_writes.reason(ValueError("OUT_OF_RANGE: a damaged file")) is None
  assert failed_writes.reason(OSError(errno.ENOENT, "missing")) is None
  assert failed_writes.size_text(7041024) == "6.7 MiB"
