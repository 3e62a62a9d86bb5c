"""adamw_jax: torch.optim.AdamW as pure, chainable optax gradient transformations.

The math, the rounding and every difference from torch and optax are
documented in :func:`adamw_jax.adamw` and in the README.
"""

from adamw_jax._alias import adam, adamw
from adamw_jax._core import ScaleByAdamState
from adamw_jax._groups import param_groups
from adamw_jax._masks import DEFAULT_EXCLUDE, decay_mask, describe_mask
from adamw_jax._transforms import (
    AddDecayedWeightsState,
    add_decayed_weights,
    masked,
    scale_by_adam,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_EXCLUDE",
    "AddDecayedWeightsState",
    "ScaleByAdamState",
    "adam",
    "adamw",
    "add_decayed_weights",
    "decay_mask",
    "describe_mask",
    "masked",
    "param_groups",
    "scale_by_adam",
]
