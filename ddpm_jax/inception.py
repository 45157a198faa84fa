"""The FID Inception-v3 in Flax Linen: the network of the standard FID and Inception Score code.

This is the network of TTUR's TensorFlow FID graph (inception-2015-12-05), in the form that
pytorch-fid ported it to (`pytorch_fid.inception.fid_inception_v3`, weights
pt_inception-2015-12-05-6726825d.pth): torchvision's Inception-v3 with num_classes=1008,
aux_logits=False and four kinds of block patched to behave like the TF graph:

- Mixed_5b/5c/5d (FIDInceptionA), Mixed_6b..6e (FIDInceptionC) and Mixed_7b (FIDInceptionE_1)
  average-pool their pool branch with a 3x3 window, stride 1, padding 1 and
  count_include_pad=False (TF's average pool does not count the padding);
- Mixed_7c (FIDInceptionE_2) max-pools its pool branch (3x3, stride 1, padding 1);
- every convolution is bias-free and followed by BatchNorm (inference mode, eps=1e-3) and ReLU.

`InceptionV3()(x)` takes x float32 [N, H, W, 3] in [-1, 1] (the protocol uses H = W = 299; the
network itself accepts any H, W >= 75) and returns
  pool   [N, 2048]: the pool3 features, the mean over the last 8x8 map (FID uses these), and
  logits [N, 1008]: fc(pool) = pool @ kernel + bias, the TF graph's "softmax/logits".

`preprocess(images)` is the FID protocol's input step (see its docstring), `load_inception_params`
reads pytorch-fid's .pth itself (no torch needed) or an .npz of our keys
(docs/inception_weights.md), and `param_shapes` / `count_params` describe the model without
allocating it.

Parameter names follow the torch module names, with a "/" path: "Conv2d_1a_3x3/conv/kernel",
"Mixed_5b/branch1x1/bn/scale", "fc/kernel"; BatchNorm's running statistics ("bn/mean",
"bn/var") are in the "batch_stats" collection, everything else in "params".
"""
import functools
import os
import zipfile
from typing import Any, Dict, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddpm_jax import pth
from ddpm_jax.errors import MissingFileError, UserError

INPUT_SIZE = 299  # The protocol's input size: images are resized to 299x299.
MIN_INPUT_SIZE = 75  # The smallest H, W that survives the network's strided layers.
NUM_FEATURES = 2048  # pool3.
NUM_CLASSES = 1008  # The TF graph's classifier: 1000 ImageNet classes plus 8 unused.
BN_EPSILON = 1e-3  # As the TF graph (torchvision's BasicConv2d uses the same).
# Trainable parameters of pytorch-fid's FID Inception (sum(p.numel() for p in
# fid_inception_v3().parameters())): convolution kernels, BatchNorm scale and bias, and the
# 2048 -> 1008 fc layer (2048 * 1008 + 1008).
NUM_PARAMS = 23_850_960
# Every float value of the weights: NUM_PARAMS plus the 34,432 BatchNorm running means and
# variances, i.e. the float entries of pt_inception-2015-12-05-6726825d.pth.
NUM_VALUES = 23_885_392
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_DOC = "docs/inception_weights.md"
_STATS_LEAVES = ("mean", "var")  # Leaves that live in the "batch_stats" collection.

# Full float32 precision for every convolution and matmul: on TPUs (and TF32 GPUs) the default
# precision would compute them in bfloat16/TF32 and move FID away from the reference numbers.
PRECISION = jax.lax.Precision.HIGHEST


