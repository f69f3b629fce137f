"""raypipe: pretrain small Gemma 3 style language models on Ray (Train for runs, Tune for sweeps)."""

from .data import get_batch
from .loop import estimate_loss

__all__ = ["get_batch", "estimate_loss"]
__version__ = "0.1.0"
