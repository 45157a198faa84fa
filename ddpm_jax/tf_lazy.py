"""TensorFlow and tensorflow-datasets for the input pipeline, imported on first use.

The model, the train step, sampling and the benchmarks on synthetic data run where TensorFlow is
not installed (e.g. a bare GPU image); only reading data imports it. On import, TensorFlow is
kept off the GPUs: JAX owns them.
"""
from etils import epy


def _keep_tf_off_the_gpus(_module_name: str) -> None:
  import tensorflow  # pylint: disable=import-outside-toplevel  (already imported by now)
  try:  # TF must not allocate GPU memory that JAX needs; harmless on CPU-only TF.
    tensorflow.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices elsewhere; too late to hide them.
    pass


with epy.lazy_imports(
    error_callback="ddpm_jax's input pipeline needs tensorflow and tensorflow-datasets: "
                   "pip install -r requirements.txt",
    success_callback=_keep_tf_off_the_gpus):
  import tensorflow as tf  # noqa: F401  (re-exported)
  import tensorflow_datasets as tfds  # noqa: F401  (re-exported)
