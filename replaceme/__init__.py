"""replaceme — training-free depth pruning of LLMs (ReplaceMe, arXiv 2505.02819)."""

__version__ = "0.1.0"
