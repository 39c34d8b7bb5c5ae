"""slimforge: cheap training and compression of neural networks, with a Rust core.

Areas live in submodules (`slimforge.dedup`, ...); importing the package stays cheap and does
not import torch.
"""

from slimforge._native import __version__, built_with_cuda, get_num_threads, set_num_threads

__all__ = ["__version__", "built_with_cuda", "get_num_threads", "set_num_threads"]