class BasicConv2d(nn.Module):
  """torchvision's BasicConv2d: a bias-free convolution, BatchNorm(eps=1e-3), ReLU."""
  features: int
  kernel_size: Tuple[int, int]
  strides: int = 1
  padding: Tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel_size, strides=(self.strides, self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=PRECISION,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  """F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3(x):
  """F.max_pool2d(x, 3, stride=1, padding=1) (the padding never wins a max)."""
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x):
  """nn.MaxPool2d(kernel_size=3, stride=2), no padding."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """FIDInceptionA (Mixed_5b/5c/5d): 64 + 64 + 96 + pool_features channels."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """torchvision's InceptionB (Mixed_6a): 384 + 96 + C_in channels at half the size."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """FIDInceptionC (Mixed_6b..6e): 4 x 192 channels, factorised 7x7 convolutions."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """torchvision's InceptionD (Mixed_7a): 320 + 192 + C_in channels at half the size."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv2d(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """FIDInceptionE_1 (Mixed_7b, pool="avg") and FIDInceptionE_2 (Mixed_7c, pool="max")."""
  pool: str

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x)
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """pytorch-fid's fid_inception_v3() (= TTUR's TF FID graph): x [N, H, W, 3] in [-1, 1] ->
  (pool [N, 2048], logits [N, 1008]). Inference only (BatchNorm uses the running statistics;
  torchvision's dropout before fc is the identity at inference)."""

  @nn.compact
  def __call__(self, x):
    if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < MIN_INPUT_SIZE:
      raise ValueError(f"InceptionV3 takes images [N, H, W, 3] with H, W >= {MIN_INPUT_SIZE}, "
                       f"got shape {tuple(x.shape)}; use preprocess() to make 299x299x3 inputs.")
    x = BasicConv2d(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)  # 299 -> 149
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)  # -> 147
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)  # -> 73
    x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)  # -> 71
    x = _max_pool_3x3_s2(x)  # -> 35
    x = InceptionA(32, name="Mixed_5b")(x)  # 256 channels
    x = InceptionA(64, name="Mixed_5c")(x)  # 288
    x = InceptionA(64, name="Mixed_5d")(x)  # 288
    x = InceptionB(name="Mixed_6a")(x)  # 768 at 17x17
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)  # 1280 at 8x8
    x = InceptionE("avg", name="Mixed_7b")(x)  # 2048
    x = InceptionE("max", name="Mixed_7c")(x)  # 2048
    pool = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)): pool3.
    logits = nn.Dense(NUM_CLASSES, precision=PRECISION, name="fc")(pool)
    return pool, logits


# ---------------------------------------------------------------------------------------------
# Preprocessing: the FID protocol's resize.

def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """float64 [out_size, in_size] matrix of torch's F.interpolate(mode="bilinear",
  align_corners=False) along one axis, without antialiasing.

  As ATen's upsample_bilinear2d: scale = in/out, src = max(scale * (dst + 0.5) - 0.5, 0),
  i0 = floor(src), i1 = min(i0 + 1, in - 1), weights (1 - (src - i0), src - i0).
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"Resize sizes must be positive, got {in_size} -> {out_size}.")
  scale = in_size / out_size
  src = np.maximum(scale * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5, 0.0)
  i0 = np.floor(src).astype(np.int64)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = src - i0
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), 1.0 - lam)
  np.add.at(m, (rows, i1), lam)
  return m


def resize_bilinear(images: jax.Array, size: Tuple[int, int]) -> jax.Array:
  """[N, H, W, C] -> [N, size[0], size[1], C], exactly torch's bilinear, align_corners=False.

  Separable: rows then columns, each a matmul with `bilinear_resize_matrix` in full float32
  precision. For upsampling this equals jax.image.resize(method="bilinear") too.
  """
  _, h, w, _ = images.shape
  mh = jnp.asarray(bilinear_resize_matrix(h, size[0]), images.dtype)
  mw = jnp.asarray(bilinear_resize_matrix(w, size[1]), images.dtype)
  x = jnp.einsum("oh,nhwc->nowc", mh, images, precision=PRECISION)
  return jnp.einsum("pw,nowc->nopc", mw, x, precision=PRECISION)


def preprocess(images: jax.Array) -> jax.Array:
  """The FID protocol's input step: float32 [N, H, W, C] in [-1, 1], C in {1, 3} ->
  [N, 299, 299, 3] in [-1, 1].

  One channel is repeated to three; then a bilinear resize to 299x299 with torch's
  F.interpolate(mode="bilinear", align_corners=False) arithmetic (no antialiasing), the same
  size whatever H, W are. pytorch-fid resizes x01 = (x + 1) / 2 and then maps it back with
  2 * x01 - 1; bilinear weights sum to one, so resizing x itself is the same (to float32
  rounding). No clipping: values outside [-1, 1] pass through.
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError("Inception inputs must be images [N, H, W, C] with C = 1 or 3, "
                     f"got shape {tuple(images.shape)}.")
  images = images.astype(jnp.float32)
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  if images.shape[1:3] == (INPUT_SIZE, INPUT_SIZE):
    return images
  return resize_bilinear(images, (INPUT_SIZE, INPUT_SIZE))


