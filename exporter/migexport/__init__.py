"""migexport: make PostgreSQL production migrations observable and safe."""

__version__ = "0.1.0"
