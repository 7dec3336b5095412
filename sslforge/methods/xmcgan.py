"""XMC-GAN (Zhang et al., CVPR 2021): a one-stage text-to-image GAN trained with three
contrastive losses (google-research/xmcgan_image_generation, xmc_gan.py).

    words, s = T(caption)                     # frozen text encoder (BERT), or a small one trained with D
    fake = G(z, s, words)                     # z ~ N(0, I) per sample
    real / fake logits, pooled, regions = D([real, fake], s)
    loss_D = hinge_D(real, fake) + word_region(real regions, words) + pair(real pooled, Dense(s))
    loss_G = hinge_G(fake) + word_region(fake regions, words) + pair(fake pooled, Dense(s))
             + pair(fake pooled, real pooled) [+ pair(R(fake), R(real)), R a pretrained ResNet-50]

Two parts with their own optimisers (`optim.parts.discriminator` / `.generator`): with `every` 1
and 2, step t updates D from a fresh batch, step t+1 updates D and G from one batch and one
draw of z, the official `train_d` / `train_g_d` pair (which splits one device batch in two).
The discriminator's `part_step` generates the fakes (keeping G's graph when G also updates)
and scores real and detached fake images in one forward; the generator's reuses those fakes and
runs D frozen and in eval mode, so its spectral norms read the power-iteration vectors the
D pass has just advanced: D's weights in G's loss are exactly the ones in D's loss, as in the
official single forward. The generator's loss reuses the real images' pooled features of the
D pass (they do not depend on G). An EMA copy of G (0.999 after every G update) is what is
sampled and scored.

Negatives of the contrastive losses come from every rank (`method.gather`; the official code
uses the local batch only). Noise is keyed by (seed, step, sample index), so it does not depend
on the ranks. The text encoder (`method.text_encoder`: `bert:<dir>` or `dual_encoder:<run dir>`)
is frozen and left out of checkpoints (rebuilt from its spec); without one, a small recurrent
encoder (`models.text.SmallTextEncoder`) trains with the discriminator through its real-pair
contrastive losses, and G reads its features detached.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from sslforge import distributed
from sslforge.config import MethodConfig, ViewConfig
from sslforge.data_pipeline.views import IMAGENET_MEAN, IMAGENET_STD, unit_pixels
from sslforge.losses.elbo import indexed_normal
from sslforge.losses.xmc_contrastive import hinge_d_loss, hinge_g_loss, pair_contrastive_loss, word_region_loss
from sslforge.methods.base import EvalContext, PartsMethod
from sslforge.models.ema import ema_update_, frozen, momentum_copy
from sslforge.models.text import (SmallTextEncoder, TextEncoder, TextFeatures, build_text_encoder,
                                  check_text_encoder_spec, keep_out_of_state_dict)
from sslforge.models.xmcgan import Discriminator, Generator, check_sizes, spectral_norm_buffers

GRID_NOISE_KEY = -1  # in place of the step: the grid's noise is the same at every evaluation
PRETRAINED_SIZE = 224  # the official ResNet-50 reads images resized to 224 px (bilinear)


@dataclass
class XMCGANConfig(MethodConfig):
    name: str = "xmcgan"
    text_encoder: Optional[str] = None  # bert:<dir> | dual_encoder:<run dir>, frozen; None: SmallTextEncoder in D
    text_dim: int = 256  # without text_encoder: the small encoder's width (AttnGAN's DAMSM: 256)
    word_dim: int = 300  # without text_encoder: its word embeddings
    z_dim: int = 128
    gf_dim: int = 96
    df_dim: int = 96
    cond_size: Optional[int] = None  # side of the region grid; None: min(16, image_size / 4)
    gamma_g: float = 15.0  # sharpness of the generator's word attention
    temperature: float = 0.1  # sentence-image and image-image losses
    gamma1: float = 5.0  # word-region loss (AttnGAN's DAMSM)
    gamma2: float = 5.0
    gamma3: float = 50.0
    word_contrastive: bool = True
    sentence_contrastive: bool = True
    image_contrastive: bool = True
    pretrained_image_encoder: Optional[str] = None  # torchvision ResNet-50 state dict file; None: off
    gather: bool = True  # negatives from every rank; false: the official local batch
    ema_momentum: float = 0.999
    grid_captions: int = 6  # evaluation grid: val captions (rows) ...
    grid_samples: int = 6  # ... and noise draws each (columns)
    eval_seed: int = 0


class StepShared(NamedTuple):
    """What the parts of one step share: the batch's text features (detached), its real images
    and their pooled critic features, the fakes (with G's graph when G updates)."""

    step: int
    words: torch.Tensor
    sentence: torch.Tensor
    word_mask: torch.Tensor
    real: torch.Tensor
    real_pooled: torch.Tensor
    fake: torch.Tensor


class FrozenImageClassifier(nn.Module):
    """A torchvision ResNet-50 from a local state dict: [0, 1] images -> its 1000 logits (the
    official image-image loss on the pretrained network reads its last layer). Frozen, always
    in eval mode, and out of the owner's state dict (rebuilt from the file)."""

    def __init__(self, path: str) -> None:
        from torchvision.models import resnet50

        from sslforge.trainer.safe_load import load_data

        super().__init__()
        self.encoder = resnet50()
        self.encoder.load_state_dict(load_data(Path(path).expanduser()))
        self.encoder.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        keep_out_of_state_dict(self)

    def train(self, mode: bool = True) -> "FrozenImageClassifier":
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(PRETRAINED_SIZE, PRETRAINED_SIZE), mode="bilinear", align_corners=False)
        return self.encoder((x - self.mean) / self.std)


