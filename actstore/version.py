"""actstore's version (its own module, so no module imports the package to read it)."""

__version__ = "0.1.0"
