"""The library version, in one place: the package exports it and the files it writes record it."""

__version__ = "0.1.0"
