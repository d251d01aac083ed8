"""difflower's version, importable without importing torch."""

__version__ = "0.1.0"
