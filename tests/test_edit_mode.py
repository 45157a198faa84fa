"""--mode=edit as a user types it (main's parser and main.execute, in this process): the
results equal the run-level functions', a rerun keeps what was written, and a bad mask or
image is one sentence that writes nothing."""
import glob
import os

import jax
import numpy as np
import pytest
from PIL import Image

import ddpm_jax
from ddpm_jax import edit_mode, run_edits
from tests.test_cli import parse, refused

SMALL = ["--config.edit.num_steps=6", "--config.edit.jump_length=2",
         "--config.edit.jump_n_sample=2", "--config.sampling.batch_size=4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-step smoke run (trained as typed) and a folder of 5 8x8 grey images and their masks."""
  root = tmp_path_factory.mktemp("edit_mode")
  workdir = str(root / "run")
  import main  # pylint: disable=import-outside-toplevel
  main.execute(parse("--config=configs/smoke.py", f"--workdir={workdir}",
                     "--config.training.num_train_steps=2", "--config.training.checkpoint_every=2",
                     "--config.training.sample_every=0", "--config.training.batch_size=8"))
  inputs, masks = root / "in", root / "masks"
  inputs.mkdir()
  masks.mkdir()
  rng = np.random.default_rng(0)
  for i in range(5):
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(inputs / f"d{i}.png")
    mask = np.full((8, 8), 255, np.uint8)
    mask[:, i + 2:] = 0  # black is filled
    Image.fromarray(mask).save(masks / f"d{i}.bmp")
  return workdir, str(inputs), str(masks)


def _run(*args):
  import main  # pylint: disable=import-outside-toplevel
  main.execute(parse(*args))


def test_inpaint_writes_pngs_and_npz_equal_to_inpaint_and_resumes(trained):
  workdir, inputs, _ = trained
  args = [f"--workdir={workdir}", "--mode=edit", f"--config.edit.input={inputs}", *SMALL]
  _run(*args)
  directory = os.path.join(workdir, "samples", "00000002_inpaint_repaint6_j2r2_center")
  pngs = sorted(os.path.basename(p) for p in glob.glob(f"{directory}/*.png"))
  assert pngs == ["d0.png", "d1.png", "d2.png", "d3.png", "d4.png", "grid.png"]
  with np.load(os.path.join(directory, "edits.npz")) as f:
    images, names, masks = f["images"], f["names"], f["masks"]
  assert list(names) == [f"d{i}.png" for i in range(5)]
  params, config = ddpm_jax.load(workdir)
  config.unlock()
  config.update_from_flattened_dict({"edit.num_steps": 6, "edit.jump_length": 2,
                                     "edit.jump_n_sample": 2, "sampling.batch_size": 4})
  inputs_u8 = np.stack([np.asarray(Image.open(os.path.join(inputs, n))) for n in names])[..., None]
  want = run_edits.inpaint(params, edit_mode.edit_key(config), inputs_u8, "center", config=config)
  want = np.clip(np.round((want + 1) * 127.5), 0, 255).astype(np.uint8)
  assert np.abs(images.astype(int) - want).max() <= 1  # rounding of a different batch
  keep = np.broadcast_to(run_edits.named_mask("center", 8), images.shape) == 1
  np.testing.assert_array_equal(images[keep], inputs_u8[keep])  # the known pixels, exactly
  np.testing.assert_array_equal(masks[0, ..., 0], run_edits.named_mask("center", 8)[..., 0])
  # a rerun keeps every written PNG and computes only the missing one, the same again
  kept = {p: os.path.getmtime(p) for p in glob.glob(f"{directory}/d[0-3].png")}
  first = open(os.path.join(directory, "d4.png"), "rb").read()
  os.remove(os.path.join(directory, "d4.png"))
  _run(*args)
  assert {p: os.path.getmtime(p) for p in kept} == kept
  assert open(os.path.join(directory, "d4.png"), "rb").read() == first


def test_masks_folder_edit_invert_and_interpolate(trained):
  workdir, inputs, masks = trained
  common = [f"--workdir={workdir}", "--mode=edit", f"--config.edit.input={inputs}", *SMALL]
  _run(*common, f"--config.edit.masks={masks}", "--config.edit.sampler=dpm_solver")
  with np.load(os.path.join(workdir, "samples", "00000002_inpaint_dpm_solver6_masks",
                            "edits.npz")) as f:
    images, got_masks = f["images"], f["masks"]
  assert got_masks[2, :, :4].all() and not got_masks[2, :, 4:].any()
  inputs_u8 = np.stack([np.asarray(Image.open(os.path.join(inputs, f"d{i}.png")))
                        for i in range(5)])[..., None]
  np.testing.assert_array_equal(images[got_masks == 1], inputs_u8[got_masks == 1])
  _run(*common, "--config.edit.task=edit", "--config.edit.strength=0.5")
  assert len(glob.glob(f"{workdir}/samples/00000002_edit_ddim6_s0.5/d*.png")) == 5
  _run(*common, "--config.edit.task=invert")
  with np.load(f"{workdir}/samples/00000002_invert_ddim6/noise.npz") as f:
    assert f["noise"].shape == (5, 8, 8, 1) and f["noise"].dtype == np.float32
  _run(*common, "--config.edit.task=interpolate", "--config.edit.num=4")
  assert len(glob.glob(f"{workdir}/samples/00000002_interpolate_ddim6_num4/frame_*.png")) == 4


def test_a_bad_mask_or_image_is_one_sentence_and_writes_nothing(trained, tmp_path):
  workdir, inputs, masks = trained
  before = sorted(glob.glob(f"{workdir}/samples/*"))
  args = [f"--workdir={workdir}", "--mode=edit", *SMALL]
  line = refused(*args, f"--config.edit.input={inputs}",
                 "--config.edit.mask=middle")
  assert line.startswith("config.edit.mask='middle': accepted: 'center', 'left-half'")
  few = tmp_path / "few_masks"
  few.mkdir()
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(few / "d0.png")
  line = refused(*args, f"--config.edit.input={inputs}",
                 f"--config.edit.masks={few}")
  assert line == (f"config.edit.masks={str(few)!r} has no mask for d1.png (a mask is an image "
                  "of the same name, any extension: white keeps, black fills).")
  big = tmp_path / "big"
  big.mkdir()
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(big / "x.png")
  line = refused(*args, f"--config.edit.input={big}")
  assert line == f"The image {big}/x.png is 16x16, but the run's images are 8x8; resize it first."
  line = refused(*args, f"--config.edit.input={inputs}",
                 f"--config.edit.masks={big}")
  assert "has no mask for d0.png" in line
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
  line = refused(*args, f"--config.edit.input={tmp_path}/broken")
  assert line.startswith(f"The image {tmp_path}/broken/a.png cannot be read as an image")
  line = refused(*args)
  assert line.startswith("--mode=edit needs config.edit.input")
  line = refused(*args, f"--config.edit.input={inputs}",
                 "--config.edit.strength=1.5")
  assert line.startswith("config.edit.strength=1.5: the SDEdit strength must be a number in [0, 1]")
  assert sorted(glob.glob(f"{workdir}/samples/*")) == before
