"""The version, in one place: ``fastbackend.__version__`` and the package metadata read it."""

__version__ = "0.1.0"
