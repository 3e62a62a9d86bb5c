"""The public API of adamw_jax: torch.optim.AdamW as pure, chainable optax transformations.

The math, the rounding and every difference from torch and optax are
written once, in the documentation ([the math](math.md), [Fidelity](fidelity.md));
every public function's docstring has an example.
"""

from adamw_jax._alias import adam, adamw
from adamw_jax._checkpoint import (
  opt_state_restore_args,
  opt_state_save_args,
  restore_opt_state,
  save_opt_state,
)
from adamw_jax._core import ScaleByAdamState
from adamw_jax._flat import FlatParams, flatten
from adamw_jax._fused import clipped, fused_step
from adamw_jax._groups import param_groups
from adamw_jax._interop import from_torch, to_torch_state_dict
from adamw_jax._layout import flax_layout
from adamw_jax._lowmem import LowMemoryAdamState
from adamw_jax._masks import DEFAULT_EXCLUDE, decay_mask, describe_mask
from adamw_jax._master import master_params, split_master
from adamw_jax._nnx import fused_update
from adamw_jax._paper import normalized_weight_decay, warm_restarts
from adamw_jax._quantize import PackedQuantizedMoment, QuantizedMoment
from adamw_jax._transforms import (
  AddDecayedWeightsState,
  add_decayed_weights,
  masked,
  scale_by_adam,
)
from adamw_jax._version import __version__ as __version__

__all__ = [
  "DEFAULT_EXCLUDE",
  "AddDecayedWeightsState",
  "FlatParams",
  "LowMemoryAdamState",
  "PackedQuantizedMoment",
  "QuantizedMoment",
  "ScaleByAdamState",
  "adam",
  "adamw",
  "add_decayed_weights",
  "clipped",
  "decay_mask",
  "describe_mask",
  "flatten",
  "flax_layout",
  "from_torch",
  "fused_step",
  "fused_update",
  "masked",
  "master_params",
  "normalized_weight_decay",
  "opt_state_restore_args",
  "opt_state_save_args",
  "param_groups",
  "restore_opt_state",
  "save_opt_state",
  "scale_by_adam",
  "split_master",
  "to_torch_state_dict",
  "warm_restarts",
]
