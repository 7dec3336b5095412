"""Where a loader's CPU time goes per image (`bench_loaders.py --profile`): one process, one
thread, batches of 32, each stage timed around the very callables the loaders run.

sslforge: decode (draft at `decode_size`), crop+resize+flip (`draw_geometry` and `cut`, timed
by wrapping them for the duration), each photometric op of each view, collate (stack per view),
IPC (a DataLoader's transport: ForkingPickler dumps into shared memory and loads), and
`model_input` in the consumer. torchvision: full decode, each op of each view's v2 pipeline,
default collate (into shared memory, as in a worker), IPC. The sum is the CPU one image costs
end to end; on C cores no loader can beat C * 1000 / sum images/s.
"""
from __future__ import annotations

import pickle
import time
from collections import defaultdict
from contextlib import ExitStack
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Sequence
from unittest import mock

import torch
from torch.utils.data import default_collate
from torchvision.transforms import v2

import sslforge.data_pipeline.views as views_module
from sslforge.data_pipeline.views import build_view_transform, model_input

from loader_decode import decode_pil
from loader_pipelines import BATCH, MultiCrop

STAGES = {  # op class -> stage name (RandomApply: its inner op's)
    "RandomResizedCrop": "crop+resize+flip", "RandomHorizontalFlip": "crop+resize+flip",
    "ColorJitter": "colour jitter", "RandomGrayscale": "grayscale", "GaussianBlur": "blur",
    "SeparableGaussianBlur": "blur", "RandomSolarize": "solarize", "PILToTensor": "to tensor",
    "ToImage": "to tensor", "ToDtype": "to float+normalize", "Normalize": "to float+normalize",
}
ORDER = ["decode", "crop+resize+flip", "colour jitter", "grayscale", "to tensor", "blur", "solarize",
         "to float+normalize", "collate", "IPC", "model_input"]


class StageTimer:
    """Accumulates seconds per stage name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, stage: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start
        return timed

    def run(self, stage: str, fn: Callable, *args: Any) -> Any:
        return self.wrap(stage, fn)(*args)


def _stage(op: Any) -> str:
    inner = op.transforms[0] if isinstance(op, v2.RandomApply) else op
    return STAGES.get(type(inner).__name__, type(inner).__name__)


def _time_ops(pipeline: v2.Compose, timer: StageTimer) -> None:
    """Each op of `pipeline` timed under its stage's name (in place)."""
    pipeline.transforms = [timer.wrap(_stage(op), op) for op in pipeline.transforms]


def _ipc(views: list[torch.Tensor]) -> list[torch.Tensor]:
    """A worker-to-consumer hand-over as DataLoader does it: tensors moved to shared memory."""
    return pickle.loads(ForkingPickler.dumps(views))


def _stack(crops: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """The stream's collate: each crop position stacked over the batch."""
    return [torch.stack(c) for c in zip(*crops)]


def _model_inputs(views: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model_input(v) for v in views]


def _batches(encoded: Sequence[bytes]) -> list[Sequence[bytes]]:
    return [encoded[i:i + BATCH] for i in range(0, len(encoded), BATCH)]


def profile_sslforge(views: Sequence[Any], encoded: Sequence[bytes]) -> dict[str, float]:
    """ms per image per stage of ShardLoader's per-sample work, as its worker and consumer do it."""
    transform, timer = build_view_transform(views), StageTimer()
    for pipeline in transform.photometric:
        _time_ops(pipeline, timer)
    with ExitStack() as patches:
        for name in ("draw_geometry", "cut"):
            patches.enter_context(mock.patch.object(views_module, name, timer.wrap("crop+resize+flip",
                                                                                  getattr(views_module, name))))
        for batch in _batches(encoded):
            crops = [transform(timer.run("decode", decode_pil, data, transform.decode_size)) for data in batch]
            stacked = timer.run("collate", _stack, crops)
            received = timer.run("IPC", _ipc, stacked)
            timer.run("model_input", _model_inputs, received)
    return {k: v * 1000 / len(encoded) for k, v in timer.seconds.items()}


def profile_torchvision(views: Sequence[Any], encoded: Sequence[bytes]) -> dict[str, float]:
    """ms per image per stage of the torchvision multi-crop pipeline (what both baselines run).
    In a worker, default collate stacks straight into shared memory (so IPC copies nothing
    more): told here that it runs in one."""
    transform, timer = MultiCrop(views), StageTimer()
    for pipeline, _ in transform.pipelines:
        _time_ops(pipeline, timer)
    in_worker = mock.patch.object(torch.utils.data, "get_worker_info", lambda: object())
    for batch in _batches(encoded):
        crops = [transform(timer.run("decode", decode_pil, data, None)) for data in batch]
        with in_worker:
            stacked = timer.run("collate", default_collate, crops)
        timer.run("IPC", _ipc, stacked)
    return {k: v * 1000 / len(encoded) for k, v in timer.seconds.items()}


def format_profile(case: str, sslforge: dict[str, float], torchvision: dict[str, float], cores: int) -> str:
    """Stage rows side by side, the per-image CPU total and the rate it allows on `cores`."""
    lines = [f"-- {case}: CPU ms per image, 1 thread",
             f"{'stage':<20} {'sslforge':>9} {'torchvision':>12} {'tv/sslforge':>12}"]
    for stage in ORDER:
        a, b = sslforge.get(stage), torchvision.get(stage)
        if a is None and b is None:
            continue
        ratio = f"{b / a:>11.1f}x" if a and b else f"{'':>12}"
        lines.append(f"{stage:<20} {a or 0:>9.2f} {b or 0:>12.2f} {ratio}")
    total_a, total_b = sum(sslforge.values()), sum(torchvision.values())
    lines.append(f"{'total':<20} {total_a:>9.2f} {total_b:>12.2f} {total_b / total_a:>11.2f}x")
    lines.append(f"{f'bound, {cores} cores':<20} {cores * 1000 / total_a:>9.0f} {cores * 1000 / total_b:>12.0f}"
                 f"  images/s")
    return "\n".join(lines)
