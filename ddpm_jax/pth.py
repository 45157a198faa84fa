"""Read and write PyTorch `.pth` state dicts as NumPy arrays, without torch and without running
pickled code.

    arrays = read_state_dict("pt_inception-2015-12-05-6726825d.pth")  # {"fc.weight": ndarray}
    write_state_dict("weights.pth", arrays)                 # torch.load can read it back

A `.pth` is a pickle that names functions for the unpickler to call. This reader's unpickler
resolves only the names of a plain state dict -- `collections.OrderedDict`, torch's tensor
rebuild functions and its typed storage classes -- to stand-ins of its own (torch is never
imported); any other name (`os.system`, `builtins.eval`, ...) is refused before anything is
called, and so is a pickle that builds anything but a dict of arrays.

Both of torch's formats are read:
- zip (torch >= 1.6, the default): `<name>/data.pkl` plus one raw record per storage,
  `<name>/data/<key>`, in the byte order of `<name>/byteorder` (little-endian if absent);
- legacy (`_use_new_zipfile_serialization=False`, and every file saved before torch 1.6): five
  consecutive pickles -- magic number, protocol version 1001, system info, the object, the sorted
  storage keys -- followed by each storage as an int64 element count and its raw bytes.

Only this module's job is the file format: it returns torch's names and layouts unchanged
(e.g. conv weights [out, in, kh, kw]).
"""
import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Dict, Mapping

import numpy as np

try:  # bfloat16 for NumPy; JAX brings it (the fixture script reads files without it)
  import ml_dtypes
except ImportError:  # pragma: no cover
  ml_dtypes = None

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION

# torch's typed storage classes -> element dtype (little-endian).
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"), "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
    **({"BFloat16Storage": np.dtype(ml_dtypes.bfloat16)} if ml_dtypes else {}),
}
_STORAGE_OF_DTYPE = {v: k for k, v in STORAGE_DTYPES.items()}


class UnsafeFileError(pickle.UnpicklingError):
  """The pickle names something other than a state dict's tensors, or is malformed."""


class _StorageType:
  """Stands in for torch.FloatStorage etc.: only carries the element dtype."""

  def __init__(self, name: str):
    self.name, self.dtype = name, STORAGE_DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """Stand-in for torch._utils._rebuild_tensor(_v2): a strided view of a storage, copied."""
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise UnsafeFileError("a tensor record does not refer to a storage")
  try:
    offset, size, stride = int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)
  except (TypeError, ValueError) as e:
    raise UnsafeFileError(f"a tensor record has a malformed offset, size or stride ({e})")
  if len(size) != len(stride) or min(size + stride + (offset,), default=0) < 0:
    raise UnsafeFileError(f"a tensor record has size {size} and stride {stride}")
  if all(size):
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.shape[0]:
      raise UnsafeFileError(f"a tensor of size {size} reaches past its storage of "
                            f"{storage.shape[0]} elements")
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], size, tuple(s * storage.itemsize for s in stride), writeable=False)
    return np.array(view)
  return np.zeros(size, storage.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  """Stand-in for torch._utils._rebuild_parameter(_with_state): the data itself."""
  if not isinstance(data, np.ndarray):
    raise UnsafeFileError("a parameter record does not hold a tensor")
  return data


_REBUILD_TENSOR = (("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"))
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
  """Resolves only `_ALLOWED` names; storages come from `load_storage(dtype, key, numel)`."""

  def __init__(self, file, load_storage, rebuild=None):
    super().__init__(file)
    self._load_storage, self._rebuild = load_storage, rebuild

  def find_class(self, module, name):
    if self._rebuild is not None and (module, name) in _REBUILD_TENSOR:
      return self._rebuild
    try:
      return _ALLOWED[(module, name)]
    except (KeyError, TypeError):
      raise UnsafeFileError(f"it names {module}.{name}, which is not part of a state dict of "
                            "tensors") from None

  def persistent_load(self, pid):
    # zip: ("storage", type, key, location, numel); legacy: the same + view metadata (None).
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
            and isinstance(pid[4], int) and pid[4] >= 0):
      raise UnsafeFileError(f"it holds a persistent record {pid!r:.80} that is not a storage")
    if len(pid) == 6 and pid[5] is not None:
      raise UnsafeFileError("it holds a storage view (torch < 0.4), which is not supported")
    return self._load_storage(pid[1].dtype, pid[2], pid[4])


