"""sparse-coding: measure how sparse the features inside language models are (arXiv 2310.07837)."""

__version__ = "0.1.0"
