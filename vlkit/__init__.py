"""vlkit: give language models eyes, cheaply and safely."""

__version__ = "0.1.0"
