"""Stand-in for wandb, which the GPU machine lacks (its wheel and dependencies are ~25 MB to carry).

Axolotl imports it at module level (axolotl.utils.callbacks) and uses it only with use_wandb.
This module has no attributes: transformers' is_wandb_available() checks for ``wandb.run`` and so
reports wandb as absent (no WandbCallback), and any real use fails with an AttributeError.
"""


def __getattr__(name):
    raise AttributeError(f"wandb is not installed (m1-suite stand-in): no wandb.{name}; set use_wandb: false")