# ---------------------------------------------------------------------------------------------
# Shapes, counting and weights.

@functools.lru_cache(maxsize=None)
def _variable_shapes() -> Dict[str, Tuple[int, ...]]:
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  variables = jax.eval_shape(InceptionV3().init, jax.random.key(0), x)
  flat = traverse_util.flatten_dict(variables, sep="/")
  # Drop the collection prefix: leaf names tell "params" (kernel, scale, bias) from
  # "batch_stats" (mean, var) apart, so keys stay unique and read like the torch names.
  return {k.split("/", 1)[1]: tuple(v.shape) for k, v in sorted(flat.items())}


def param_shapes() -> Dict[str, Tuple[int, ...]]:
  """Every variable of the model, "Conv2d_1a_3x3/conv/kernel" -> shape, from jax.eval_shape
  (nothing allocated): the keys and shapes a weights file must hold."""
  return dict(_variable_shapes())


def count_params(shapes: Mapping[str, Tuple[int, ...]] = None) -> int:
  """Trainable parameters (BatchNorm running mean/var excluded): 23,850,960 for this model."""
  shapes = param_shapes() if shapes is None else shapes
  return sum(int(np.prod(s)) for k, s in shapes.items()
             if k.rsplit("/", 1)[-1] not in _STATS_LEAVES)


def _missing_weights_message(path) -> str:
  return (f"Inception weights file {os.fspath(path)!r} does not exist: point "
          f"config.eval.inception_weights at pytorch-fid's {WEIGHTS_FILE} (or leave it unset to "
          f"download it), as {WEIGHTS_DOC} explains.")


_BN_LEAVES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def flat_from_state_dict(state_dict: Mapping[str, np.ndarray], source: str = "the weights"
                         ) -> Dict[str, np.ndarray]:
  """pytorch-fid's state dict (torch names and layouts) -> {"a/b/kernel": float32 array}:

    X.conv.weight [out, in, kh, kw]  -> X/conv/kernel [kh, kw, in, out]
    X.bn.weight / bias               -> X/bn/scale / X/bn/bias
    X.bn.running_mean / running_var  -> X/bn/mean / X/bn/var
    X.bn.num_batches_tracked         -> dropped (training bookkeeping)
    fc.weight [1008, 2048]           -> fc/kernel [2048, 1008];  fc.bias -> fc/bias
  """
  out = {}
  for name, value in state_dict.items():
    parts = name.split(".")
    value = np.asarray(value)
    if len(parts) >= 3 and parts[-2:] == ["conv", "weight"] and value.ndim == 4:
      out["/".join(parts[:-1] + ["kernel"])] = value.transpose(2, 3, 1, 0)
    elif len(parts) >= 3 and parts[-2] == "bn" and parts[-1] == "num_batches_tracked":
      continue
    elif len(parts) >= 3 and parts[-2] == "bn" and parts[-1] in _BN_LEAVES:
      out["/".join(parts[:-1] + [_BN_LEAVES[parts[-1]]])] = value
    elif name == "fc.weight" and value.ndim == 2:
      out["fc/kernel"] = value.T
    elif name == "fc.bias":
      out["fc/bias"] = value
    else:
      raise UserError(f"{source} hold {name!r} with shape {value.shape}, which is not part of "
                       f"the FID Inception (is it pytorch-fid's {WEIGHTS_FILE}?).")
  return {k: np.ascontiguousarray(v, np.float32) if np.issubdtype(v.dtype, np.floating) else v
          for k, v in out.items()}


