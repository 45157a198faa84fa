"""python -m ddpm_jax.convert: diffusers' DDPM folders into run directories, equal output for output.

The fixture tests/fixtures/diffusers_tiny is a perturbed, randomly initialised diffusers
UNet2DModel (DownBlock2D + AttnDownBlock2D, 8x8x1) with diffusers' own outputs on three inputs
and DDPMScheduler's betas; benchmarks/diffusers_fixture.py regenerates it in the peer's
environment. No torch is needed here.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import safetensors.numpy

import ddpm_jax
from configs import digits
from ddpm_jax import checkpoint, convert, diffusers_mapping, schedules, train
from ddpm_jax.errors import MissingFileError, UserError
from ddpm_jax.unet import UNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "diffusers_tiny")
WEIGHTS = os.path.join(FIXTURE, "unet", "diffusion_pytorch_model.safetensors")


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")


def _main(*args, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(os.path.join(FIXTURE, "reference.npz")))


# The run as a user makes it for a model whose dataset config is at hand: configs/smoke.py's
# digits, 20 steps and U-Net but for ch_mult, which the fixture's block_out_channels (32, 32) make (1, 1).
SMOKE = ("--config=configs/smoke.py", "--config.model.ch_mult=(1, 1)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The fixture converted from the command line, with --config."""
  workdir = str(tmp_path_factory.mktemp("converted") / "run")
  proc = _main("-m", "ddpm_jax.convert", "--from=diffusers", f"--src={FIXTURE}",
               f"--workdir={workdir}", *SMOKE)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Converted" in proc.stdout
  return workdir


@pytest.fixture(scope="module")
def inferred(tmp_path_factory):
  """The fixture converted in this process, its config inferred."""
  workdir = str(tmp_path_factory.mktemp("inferred") / "run")
  convert.convert(FIXTURE, workdir)
  return workdir


def _forward(params, config, reference):
  model = UNet(**config.model)
  return np.asarray(model.apply({"params": params}, reference["x_t"], reference["t"]))


def test_converted_runs_equal_diffusers_output_for_output(run, inferred, reference):
  assert np.abs(reference["out"]).max() > 1.0  # the reference is not trivially small
  for workdir in (run, inferred):
    params, config = ddpm_jax.load(workdir)
    np.testing.assert_allclose(_forward(params, config, reference), reference["out"], rtol=0,
                               atol=1e-4)


def test_inferred_config(inferred):
  """8x8x1 starts from configs/digits.py; the model, diffusion and sampling chain are the source's."""
  _, config = ddpm_jax.load(inferred)
  assert config.data.dataset == "digits" and config.data.image_size == 8
  assert config.data.num_channels == 1
  assert config.training.to_dict() == digits.get_config().training.to_dict()  # digits.py's
  m = config.model
  assert (m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions), m.out_channels) == (
      32, (1, 1), 1, (4,), 1)
  d = config.diffusion
  assert (d.beta_schedule, d.num_timesteps, d.mean_type, d.var_type) == (
      "linear", 20, "eps", "fixedlarge")
  assert config.sampling.num_steps == 20 and config.sampling.clip_denoised is True


def test_checkpoint_is_a_training_state_at_step_0(inferred):
  """What fine-tuning restores: step 0, params == every EMA == the converted weights, Adam's
  moments zero."""
  params, config = ddpm_jax.load(inferred)
  template = jax.eval_shape(lambda k: train.create_train_state(config, k), jax.random.PRNGKey(0))
  with checkpoint.Checkpointer(inferred, keep=None, read_only=True) as ckpt:
    assert ckpt.all_steps() == [0]
    tree, meta = ckpt.restore(target=train.state_dict(template))
  state = train.state_from_dict(template, tree)
  assert int(state.step) == 0 and int(state.nonfinite_steps) == 0 and meta["step"] == 0
  for tree in (state.params, *state.ema_params):
    jax.tree_util.tree_map(np.testing.assert_array_equal, tree, params)
  moments = [x for x in jax.tree_util.tree_leaves(state.opt_state) if np.ndim(x) > 0]
  assert moments and not any(np.any(x) for x in moments)


