"""Scoring a text-to-image generator on captioned shards: FID and R-precision in one pass.

Each rank reads its share of the captioned set (every sample once, `eval_batches`), generates
one image per caption with noise keyed by the sample's index (so the images do not depend on the
ranks or the batch size), and feeds the real images and the generated ones to FID and the
generated ones with their captions to R-precision. A method that generates offers

    generate(text_ids (B, L), text_mask (B, L), z (B, z_dim)) -> images (B, 3, S, S) in [0, 1]
    z_dim: int

(XMC-GAN: its EMA generator). The trainer's evaluation of such a method and
`sslforge eval fid | rprecision` both come here; so does the dual encoder's own evaluation
(R-precision of the real images: its retrieval top-1 among 100 captions).
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from torchvision.transforms import InterpolationMode, v2

from sslforge import distributed
from sslforge.eval import EvalError
from sslforge.eval.fid import FrechetDistance
from sslforge.eval.rprecision import RPrecision, scoring
from sslforge.launcher.env import DistEnv

Images = Callable[[dict[str, Any]], torch.Tensor]  # a caption batch -> images in [0, 1]


def real_transform(image_size: int) -> v2.Compose:
    """The whole image, shorter side resized to `image_size` and centre-cropped, as uint8: the
    real images FID compares with (no evaluation crop margin, no normalisation)."""
    return v2.Compose([v2.Resize(image_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(image_size), v2.PILToTensor()])


def thinned(index: torch.Tensor, total: int, samples: int | None) -> torch.Tensor:
    """Which of these sample indices are among `samples` spread evenly over the `total` of the
    set (all when `samples` is None or not smaller): the choice depends on the index alone."""
    if samples is None or samples >= total:
        return torch.ones_like(index, dtype=torch.bool)
    return (index * samples) // total != ((index + 1) * samples) // total


def caption_batches(shards: str, image_size: int, batch_size: int, env: DistEnv, workers: int,
                    tokenizer: str, max_tokens: int, samples: int | None = None) -> Iterator[dict[str, Any]]:
    """This rank's share of the captioned set: `image` (B, 3, S, S) uint8, `text_ids`, `text_mask`,
    `caption`, `index`; at most `samples` over all ranks, spread evenly over the set."""
    from sslforge.data_pipeline.captions import build_tokenizer
    from sslforge.data_pipeline.eval_stream import eval_batches
    from sslforge.data_pipeline.planning import ShardSet
    from sslforge.data_pipeline.shards import expand_shards

    paths = expand_shards(shards)
    total = ShardSet.open(paths).total
    for batch in eval_batches(paths, real_transform(image_size), batch_size, env.rank, env.world_size, workers,
                              tokenizer=build_tokenizer(tokenizer, max_tokens)):
        keep = thinned(batch["index"], total, samples)
        if keep.any():
            yield {"image": batch["image"][keep], "text_ids": batch["text_ids"][keep],
                   "text_mask": batch["text_mask"][keep], "index": batch["index"][keep],
                   "caption": [c for c, k in zip(batch["caption"], keep.tolist()) if k]}


def check_generator(method: nn.Module, run: str) -> None:
    """EvalError unless `method` generates from captions (`generate` and `z_dim`)."""
    if not callable(getattr(method, "generate", None)) or not isinstance(getattr(method, "z_dim", None), int):
        raise EvalError(f"{run}: method {type(method).__name__} does not generate images from captions "
                        "(it has no generate(text_ids, text_mask, z) and z_dim)")


def generate_for_captions(method: Any, batch: dict[str, Any], seed: int, device: torch.device) -> torch.Tensor:
    """The method's images for the batch's captions, noise keyed by sample index."""
    from sslforge.losses.elbo import indexed_normal

    z = indexed_normal(batch["index"], method.z_dim, seed).to(device)
    with torch.no_grad():
        return method.generate(batch["text_ids"].to(device), batch["text_mask"].to(device), z)


def score_images(images_of: Images, shards: str, cfg: DictConfig, env: DistEnv, *, fid_weights: str | None,
                 scorer: nn.Module | None, samples: int | None, batch_size: int, workers: int,
                 seed: int = 0) -> dict[str, float]:
    """One pass over the captioned `shards` (at `cfg.data.image_size`, tokenised by
    `cfg.data.tokenizer`): `fid` of `images_of(batch)` against the real images (with
    `fid_weights`), `r_precision` of them by `scorer` (a dual encoder), and `samples` scored."""
    fid = FrechetDistance(fid_weights, env.device) if fid_weights else None
    seen = 0
    with scoring(scorer) if scorer is not None else nullcontext() as model:
        rprec = RPrecision(model, seed) if model is not None else None
        for batch in caption_batches(shards, cfg.data.image_size, batch_size, env, workers, cfg.data.tokenizer,
                                     cfg.data.max_tokens, samples):
            images = images_of(batch).float()
            if fid is not None:
                fid.update(batch["image"], real=True)
                fid.update(images, real=False)
            if rprec is not None:
                rprec.update(images, batch["caption"], batch["index"])
            seen += len(images)
    result = {"samples": distributed.sum_over_ranks(seen)}
    if fid is not None:
        result["fid"] = fid.compute()
    if rprec is not None:
        result["r_precision"] = rprec.compute()
    return result


def real_image_r_precision(scorer: nn.Module, shards: str, env: DistEnv, batch_size: int, workers: int,
                           seed: int = 0) -> float:
    """R-precision of the real images of `shards` by the dual encoder `scorer` itself."""
    cfg = scorer.cfg  # type: ignore[union-attr]
    return score_images(lambda batch: batch["image"].float() / 255, shards, cfg, env, fid_weights=None,
                        scorer=scorer, samples=None, batch_size=batch_size, workers=workers,
                        seed=seed)["r_precision"]


def load_scorer(run: str | Path, device: torch.device) -> nn.Module:
    """The dual encoder of a `dual_encoder` run, on `device`, for R-precision."""
    from sslforge.eval.run import load_method

    _, cfg, method, _ = load_method(Path(run))
    if cfg.method.name != "dual_encoder":
        raise EvalError(f"{run}: R-precision needs a dual_encoder run, this one trained {cfg.method.name!r}")
    return method.to(device)


def check_eval_config(cfg: DictConfig) -> None:
    """ValueError naming the key when `eval.inception_weights` or `eval.dual_encoder` is set but
    unusable, or when the scorer is the dual encoder the run's text encoder comes from (its
    R-precision would score the network the generator was trained against); loads nothing."""
    from sslforge.eval.fid import check_inception_weights
    from sslforge.models.text import check_dual_encoder_run

    if cfg.eval.inception_weights:
        check_inception_weights(cfg.eval.inception_weights)
    if cfg.eval.dual_encoder:
        scorer = Path(cfg.eval.dual_encoder).expanduser()
        check_dual_encoder_run(scorer, f"eval.dual_encoder={scorer}")
        kind, _, text = str(OmegaConf.select(cfg, "method.text_encoder", default="") or "").partition(":")
        if kind == "dual_encoder" and Path(text).expanduser().resolve() == scorer.resolve():
            raise ValueError(f"eval.dual_encoder={scorer} is also method.text_encoder: R-precision needs a dual "
                             "encoder trained separately (another run, another seed)")


def score_generator(method: Any, shards: str, cfg: DictConfig, env: DistEnv, *, fid_weights: str | None,
                    dual_encoder: str | None, samples: int | None, batch_size: int, workers: int,
                    seed: int = 0) -> dict[str, float]:
    """FID (with `fid_weights`) and R-precision (with the `dual_encoder` run) of the images
    `method` generates for the captions of `shards`."""
    scorer = load_scorer(dual_encoder, env.device) if dual_encoder else None
    return score_images(lambda batch: generate_for_captions(method, batch, seed, env.device), shards, cfg, env,
                        fid_weights=fid_weights, scorer=scorer, samples=samples, batch_size=batch_size,
                        workers=workers, seed=seed)


def score_run(source: Path, shards: str, *, fid_weights: str | None, dual_encoder: str | None,
              samples: int | None, batch_size: int, workers: int, seed: int) -> dict[str, float]:
    """`sslforge eval fid | rprecision`: score the generator of the run at `source` and append the
    result to its metrics.jsonl."""
    from sslforge.config import load_resolved
    from sslforge.eval.run import append_metrics, load_method, run_dir_of
    from sslforge.launcher.env import init_distributed

    given = {"eval": {"inception_weights": fid_weights, "dual_encoder": dual_encoder}}
    try:  # before any network is built
        check_eval_config(OmegaConf.merge(load_resolved(run_dir_of(source) / "config.yaml"), given))
    except ValueError as exc:
        raise EvalError(str(exc)) from None
    env = init_distributed("auto")
    run_dir, cfg, method, step = load_method(source)
    check_generator(method, str(source))
    method = method.to(env.device).eval()
    result = score_generator(method, shards, cfg, env, fid_weights=fid_weights, dual_encoder=dual_encoder,
                             samples=samples, batch_size=batch_size, workers=workers, seed=seed)
    if env.is_main:
        append_metrics(run_dir, {"step": step, "eval": "fid" if fid_weights else "rprecision", **result,
                                 "data": shards, "dual_encoder": dual_encoder, "seed": seed})
    return result


__all__ = ["caption_batches", "check_eval_config", "check_generator", "generate_for_captions", "load_scorer",
           "real_image_r_precision", "real_transform", "score_generator", "score_images", "score_run", "thinned"]
