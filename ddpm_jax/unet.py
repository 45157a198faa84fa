"""The U-Net of Ho et al. (2020) in Flax Linen.

A faithful port of diffusion_tf/models/unet.py of the original DDPM code: the same layers, the
same initialisation, the same parameter count (35,746,307 for CIFAR-10, 113,673,219 for
CelebA-HQ 256), with parameter names after the original's variable scopes.

    model = UNet(**config.model)
    params = model.init(key, x_t, t)["params"]
    out = model.apply({"params": params}, x_t, t, train=True, rngs={"dropout": key})

x_t: float32 [B, S, S, C] in [-1, 1]; t: int [B], 0-based timesteps; out: float32
[B, S, S, out_channels]. With `dtype="bfloat16"` activations are computed in bfloat16 while the
parameters, the GroupNorm statistics, the attention softmax and the output stay float32.
"""
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NUM_GROUPS = 32  # tf.contrib.layers.group_norm's default number of groups.


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
  """The original's default_init: variance scaling, fan_avg, uniform; scale 0 means 1e-10.

  Layers that end a residual branch use scale 0, so every residual block starts as the identity
  and the whole network starts with an (almost) zero output.
  """
  return nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, "fan_avg", "uniform")


def get_timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal timestep embedding of the original (tensor2tensor's), float32 [B] -> [B, dim].

  Frequencies exp(-log(10000) * k / (dim // 2 - 1)) for k < dim // 2; [sin, cos], then one zero
  column when dim is odd.
  """
  if dim < 4:
    raise ValueError(f"The timestep embedding needs dim >= 4, got dim={dim}.")
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000) / (half - 1)))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


# Layer factories: every layer keeps float32 parameters and computes in `dtype`.

def _conv(features, name, dtype, *, strides=1, init_scale=1.0):
  # lax's "SAME" is TF's "SAME": for the stride-2 downsampling conv on an even size it pads
  # (0, 1), one row/column after and none before, as the original does.
  return nn.Conv(features, (3, 3), strides=(strides, strides), padding="SAME", dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=default_init(init_scale), name=name)


def _dense(features, name, dtype, *, init_scale=1.0):
  # Also the original's `nin` (a 1x1 convolution): a kernel of shape [C_in, C_out] on the last axis.
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=default_init(init_scale), name=name)


def _norm(name, dtype):
  # tf.contrib.layers.group_norm: 32 groups, epsilon 1e-6, two-pass (not E[x^2] - E[x]^2)
  # moments. Flax computes the statistics in float32 whatever `dtype` is.
  return nn.GroupNorm(num_groups=NUM_GROUPS, epsilon=1e-6, use_fast_variance=False, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


class ResnetBlock(nn.Module):
  """x [B, H, W, C], temb [B, 4ch] -> [B, H, W, out_ch].

  GroupNorm -> swish -> conv3x3, plus Dense(swish(temb)), GroupNorm -> swish -> dropout ->
  conv3x3 (zero-initialised), added to x (through a 1x1 "nin" projection when C != out_ch).
  """
  out_ch: int
  dropout: float
  dtype: Any

  @nn.compact
  def __call__(self, x, temb, train: bool):
    h = _conv(self.out_ch, "conv1", self.dtype)(nn.swish(_norm("norm1", self.dtype)(x)))
    h = h + _dense(self.out_ch, "temb_proj", self.dtype)(nn.swish(temb))[:, None, None, :]
    h = nn.swish(_norm("norm2", self.dtype)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv(self.out_ch, "conv2", self.dtype, init_scale=0.0)(h)
    if x.shape[-1] != self.out_ch:
      x = _dense(self.out_ch, "nin_shortcut", self.dtype)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions with a residual: [B, H, W, C] -> same.

  GroupNorm, 1x1 q/k/v, softmax(q k^T / sqrt(C)) v, 1x1 output projection (zero-initialised).
  """
  dtype: Any

  @nn.compact
  def __call__(self, x):
    B, H, W, C = x.shape
    h = _norm("norm", self.dtype)(x)
    q, k, v = (_dense(C, name, self.dtype)(h).reshape(B, H * W, 1, C) for name in ("q", "k", "v"))
    # One head of size C: the default scale is 1/sqrt(C), as in the original; the softmax runs
    # in float32. Going through dot_product_attention lets XLA use its fused attention kernels.
    h = jax.nn.dot_product_attention(q, k, v).reshape(B, H, W, C)
    return x + _dense(C, "proj_out", self.dtype, init_scale=0.0)(h)


class Downsample(nn.Module):
  """[B, H, W, C] -> [B, H/2, W/2, C]: a stride-2 conv3x3, or a 2x2 average pool."""
  with_conv: bool
  dtype: Any

  @nn.compact
  def __call__(self, x):
    if self.with_conv:
      return _conv(x.shape[-1], "conv", self.dtype, strides=2)(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
  """[B, H, W, C] -> [B, 2H, 2W, C]: nearest-neighbour x2, then a conv3x3 if with_conv."""
  with_conv: bool
  dtype: Any

  @nn.compact
  def __call__(self, x):
    # The original resizes with align_corners=True; at exactly 2x that maps output pixel i to
    # input round(i * (H - 1) / (2H - 1)) = i // 2, i.e. plain pixel repetition.
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if self.with_conv:
      x = _conv(x.shape[-1], "conv", self.dtype)(x)
    return x


class UNet(nn.Module):
  """The DDPM U-Net: (x_t [B, S, S, C] float in [-1, 1], t int [B]) -> float32 [B, S, S, out_channels].

  t may also be float in [0, T-1] (continuous time, as the probability-flow ODE and EDM's sampler
  call it): the sinusoidal embedding takes it as it is, and integer values give the same output.

  Attributes (config.model):
    ch: base channel count; also the timestep embedding's size (the MLP widens it to 4 * ch).
    ch_mult: channel multiplier per resolution level; len(ch_mult) - 1 downsamplings by 2.
    num_res_blocks: ResNet blocks per level on the way down (one more per level on the way up).
    attn_resolutions: spatial sizes at which every ResNet block is followed by self-attention.
    dropout: dropout rate inside the ResNet blocks, applied only when train=True.
    resamp_with_conv: convolutions in the down/up-sampling layers (else average pool / repeat).
    out_channels: output channels: C, or 2C for a learned variance.
    num_classes: 0 for an unconditional model; > 0 adds a label embedding with num_classes + 1
      rows to the timestep embedding; the last row, label num_classes, is the null label of
      classifier-free guidance, used when y is None.
    dtype: compute dtype, "float32" or "bfloat16"; parameters are always float32.
    remat: rematerialise every ResNet and attention block (flax.linen.remat): the backward pass
      recomputes their activations instead of keeping them, so training takes less memory (a
      larger batch fits) for about one more forward pass of compute. Outputs, gradients and
      parameter names are unchanged.
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  out_channels: int = 3
  num_classes: int = 0
  dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    super().__post_init__()
    if self.dtype not in DTYPES:
      raise ValueError(f"UNet dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}.")
    widths = [self.ch] + [self.ch * m for m in self.ch_mult]
    if any(w % NUM_GROUPS for w in widths):
      raise ValueError(
          f"GroupNorm uses {NUM_GROUPS} groups, so every channel count must be a multiple of "
          f"{NUM_GROUPS}, but ch={self.ch} with ch_mult={tuple(self.ch_mult)} gives channel "
          f"counts {sorted(set(widths))}.")

  def _check_inputs(self, x, t, y):
    """One clear ValueError for inputs this configuration cannot take."""
    if x.ndim != 4:
      raise ValueError(f"UNet expects x of shape [B, H, W, C] (rank 4), got shape {x.shape}.")
    if t.shape != x.shape[:1]:
      raise ValueError(f"UNet expects t of shape [B] = {x.shape[:1]} to match x's batch size, "
                       f"got shape {t.shape}.")
    size = x.shape[1]
    if x.shape[2] != size:
      raise ValueError(f"UNet expects square images, got x of shape {x.shape}.")
    factor = 2 ** (len(self.ch_mult) - 1)
    if size % factor:
      raise ValueError(
          f"Image size {size} is not divisible by 2**(len(ch_mult) - 1) = {factor}, which the "
          f"{len(self.ch_mult) - 1} downsamplings of ch_mult={tuple(self.ch_mult)} need; use an "
          f"image size that is a multiple of {factor}.")
    occurring = [size // 2 ** i for i in range(len(self.ch_mult))]
    for res in self.attn_resolutions:
      if res not in occurring:
        raise ValueError(
            f"Attention resolution {res} in attn_resolutions={tuple(self.attn_resolutions)} never "
            f"occurs in this network; with {size}x{size} inputs and ch_mult="
            f"{tuple(self.ch_mult)} the resolutions are {tuple(occurring)}.")
    if y is not None and not self.num_classes:
      raise ValueError("Class labels y were given to an unconditional UNet (num_classes=0); "
                       "pass y=None or set num_classes > 0.")
    if y is not None and y.shape != x.shape[:1]:
      raise ValueError(f"UNet expects labels y of shape [B] = {x.shape[:1]}, got {y.shape}.")

  @nn.compact
  def __call__(self, x, t, *, train: bool = False, y: Optional[jax.Array] = None):
    """x [B, S, S, C] float, t [B] int, y [B] int labels or None -> float32 [B, S, S, out_channels]."""
    self._check_inputs(x, t, y)
    dtype = DTYPES[self.dtype]
    num_levels = len(self.ch_mult)

    # Timestep embedding [B, 4ch], plus the label embedding for a class-conditional model.
    temb = get_timestep_embedding(t, self.ch)
    temb = _dense(4 * self.ch, "temb_dense0", dtype)(temb)
    temb = _dense(4 * self.ch, "temb_dense1", dtype)(nn.swish(temb))
    if self.num_classes:
      if y is None:
        y = jnp.full(t.shape, self.num_classes, jnp.int32)  # the null label
      temb = temb + nn.Embed(self.num_classes + 1, 4 * self.ch, dtype=dtype,
                             param_dtype=jnp.float32, embedding_init=default_init(),
                             name="label_emb")(y)

    # With remat the blocks are wrapped in flax.linen.remat; `train` (argument 3, counting the
    # module itself as 0) is a Python bool and must stay static.
    res_block = nn.remat(ResnetBlock, static_argnums=(3,)) if self.remat else ResnetBlock
    attn_block = nn.remat(AttnBlock) if self.remat else AttnBlock

    def block(h, out_ch, name, attn_name):
      """A ResNet block, then self-attention if h's resolution is in attn_resolutions."""
      h = res_block(out_ch, self.dropout, dtype, name=name)(h, temb, train)
      if h.shape[1] in self.attn_resolutions:
        h = attn_block(dtype, name=attn_name)(h)
      return h

    # Down: hs collects every skip connection, consumed in reverse on the way up.
    hs = [_conv(self.ch, "conv_in", dtype)(x)]
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        hs.append(block(hs[-1], self.ch * mult, f"down_{i}_block_{j}", f"down_{i}_attn_{j}"))
      if i != num_levels - 1:
        hs.append(Downsample(self.resamp_with_conv, dtype, name=f"down_{i}_downsample")(hs[-1]))

    # Middle: ResNet, attention (at any resolution), ResNet.
    h = hs[-1]
    h = res_block(h.shape[-1], self.dropout, dtype, name="mid_block_1")(h, temb, train)
    h = attn_block(dtype, name="mid_attn_1")(h)
    h = res_block(h.shape[-1], self.dropout, dtype, name="mid_block_2")(h, temb, train)

    # Up: num_res_blocks + 1 blocks per level, each on [h, skip] concatenated along channels.
    for i in reversed(range(num_levels)):
      for j in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop()], axis=-1)
        h = block(h, self.ch * self.ch_mult[i], f"up_{i}_block_{j}", f"up_{i}_attn_{j}")
      if i != 0:
        h = Upsample(self.resamp_with_conv, dtype, name=f"up_{i}_upsample")(h)
    assert not hs, "every skip connection is used exactly once"

    h = nn.swish(_norm("norm_out", dtype)(h))
    h = _conv(self.out_channels, "conv_out", dtype, init_scale=0.0)(h)
    return h.astype(jnp.float32)
