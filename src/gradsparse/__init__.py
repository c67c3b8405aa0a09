"""gradsparse: communication-efficient distributed SGD by gradient sparsification with error feedback."""

__version__ = "0.1.0"
