"""ppl: a probabilistic programming mini-language with automatic variational inference."""
__version__ = "0.1.0"

from .api import load, load_fit, loads  # noqa: E402  (torch is imported only when fitting)

__all__ = ["load", "load_fit", "loads", "__version__"]
