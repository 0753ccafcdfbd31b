"""ppl: a probabilistic programming mini-language with automatic variational inference."""
__version__ = "0.1.0"

from .api import load, loads  # noqa: E402  (torch is imported only when fitting)

__all__ = ["load", "loads", "__version__"]
