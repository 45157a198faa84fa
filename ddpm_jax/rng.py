"""Keys that may be one PRNG key or one key per example, so a draw can depend on the example alone.

A "key batch" is a [B] array of typed keys (or [B, 2] raw uint32 keys): row b of every draw then
comes from key[b] only, which makes samples and bound estimates independent of how a batch is
split over devices and hosts.
"""
import jax
import jax.numpy as jnp


def is_key_batch(key) -> bool:
  """Whether `key` holds one key per example rather than a single key."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key.ndim == 1
  return key.ndim == 2  # raw uint32 keys: [2] for one key, [B, 2] for a batch


def fold_in(key, data):
  """jax.random.fold_in on one key, or on every key of a key batch."""
  if is_key_batch(key):
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, data)
  return jax.random.fold_in(key, data)


def normal(key, shape, dtype=jnp.float32):
  """Standard normal noise of `shape`; with a key batch, row b is drawn from key[b] alone."""
  if is_key_batch(key):
    if key.shape[0] != shape[0]:
      raise ValueError(f"A batch of {key.shape[0]} keys cannot draw {shape[0]} examples; pass one "
                       "key or one key per example.")
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(key)
  return jax.random.normal(key, shape, dtype)
