"""sslforge: distributed self-supervised and contrastive pretraining."""
import os as _os

# DeepSpeed picks its accelerator at import; on a machine without CUDA that must be the CPU one.
if "DS_ACCELERATOR" not in _os.environ:
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            _os.environ["DS_ACCELERATOR"] = "cpu"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass

__version__ = "0.1.0"
