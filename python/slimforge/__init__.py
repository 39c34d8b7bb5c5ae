"""slimforge: cheap training and compression of neural networks, with a Rust core.

Areas live in submodules (`slimforge.dedup`, ...); importing the package stays cheap and does
not import torch.
"""

from slimforge._native import __version__, built_with_cuda, get_num_threads, set_num_threads

__all__ = ["__version__", "built_with_cuda", "get_num_threads", "set_num_threads", "set_threads"]


def set_threads(n: int) -> None:
    """Threads for everything that computes: slimforge's Rust pool (:func:`set_num_threads`)
    and, when torch is installed, torch's intra-op pool. ``n = 0`` leaves both as they are
    (what the ``--threads`` options of the command line default to)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"threads must be an int >= 0, got {n!r}")
    if n == 0:
        return
    set_num_threads(n)
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(n)
