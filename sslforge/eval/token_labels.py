"""`sslforge eval token-labels`: a picture of a dense classifier's token labels (STL, figure 2).

For each of the first `count` images of a shard set (evaluation transform) three panels, one
column per image: the input crop; the token label map (each patch token's argmax class, drawn
over the image on the token grid in a categorical colour per class, most frequent class first,
its legend below); the confidence (each token's max softmax probability) as a heatmap. A
labeler that segments the object shows one class over the object and low confidence elsewhere.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn

from sslforge.eval import EvalError

SHOWN_CLASSES = 9  # coloured classes per image; the rest are drawn grey as "other"
OVERLAY_ALPHA = 0.6


class TokenMaps(NamedTuple):
    labels: torch.Tensor  # (B, gh, gw) int64: each token's argmax class
    confidence: torch.Tensor  # (B, gh, gw) float: its max softmax probability
    predicted: torch.Tensor  # (B,) int64: the class token's argmax
    cls_confidence: torch.Tensor  # (B,) float


@torch.no_grad()
def token_label_maps(classifier: nn.Module, images: torch.Tensor) -> TokenMaps:
    """Token labels and confidences of normalised `images` from `classifier.forward_dense`
    (class-token logits (B, K) and token logits (B, gh, gw, K)), in eval mode."""
    if not getattr(classifier, "dense", False):
        raise EvalError(f"{type(classifier).__name__} has no forward_dense (per-token logits): "
                        "token-labels needs a dense classifier such as the STL labeler's")
    was_training = classifier.training
    classifier.eval()
    try:
        out = classifier.forward_dense(images)
    finally:
        classifier.train(was_training)
    tokens, cls = out.tokens.float().softmax(-1), out.cls.float().softmax(-1)
    confidence, labels = tokens.max(-1)
    cls_confidence, predicted = cls.max(-1)
    return TokenMaps(labels.cpu(), confidence.cpu(), predicted.cpu(), cls_confidence.cpu())


def rank_classes(labels: torch.Tensor, shown: int = SHOWN_CLASSES) -> tuple[np.ndarray, list[int]]:
    """One image's label map as colour slots: slot i for its i-th most frequent class
    (ties: lower class first), slot `shown` for every class after the first `shown`."""
    classes, counts = np.unique(labels.numpy(), return_counts=True)
    order = [int(c) for c in classes[np.lexsort((classes, -counts))]]
    slot_of = {c: min(i, shown) for i, c in enumerate(order)}
    return np.vectorize(slot_of.__getitem__)(labels.numpy()), order[:shown]


def _name(class_id: int, names: Sequence[str] | None) -> str:
    return names[class_id] if names is not None and class_id < len(names) else str(class_id)


def plot_token_labels(pixels: torch.Tensor, maps: TokenMaps, targets: torch.Tensor,
                      names: Sequence[str] | None = None):  # -> matplotlib Figure
    """The figure: rows input / token labels / confidence, one column per image; `pixels`
    are the [0, 1] crops (B, 3, H, W) the maps were computed from."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    count, (height, width) = len(pixels), pixels.shape[-2:]
    palette = [*plt.get_cmap("tab10").colors[:SHOWN_CLASSES], (0.6, 0.6, 0.6)]
    fig, axes = plt.subplots(3, count, figsize=(2.4 * count, 8.2), squeeze=False)
    extent = (0, width, height, 0)  # tokens laid on the pixels they cover
    heat = None
    for i in range(count):
        image = pixels[i].permute(1, 2, 0).clamp(0, 1).numpy()
        slots, shown = rank_classes(maps.labels[i])
        axes[0, i].imshow(image, extent=extent)
        axes[0, i].set_title(f"label: {_name(int(targets[i]), names)}", fontsize=8)
        axes[1, i].imshow(image, extent=extent)
        axes[1, i].imshow(slots, cmap=ListedColormap(palette), vmin=0, vmax=SHOWN_CLASSES, alpha=OVERLAY_ALPHA,
                          interpolation="nearest", extent=extent)
        axes[1, i].set_title(f"cls: {_name(int(maps.predicted[i]), names)} ({float(maps.cls_confidence[i]):.2f})",
                             fontsize=8)
        axes[1, i].legend(handles=[Patch(color=palette[k], label=_name(c, names)) for k, c in enumerate(shown)],
                          loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=6, ncol=2, frameon=False)
        heat = axes[2, i].imshow(maps.confidence[i].numpy(), cmap="inferno", vmin=0, vmax=1,
                                 interpolation="nearest", extent=extent)
        axes[2, i].set_title("token confidence", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(heat, ax=list(axes[2]), fraction=0.03, pad=0.01, label="max softmax")
    return fig


def class_names(shards: list[str]) -> list[str] | None:
    """Names from the shard directory's classes.json ({name: index}), when there is one."""
    from sslforge.data_pipeline.shards import CLASSES_FILE

    path = Path(shards[0]).parent / CLASSES_FILE
    if not path.is_file():
        return None
    index = json.loads(path.read_text())
    return [name for name, _ in sorted(index.items(), key=lambda item: item[1])]


def first_images(shards_spec: str, image_size: int, count: int) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """The first `count` readable samples in shard order: [0, 1] crops, labels, class names."""
    from sslforge.data_pipeline.eval_stream import eval_batches
    from sslforge.data_pipeline.shards import expand_shards
    from sslforge.eval.classify import split_eval_transform

    shards = expand_shards(shards_spec)
    batch = next(eval_batches(shards, split_eval_transform(image_size)[0], count), None)
    if batch is None:
        raise EvalError(f"no readable images in {shards_spec}")
    return batch["image"], batch["label"], class_names(shards)


def draw_token_labels(source: Path, shards: str | None = None, out: Path | None = None, count: int = 8,
                      dpi: int = 100) -> Path:
    """Draw the token labels of the classifier of the run at `source` (run or checkpoint
    directory) on the first `count` images of `shards` (default: the run's data.val); writes
    `out` (default RUN_DIR/token_labels_step<N>.png) and returns its path."""
    from sslforge.eval.classify import split_eval_transform
    from sslforge.eval.run import load_method

    if count < 1:
        raise EvalError(f"count must be >= 1, got {count}")
    run_dir, cfg, method, step = load_method(source)
    classifier = method.classifier()
    if classifier is None:
        raise EvalError(f"method {cfg.method.name} has no classifier (a self-supervised method): "
                        "token-labels draws a dense supervised classifier's token labels")
    if not getattr(classifier, "dense", False):
        raise EvalError(f"the classifier of method {cfg.method.name} has no per-token head (forward_dense): "
                        "token-labels needs a dense model such as stl_labeler's or stl_student's")
    shards = shards or cfg.data.val
    if not shards:
        raise EvalError(f"no shards to draw: pass --shards or set data.val in {run_dir / 'config.yaml'}")
    pixels, targets, names = first_images(shards, cfg.data.image_size, count)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    maps = token_label_maps(classifier.to(device), split_eval_transform(cfg.data.image_size)[1](pixels.to(device)))
    out = Path(out) if out is not None else run_dir / f"token_labels_step{step}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = plot_token_labels(pixels, maps, targets, names)
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


__all__ = ["TokenMaps", "draw_token_labels", "first_images", "plot_token_labels", "rank_classes",
           "token_label_maps"]
