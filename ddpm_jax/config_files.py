"""Where the command line finds config files, in a checkout and in an installed package.

In a checkout the configs are the files of configs/ beside the package; an installed package
carries the same files as ddpm_jax.configs (pyproject.toml maps the folder there). A config file
imports its siblings as `from configs import default`, so before config_flags runs it, the
`configs` of its folder is made importable.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from typing import List, Optional

CONFIG_FLAG = re.compile(r"^--?config(?:=(.*))?$")  # --config=value (group 1) or --config value
_CHECKOUT_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "configs")


def configs_dir() -> str:
  """The folder of the shipped configs: ddpm_jax.configs where the package is installed (an
  editable install maps it to the checkout's configs/), else the checkout's configs/."""
  try:
    module = importlib.import_module("ddpm_jax.configs")
  except ImportError:
    return _CHECKOUT_CONFIGS
  return os.path.dirname(os.path.abspath(module.__file__))


def resolve(value: str) -> str:
  """A --config value as a path: `cifar10` or `configs/cifar10.py` names the shipped file where
  no such file exists (as for the `ddpm-jax` command outside a checkout); anything else, and a
  `path:argument` suffix, is kept as given."""
  path, sep, argument = value.partition(":")
  if os.path.exists(path):
    return value
  name = os.path.basename(path)
  name = name[:-3] if name.endswith(".py") else name
  if os.path.dirname(path) not in ("", "configs") or not re.fullmatch(r"\w+", name):
    return value
  shipped = os.path.join(configs_dir(), f"{name}.py")
  return shipped + sep + argument if os.path.exists(shipped) else value


def make_importable(config_file: str) -> None:
  """Lets a config file in a folder named configs run `from configs import <sibling>`: the
  folder's parent goes first on sys.path, or, for the installed package's own configs,
  `configs` becomes another name of ddpm_jax.configs. Nothing changes while a `configs`
  package is already imported, or for a file in a folder of another name."""
  folder = os.path.dirname(os.path.abspath(config_file.partition(":")[0]))
  if os.path.basename(folder) != "configs" or "configs" in sys.modules:
    return
  shipped = configs_dir()
  if folder == shipped and shipped != _CHECKOUT_CONFIGS:
    sys.modules["configs"] = importlib.import_module("ddpm_jax.configs")
  elif os.path.dirname(folder) not in sys.path:
    sys.path.insert(0, os.path.dirname(folder))


def shipped_config(name: str):
  """configs/<name>.py's get_config(): the checkout's, or the installed package's."""
  make_importable(os.path.join(configs_dir(), f"{name}.py"))
  return importlib.import_module(f"configs.{name}").get_config()


def with_resolved_config(argv: List[str], pattern: re.Pattern = CONFIG_FLAG) -> List[str]:
  """argv with its --config value resolved (see `resolve`), the config's folder importable.
  pattern: matches `--config[=value]` with the value as group 1 (else the next argument)."""
  argv = list(argv)
  for i, arg in enumerate(argv[1:], start=1):
    m = pattern.match(arg)
    if not m:
      continue
    value: Optional[str] = m.group(1) if m.group(1) is not None else (
        argv[i + 1] if i + 1 < len(argv) else None)
    if value is None:
      break
    path = resolve(value)
    if m.group(1) is not None:
      argv[i] = f"--config={path}"
    else:
      argv[i + 1] = path
    make_importable(path)
    break
  return argv