def _check_state_dict(obj) -> Dict[str, np.ndarray]:
  if not isinstance(obj, dict):
    raise UnsafeFileError(f"it holds a {type(obj).__name__}, not a state dict")
  for key, value in obj.items():
    if not isinstance(key, str) or not isinstance(value, np.ndarray):
      raise UnsafeFileError(f"its entry {key!r:.60} is a {type(value).__name__}, not a tensor")
  return dict(obj)


def _read_zip(f) -> Dict[str, np.ndarray]:
  with zipfile.ZipFile(f) as z:
    names = z.namelist()
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
      raise UnsafeFileError("its zip archive has no <name>/data.pkl record")
    prefix = pkl[0][:-len("data.pkl")]
    order = "<"
    if prefix + "byteorder" in names:
      order = "<" if z.read(prefix + "byteorder").strip() == b"little" else ">"
    storages = {}

    def load_storage(dtype, key, numel):
      if key not in storages:
        record = prefix + "data/" + key
        if record not in names:
          raise UnsafeFileError(f"its storage record {record!r} is missing")
        raw = z.read(record)
        if len(raw) < numel * dtype.itemsize:
          raise UnsafeFileError(f"its storage record {record!r} is truncated")
        storages[key] = np.frombuffer(raw, dtype.newbyteorder(order), numel).astype(dtype)
      return storages[key]

    return _Unpickler(io.BytesIO(z.read(pkl[0])), load_storage).load()


def _read_legacy(f) -> Dict[str, np.ndarray]:
  def no_storage(*_):
    raise UnsafeFileError("its header holds a storage")

  def header():
    return _Unpickler(f, no_storage).load()

  if header() != LEGACY_MAGIC:
    raise UnsafeFileError("it is neither a zip archive nor a legacy torch file (magic number)")
  if header() != LEGACY_PROTOCOL:
    raise UnsafeFileError("its legacy protocol version is not 1001")
  info = header()
  order = "<" if not isinstance(info, dict) or info.get("little_endian", True) else ">"
  # The storages follow the object's pickle: a first pass over it collects their keys, dtypes
  # and sizes (its tensors built from empty stand-ins), a second one builds the tensors.
  start = f.tell()
  wanted = {}

  def note_storage(dtype, key, numel):
    if wanted.setdefault(key, (dtype, numel)) != (dtype, numel):
      raise UnsafeFileError(f"its storage {key!r} is used with two dtypes or sizes")
    return np.zeros(0, dtype)

  _Unpickler(f, note_storage, rebuild=lambda storage, *_: storage).load()
  keys = header()
  if not isinstance(keys, list) or sorted(keys) != sorted(wanted):
    raise UnsafeFileError("its list of storage keys does not match its tensors")
  storages = {}
  for key in keys:
    dtype, numel = wanted[key]
    count = f.read(8)
    if len(count) != 8:
      raise UnsafeFileError(f"it is truncated before storage {key!r}")
    (stored,) = struct.unpack(order + "q", count)
    if stored != numel:
      raise UnsafeFileError(f"its storage {key!r} holds {stored} elements, {numel} expected")
    raw = f.read(numel * dtype.itemsize)
    if len(raw) != numel * dtype.itemsize:
      raise UnsafeFileError(f"it is truncated inside storage {key!r}")
    storages[key] = np.frombuffer(raw, dtype.newbyteorder(order)).astype(dtype)
  f.seek(start)
  return _Unpickler(f, lambda dtype, key, numel: storages[key]).load()


