"""ddpm_jax/pth.py: torch's .pth files read without torch, and nothing else read at all.

torch_zip.pth and torch_legacy.pth in tests/fixtures/pytorch_fid were written by torch.save
itself (benchmarks/pytorch_fid_fixture.py, which also checks that torch.load reads what
`write_state_dict` writes); here the reader must give back expected.npz exactly.
"""
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from ddpm_jax import pth

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "pytorch_fid")


@pytest.mark.parametrize("name", ["torch_zip.pth", "torch_legacy.pth"])
def test_reads_torch_save_output_in_both_formats(name):
  path = os.path.join(FIXTURES, name)
  assert zipfile.is_zipfile(path) == (name == "torch_zip.pth")
  got = pth.read_state_dict(path)
  with np.load(os.path.join(FIXTURES, "expected.npz")) as f:
    expected = {k: f[k] for k in f.files}
  assert sorted(got) == sorted(expected)
  for key, value in expected.items():
    assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  # A module's state dict (BatchNorm2d's, with torch's _metadata attribute) ...
  assert got["num_batches_tracked"].shape == () and got["running_var"].tolist() == [1.0, 1.0]
  # ... and views of one storage: a transpose (strides) and a slice (offset) of "base".
  np.testing.assert_array_equal(got["transposed"], got["base"].T)
  np.testing.assert_array_equal(got["slice"], got["base"][1:3, 2:5])


@pytest.mark.parametrize("legacy", [False, True])
def test_writer_round_trip(tmp_path, legacy):
  rng = np.random.default_rng(0)
  arrays = {"conv.weight": rng.standard_normal((4, 3, 2, 2)).astype(np.float32),
            "bn.num_batches_tracked": np.array(3, np.int64),
            "half": rng.standard_normal(5).astype(np.float16),
            "bf16": rng.standard_normal(3).astype(ml_dtypes.bfloat16),
            "double": rng.standard_normal((2, 2)), "mask": np.array([True, False, True])}
  path = tmp_path / "w.pth"
  pth.write_state_dict(path, arrays, legacy=legacy)
  assert zipfile.is_zipfile(path) != legacy
  got = pth.read_state_dict(path)
  assert list(got) == list(arrays)
  for key, value in arrays.items():
    assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)


class _RunsACommand:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def _zip_with_pickle(path, payload: bytes):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", payload)
    z.writestr("archive/version", "3\n")


def _legacy_with_pickle(path, payload: bytes):
  with open(path, "wb") as f:
    for header in (pth.LEGACY_MAGIC, pth.LEGACY_PROTOCOL, {"little_endian": True}):
      pickle.dump(header, f, protocol=2)
    f.write(payload)
    pickle.dump([], f, protocol=2)


@pytest.mark.parametrize("write", [_zip_with_pickle, _legacy_with_pickle])
def test_code_in_the_pickle_is_refused_without_running(tmp_path, write):
  marker = tmp_path / "ran"
  payload = pickle.dumps({"fc.weight": _RunsACommand(marker)}, protocol=2)
  path = tmp_path / "evil.pth"
  write(path, payload)
  with pytest.raises(pth.UnsafeFileError, match=r"names posix\.system"):
    pth.read_state_dict(path)
  assert not marker.exists()
  # Through the Inception loader: one sentence naming the file, a UserError (exit 2).
  from ddpm_jax import inception
  from ddpm_jax.errors import UserError
  with pytest.raises(UserError, match=f"{path}.*refused.*posix.system"):
    inception.load_inception_params(path)
  assert not marker.exists()


@pytest.mark.parametrize("obj, message", [
    ([1, 2], "holds a list, not a state dict"),
    ({"a": 1.5}, "entry 'a' is a float, not a tensor"),
    ({"a": {"b": 1}}, "entry 'a' is a dict"),
])
def test_non_tensor_contents_are_refused(tmp_path, obj, message):
  path = tmp_path / "x.pth"
  _zip_with_pickle(path, pickle.dumps(obj, protocol=2))
  with pytest.raises(pth.UnsafeFileError, match=message):
    pth.read_state_dict(path)


def test_builtins_and_unknown_storages_are_refused(tmp_path):
  path = tmp_path / "x.pth"
  _zip_with_pickle(path, b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.")
  with pytest.raises(pth.UnsafeFileError, match=r"names builtins\.eval"):
    pth.read_state_dict(path)
  _zip_with_pickle(path, b"\x80\x02ctorch\nComplexFloatStorage\n.")
  with pytest.raises(pth.UnsafeFileError, match="ComplexFloatStorage"):
    pth.read_state_dict(path)


def test_truncated_and_foreign_files_are_refused(tmp_path):
  arrays = {"w": np.arange(100, dtype=np.float32)}
  for legacy in (False, True):
    path = tmp_path / f"t{legacy}.pth"
    pth.write_state_dict(path, arrays, legacy=legacy)
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    with pytest.raises(pth.UnsafeFileError):
      pth.read_state_dict(path)
  path = tmp_path / "text.pth"
  path.write_bytes(b"hello, not a checkpoint")
  with pytest.raises(pth.UnsafeFileError):
    pth.read_state_dict(path)
  # A record whose view reaches past its storage.
  pth.write_state_dict(tmp_path / "ok.pth", {"w": np.zeros(4, np.float32)})
  with zipfile.ZipFile(tmp_path / "ok.pth") as z:
    pkl = z.read("ok/data.pkl")
  # The second int64 4 in the pickle is the size (4,) (the first is the storage's numel).
  at = pkl.index(struct.pack("<q", 4), pkl.index(struct.pack("<q", 4)) + 1)
  big = pkl[:at] + struct.pack("<q", 40) + pkl[at + 8:]
  assert big != pkl
  _zip_with_pickle(tmp_path / "past.pth", big)
  with zipfile.ZipFile(tmp_path / "past.pth", "a") as z:
    z.writestr("archive/data/0", np.zeros(4, np.float32).tobytes())
  with pytest.raises(pth.UnsafeFileError, match=r"size \(40,\) reaches past its storage"):
    pth.read_state_dict(tmp_path / "past.pth")
