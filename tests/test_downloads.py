"""ddpm_jax/downloads.py against an HTTP server on 127.0.0.1 that each test starts and stops."""
import hashlib
import http.server
import os
import socket
import threading

import pytest

from ddpm_jax import downloads
from ddpm_jax.errors import UserError

CONTENT = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(CONTENT).hexdigest()


class _Server:
  """Serves `content` at any path, honours "Range: bytes=N-", and can cut the body short."""

  def __init__(self, content, cut_after=None):
    self.content, self.cut_after, self.requests = content, cut_after, []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):
        server.requests.append(dict(self.headers, path=self.path))
        start = 0
        if self.headers.get("Range", "").startswith("bytes="):
          start = int(self.headers["Range"][6:].split("-")[0])
        body = server.content[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cut_after is not None:
          self.wfile.write(body[:server.cut_after])  # then the connection closes
          server.cut_after = None
          self.close_connection = True
          return
        self.wfile.write(body)

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/weights.pth"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.httpd.shutdown()
    self.httpd.server_close()
    self.thread.join()


def _asset(sha=SHA):
  return downloads.Asset(name="weights.pth", url="http://unused.invalid/weights.pth",
                         sha256=sha, field="config.eval.inception_weights")


def test_fetch_then_cache_hit(tmp_path):
  with _Server(CONTENT) as server:
    path = downloads.fetch(_asset(), cache=str(tmp_path), url=server.url)
    assert path == str(tmp_path / "weights.pth")
    assert open(path, "rb").read() == CONTENT
    assert not os.path.exists(path + ".part") and len(server.requests) == 1
    # Verified from the cache, no request; a prefix of the hash (torch.hub's names) suffices.
    assert downloads.fetch(_asset(SHA[:8]), cache=str(tmp_path), url=server.url) == path
    assert len(server.requests) == 1


def test_cache_folder_from_the_environment(tmp_path, monkeypatch):
  monkeypatch.setenv(downloads.CACHE_ENV, str(tmp_path / "shared"))
  assert downloads.cache_dir() == str(tmp_path / "shared")
  monkeypatch.delenv(downloads.CACHE_ENV)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert downloads.cache_dir() == str(tmp_path / "xdg" / "ddpm_jax")
  with _Server(CONTENT) as server:  # DDPM_JAX_MIRROR: <mirror>/<name> instead of asset.url
    monkeypatch.setenv(downloads.MIRROR_ENV, server.url.rsplit("/", 1)[0] + "/")
    assert downloads.fetch(_asset()) == str(tmp_path / "xdg" / "ddpm_jax" / "weights.pth")
    assert server.requests and open(downloads.fetch(_asset()), "rb").read() == CONTENT


def test_interrupted_download_resumes(tmp_path):
  cut = 300_000
  with _Server(CONTENT, cut_after=cut) as server:
    with pytest.raises(UserError) as e:
      downloads.fetch(_asset(), cache=str(tmp_path), url=server.url)
    kept = (tmp_path / "weights.pth.part").stat().st_size
    assert 0 < kept <= cut  # whole network chunks
    assert f"{kept} bytes kept" in str(e.value) and "the next run resumes" in str(e.value)
    assert not (tmp_path / "weights.pth").exists()  # never looks complete
    path = downloads.fetch(_asset(), cache=str(tmp_path), url=server.url)
    assert server.requests[-1]["Range"] == f"bytes={kept}-"
    assert open(path, "rb").read() == CONTENT


def test_hash_mismatch_is_one_sentence_with_both_hashes(tmp_path):
  other = CONTENT[::-1]
  with _Server(other) as server:
    with pytest.raises(UserError) as e:
      downloads.fetch(_asset(), cache=str(tmp_path), url=server.url)
  message = str(e.value)
  assert hashlib.sha256(other).hexdigest() in message and SHA in message
  assert "--config.eval.inception_weights=" in message and message.count(". ") == 0
  assert os.listdir(tmp_path) == ["weights.pth.lock"]  # nothing left that looks like the file


def test_offline_names_the_address_the_cache_and_the_flag(tmp_path):
  with socket.socket() as s:  # a port with nothing listening
    s.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{s.getsockname()[1]}/weights.pth"
  with pytest.raises(UserError) as e:
    downloads.fetch(_asset(), cache=str(tmp_path), url=url, timeout=5)
  message = str(e.value)
  assert url in message and str(tmp_path) in message
  assert "--config.eval.inception_weights=/path/to/weights.pth" in message
  assert "\n" not in message


def test_damaged_cache_file_is_moved_aside(tmp_path):
  (tmp_path / "weights.pth").write_bytes(b"not the file")
  with pytest.raises(UserError, match="The cached .* has SHA-256 .* moved to"):
    downloads.fetch(_asset(), cache=str(tmp_path), url="http://127.0.0.1:9/never")
  assert (tmp_path / "weights.pth.part.bad").read_bytes() == b"not the file"
