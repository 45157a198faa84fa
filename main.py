"""ddpm_jax's command line from a checkout: `python main.py --config=configs/cifar10.py
--workdir=/path/to/run [--mode=sample|eval]`. The program is ddpm_jax/cli.py (installed, the
same program is the `ddpm-jax` command); `python main.py --help` lists the flags."""
from ddpm_jax import cli
from ddpm_jax.cli import *  # pylint: disable=wildcard-import,unused-wildcard-import

if __name__ == "__main__":
  cli.run()
