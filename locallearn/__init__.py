"""locallearn: local learning rules compared with backpropagation."""

__version__ = "0.1.0"
