"""vlkit's version, in a module of its own: what saved models and results record."""

__version__ = "0.1.0"
