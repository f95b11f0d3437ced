"""SMFNet image fusion in JAX + Flax NNX."""

# The one place the version is written: pyproject reads it (setuptools dynamic version).
__version__ = "0.1.0"
