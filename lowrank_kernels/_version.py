"""The package version (pyproject.toml says the same), importable without importing the package."""

__version__ = "0.1.0"
