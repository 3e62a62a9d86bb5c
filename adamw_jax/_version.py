"""The package's version, in one place: ``adamw_jax.__version__`` and the checkpoints' record of it."""

__version__ = "0.1.0"
