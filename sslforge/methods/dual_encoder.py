"""Image-text dual encoder trained with CLIP's objective (Radford et al., 2021):

    v = W f(image)                          # image tower: backbone + linear projection
    words, s = g(text_ids, text_mask)       # text tower: bidirectional GRU, s = mean of the words
    loss = clip_loss(v, s, exp(t))          # symmetric CE over the global batch's pairs
    t learnable, initialised at ln(1/0.07), exp(t) clamped at 100

As AttnGAN's DAMSM, only the image side is projected: the text tower's sentence feature is the
joint embedding itself and its word features live in the same space, so the tower can be handed
to a text-to-image GAN as its text encoder (`build_text_encoder("dual_encoder:<run dir>")`).
Negatives come from every rank with gradients (`method.gather`), as OpenCLIP's
`gather_with_grad`. The evaluated network (`encoder`) is the image tower; the method's own
evaluation is the R-precision of the real val images (each image's caption ranked among 99
mismatched ones, chance 1%), and a run of it, with another seed, scores a GAN's images
(`eval.dual_encoder`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig

from sslforge.config import MethodConfig, ViewConfig
from sslforge.losses.clip import clip_loss
from sslforge.methods.base import EvalContext, Method
from sslforge.models.backbones import build_backbone
from sslforge.models.text import SmallTextEncoder


@dataclass
class DualEncoderConfig(MethodConfig):
    name: str = "dual_encoder"
    embed_dim: int = 256  # the joint space and the text tower's width (AttnGAN's DAMSM: 256)
    word_dim: int = 300  # word embeddings (AttnGAN: 300)
    text_layers: int = 1  # GRU layers
    text_dropout: float = 0.0
    init_temperature: float = 0.07  # CLIP: logit scale starts at 1/0.07
    max_logit_scale: float = 100.0  # CLIP: the scale is clamped at 100
    gather: bool = True  # negatives from every rank (OpenCLIP gather_with_grad); false: local batch
    eval_seed: int = 0  # R-precision's candidate draws


class DualEncoder(Method):
    config_class = DualEncoderConfig
    needs_captions = True

    def __init__(self, cfg: DictConfig) -> None:
        from sslforge.data_pipeline.captions import build_tokenizer

        super().__init__(cfg)
        m = cfg.method
        backbone, dim = build_backbone(cfg.model, cfg.data.image_size)
        self.image_tower = nn.Sequential(backbone, nn.Linear(dim, m.embed_dim))
        vocab = build_tokenizer(cfg.data.tokenizer, cfg.data.max_tokens).vocab_size
        self.text_tower = SmallTextEncoder(vocab, m.embed_dim, m.word_dim, m.text_layers, m.text_dropout)
        # t, shape (1,): DeepSpeed broadcasts parameters as bytes, which a 0-d tensor cannot be
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / m.init_temperature)))

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        m = cfg.method
        if m.embed_dim < 2 or m.embed_dim % 2:
            raise ValueError(f"method.embed_dim must be an even number >= 2 (two GRU directions), got {m.embed_dim}")
        if m.word_dim < 1 or m.text_layers < 1:
            raise ValueError("method.word_dim and method.text_layers must be >= 1")
        if not 0.0 <= m.text_dropout < 1.0:
            raise ValueError(f"method.text_dropout must be in [0, 1), got {m.text_dropout}")
        if m.init_temperature <= 0 or 1.0 / m.init_temperature > m.max_logit_scale:
            raise ValueError(f"method.init_temperature={m.init_temperature} must be > 0 with 1/temperature <= "
                             f"method.max_logit_scale={m.max_logit_scale}")

    @classmethod
    def views(cls, cfg: DictConfig) -> list[ViewConfig]:
        """One mild crop (scale 0.9-1, OpenCLIP's training crop) and nothing else: a caption may
        name the colour and the position of what is drawn, so no flip and no colour change."""
        return [ViewConfig(size=cfg.data.image_size, count=1, scale=[0.9, 1.0], flip_p=0.0, jitter_p=0.0,
                           grayscale_p=0.0, blur_p=0.0)]

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) joint-space features of normalised images (not L2-normalised)."""
        return self.image_tower(images)

    def text_embedding(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) joint-space features of captions: the text tower's sentence feature."""
        return self.text_tower(text_ids, text_mask).sentence

    def scale(self) -> torch.Tensor:
        """exp(t) clamped at `max_logit_scale` in the forward (CLIP clamps t in place after the
        step; under ZeRO the optimiser's master copy would undo that, so the clamp is here:
        above the bound t gets no gradient and the scale stays at the bound)."""
        return self.logit_scale.clamp(max=math.log(self.cfg.method.max_logit_scale)).exp().squeeze(0)

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        image = self.image_embedding(batch["views"][0])
        text = self.text_embedding(batch["text_ids"].to(image.device), batch["text_mask"].to(image.device))
        scale = self.scale()
        loss = clip_loss(image, text, scale, gather=self.cfg.method.gather)
        return {"loss": loss, "logit_scale": scale.detach(), "embedding": image.detach()}

    def encoder(self) -> nn.Module:
        return self.image_tower

    def evaluate(self, context: EvalContext) -> dict[str, float]:
        from sslforge.eval.generation import real_image_r_precision

        return {"val_r_precision": real_image_r_precision(self, context.cfg.data.val, context.env,
                                                          context.cfg.eval.batch_size, context.cfg.data.num_workers,
                                                          self.cfg.method.eval_seed)}
