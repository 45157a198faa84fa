"""Files a run needs from the internet (the FID Inception weights), fetched once into a cache.

    path = downloads.fetch(downloads.INCEPTION_WEIGHTS)   # ~/.cache/ddpm_jax/pt_inception-...pth

- The cache is $DDPM_JAX_CACHE if set (e.g. a shared disk of a TPU pod), else
  $XDG_CACHE_HOME/ddpm_jax, else ~/.cache/ddpm_jax. A file already there is verified and used.
- A download goes to `<name>.part` and is renamed to `<name>` only after its SHA-256 checked, so a
  broken download never looks complete; an interrupted one is resumed (an HTTP Range request)
  by the next fetch.
- `<name>.lock` (a POSIX lock) lets one process download while the others wait, then read the
  cache: the hosts of a multi-host run that share the cache download the file once.
- $DDPM_JAX_MIRROR, if set, is a base address (an internal server) from which `<name>` is fetched
  instead of the public address.
- Offline, a failed download or a hash mismatch is one sentence (a UserError) naming the address,
  the cache path and the config field that takes a local file instead.

HTTP is `requests` (which tensorflow-datasets already brings); tfds' own download manager is
built around dataset checksum files and its own cache layout, and etils has no downloader.
"""
import contextlib
import dataclasses
import fcntl
import hashlib
import os
from typing import Optional

import requests

from ddpm_jax.errors import UserError

CACHE_ENV = "DDPM_JAX_CACHE"
MIRROR_ENV = "DDPM_JAX_MIRROR"  # a base address serving the files by name, used instead
CHUNK = 1 << 20
NETWORK_CHUNK = 1 << 16  # what an interrupted download keeps is a multiple of this


@dataclasses.dataclass(frozen=True)
class Asset:
  """A file to fetch: its cache name, address, expected SHA-256 (hex; where only a published
  prefix is known -- torch.hub's `name-<prefix>.pth` convention -- that prefix) and the config
  field that takes a local copy instead."""
  name: str
  url: str
  sha256: str
  field: str


# pytorch-fid's port of the TF FID Inception (pytorch_fid.inception.FID_WEIGHTS_URL). Its
# publisher gives no full SHA-256; the file name carries the prefix that torch.hub checks.
INCEPTION_WEIGHTS = Asset(
    name="pt_inception-2015-12-05-6726825d.pth",
    url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth",
    sha256="6726825d",
    field="config.eval.inception_weights")


def cache_dir() -> str:
  """$DDPM_JAX_CACHE, else $XDG_CACHE_HOME/ddpm_jax, else ~/.cache/ddpm_jax (not created)."""
  if os.environ.get(CACHE_ENV):
    return os.path.expanduser(os.environ[CACHE_ENV])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "ddpm_jax")


def sha256_of(path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(CHUNK), b""):
      digest.update(block)
  return digest.hexdigest()


def matches(digest: str, expected: str) -> bool:
  return digest.lower().startswith(expected.lower())


@contextlib.contextmanager
def _locked(path: str):
  with open(path, "a+b") as f:
    fcntl.lockf(f, fcntl.LOCK_EX)  # blocks while another process holds it
    try:
      yield
    finally:
      fcntl.lockf(f, fcntl.LOCK_UN)


def _expected(asset: Asset) -> str:
  return asset.sha256 if len(asset.sha256) == 64 else f"one starting with {asset.sha256}"


def _download(asset: Asset, url: str, part: str, timeout: float) -> None:
  """Append the rest of `url` to `part` (from its current size, by a Range request)."""
  have = os.path.getsize(part) if os.path.exists(part) else 0
  headers = {"Range": f"bytes={have}-"} if have else {}
  with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
    if r.status_code == 416:  # nothing left to fetch: `part` holds the whole file already
      return
    r.raise_for_status()
    resumed = have and r.status_code == 206
    with open(part, "ab" if resumed else "wb") as f:
      for block in r.iter_content(NETWORK_CHUNK):
        f.write(block)
      f.flush()
      os.fsync(f.fileno())


def fetch(asset: Asset, *, cache: Optional[str] = None, url: Optional[str] = None,
          timeout: float = 60.0) -> str:
  """The local path of `asset` in the cache, downloaded (or resumed) and verified if needed.

  url: another address for the same file (default: $DDPM_JAX_MIRROR/<name> if set, else
  asset.url). Raises UserError
  with one sentence when the download fails or the file's SHA-256 does not match.
  """
  cache = cache_dir() if cache is None else cache
  if url is None:
    mirror = os.environ.get(MIRROR_ENV)
    url = f"{mirror.rstrip('/')}/{asset.name}" if mirror else asset.url
  target = os.path.join(cache, asset.name)
  part = target + ".part"
  instead = (f"copy {asset.name} there from a machine with internet, or pass "
             f"--{asset.field}=/path/to/{asset.name}")
  try:
    os.makedirs(cache, exist_ok=True)
  except OSError as e:
    raise UserError(f"Cannot create the download cache {cache} ({e.strerror}); set "
                     f"{CACHE_ENV} to a writable folder, or pass --{asset.field}=/path/to/"
                     f"{asset.name}.") from e
  with _locked(target + ".lock"):
    if os.path.exists(target):
      digest = sha256_of(target)
      if matches(digest, asset.sha256):
        return target
      os.replace(target, part + ".bad")  # kept aside, never deleted unread
      raise UserError(f"The cached {target} has SHA-256 {digest}, expected "
                       f"{_expected(asset)}; it was moved to {part}.bad: {instead}.")
    try:
      _download(asset, url, part, timeout)
    except (requests.RequestException, OSError) as e:
      done = os.path.getsize(part) if os.path.exists(part) else 0
      kept = f" ({done} bytes kept in {part}; the next run resumes)" if done else ""
      raise UserError(f"Could not download {url} into {cache} ({type(e).__name__}){kept}: "
                       f"{instead}.") from e
    digest = sha256_of(part)
    if not matches(digest, asset.sha256):
      os.remove(part)
      raise UserError(f"The download of {url} has SHA-256 {digest}, expected "
                       f"{_expected(asset)}; it was deleted: {instead}.")
    os.replace(part, target)
  return target
