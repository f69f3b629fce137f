"""raypipe: pretrain small Gemma 3 style language models on Ray (Train for runs, Tune for sweeps)."""

__version__ = "0.1.0"
__all__ = ["get_batch", "estimate_loss"]


def __getattr__(name: str):
    # The reference script's names, imported on first use: `python -m raypipe.prepare` need not pay for torch.
    if name == "get_batch":
        from .batches import get_batch

        return get_batch
    if name == "estimate_loss":
        from .loop import estimate_loss

        return estimate_loss
    raise AttributeError(f"module 'raypipe' has no attribute {name!r}")
