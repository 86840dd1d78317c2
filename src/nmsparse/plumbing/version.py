"""The package version (one place; the facade and the files we write read it)."""

__version__ = "0.1.0"
