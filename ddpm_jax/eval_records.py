"""Evaluation results with the protocol that made them, kept side by side in eval/<step>.json.

    {"step": 3,
     "bpd": {"test-n10000-3f2a9c01d4": {"bpd": 3.70, ..., "protocol": {...}}},
     "fid": {"00000003_ddim100_eta0-n50000-8e1b0c7d22": {"fid": 3.17, ..., "protocol": {...}}}}

Each metric maps a protocol key -- a readable prefix and 10 hex digits of the SHA-256 of the
protocol's canonical JSON -- to its result. A run under another protocol (fewer samples, another
sampler, reference or weights) adds a key beside the others and never replaces them; a rerun of
the same protocol replaces its own entry, which then says so in "note".

A FID/IS protocol records the number of samples, the sampler and its options, the EMA decay,
the seed, the reference statistics (a file and its SHA-256, or dataset + split + count + image
size), the Inception weights' SHA-256, the resize and the package version; `paper_differences`
lists where it departs from the DDPM paper's (50,000 samples, train-split statistics, EMA).
"""
import dataclasses
import datetime
import hashlib
import json
from typing import Dict, List, Optional

import jax
from etils import epath

from ddpm_jax import rundir, settings

PAPER_NUM_SAMPLES = 50_000
RESIZE = ("bilinear to 299x299 as torch F.interpolate(align_corners=False, antialias=False), "
          "gray repeated to RGB")


def _version() -> str:
  from ddpm_jax import __version__  # the package imports this module's importers
  return f"ddpm_jax {__version__}"


def sha256_of_file(path) -> str:
  digest = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def reference_protocol(config) -> Dict:
  """What the FID reference statistics are: a file with its hash, or how they are computed."""
  e, d = config.eval, config.data
  if e.get("fid_reference"):
    return dict(file=str(e.fid_reference), sha256=sha256_of_file(e.fid_reference))
  return dict(dataset=d.dataset, split=e.fid_split, max_examples=int(e.fid_reference_examples),
              image_size=int(d.image_size))


def fid_protocol(config, *, num_samples: int, weights_sha256: str) -> Dict:
  s = settings.Settings.from_config(config)
  return dict(num_samples=int(num_samples), sampling=dataclasses.asdict(s.sampling.chain),
              model_dtype=s.model.dtype, ema_decay=float(config.training.ema_decay),
              seed=int(config.seed), reference=reference_protocol(config),
              inception_weights_sha256=weights_sha256, resize=RESIZE, package=_version())


def bpd_protocol(config, *, split: str, num_examples: int) -> Dict:
  return dict(split=split, num_examples=int(num_examples),
              num_timesteps=int(config.diffusion.num_timesteps),
              ema_decay=float(config.training.ema_decay), seed=int(config.seed),
              package=_version())


def paper_differences(protocol: Dict) -> List[str]:
  """Where a FID protocol departs from the DDPM paper's Table 1 (empty: it does not)."""
  out = []
  if protocol["num_samples"] != PAPER_NUM_SAMPLES:
    out.append(f"{protocol['num_samples']} samples instead of {PAPER_NUM_SAMPLES:,}")
  split = protocol["reference"].get("split")
  if split is not None and split != "train":
    out.append(f"reference statistics of the {split!r} split instead of 'train'")
  if not protocol["ema_decay"]:
    out.append("no EMA of the weights (training.ema_decay=0)")
  return out


def key(prefix: str, protocol: Dict) -> str:
  canonical = json.dumps(protocol, sort_keys=True, separators=(",", ":"))
  return f"{prefix}-{hashlib.sha256(canonical.encode()).hexdigest()[:10]}"


def path(workdir: str, step: int) -> epath.Path:
  return epath.Path(workdir) / "eval" / f"{step:08d}.json"


def merge(workdir: str, step: int, update) -> epath.Path:
  """Applies update(results dict) to workdir/eval/<step>.json on process 0, atomically."""
  p = path(workdir, step)
  if jax.process_index() == 0:
    p.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(p.read_text()) if p.exists() else {"step": step}
    update(data)
    rundir.write_atomically(p, json.dumps(data, indent=2, sort_keys=True) + "\n")
  return p


def record(workdir: str, step: int, metric: str, entry_key: str, result: Dict,
           protocol: Dict) -> Optional[str]:
  """Stores result (with its protocol) under eval/<step>.json[metric][entry_key]; returns a note
  when it replaced an earlier result of the same protocol."""
  note = []

  def update(data):
    entries = data.get(metric)
    if isinstance(entries, dict) and entries and not all(isinstance(v, dict) for v in
                                                         entries.values()):
      entries = {"unrecorded-protocol": entries}  # a result written before protocols were kept
    entries = dict(entries or {})
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    entry = dict(result, protocol=protocol, written=now)
    if entry_key in entries:
      note.append(f"replaces the result of the same protocol written at "
                  f"{entries[entry_key].get('written', 'an unknown time')}")
      entry["note"] = note[0]
    entries[entry_key] = entry
    data[metric] = entries

  merge(workdir, step, update)
  return note[0] if note else None
