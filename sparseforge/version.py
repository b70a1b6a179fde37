"""The package version (one place: the package, its builds and generated sources name it)."""
__version__ = "0.1.0"
