"""One-line warnings for settings that a shortened run (a smaller training.num_train_steps on
the command line) silently defeats: a learning-rate warm-up that never ends, a fixed EMA that
still remembers the initialisation, checkpoints, grids or log lines that never come before the
end. Nothing is changed: the run does what its config says, and the user knows what to expect.
"""
from __future__ import annotations

from typing import Any, List

from absl import logging


def warnings_for(config: Any) -> List[str]:
  """The warnings (sentences) for config's training run; [] when nothing is defeated."""
  t, o = config.training, config.optim
  steps = int(t.num_train_steps)
  out = []
  if o.warmup_steps >= steps:
    reached = o.learning_rate * steps / o.warmup_steps
    out.append(f"optim.warmup_steps={o.warmup_steps} is not below training.num_train_steps="
               f"{steps}: the learning rate never reaches optim.learning_rate={o.learning_rate:g} "
               f"(it ends at {reached:.3g}), so expect noisy samples; set e.g. "
               f"--config.optim.warmup_steps={max(1, steps // 10)}.")
  elif o.warmup_steps > steps // 2:
    out.append(f"optim.warmup_steps={o.warmup_steps} is more than half of training.num_train_steps="
               f"{steps}: the learning rate warms up for most of the run; set e.g. "
               f"--config.optim.warmup_steps={max(1, steps // 10)}.")
  decay = float(t.ema_decay)
  if not t.get("ema_warmup", False) and decay > 0 and 1.0 / (1.0 - decay) > steps / 2:
    out.append(f"training.ema_decay={decay:g} averages about the last {1.0 / (1.0 - decay):,.0f} "
               f"steps, more than half of training.num_train_steps={steps}: the EMA samples will "
               "still look like the initialisation (noise); set --config.training.ema_warmup=True "
               "or a smaller decay.")
  for field, what in (("checkpoint_every", "the only checkpoint is written at the end"),
                      ("sample_every", "the only sample grid is drawn at the end"),
                      ("eval_every", "the only evaluation is at the end")):
    every = int(t.get(field, 0) or 0)
    if every > steps:
      out.append(f"training.{field}={every} exceeds training.num_train_steps={steps}: {what}.")
  return out


def warn(config: Any) -> None:
  """Logs `warnings_for(config)`, one line each."""
  for sentence in warnings_for(config):
    logging.warning("%s", sentence)