class CriticFeatures(nn.Module):
    """The evaluated and exported encoder: ImageNet-normalised images -> the discriminator's
    pooled feature."""

    def __init__(self, discriminator: Discriminator) -> None:
        super().__init__()
        self.discriminator = discriminator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.discriminator.trunk(unit_pixels(x))[0]


@contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """`modules` in eval mode inside, their modes restored after (the critic's spectral norms
    then read their vectors without a power iteration; the generator's BN its running stats)."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def vocab_size(cfg: DictConfig) -> int:
    from sslforge.data_pipeline.captions import build_tokenizer

    return build_tokenizer(cfg.data.tokenizer, cfg.data.max_tokens).vocab_size


def build_text_side(cfg: DictConfig) -> TextEncoder:
    """The frozen encoder `method.text_encoder` names, or a small one to train from scratch."""
    m = cfg.method
    if m.text_encoder:
        return build_text_encoder(m.text_encoder, vocab_size(cfg))
    return SmallTextEncoder(vocab_size(cfg), m.text_dim, m.word_dim)


class XMCGAN(PartsMethod):
    config_class = XMCGANConfig
    part_names = ("discriminator", "generator")
    needs_captions = True

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        m, size = cfg.method, cfg.data.image_size
        self.text_encoder = build_text_side(cfg)
        self.z_dim: int = m.z_dim
        self.generator = Generator(size, self.text_encoder.dim, m.z_dim, m.gf_dim, m.cond_size, m.gamma_g)
        self.discriminator = Discriminator(size, self.text_encoder.dim, m.df_dim, m.cond_size)
        self.ema_generator = momentum_copy(self.generator)
        pretrained = m.pretrained_image_encoder
        self.image_classifier = FrozenImageClassifier(pretrained) if pretrained else None
        self._shared: StepShared | None = None

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        m = cfg.method
        check_sizes(cfg.data.image_size, m.cond_size)
        if m.text_encoder:
            check_text_encoder_spec(m.text_encoder, cfg.data.tokenizer)
        if m.pretrained_image_encoder and not Path(m.pretrained_image_encoder).expanduser().is_file():
            raise ValueError(f"method.pretrained_image_encoder: {m.pretrained_image_encoder} does not exist; it must "
                             "be a torchvision ResNet-50 state dict file (e.g. ResNet50_Weights.IMAGENET1K_V1's "
                             "resnet50-0676ba61.pth), or unset it")
        positive = {"z_dim": m.z_dim, "gf_dim": m.gf_dim, "df_dim": m.df_dim, "text_dim": m.text_dim,
                    "word_dim": m.word_dim, "temperature": m.temperature, "gamma_g": m.gamma_g, "gamma1": m.gamma1,
                    "gamma2": m.gamma2, "gamma3": m.gamma3, "grid_captions": m.grid_captions,
                    "grid_samples": m.grid_samples}
        for key, value in positive.items():
            if value <= 0:
                raise ValueError(f"method.{key} must be > 0, got {value}")
        if not m.text_encoder and m.text_dim % 2:
            raise ValueError(f"method.text_dim must be even (the small text encoder's two GRU directions), "
                             f"got {m.text_dim}")
        if not 0.0 <= m.ema_momentum < 1.0:
            raise ValueError(f"method.ema_momentum must be in [0, 1), got {m.ema_momentum}")
        crops = sum(v.count for v in (list(cfg.data.views) or cls.views(cfg)))
        if crops != 1:
            raise ValueError(f"XMC-GAN takes one crop per image, the counts of data.views give {crops}")

    @classmethod
    def views(cls, cfg: DictConfig) -> list[ViewConfig]:
        """The whole image resized, flipped at random, nothing photometric (the official
        preprocessing)."""
        return [ViewConfig(size=cfg.data.image_size, scale=[1.0, 1.0], flip_p=0.5, jitter_p=0.0,
                           grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)]

    # ------------------------------------------------------------------ parts
    def part_modules(self) -> dict[str, nn.Module]:
        trained_text = any(p.requires_grad for p in self.text_encoder.parameters())
        critic = nn.ModuleDict({"critic": self.discriminator, "text": self.text_encoder}) if trained_text \
            else self.discriminator
        return {"discriminator": critic, "generator": self.generator}

    def part_step(self, part: str, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        if part == "discriminator":
            return self.discriminator_step(batch, step)
        if part == "generator":
            return self.generator_step(batch, step)
        raise ValueError(f"XMC-GAN has no part {part!r}; its parts are {self.part_names}")

    def discriminator_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """Hinge on real and detached fake images, and the contrastive losses of the real pairs."""
        m = self.cfg.method
        real = unit_pixels(batch["views"][0])
        mask = batch["text_mask"].bool()
        text = self.text_encoder(batch["text_ids"], mask)
        fake = self.fakes(batch, step, _detached(text), mask)
        out = self.discriminator(torch.cat([real, fake.detach()]), text.sentence)
        b = len(real)
        terms = {"d_hinge": hinge_d_loss(out.logits[:b], out.logits[b:])}
        if m.word_contrastive:
            terms["d_word_real"] = word_region_loss(out.regions[:b], text.words, mask, m.gamma1, m.gamma2,
                                                    m.gamma3, gather=m.gather)
        if m.sentence_contrastive:
            terms["d_sentence_real"] = pair_contrastive_loss(out.pooled[:b], out.sentence, m.temperature, m.gather)
        real_pooled = out.pooled[:b].detach()
        self._shared = StepShared(step, text.words.detach(), text.sentence.detach(), mask, real, real_pooled, fake)
        return {"loss": sum(terms.values()), **{k: v.detach() for k, v in terms.items()}, "embedding": real_pooled}

    def generator_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """Hinge, the contrastive losses of the fake pairs and fake-vs-real, through D frozen."""
        m = self.cfg.method
        shared = self._shared
        if shared is None or shared.step != step:  # G updates alone at this step
            shared = self.shared_without_d(batch, step)
        with frozen(self.discriminator), evaluating(self.discriminator):
            out = self.discriminator(shared.fake, shared.sentence)
        terms = {"g_hinge": hinge_g_loss(out.logits)}
        if m.word_contrastive:
            terms["g_word_fake"] = word_region_loss(out.regions, shared.words, shared.word_mask, m.gamma1, m.gamma2,
                                                    m.gamma3, gather=m.gather)
        if m.sentence_contrastive:
            terms["g_sentence_fake"] = pair_contrastive_loss(out.pooled, out.sentence, m.temperature, m.gather)
        if m.image_contrastive:
            terms["g_image"] = pair_contrastive_loss(out.pooled, shared.real_pooled, m.temperature, m.gather)
        if self.image_classifier is not None:
            with torch.no_grad():
                real_logits = self.image_classifier(shared.real)
            terms["g_image_pretrained"] = pair_contrastive_loss(self.image_classifier(shared.fake), real_logits,
                                                                m.temperature, m.gather)
        self._shared = None
        return {"loss": sum(terms.values()), **{k: v.detach() for k, v in terms.items()}}

    def fakes(self, batch: dict[str, Any], step: int, text: TextFeatures, mask: torch.Tensor) -> torch.Tensor:
        """G's images for the batch's captions, z keyed by (seed, step, sample index); G's graph
        kept only when G updates at this step."""
        z = indexed_normal(batch["index"], self.z_dim, self.cfg.train.seed, step).to(text.sentence.device)
        with torch.set_grad_enabled("generator" in self.updating):
            return self.generator(z, text.sentence, text.words, mask)

    @torch.no_grad()
    def shared_without_d(self, batch: dict[str, Any], step: int) -> StepShared:
        """A step that updates G alone (a config with D's `every` > 1): text, real features and
        the fakes computed here (the fakes with G's graph)."""
        real = unit_pixels(batch["views"][0])
        mask = batch["text_mask"].bool()
        text = self.text_encoder(batch["text_ids"], mask)
        fake = self.fakes(batch, step, text, mask)
        with evaluating(self.discriminator):
            real_pooled = self.discriminator.trunk(real)[0]
        return StepShared(step, text.words, text.sentence, mask, real, real_pooled, fake)

    def on_after_optimizer_step(self, step: int, total_steps: int) -> None:
        """After a generator update: EMA of its parameters; its running statistics copied (the
        official EMA generator samples with the online generator's batch statistics)."""
        if "generator" in self.updating:
            ema_update_(self.ema_generator, self.generator, self.cfg.method.ema_momentum)
            with torch.no_grad():
                for ema, online in zip(self.ema_generator.buffers(), self.generator.buffers()):
                    ema.copy_(online)
        self._shared = None

    def fp32_modules(self) -> list[nn.Module]:
        return [self.ema_generator]

    def forward_buffers(self) -> list[torch.Tensor]:
        """Norm statistics, and the critic's power-iteration vectors its training forward advances."""
        return super().forward_buffers() + spectral_norm_buffers(self.discriminator)

    def encoder(self) -> nn.Module:
        return CriticFeatures(self.discriminator)

    # ------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, text_ids: torch.Tensor, text_mask: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The EMA generator's images in [0, 1] for these captions and noise (B, z_dim)."""
        mask = text_mask.bool()
        with evaluating(self.text_encoder, self.ema_generator):
            text = self.text_encoder(text_ids, mask)
            return self.ema_generator(z.to(text.sentence), text.sentence, text.words, mask).float()

    @torch.no_grad()
    def evaluate(self, context: EvalContext) -> dict[str, float]:
        """A grid of EMA-generator samples per val caption (rank 0), and FID against the real
        val images (`eval.inception_weights`) and R-precision by a dual encoder
        (`eval.dual_encoder`) when configured. Collective; every rank samples with rank 0's
        batch statistics (the ones its checkpoints hold)."""
        if distributed.is_distributed():
            for buffer in self.ema_generator.buffers():
                buffer.copy_(distributed.broadcast(buffer.to(distributed.comm_device()), src=0))
        if context.env.is_main:
            self.write_grid(context)
        cfg = self.cfg
        if not (cfg.eval.inception_weights or cfg.eval.dual_encoder):
            return {}
        from sslforge.eval.generation import score_generator

        scores = score_generator(self, cfg.data.val, cfg, context.env, fid_weights=cfg.eval.inception_weights,
                                 dual_encoder=cfg.eval.dual_encoder, samples=cfg.eval.fid_samples,
                                 batch_size=cfg.eval.batch_size, workers=cfg.data.num_workers,
                                 seed=cfg.method.eval_seed)
        return {("eval_samples" if k == "samples" else k): v for k, v in scores.items()}

    def write_grid(self, context: EvalContext) -> None:
        """`grid_captions` rows (val captions) of `grid_samples` images, the same noise in each
        column at every evaluation, each row titled by its caption."""
        from sslforge.eval.generation import caption_batches
        from sslforge.eval.image_grid import save_image_grid

        cfg, m = self.cfg, self.cfg.method
        batches = caption_batches(cfg.data.val, cfg.data.image_size, m.grid_captions, context.env, 0,
                                  cfg.data.tokenizer, cfg.data.max_tokens)
        batch = next(batches, None)
        batches.close()
        if batch is None:
            return
        rows, columns = len(batch["caption"]), m.grid_samples
        z = indexed_normal(torch.arange(columns).repeat(rows), self.z_dim, m.eval_seed, GRID_NOISE_KEY)
        device = context.env.device
        images = self.generate(batch["text_ids"].repeat_interleave(columns, 0).to(device),
                               batch["text_mask"].repeat_interleave(columns, 0).to(device), z.to(device))
        titles = [caption if j == 0 else "" for caption in batch["caption"] for j in range(columns)]
        path = save_image_grid(images.clamp(0, 1).cpu(), context.images_dir / f"generated_{context.step:08d}.png",
                               nrow=columns, titles=titles)
        context.log_image("generated", path)


def _detached(text: TextFeatures) -> TextFeatures:
    return TextFeatures(text.words.detach(), text.sentence.detach())