def read_state_dict(path) -> Dict[str, np.ndarray]:
  """{name: numpy array} of a torch `.pth` state dict (zip or legacy format), torch's layouts.

  Raises UnsafeFileError (a pickle.UnpicklingError) for a file that names anything but tensor
  records and OrderedDict, or that is malformed or truncated; nothing it names is ever called.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    try:
      if zipfile.is_zipfile(f):
        f.seek(0)
        obj = _read_zip(f)
      else:
        f.seek(0)
        obj = _read_legacy(f)
    except UnsafeFileError:
      raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, zipfile.BadZipFile, struct.error) as e:
      raise UnsafeFileError(f"it is not a readable torch state dict ({type(e).__name__}: {e})")
  return _check_state_dict(obj)


# ------------------------------------------------------------------------------- writing


def _pickle_state_dict(arrays: Mapping[str, np.ndarray], storage_id) -> bytes:
  """Protocol-2 pickle of OrderedDict{name: tensor record}, as torch.save writes a state dict;
  storage_id(i, array) gives the persistent id's tail after ("storage", type, ...)."""
  out = io.BytesIO()
  w = out.write

  def string(s):
    data = s.encode("utf-8")
    w(pickle.BINUNICODE + struct.pack("<I", len(data)) + data)

  def integer(i):
    w(pickle.LONG1 + bytes([8]) + struct.pack("<q", i))

  def int_tuple(values):
    w(pickle.MARK)
    for v in values:
      integer(v)
    w(pickle.TUPLE)

  def global_(module, name):
    w(pickle.GLOBAL + f"{module}\n{name}\n".encode())

  def ordered_dict():
    global_("collections", "OrderedDict")
    w(pickle.EMPTY_TUPLE + pickle.REDUCE)

  w(pickle.PROTO + bytes([2]))
  ordered_dict()
  w(pickle.MARK)
  for i, (name, a) in enumerate(arrays.items()):
    string(name)
    global_("torch._utils", "_rebuild_tensor_v2")
    w(pickle.MARK)
    w(pickle.MARK)  # the persistent id tuple
    string("storage")
    global_("torch", _STORAGE_OF_DTYPE[a.dtype])
    for item in storage_id(i, a):
      string(item) if isinstance(item, str) else (w(pickle.NONE) if item is None
                                                  else integer(item))
    w(pickle.TUPLE + pickle.BINPERSID)
    integer(0)
    int_tuple(a.shape)
    int_tuple(np.empty(a.shape, np.uint8).strides if a.ndim else ())  # contiguous, elements
    w(pickle.NEWFALSE)
    ordered_dict()
    w(pickle.TUPLE + pickle.REDUCE)
  w(pickle.SETITEMS + pickle.STOP)
  return out.getvalue()


def write_state_dict(path, arrays: Mapping[str, np.ndarray], *, legacy: bool = False) -> None:
  """Write {name: array} as a torch `.pth` that `torch.load(path, weights_only=True)` reads:
  the zip format of torch >= 1.6, or with legacy=True the format before it. Arrays of the
  dtypes of STORAGE_DTYPES; each gets its own contiguous little-endian storage."""
  arrays = {k: np.asarray(v, np.asarray(v).dtype.newbyteorder("<"), order="C")
            for k, v in arrays.items()}  # (not ascontiguousarray: it makes 0-d arrays 1-d)
  for k, a in arrays.items():
    if a.dtype not in _STORAGE_OF_DTYPE:
      raise ValueError(f"{k!r} has dtype {a.dtype}, which torch storages do not hold")
  path = os.fspath(path)
  if legacy:
    with open(path, "wb") as f:
      for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, dict(
          protocol_version=LEGACY_PROTOCOL, little_endian=True,
          type_sizes=dict(short=2, int=4, long=4))):
        pickle.dump(header, f, protocol=2)
      f.write(_pickle_state_dict(arrays, lambda i, a: (str(i), "cpu", a.size, None)))
      pickle.dump([str(i) for i in sorted(range(len(arrays)), key=str)], f, protocol=2)
      values = list(arrays.values())
      for i in sorted(range(len(arrays)), key=str):
        f.write(struct.pack("<q", values[i].size) + values[i].tobytes())
    return
  stem = os.path.splitext(os.path.basename(path))[0] or "archive"
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr(f"{stem}/data.pkl", _pickle_state_dict(arrays, lambda i, a: (str(i), "cpu",
                                                                               a.size)))
    z.writestr(f"{stem}/byteorder", "little")
    for i, a in enumerate(arrays.values()):
      z.writestr(f"{stem}/data/{i}", a.tobytes())
    z.writestr(f"{stem}/version", "3\n")
