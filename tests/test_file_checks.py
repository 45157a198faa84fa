"""Every file a run reads is checked: a damaged or foreign one is one sentence naming it (exit
status 2, no traceback, nothing written), or, for a sample shard, recomputed after one
warning. Through main's in-process path (parse_flags + execute under report_user_errors)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import smoke
from ddpm_jax import data, generate, image_folder, rundir, sources
from ddpm_jax.errors import UserError
from tests.conftest import TRAINED_RUN_FLAGS, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = ["--mode=sample", "--config.sampling.sampler=ddim", "--config.sampling.num_steps=2",
          "--config.sampling.num_samples=4", "--config.sampling.batch_size=2"]
SAMPLE_DIR = os.path.join("samples", "00000002_ddim2_eta0")


_run = run_main


def _refused(monkeypatch, capsys, *args) -> str:
  status, err = _run(monkeypatch, capsys, *args)
  assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, (status, err)
  return err.strip()


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root)
                for f in fs)


@pytest.fixture
def run(trained_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained_run, workdir)
  return workdir


# ----------------------------------------------------------------------------- the run's files


def test_a_damaged_config_json_is_one_sentence_in_every_mode(tmp_path, monkeypatch, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  path = workdir / "config.json"
  cases = {
      b"\xff\xfe{}": "is not UTF-8 text (byte 0); it should be the run's config",
      b"[" * 100000 + b"]" * 100000: "is JSON nested too deep to read",
      b'{"model": ': "is not valid JSON (Expecting value: line 1 column 11 (char 10))",
  }
  for text, problem in cases.items():
    path.write_bytes(text)
    for args in (["--mode=sample"], ["--mode=eval"], TRAINED_RUN_FLAGS):
      line = _refused(monkeypatch, capsys, f"--workdir={workdir}", *args)
      assert line.startswith(f"{path} {problem}"), (args, line)
  # Fields our configs do not have: refused by sampling as by training.
  config = json.loads(smoke.get_config().to_json())
  config["model"]["bogus_width"] = 3
  path.write_text(json.dumps(config))
  line = _refused(monkeypatch, capsys, f"--workdir={workdir}", "--mode=sample")
  assert line == (f"{path} has fields that configs/default.py does not declare "
                  "(model.bogus_width); remove them, or pass the --workdir of a ddpm_jax "
                  "training run.")
  assert os.listdir(workdir) == ["config.json"]


@pytest.mark.parametrize("text, shown", [('["a", "a"]', "('a', 'a')"), ('{"a": 1}', "{'a': 1}"),
                                         ("[1, 2]", "(1, 2)"), ('["a"', None)])
def test_a_damaged_classes_json_is_one_sentence(tmp_path, monkeypatch, capsys, text, shown):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(smoke.get_config().to_json())
  (workdir / "classes.json").write_text(text)
  line = _refused(monkeypatch, capsys, f"--workdir={workdir}", "--mode=sample")
  want = (f"{workdir}/classes.json holds {shown}, not a list of distinct class names" if shown
          else f"{workdir}/classes.json is not valid JSON")
  assert line.startswith(want), line
  with pytest.raises(UserError, match="classes.json"):
    rundir.write_class_names(str(workdir), ("a", "b"))


def test_a_missing_or_broken_config_file_is_one_sentence(tmp_path, monkeypatch, capsys):
  workdir = tmp_path / "run"
  line = _refused(monkeypatch, capsys, f"--config={tmp_path}/nope.py", f"--workdir={workdir}")
  assert line == (f"--config={tmp_path}/nope.py: there is no such file; pass a config file "
                  "such as configs/cifar10.py.")
  (tmp_path / "syntax.py").write_text("def get_config(:\n")
  line = _refused(monkeypatch, capsys, f"--config={tmp_path}/syntax.py", f"--workdir={workdir}")
  assert line.startswith(f"--config={tmp_path}/syntax.py does not load: SyntaxError: ")
  (tmp_path / "imports.py").write_text("import not_a_module_anywhere\n")
  line = _refused(monkeypatch, capsys, f"--config={tmp_path}/imports.py", f"--workdir={workdir}",
                  "--config.seed=1")
  assert line == (f"--config={tmp_path}/imports.py does not load: ModuleNotFoundError: No "
                  "module named 'not_a_module_anywhere'; fix it, or pass another config file "
                  "such as configs/cifar10.py.")
  assert not workdir.exists()


def test_the_command_line_exits_2_with_the_sentence_last_and_no_traceback(tmp_path):
  proc = subprocess.run([sys.executable, "main.py", f"--config={tmp_path}/nope.py",
                         f"--workdir={tmp_path}/run"], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(f"--config={tmp_path}/nope.py: there "
                                                         "is no such file")


def test_step_is_refused_in_training(run, monkeypatch, capsys):
  before = _files(run)
  line = _refused(monkeypatch, capsys, f"--workdir={run}", *TRAINED_RUN_FLAGS, "--step=2")
  assert line.startswith("--step=2 is for --mode=sample and --mode=eval; training always "
                         "resumes from the workdir's newest intact checkpoint")
  assert _files(run) == before


# ----------------------------------------------------------------------------- samples


def test_damaged_shards_are_recomputed_and_a_garbled_manifest_is_named(run, monkeypatch, capsys,
                                                                       caplog):
  status, err = _run(monkeypatch, capsys, f"--workdir={run}", *SAMPLE)
  assert status == 0, err
  folder = run / SAMPLE_DIR
  want, _ = generate.read_samples(folder, 4)
  shard0, shard1 = folder / "shard_000000.npz", folder / "shard_000001.npz"
  shard0.write_bytes(shard0.read_bytes()[:100])  # truncated
  np.save(str(shard1) + ".npy", np.zeros(3))  # an .npy under a shard's name
  os.replace(str(shard1) + ".npy", shard1)
  status, err = _run(monkeypatch, capsys, f"--workdir={run}", *SAMPLE)
  assert status == 0, err
  recomputed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Recomputing")]
  assert len(recomputed) == 2, recomputed  # one warning each
  assert "not an .npz archive" in recomputed[1]
  got, _ = generate.read_samples(folder, 4)
  np.testing.assert_array_equal(got, want)
  shard0.write_bytes(b"not a zip at all")
  status, err = _run(monkeypatch, capsys, f"--workdir={run}", *SAMPLE)
  assert status == 0, err
  (folder / "sampling.json").write_text('{"step": 2, "shard_si')
  line = _refused(monkeypatch, capsys, f"--workdir={run}", *SAMPLE)
  assert line.startswith(f"{folder}/sampling.json is not valid JSON")
  assert f"move {folder} away (or delete sampling.json to recompute its samples)." in line


def test_a_config_json_edited_to_another_model_is_refused_before_sampling(run, monkeypatch,
                                                                          capsys):
  config = json.loads((run / "config.json").read_text())
  config["model"]["ch"] = 64
  (run / "config.json").write_text(json.dumps(config))
  before = _files(run)
  line = _refused(monkeypatch, capsys, f"--workdir={run}", *SAMPLE)
  assert line.startswith(f"The checkpoint of step 2 in {run} does not fit the model of its "
                         "config (") and line.endswith(f"restore {run}/config.json, or pass the "
                                                       "--workdir of the run it describes.")
  assert _files(run) == before


# ----------------------------------------------------------------------------- data files


def _npz_config(path, num_classes=0):
  config = smoke.get_config()
  config.data.dataset, config.data.path = "npz", str(path)
  config.model.num_classes = num_classes
  return config


def test_a_truncated_npz_or_an_npy_is_one_sentence(tmp_path, monkeypatch, capsys):
  images = np.zeros((20, 8, 8), np.uint8)
  np.savez(tmp_path / "d.npz", images=images)
  (tmp_path / "cut.npz").write_bytes((tmp_path / "d.npz").read_bytes()[:300])
  np.save(tmp_path / "a.npy", images)
  os.replace(tmp_path / "a.npy", tmp_path / "a.npz")
  for name, problem in (("cut.npz", "BadZipFile"), ("a.npz", "ValueError: it holds a single "
                                                              "ndarray (an .npy)")):
    workdir = tmp_path / name.replace(".", "_")
    line = _refused(monkeypatch, capsys, *TRAINED_RUN_FLAGS, f"--workdir={workdir}",
                    "--config.data.dataset=npz", f"--config.data.path={tmp_path / name}")
    assert line.startswith(f"config.data.path={str(tmp_path / name)!r} is not a readable .npz "
                           f"({problem}"), line
    assert not workdir.exists()


def test_an_unconditional_model_ignores_the_labels_of_an_npz(tmp_path):
  np.savez(tmp_path / "mnist_like.npz", images=np.zeros((50, 8, 8), np.uint8),
           labels=np.arange(50) % 10)
  source = sources.open_npz(_npz_config(tmp_path / "mnist_like.npz"), "train")
  assert source.num_examples > 40
  conditional = sources.open_npz(_npz_config(tmp_path / "mnist_like.npz", num_classes=10),
                                 "train")
  assert conditional.num_examples == source.num_examples
  with pytest.raises(UserError, match=r"must be 50 ints in \[0, config.model.num_classes=5\)"):
    sources.open_npz(_npz_config(tmp_path / "mnist_like.npz", num_classes=5), "train")


def _png(path, size, seed=0):
  pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)
  Image.fromarray(pixels).save(path, "PNG")


def _damage_middle(path):
  """Zeroes 64 bytes in the middle of the file: its header and end marker stay intact."""
  raw = bytearray(path.read_bytes())
  mid = len(raw) // 2
  raw[mid:mid + 64] = bytes(64)
  path.write_bytes(bytes(raw))


def _folder_config(root):
  config = smoke.get_config()
  config.data.dataset, config.data.path, config.data.num_channels = "folder", str(root), 3
  config.model.out_channels = 3
  config.data.eval_fraction = 0.0
  return config


def test_a_small_image_damaged_inside_is_named_before_the_run_is_written(tmp_path, monkeypatch,
                                                                        capsys):
  root = tmp_path / "images"
  root.mkdir()
  for i in range(3):
    _png(root / f"{i}.png", 16, seed=i)
  _damage_middle(root / "1.png")
  workdir = tmp_path / "run"
  line = _refused(monkeypatch, capsys, *TRAINED_RUN_FLAGS, f"--workdir={workdir}",
                  "--config.data.dataset=folder", f"--config.data.path={root}",
                  "--config.data.num_channels=3", "--config.model.out_channels=3")
  assert line.startswith(f"{root}/1.png is damaged inside its image data (OSError: "), line
  assert not workdir.exists()


def test_a_large_image_damaged_inside_is_named_when_the_stream_reaches_it(tmp_path):
  root = tmp_path / "images"
  root.mkdir()
  _png(root / "big.png", 200)  # > 64 KiB: check_folder reads only its head and end
  _png(root / "small.png", 16)
  _damage_middle(root / "big.png")
  config = _folder_config(root)
  assert (root / "big.png").stat().st_size > 1 << 16
  image_folder.check_folder(config)  # passes: header and end marker intact
  batches = data.create_input_iter(config, per_host_batch_size=2, seed=0, process_index=0,
                                   process_count=1)
  with pytest.raises(UserError, match=rf"^{root}/big.png is damaged inside its image data "):
    next(batches)


def test_links_that_loop_are_walked_once(tmp_path, caplog):
  root = tmp_path / "images"
  (root / "sub").mkdir(parents=True)
  for name in ("a.png", "sub/b.png", "sub/c.png"):
    _png(root / name, 8)
  os.symlink(".", root / "loop")  # ln -s . loop
  os.symlink("..", root / "sub" / "up")  # back up
  os.symlink("c.png", root / "sub" / "c_again.png")  # a second name for one image
  assert image_folder.list_images(str(root)) == ["a.png", "sub/b.png", "sub/c.png"]
  assert "Skipped 3 links" in caplog.text
  config = _folder_config(root)
  image_folder.check_folder(config)
  assert sources.split_indices(["a.png", "sub/b.png", "sub/c.png"], config, "train",
                               str(root)).tolist() == [0, 1, 2]
