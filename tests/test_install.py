"""The package as a user installs it: `pip install <checkout>` and `pip install -e <checkout>`
into a fresh virtual environment, then `import ddpm_jax` and the `ddpm-jax` command from
elsewhere, including beside a clone folder named ddpm_jax.

Fast and offline: the checkout is copied (as a clone would be), built without build isolation
or dependencies, and the environment sees this one's packages through a .pth file.
"""
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NOT_A_CLONE = shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                      ".pytest_cache", "venv*", ".venv")
_REPORT = ("import ddpm_jax, ddpm_jax.configs; print(ddpm_jax.__file__); "
           "print(ddpm_jax.configs.__file__); print(ddpm_jax.__version__); "
           "print(callable(ddpm_jax.load) and callable(ddpm_jax.sample))")


def _venv(path):
  """A virtual environment without pip that sees this environment's packages after its own."""
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
  python = os.path.join(path, "bin", "python")
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        check=True, capture_output=True, text=True).stdout.strip()
  parents = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
  with open(os.path.join(site, "_this_environment.pth"), "w") as f:
    f.write("\n".join(sorted(parents)) + "\n")
  return python, site


def _pip_install(python, *args):
  proc = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
                         "--no-build-isolation", "--no-deps", *args],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _run(python, code_or_args, cwd):
  args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return subprocess.run([python, *args] if python else args, cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
  """A copy of the checkout in a folder named ddpm_jax, as `git clone <url>` would make it."""
  path = tmp_path_factory.mktemp("clone") / "ddpm_jax"
  shutil.copytree(ROOT, path, ignore=_NOT_A_CLONE)
  return path


def test_an_installed_package_imports_from_anywhere_and_its_command_finds_the_configs(
    clone, tmp_path):
  python, site = _venv(tmp_path / "venv")
  _pip_install(python, str(clone))
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  # From an unrelated folder, and from the folder that holds the clone named ddpm_jax (which
  # shadowed the package before it was installed).
  for cwd in (elsewhere, clone.parent):
    proc = _run(python, _REPORT, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    package, configs, version, api = proc.stdout.split()
    assert package == os.path.join(site, "ddpm_jax", "__init__.py")
    assert configs == os.path.join(site, "ddpm_jax", "configs", "__init__.py")
    assert version == _version() and api == "True"
  # The console script reads a shipped config by name, or by its checkout path where no such
  # file is; a run that does not exist is then the user's one-sentence mistake (exit 2).
  command = os.path.join(tmp_path, "venv", "bin", "ddpm-jax")
  for config in ("digits", "configs/digits.py"):
    proc = _run(None, [command, f"--config={config}", f"--workdir={tmp_path / 'no-run'}",
                       "--mode=sample", "--config.sampling.num_samples=4"], elsewhere)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert str(tmp_path / "no-run") in proc.stderr
  assert not (tmp_path / "no-run").exists()


def test_an_editable_install_imports_the_checkouts_files(clone, tmp_path):
  python, _ = _venv(tmp_path / "venv")
  _pip_install(python, "--editable", str(clone))
  proc = _run(python, _REPORT, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  package, configs, _, api = proc.stdout.split()
  assert package == str(clone / "ddpm_jax" / "__init__.py")
  assert configs == str(clone / "configs" / "__init__.py") and api == "True"


def _version():
  with open(os.path.join(ROOT, "ddpm_jax", "__init__.py")) as f:
    return next(line.split('"')[1] for line in f if line.startswith("__version__"))
