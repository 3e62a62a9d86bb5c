"""The package's version, in one place: ``adamw_jax.__version__``, pyproject's and the docs'.

Also the checkpoints' record of the library. Change it together with
CHANGELOG.md's newest release (tests/test_docs.py checks both).
"""

__version__ = "0.1.0"