def variables_from_flat(arrays: Mapping[str, np.ndarray], source: str = "the weights") -> Dict:
  """{"Conv2d_1a_3x3/conv/kernel": array, ...} -> Flax variables {"params", "batch_stats"},
  float32, after checking that the keys are exactly the model's and every shape matches."""
  expected = _variable_shapes()
  missing = sorted(set(expected) - set(arrays))
  if missing:
    raise UserError(f"{source} lack {len(missing)} of the Inception's {len(expected)} arrays, "
                     f"e.g. {missing[0]!r} with shape {expected[missing[0]]}.")
  extra = sorted(set(arrays) - set(expected))
  if extra:
    raise UserError(f"{source} hold {len(extra)} arrays that the Inception does not have, "
                     f"e.g. {extra[0]!r}; expected only keys like 'Conv2d_1a_3x3/conv/kernel'.")
  tree = {}
  for key, shape in expected.items():
    value = np.asarray(arrays[key])
    if value.shape != shape:
      raise UserError(f"{source} give {key!r} the shape {value.shape}, the Inception needs "
                       f"{shape}.")
    if not np.issubdtype(value.dtype, np.floating):
      raise UserError(f"{source} give {key!r} the dtype {value.dtype}; a float array is needed.")
    if not np.all(np.isfinite(value)):
      raise UserError(f"{source} give {key!r} non-finite values (NaN or Inf).")
    collection = "batch_stats" if key.rsplit("/", 1)[-1] in _STATS_LEAVES else "params"
    tree[(collection,) + tuple(key.split("/"))] = jnp.asarray(value, jnp.float32)
  return traverse_util.unflatten_dict(tree)


def flat_from_variables(variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """The inverse of `variables_from_flat`: Flax variables -> {"a/b/kernel": numpy array}."""
  flat = traverse_util.flatten_dict(dict(variables), sep="/")
  return {k.split("/", 1)[1]: np.asarray(v) for k, v in flat.items()}


def load_inception_params(path) -> Dict:
  """Read FID Inception weights and return the Flax variables {"params": ..., "batch_stats":
  ...} for `InceptionV3().apply`: pytorch-fid's .pth (pt_inception-2015-12-05-6726825d.pth, or
  any .pth of that state dict; read by ddpm_jax.pth without torch and without running pickled
  code), or an .npz with our keys ("Conv2d_1a_3x3/conv/kernel", as `flat_from_variables` gives).

  A missing file, an unreadable one, a .pth holding anything but tensors, a missing or extra
  key, or a wrong shape fails with one sentence saying which (a UserError).
  """
  path = os.fspath(path)
  source = f"Inception weights file {path!r}"
  if not os.path.isfile(path):
    raise MissingFileError(_missing_weights_message(path))
  if path.endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # Not an .npz, truncated.
      raise UserError(f"{source} is not a readable .npz archive ({e}); use pytorch-fid's "
                       f"{WEIGHTS_FILE} as {WEIGHTS_DOC} explains.") from e
  else:
    try:
      state_dict = pth.read_state_dict(path)
    except pth.UnsafeFileError as e:
      raise UserError(f"{source} was refused: {e} (a .pth must hold only a state dict of "
                       f"tensors, as pytorch-fid's {WEIGHTS_FILE} does).") from e
    arrays = flat_from_state_dict(state_dict, source)
  return variables_from_flat(arrays, source=source)
