"""diffusers' DDPM models in our terms: UNet2DModel config -> config.model, DDPMScheduler config
-> config.diffusion, and every UNet2DModel tensor -> our U-Net parameter.

diffusers' UNet2DModel with DownBlock2D/AttnDownBlock2D, UNetMidBlock2D and
UpBlock2D/AttnUpBlock2D, the original's timestep embedding (flip_sin_to_cos=False,
freq_shift=1), GroupNorm(32, eps 1e-6), downsample_padding=0 and one attention head per layer
computes exactly our `ddpm_jax.unet.UNet` (that is how google/ddpm-* republished Ho et al.'s
models). The correspondence, with n = len(block_out_channels) levels:

    ours                       diffusers
    conv_in                    conv_in
    temb_dense0 / temb_dense1  time_embedding.linear_1 / linear_2
    down_{i}_block_{j}         down_blocks.{i}.resnets.{j}
    down_{i}_attn_{j}          down_blocks.{i}.attentions.{j}
    down_{i}_downsample/conv   down_blocks.{i}.downsamplers.0.conv
    mid_block_1 / mid_attn_1 / mid_block_2    mid_block.resnets.0 / attentions.0 / resnets.1
    up_{i}_block_{j}           up_blocks.{n-1-i}.resnets.{j}    (diffusers counts up blocks from
    up_{i}_attn_{j}            up_blocks.{n-1-i}.attentions.{j}  the lowest resolution; we count
    up_{i}_upsample/conv       up_blocks.{n-1-i}.upsamplers.0.conv   levels from the highest)
    norm_out / conv_out        conv_norm_out / conv_out
  inside a ResNet block: norm1, conv1, temb_proj (time_emb_proj), norm2, conv2, nin_shortcut
  (conv_shortcut, a 1x1 conv); inside attention: norm (group_norm), q, k, v (to_q, to_k, to_v),
  proj_out (to_out.0). Old checkpoints name attention query/key/value/proj_attn and resampling
  convolutions Conv2d_0; both are accepted.

Both networks keep every skip connection in the same order and concatenate [h, skip] along the
channels, so no tensor needs its input channels permuted: only the layouts change (convolution
OIHW -> HWIO, linear [out, in] -> [in, out], 1x1 convolution [out, in, 1, 1] -> [in, out]).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Tuple

import numpy as np

from ddpm_jax.errors import UserError

# UNet2DModel's defaults (diffusers 0.42), for keys a config.json leaves out.
UNET_DEFAULTS = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type="positional", time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=0.0,
    act_fn="silu", attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None,
    norm_eps=1e-5, resnet_time_scale_shift="default", add_attention=True, class_embed_type=None,
    num_class_embeds=None, num_train_timesteps=None)

# The settings that make a UNet2DModel the DDPM network, with what each one means for us.
DDPM_UNET = {
    "center_input_sample": (False, "inputs used as given"),
    "time_embedding_type": ("positional", "the sinusoidal timestep embedding"),
    "time_embedding_dim": (None, "a timestep MLP 4x the base width"),
    "freq_shift": (1, "the original's embedding frequencies"),
    "flip_sin_to_cos": (False, "the original's [sin, cos] order"),
    "mid_block_type": ("UNetMidBlock2D", "the ResNet-attention-ResNet middle"),
    "mid_block_scale_factor": (1, "unscaled residuals"),
    "downsample_padding": (0, "TF-style SAME padding of the stride-2 convolution"),
    "downsample_type": ("conv", "convolutional downsampling"),
    "upsample_type": ("conv", "convolutional upsampling"),
    "act_fn": ("silu", "the swish activation"),
    "norm_num_groups": (32, "GroupNorm with 32 groups"),
    "attn_norm_num_groups": ((None, 32), "GroupNorm with 32 groups in attention"),
    "norm_eps": (1e-6, "GroupNorm epsilon 1e-6"),
    "resnet_time_scale_shift": ("default", "an additive timestep projection"),
    "add_attention": (True, "attention in the middle"),
    "class_embed_type": (None, "an unconditional model"),
    "num_class_embeds": (None, "an unconditional model"),
}
DOWN_TYPES = {"DownBlock2D": False, "AttnDownBlock2D": True}  # block type -> has attention
UP_TYPES = {"UpBlock2D": False, "AttnUpBlock2D": True}

# DDPMScheduler's defaults (diffusers 0.42), for keys a scheduler_config.json leaves out.
SCHEDULER_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, variance_type="fixed_small", clip_sample=True, prediction_type="epsilon",
    thresholding=False, clip_sample_range=1.0, rescale_betas_zero_snr=False)
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "quad", "squaredcos_cap_v2": "cosine",
                  "sigmoid": "sigmoid"}
# fixed_small_log is fixed_small's variance computed through its logarithm: the same sampler.
VARIANCE_TYPES = {"fixed_small": "fixedsmall", "fixed_small_log": "fixedsmall",
                  "fixed_large": "fixedlarge", "learned_range": "learned_range"}
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def _where(path: str, key: str) -> str:
  return f"{path}'s {key}"


def model_from_unet_config(cfg: Dict[str, Any], path: str):
  """UNet2DModel config (a dict read from unet/config.json at `path`) -> (our config.model
  fields but attn_resolutions, the levels with attention, image size or None, input channels).
  Raises UserError for anything but the DDPM architecture."""
  cls = cfg.get("_class_name", "UNet2DModel")
  if cls != "UNet2DModel":
    raise UserError(f"{_where(path, '_class_name')} is {cls!r}; only diffusers' UNet2DModel "
                    "(the DDPM network of google/ddpm-*) can be converted.")
  c = {**UNET_DEFAULTS, **cfg}
  for key, (want, meaning) in DDPM_UNET.items():
    have = c[key]
    accepted = want if isinstance(want, tuple) else (want,)
    if not any(_same(have, w) for w in accepted):
      raise UserError(f"{_where(path, key)} is {have!r}, but the DDPM U-Net needs {want!r} "
                      f"({meaning}); this UNet2DModel is not the DDPM architecture.")
  down, up = list(c["down_block_types"]), list(c["up_block_types"])
  widths = [int(w) for w in c["block_out_channels"]]
  n = len(widths)
  if len(down) != n or len(up) != n or n < 1:
    raise UserError(f"{path} has {len(widths)} block_out_channels, {len(down)} down_block_types "
                    f"and {len(up)} up_block_types; a UNet2DModel needs as many of each.")
  for key, types, allowed in (("down_block_types", down, DOWN_TYPES),
                              ("up_block_types", up, UP_TYPES)):
    bad = [b for b in types if b not in allowed]
    if bad:
      raise UserError(f"{_where(path, key)} include {', '.join(map(repr, bad))}; the DDPM U-Net "
                      f"is built of {' and '.join(allowed)} only (no cross-attention, skip or "
                      "resampling-free blocks).")
  attn_down = [DOWN_TYPES[b] for b in down]
  attn_up = [UP_TYPES[b] for b in reversed(up)]  # up_blocks[k] is level n - 1 - k
  if attn_down != attn_up:
    raise UserError(f"{path} has attention in down blocks {_levels(attn_down)} but in up blocks "
                    f"of levels {_levels(attn_up)}; the DDPM U-Net attends at the same "
                    "resolutions on the way down and up (up_block_types mirror down_block_types).")
  ch = widths[0]
  if any(w % ch for w in widths):
    raise UserError(f"{_where(path, 'block_out_channels')} {widths} are not multiples of the "
                    f"first, {ch}; our U-Net's widths are ch * ch_mult.")
  head = c["attention_head_dim"]
  heads = {widths[i] for i in range(n) if attn_down[i]} | {widths[-1]}
  if head is not None and any(head != w for w in heads):
    raise UserError(f"{_where(path, 'attention_head_dim')} is {head!r}: several attention "
                    f"heads; the DDPM U-Net has one head per layer (attention_head_dim null or "
                    f"the layer's width, {sorted(heads)}).")
  in_ch, out_ch = int(c["in_channels"]), int(c["out_channels"])
  if out_ch not in (in_ch, 2 * in_ch):
    raise UserError(f"{path} has in_channels={in_ch} and out_channels={out_ch}; the DDPM U-Net "
                    "outputs in_channels (eps, x0 or v) or twice that (a learned variance).")
  size = c["sample_size"]
  if isinstance(size, (list, tuple)):
    if len(set(size)) != 1:
      raise UserError(f"{_where(path, 'sample_size')} is {list(size)}; our U-Net takes square "
                      "images only.")
    size = size[0]
  size = None if size is None else int(size)
  model = dict(ch=ch, ch_mult=tuple(w // ch for w in widths),
               num_res_blocks=int(c["layers_per_block"]), resamp_with_conv=True,
               out_channels=out_ch, num_classes=0)
  return model, tuple(i for i in range(n) if attn_down[i]), size, in_ch


def _same(have, want) -> bool:
  """A config value equals the DDPM setting (floats to 1e-3 relative; True is not 1)."""
  if isinstance(want, float) and isinstance(have, (int, float)) and not isinstance(have, bool):
    return bool(np.isclose(have, want, rtol=1e-3, atol=0))
  return type(have) is type(want) and have == want or (
      isinstance(want, int) and not isinstance(want, bool) and isinstance(have, float)
      and have == want)


def _levels(flags) -> str:
  return "[" + ", ".join(str(i) for i, a in enumerate(flags) if a) + "]"


def attn_resolutions(attn_levels, image_size: int) -> Tuple[int, ...]:
  """Our attn_resolutions: level i of a U-Net on image_size x image_size works at image_size / 2**i."""
  return tuple(image_size // 2 ** i for i in attn_levels)


def diffusion_from_scheduler_config(cfg: Dict[str, Any], path: str) -> Dict[str, Any]:
  """DDPMScheduler config (from scheduler/scheduler_config.json at `path`) -> our
  config.diffusion fields plus "clip_denoised"; UserError for what we cannot express."""
  cls = cfg.get("_class_name", "DDPMScheduler")
  if cls != "DDPMScheduler":
    raise UserError(f"{_where(path, '_class_name')} is {cls!r}; only a DDPMScheduler config "
                    "(the training diffusion of google/ddpm-*) can be converted.")
  c = {**SCHEDULER_DEFAULTS, **cfg}
  if c["trained_betas"] is not None:
    raise UserError(f"{_where(path, 'trained_betas')} is an explicit list of betas, which a "
                    f"ddpm_jax config cannot hold; accepted: trained_betas null with beta_schedule "
                    f"one of {', '.join(BETA_SCHEDULES)}.")
  checks = (
      ("beta_schedule", c["beta_schedule"] in BETA_SCHEDULES, ", ".join(BETA_SCHEDULES)),
      ("variance_type", c["variance_type"] in VARIANCE_TYPES, ", ".join(VARIANCE_TYPES)),
      ("prediction_type", c["prediction_type"] in PREDICTION_TYPES, ", ".join(PREDICTION_TYPES)),
      ("thresholding", c["thresholding"] is False, "false (dynamic thresholding is not supported)"),
      ("clip_sample_range", c["clip_sample_range"] == 1.0, "1.0 (clipping to [-1, 1])"),
      ("rescale_betas_zero_snr", c["rescale_betas_zero_snr"] is False, "false"),
  )
  for key, ok, accepted in checks:
    if not ok:
      raise UserError(f"{_where(path, key)} is {c[key]!r}, which ddpm_jax cannot express; "
                      f"accepted: {accepted}.")
  steps = c["num_train_timesteps"]
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise UserError(f"{_where(path, 'num_train_timesteps')} is {steps!r}; it must be an "
                    "integer >= 1.")
  return dict(beta_schedule=BETA_SCHEDULES[c["beta_schedule"]],
              beta_start=float(c["beta_start"]), beta_end=float(c["beta_end"]),
              num_timesteps=steps, mean_type=PREDICTION_TYPES[c["prediction_type"]],
              var_type=VARIANCE_TYPES[c["variance_type"]],
              clip_denoised=bool(c["clip_sample"]))


# ----------------------------------------------------------------------------- tensors

_LEGACY = ((re.compile(r"\.query\.(weight|bias)$"), r".to_q.\1"),
           (re.compile(r"\.key\.(weight|bias)$"), r".to_k.\1"),
           (re.compile(r"\.value\.(weight|bias)$"), r".to_v.\1"),
           (re.compile(r"\.proj_attn\.(weight|bias)$"), r".to_out.0.\1"),
           (re.compile(r"(samplers\.0)\.Conv2d_0\.(weight|bias)$"), r"\1.conv.\2"))


def canonical_names(tensors: Dict[str, np.ndarray]) -> Dict[str, Tuple[str, np.ndarray]]:
  """{current diffusers name: (name in the file, array)}: old attention and resampling names
  renamed as diffusers renames them when loading. Two file tensors that land on one name must
  be equal (a state dict that held both names of one shared tensor), else UserError."""
  out = {}
  for name, array in tensors.items():
    new = name
    for pattern, repl in _LEGACY:
      new = pattern.sub(repl, new)
    if new in out:
      other, first = out[new]
      if first.shape != array.shape or not np.array_equal(first, array):
        raise UserError(f"The safetensors file holds both {other} and {name}, two different "
                        f"tensors for the one parameter {new}; keep one of them.")
      continue
    out[new] = (name, array)
  return out


def _module_name(ours: str, num_levels: int) -> str:
  """Our top-level module name -> the diffusers module path."""
  fixed = {"conv_in": "conv_in", "temb_dense0": "time_embedding.linear_1",
           "temb_dense1": "time_embedding.linear_2", "mid_block_1": "mid_block.resnets.0",
           "mid_attn_1": "mid_block.attentions.0", "mid_block_2": "mid_block.resnets.1",
           "norm_out": "conv_norm_out", "conv_out": "conv_out"}
  if ours in fixed:
    return fixed[ours]
  m = re.fullmatch(r"(down|up)_(\d+)_(block|attn)_(\d+)", ours)
  if m:
    side, level, kind, j = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    index = level if side == "down" else num_levels - 1 - level
    return f"{side}_blocks.{index}.{'resnets' if kind == 'block' else 'attentions'}.{j}"
  m = re.fullmatch(r"(down)_(\d+)_downsample|(up)_(\d+)_upsample", ours)
  if m:
    if m.group(1):
      return f"down_blocks.{int(m.group(2))}.downsamplers.0"
    return f"up_blocks.{num_levels - 1 - int(m.group(4))}.upsamplers.0"
  raise KeyError(f"no diffusers counterpart for our module {ours}")  # our bug: a new layer


_SUBLAYERS = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
              "conv2": "conv2", "nin_shortcut": "conv_shortcut", "norm": "group_norm",
              "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0", "conv": "conv"}


def source_tensor(path: Tuple[str, ...], num_levels: int) -> str:
  """The diffusers tensor of our parameter at `path` (e.g. ("up_0_block_1", "conv1", "kernel"))."""
  *modules, leaf = path
  parts = [_module_name(modules[0], num_levels)] + [_SUBLAYERS[m] for m in modules[1:]]
  return ".".join(parts) + "." + ("bias" if leaf == "bias" else "weight")


def to_ours(array: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
  """A diffusers tensor in our layout for a parameter of `shape`: OIHW conv -> HWIO; [out, in]
  linear and [out, in, 1, 1] 1x1 conv -> [in, out] dense; vectors as they are. float32."""
  a = np.asarray(array, dtype=np.float32)
  if a.ndim == 4 and len(shape) == 4:
    a = a.transpose(2, 3, 1, 0)
  elif a.ndim == 4 and len(shape) == 2 and a.shape[2:] == (1, 1):
    a = a[:, :, 0, 0].T
  elif a.ndim == 2:
    a = a.T
  return np.ascontiguousarray(a)


def params_from_tensors(tensors: Dict[str, np.ndarray], shapes: Dict[Tuple[str, ...], Tuple],
                        num_levels: int, path: str) -> Dict[Tuple[str, ...], np.ndarray]:
  """Every parameter of ours (`shapes`: flat path -> shape) from the diffusers `tensors` of the
  file at `path`. UserError naming the tensors when one is missing, left over, or of the wrong
  shape."""
  named = canonical_names(tensors)
  params, used, missing = {}, set(), []
  for key, shape in shapes.items():
    name = source_tensor(key, num_levels)
    if name not in named:
      missing.append(name)
      continue
    file_name, array = named[name]
    used.add(name)
    value = to_ours(array, tuple(shape))
    if value.shape != tuple(shape):
      raise UserError(f"Tensor {file_name} of {path} has shape {tuple(array.shape)}, but "
                      f"unet/config.json makes it {'/'.join(key)} of shape {tuple(shape)} in our "
                      "layout; the weights do not belong to this config.")
    params[key] = value
  unused = sorted(named[n][0] for n in named.keys() - used)
  if missing or unused:
    listing = "; ".join(part for part in (
        f"missing {_some(missing)}" if missing else "",
        f"unused {_some(unused)}" if unused else "") if part)
    raise UserError(f"The tensors of {path} do not match the U-Net that unet/config.json "
                    f"describes ({listing}); the weights and the config must come from one "
                    "model.")
  return params


def _some(names, limit=8) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