def test_sample_and_fine_tune_the_converted_run(inferred):
  params, config = ddpm_jax.load(inferred)
  images = ddpm_jax.sample(params, jax.random.PRNGKey(0), config=config, num_samples=2,
                           sampler="ddim", num_steps=3)
  assert images.shape == (2, 8, 8, 1)
  assert np.all(np.isfinite(images)) and np.abs(images).max() <= 1.0
  # Fine-tuning (what `python main.py --config=... --workdir=RUN` runs) resumes at step 0.
  config.training.num_train_steps = 1
  config.training.sample_every = 0
  state = train.train_and_evaluate(config, inferred)
  assert int(state.step) == 1
  tuned, _ = ddpm_jax.load(inferred, step=1)
  # digits.py warms the learning rate up from 0, so step 1 leaves the converted weights as they
  # were: a run that started from a fresh initialisation instead would differ everywhere.
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), tuned, params)


def test_main_samples_and_evaluates_the_converted_run(run, main_py):
  """--mode=sample with the run's own config.json; --mode=eval bits/dim with the --config the
  run was converted with (main.py's steps in this process: tests/main_in_process.py)."""
  status, log = main_py(f"--workdir={run}", "--mode=sample")
  assert status == 0, log[-3000:]
  assert os.path.isdir(os.path.join(run, "samples", "00000000_ancestral20"))
  status, log = main_py(*SMOKE, f"--workdir={run}", "--mode=eval", "--config.eval.metrics=bpd",
                        "--config.eval.bpd_num_examples=8")
  assert status == 0, log[-3000:]
  with open(os.path.join(run, "eval", "00000000.json")) as f:
    (bpd,) = json.load(f)["bpd"].values()  # one protocol
  assert bpd["num_examples"] == 8 and 0 < bpd["bpd"] < 100


def test_scheduler_betas_equal_diffusers(reference):
  with open(os.path.join(FIXTURE, "scheduler", "scheduler_config.json")) as f:
    base = json.load(f)
  names = [k[len("betas_"):] for k in reference if k.startswith("betas_")]
  assert sorted(names) == sorted(diffusers_mapping.BETA_SCHEDULES)
  for name in names:
    d = diffusers_mapping.diffusion_from_scheduler_config({**base, "beta_schedule": name}, "s")
    ours = schedules.get_beta_schedule(d["beta_schedule"], d["num_timesteps"],
                                       beta_start=d["beta_start"], beta_end=d["beta_end"])
    np.testing.assert_allclose(ours, reference[f"betas_{name}"], rtol=2e-6, atol=1e-8,
                               err_msg=name)


@pytest.mark.parametrize("variance, prediction, var_type, mean_type", [
    ("fixed_small", "epsilon", "fixedsmall", "eps"), ("fixed_small_log", "sample", "fixedsmall", "x0"),
    ("fixed_large", "v_prediction", "fixedlarge", "v"), ("learned_range", "epsilon", "learned_range", "eps")])
def test_scheduler_fields_map(variance, prediction, var_type, mean_type):
  d = diffusers_mapping.diffusion_from_scheduler_config(
      {"variance_type": variance, "prediction_type": prediction, "clip_sample": False,
       "num_train_timesteps": 50}, "s")
  assert (d["var_type"], d["mean_type"], d["num_timesteps"], d["clip_denoised"]) == (
      var_type, mean_type, 50, False)


def _copy(tmp_path, name="src"):
  dst = str(tmp_path / name)
  shutil.copytree(FIXTURE, dst)
  return dst


def _edit_json(src, rel, **changes):
  path = os.path.join(src, rel)
  with open(path) as f:
    value = json.load(f)
  value.update(changes)
  with open(path, "w") as f:
    json.dump(value, f)


def _write_tensors(src, tensors):
  safetensors.numpy.save_file(tensors, os.path.join(src, convert.WEIGHTS))


def _converted_params(src):
  unet_cfg, sched_cfg, weights = convert.read_source(src)
  config = convert.build_config(unet_cfg, sched_cfg, src)
  return convert.convert_params(convert.read_tensors(weights), config, weights)


