"""DeepSpeed picks its accelerator once, when it is first imported; on a machine without CUDA
that must be the CPU one. Every sslforge module that imports deepspeed imports this first, so
that `import sslforge` (the CLI's `--help`, config checks) never pays for torch."""
import os

if "DS_ACCELERATOR" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
