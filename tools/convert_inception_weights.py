"""Convert pytorch-fid's FID Inception weights (.pth) into the .npz that ddpm_jax reads.

    python tools/convert_inception_weights.py \
        --input pt_inception-2015-12-05-6726825d.pth --output pt_inception-2015-12-05.npz

Needs PyTorch, only to read the .pth (`pip install torch`, on any machine; it is not one of the
project's requirements). See docs/inception_weights.md for where the .pth comes from.

Name and layout mapping (torch -> .npz key):
  X.conv.weight [out, in, kh, kw]  -> X/conv/kernel [kh, kw, in, out]
  X.bn.weight / bias               -> X/bn/scale / X/bn/bias
  X.bn.running_mean / running_var  -> X/bn/mean / X/bn/var
  X.bn.num_batches_tracked         -> dropped (training bookkeeping)
  fc.weight [1008, 2048]           -> fc/kernel [2048, 1008];  fc.bias -> fc/bias
`convert_state_dict` does this on a dict of NumPy arrays, without torch.
"""
import argparse
import hashlib
import os
import sys
import tempfile
from typing import Dict, Mapping

import numpy as np

EXPECTED_SHA256_PREFIX = "6726825d"  # In the file name, as torch.hub names its downloads.

_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def convert_name(name: str):
  """torch state-dict key -> (.npz key, transpose axes or None); None for keys to drop.

  Raises ValueError for a key that is not part of the FID Inception.
  """
  parts = name.split(".")
  if len(parts) >= 3 and parts[-2] == "conv" and parts[-1] == "weight":
    return "/".join(parts[:-1] + ["kernel"]), (2, 3, 1, 0)
  if len(parts) >= 3 and parts[-2] == "bn":
    if parts[-1] == "num_batches_tracked":
      return None
    if parts[-1] in _BN_NAMES:
      return "/".join(parts[:-1] + [_BN_NAMES[parts[-1]]]), None
  if name == "fc.weight":
    return "fc/kernel", (1, 0)
  if name == "fc.bias":
    return "fc/bias", None
  raise ValueError(f"Unexpected key {name!r} in the weights: the FID Inception only has "
                   "'*.conv.weight', '*.bn.{weight,bias,running_mean,running_var,"
                   "num_batches_tracked}', 'fc.weight' and 'fc.bias' (is this "
                   "pt_inception-2015-12-05-6726825d.pth?).")


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """A torch-style state dict of NumPy arrays -> {".npz key": float32 array} in Flax layout."""
  out = {}
  for name, value in state_dict.items():
    mapped = convert_name(name)
    if mapped is None:
      continue
    key, axes = mapped
    value = np.asarray(value)
    expected_ndim = 1 if axes is None else len(axes)
    if value.ndim != expected_ndim:
      raise ValueError(f"Key {name!r} has shape {value.shape}; a {expected_ndim}-D array was "
                       "expected.")
    if axes is not None:
      value = np.transpose(value, axes)
    out[key] = np.ascontiguousarray(value, dtype=np.float32)
  return out


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input", required=True, help="pt_inception-2015-12-05-6726825d.pth")
  parser.add_argument("--output", required=True, help="the .npz to write")
  args = parser.parse_args(argv)

  if not os.path.isfile(args.input):
    sys.exit(f"Input file {args.input!r} does not exist; docs/inception_weights.md says where "
             "to download pt_inception-2015-12-05-6726825d.pth.")
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    sys.exit("The converter needs PyTorch to read the .pth file: pip install torch "
             "(any recent CPU build; only the converter uses it).")
  # The model's shapes, to check the result against, come from the package in this checkout.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from ddpm_jax.inception import count_params, variables_from_flat  # pylint: disable=import-outside-toplevel

  digest = sha256_of(args.input)
  if not digest.startswith(EXPECTED_SHA256_PREFIX):
    print(f"WARNING: SHA-256 {digest} of {args.input} does not start with "
          f"{EXPECTED_SHA256_PREFIX}: this is not the standard pytorch-fid file, and FID values "
          "computed with it are not comparable with published ones.", file=sys.stderr)

  state_dict = torch.load(args.input, map_location="cpu", weights_only=True)
  if not isinstance(state_dict, Mapping):
    sys.exit(f"{args.input!r} does not hold a state dict (got {type(state_dict).__name__}).")
  arrays = convert_state_dict(
      {k: v.detach().cpu().numpy() for k, v in state_dict.items()})
  variables_from_flat(arrays, source=f"The converted {args.input!r}")  # Keys and shapes.

  out_dir = os.path.dirname(os.path.abspath(args.output))
  os.makedirs(out_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp_inception_", suffix=".npz")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, args.output)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  print(f"Wrote {args.output}: {len(arrays)} arrays, {count_params():,} trainable parameters "
        f"plus BatchNorm statistics; source SHA-256 {digest}.")


if __name__ == "__main__":
  main()