def test_old_attention_and_resampling_names_give_the_same_parameters(tmp_path):
  """Checkpoints saved before diffusers renamed attention (query/key/value/proj_attn) and with
  resampling convolutions as Conv2d_0 (also beside conv, as one shared tensor)."""
  tensors = safetensors.numpy.load_file(WEIGHTS)
  renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.",
             ".to_out.0.": ".proj_attn.", "samplers.0.conv.": "samplers.0.Conv2d_0."}
  old = {}
  for name, value in tensors.items():
    new = name
    for a, b in renames.items():
      new = new.replace(a, b)
    old[new] = value
  old["down_blocks.0.downsamplers.0.conv.weight"] = tensors["down_blocks.0.downsamplers.0.conv.weight"]
  assert len(set(old) - set(tensors)) > 10
  src = _copy(tmp_path)
  _write_tensors(src, old)
  jax.tree_util.tree_map(np.testing.assert_array_equal, _converted_params(src),
                         _converted_params(FIXTURE))
  # Two different tensors for one parameter are refused, naming both.
  old["down_blocks.0.downsamplers.0.conv.weight"] = old["down_blocks.0.downsamplers.0.conv.weight"] + 1
  _write_tensors(src, old)
  with pytest.raises(UserError, match=r"both down_blocks\.0\.downsamplers\.0\.(conv|Conv2d_0)"):
    _converted_params(src)


def test_config_given_must_describe_the_weights(tmp_path):
  unet_cfg, sched_cfg, _ = convert.read_source(FIXTURE)
  inferred = convert.build_config(unet_cfg, sched_cfg, FIXTURE)
  # The config's choice of fixed variance is kept (the eps-model's weights do not depend on it).
  given = ml_collections.ConfigDict(inferred.to_dict())
  given.diffusion.var_type = "fixedsmall"
  assert convert.build_config(unet_cfg, sched_cfg, FIXTURE, given).diffusion.var_type == "fixedsmall"
  given.diffusion.var_type = "learned_range"
  with pytest.raises(UserError, match=r"config\.diffusion\.var_type='learned_range' where the "
                                      r"source has 'fixedlarge'"):
    convert.build_config(unet_cfg, sched_cfg, FIXTURE, given)
  from configs import cifar10  # pylint: disable=import-outside-toplevel
  with pytest.raises(UserError) as e:
    convert.build_config(unet_cfg, sched_cfg, FIXTURE, cifar10.get_config())
  for part in ("config.model.ch=128 where the source has 32", "config.data.image_size=32",
               "config.diffusion.num_timesteps=1000 where the source has 20"):
    assert part in str(e.value)


@pytest.mark.parametrize("rel, changes, match", [
    ("unet/config.json", {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]},
     r"down_block_types include 'CrossAttnDownBlock2D'; the DDPM U-Net is built of DownBlock2D"),
    ("unet/config.json", {"up_block_types": ["UpBlock2D", "UpBlock2D"]},
     r"attention in down blocks \[1\] but in up blocks of levels \[\]"),
    ("unet/config.json", {"norm_eps": 1e-5}, r"norm_eps is 1e-05, but the DDPM U-Net needs 1e-06"),
    ("unet/config.json", {"norm_num_groups": 16}, r"norm_num_groups is 16"),
    ("unet/config.json", {"flip_sin_to_cos": True}, r"flip_sin_to_cos is True"),
    ("unet/config.json", {"attention_head_dim": 8}, r"attention_head_dim is 8: several"),
    ("unet/config.json", {"num_class_embeds": 10}, r"num_class_embeds is 10"),
    ("unet/config.json", {"_class_name": "UNet2DConditionModel"}, r"only diffusers' UNet2DModel"),
    ("unet/config.json", {"out_channels": 3}, r"in_channels=1 and out_channels=3"),
    ("unet/config.json", {"out_channels": 2}, r"out_channels=2 for in_channels=1 but .* "
                                              r"variance_type 'fixed_large'; a learned_range"),
    ("scheduler/scheduler_config.json", {"variance_type": "learned_range"},
     r"out_channels=1 for in_channels=1 but .* variance_type 'learned_range'"),
    ("scheduler/scheduler_config.json", {"beta_schedule": "laplace"},
     r"beta_schedule is 'laplace', which ddpm_jax cannot express; accepted: linear"),
    ("scheduler/scheduler_config.json", {"trained_betas": [0.1] * 20}, r"trained_betas is an explicit"),
    ("scheduler/scheduler_config.json", {"variance_type": "learned"}, r"variance_type is 'learned'"),
    ("scheduler/scheduler_config.json", {"prediction_type": "flow"}, r"prediction_type is 'flow'"),
    ("scheduler/scheduler_config.json", {"thresholding": True}, r"thresholding is True"),
    ("scheduler/scheduler_config.json", {"_class_name": "DDIMScheduler"}, r"only a DDPMScheduler"),
])
def test_configs_we_cannot_express_are_refused(tmp_path, rel, changes, match):
  src = _copy(tmp_path)
  _edit_json(src, rel, **changes)
  workdir = str(tmp_path / "run")
  with pytest.raises(UserError, match=match) as e:
    convert.convert(src, workdir)
  assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")  # one sentence
  assert not os.path.exists(workdir)  # validated before anything is written


def test_tensor_problems_are_refused_by_name(tmp_path):
  tensors = safetensors.numpy.load_file(WEIGHTS)
  src = _copy(tmp_path)
  workdir = str(tmp_path / "run")
  bad = dict(tensors, **{"up_blocks.1.resnets.0.conv1.weight": np.zeros((32, 32, 3, 3), np.float16)})
  _write_tensors(src, bad)
  with pytest.raises(UserError, match=r"Tensor up_blocks\.1\.resnets\.0\.conv1\.weight of .* has "
                                      r"shape \(32, 32, 3, 3\), but .* up_0_block_0/conv1/kernel"):
    convert.convert(src, workdir)
  extra = dict(tensors, **{"class_embedding.weight": np.ones((10, 128), np.float32)})
  del extra["mid_block.attentions.0.to_k.bias"]
  _write_tensors(src, extra)
  with pytest.raises(UserError, match=r"missing mid_block\.attentions\.0\.to_k\.bias; unused "
                                      r"class_embedding\.weight"):
    convert.convert(src, workdir)
  with open(os.path.join(src, convert.WEIGHTS), "wb") as f:
    f.write(b"not safetensors")
  with pytest.raises(UserError, match=r"Cannot read .* as safetensors"):
    convert.convert(src, workdir)
  assert not os.path.exists(workdir)


def test_missing_files_and_torch_weights_are_refused(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(MissingFileError, match=r"has no unet/config\.json"):
    convert.convert(str(empty), str(tmp_path / "run"))
  with pytest.raises(MissingFileError, match=r"is not a directory"):
    convert.convert(str(tmp_path / "nowhere"), str(tmp_path / "run"))
  src = _copy(tmp_path)
  os.rename(os.path.join(src, convert.WEIGHTS), os.path.join(src, convert.TORCH_WEIGHTS))
  with pytest.raises(UserError) as e:
    convert.convert(src, str(tmp_path / "run"))
  assert convert.bin_command(src) in str(e.value)
  assert "torch.load(" in convert.bin_command(src) and "save_file(" in convert.bin_command(src)
  os.remove(os.path.join(src, convert.TORCH_WEIGHTS))
  with pytest.raises(MissingFileError, match=r"has no unet/diffusion_pytorch_model\.safetensors"):
    convert.convert(src, str(tmp_path / "run"))


def test_a_workdir_holding_a_run_is_refused_and_kept(run):
  before = sorted(os.listdir(run))
  with pytest.raises(UserError, match=r"already holds a run \(config\.json and checkpoints\)"):
    convert.convert(FIXTURE, run)
  assert sorted(os.listdir(run)) == before
  # From the command line: the sentence alone on stderr, a non-zero exit, no traceback.
  proc = _main("-m", "ddpm_jax.convert", "--from=diffusers", f"--src={FIXTURE}",
               f"--workdir={run}", timeout=120)
  assert proc.returncode == 2  # as main.py's user errors
  assert "already holds a run" in proc.stderr and "Traceback" not in proc.stderr
