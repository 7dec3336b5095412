"""Text encoders: captions -> word features (B, L, D) and a sentence feature (B, D).

Two kinds, one interface (`TextEncoder`):
- `SmallTextEncoder`, trained from scratch (the `dual_encoder` method's text tower, for data
  without a pretrained encoder such as the built-in captions): word embeddings and a
  bidirectional GRU, AttnGAN's DAMSM text encoder (`RNN_ENCODER`) with a GRU cell. A recurrent
  net rather than two transformer layers: word order is its inductive bias with no position
  embeddings to learn, it is what the text-to-image GAN literature trains from scratch, and 17
  tokens make its sequential steps cheap.
- `BertTextEncoder`: a pretrained BERT read from a local Hugging Face directory, XMC-GAN's
  frozen text encoder (REFERENCE.md section 11).

Both pool the sentence the same way, the mean of the word features over the valid tokens
(XMC-GAN's BERT pooling; AttnGAN takes the GRU's last states instead), so a text-to-image
model sees the same kind of sentence feature whichever encoder feeds it.

A pretrained encoder used as is (`build_text_encoder`: "bert:<dir>", or "dual_encoder:<run dir>"
for the text tower of a trained `dual_encoder` run) is wrapped in `FrozenTextEncoder`: no
gradient, always in eval mode, and kept out of the owner's state_dict, so checkpoints do not
carry 110M BERT weights per save: it is rebuilt from its spec when the owner is built.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

BERT_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
SPEC_KINDS = ("bert", "dual_encoder")


class TextFeatures(NamedTuple):
    words: torch.Tensor  # (B, L, D), zero at padding
    sentence: torch.Tensor  # (B, D)


class TextEncoder(nn.Module, metaclass=ABCMeta):
    """(text_ids (B, L) int64, text_mask (B, L) bool, valid tokens first) -> TextFeatures."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    @abstractmethod
    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> TextFeatures:
        ...


def masked_mean(words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, L, D) over the valid positions of each row (a row without any: zeros)."""
    weights = mask.to(words.dtype).unsqueeze(-1)
    return (words * weights).sum(1) / weights.sum(1).clamp(min=1)


def _lengths(text_mask: torch.Tensor) -> torch.Tensor:
    """Valid tokens per row; the mask must be a prefix (tokens, then padding)."""
    lengths = text_mask.sum(1)
    prefix = torch.arange(text_mask.shape[1], device=text_mask.device)[None, :] < lengths[:, None]
    if not torch.equal(prefix, text_mask.bool()):
        raise ValueError("text_mask must mark a prefix of each row (valid tokens first, then padding)")
    return lengths


class SmallTextEncoder(TextEncoder):
    """Word embedding -> bidirectional GRU; a word's feature is its forward and backward states
    (dim/2 each), padding left out of the recurrence (packed sequences) and zeroed."""

    def __init__(self, vocab_size: int, dim: int = 256, word_dim: int = 300, layers: int = 1,
                 dropout: float = 0.0) -> None:
        if dim % 2:
            raise ValueError(f"SmallTextEncoder: dim must be even (two GRU directions), got {dim}")
        super().__init__(dim)
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.drop = nn.Dropout(dropout)
        self.rnn = nn.GRU(word_dim, dim // 2, num_layers=layers, batch_first=True, bidirectional=True,
                          dropout=dropout if layers > 1 else 0.0)

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> TextFeatures:
        lengths = _lengths(text_mask)
        packed = pack_padded_sequence(self.drop(self.embed(text_ids)), lengths.clamp(min=1).cpu(),
                                      batch_first=True, enforce_sorted=False)
        words, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=text_ids.shape[1])
        words = words * text_mask.unsqueeze(-1).to(words.dtype)  # an empty row's one step dropped too
        return TextFeatures(words, masked_mean(words, text_mask))


class BertTextEncoder(TextEncoder):
    """A Hugging Face BERT from a local directory (no download): words = its sequence output,
    sentence = their mean over the valid tokens. Build it through `build_text_encoder`, which
    freezes it."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(path), local_files_only=True)
        super().__init__(model.config.hidden_size)
        self.model = model
        self.vocab_size = model.config.vocab_size

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> TextFeatures:
        words = self.model(input_ids=text_ids, attention_mask=text_mask.long()).last_hidden_state
        words = words * text_mask.unsqueeze(-1).to(words.dtype)
        return TextFeatures(words, masked_mean(words, text_mask))


class FrozenTextEncoder(TextEncoder):
    """A pretrained encoder used as is: parameters without gradient, eval mode whatever the
    owner's mode (BERT's dropout stays off), forward without autograd, and none of its tensors
    in the owner's state_dict (saving drops them, loading neither needs nor accepts them): it is
    rebuilt from `source` (its spec) with the owner."""

    def __init__(self, encoder: TextEncoder, source: str) -> None:
        super().__init__(encoder.dim)
        self.encoder = encoder.requires_grad_(False).eval()
        self.source = source
        self.vocab_size: int = encoder.vocab_size  # type: ignore[assignment]
        keep_out_of_state_dict(self)

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        return super().train(False)

    @torch.no_grad()
    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> TextFeatures:
        return self.encoder(text_ids, text_mask)


def keep_out_of_state_dict(owner: nn.Module) -> None:
    """`owner.encoder` (a frozen network rebuilt from its source with the owner) stays out of
    the owner's state_dict: saving drops its tensors, loading keeps the ones it holds."""
    owner.register_state_dict_post_hook(_drop_own_entries)
    owner.register_load_state_dict_pre_hook(_keep_own_entries)


def _drop_own_entries(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(f"{prefix}encoder.")]:
        del state_dict[key]


def _keep_own_entries(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Loading sets the encoder to the weights it already holds: none are needed from the
    state dict, and any there (written before it was frozen) are not used."""
    _drop_own_entries(module, state_dict, prefix, None)
    state_dict.update({f"{prefix}encoder.{k}": v for k, v in module.encoder.state_dict().items()})


# ----------------------------------------------------------------------------- specs

def _parse_spec(spec: str) -> tuple[str, Path]:
    kind, sep, where = spec.partition(":")
    if not sep or kind not in SPEC_KINDS or not where:
        raise ValueError(f"text encoder {spec!r}: expected bert:<local BERT dir> or dual_encoder:<run dir>")
    return kind, Path(where).expanduser()


def check_text_encoder_spec(spec: str, tokenizer: str | None = None) -> None:
    """Raise ValueError naming the missing path and what it must hold; loads no model (a config
    check before training). With `tokenizer` (`data.tokenizer`), also that the captions will be
    tokenised as the encoder expects."""
    kind, where = _parse_spec(spec)
    if kind == "bert":
        _check_bert_dir(where, tokenizer)
    else:
        _check_dual_encoder_run(where, tokenizer)


def _check_bert_dir(where: Path, tokenizer: str | None) -> None:
    holds = (f"a local Hugging Face BERT directory (config.json and {' or '.join(BERT_WEIGHTS[:2])}, "
             "as `save_pretrained` writes them; e.g. bert-base-uncased, XMC-GAN's encoder)")
    if not where.is_dir():
        raise ValueError(f"text encoder bert:{where}: {where} does not exist; it must be {holds}")
    if not (where / "config.json").is_file():
        raise ValueError(f"text encoder bert:{where}: {where / 'config.json'} is missing; "
                         f"the directory must be {holds}")
    if not any((where / name).is_file() for name in BERT_WEIGHTS):
        raise ValueError(f"text encoder bert:{where}: no weights file ({', '.join(BERT_WEIGHTS)}) in {where}; "
                         f"the directory must be {holds}")
    if tokenizer is not None and tokenizer == "words":
        raise ValueError(f"text encoder bert:{where} reads BERT word pieces: set data.tokenizer={where} "
                         "(the BERT directory's tokenizer), not the built-in 'words'")


def _check_dual_encoder_run(where: Path, tokenizer: str | None) -> None:
    cfg = check_dual_encoder_run(where, f"text encoder dual_encoder:{where}")
    if tokenizer is not None and tokenizer != cfg.data.tokenizer:
        raise ValueError(f"text encoder dual_encoder:{where} was trained on data.tokenizer={cfg.data.tokenizer}; "
                         f"this run has data.tokenizer={tokenizer}")


def check_dual_encoder_run(where: Path, what: str) -> Any:
    """The saved config of the trained `dual_encoder` run at `where`, or ValueError starting with
    `what` (the key or spec that named it) and saying what is missing; loads no weights."""
    from sslforge.config import load_resolved

    holds = "the run directory of a trained dual_encoder run (config.yaml and checkpoints/step_N)"
    if not (where / "config.yaml").is_file():
        raise ValueError(f"{what}: {where / 'config.yaml'} is missing; it must be {holds}")
    cfg = load_resolved(where / "config.yaml")
    if cfg.method.name != "dual_encoder":
        raise ValueError(f"{what}: that run trained {cfg.method.name!r}, not dual_encoder")
    if not any((where / "checkpoints").glob("step_*")):
        raise ValueError(f"{what}: {where / 'checkpoints'} holds no checkpoint; it must be {holds}")
    return cfg


def build_text_encoder(spec: str, vocab_size: int) -> FrozenTextEncoder:
    """The frozen pretrained encoder `spec` names; `vocab_size` is the caller's tokenizer's, which
    must be the one the encoder was trained with."""
    check_text_encoder_spec(spec)
    kind, where = _parse_spec(spec)
    with torch.random.fork_rng(devices=[]):  # building it leaves the caller's initialisation as it was
        encoder = BertTextEncoder(where) if kind == "bert" else _dual_encoder_text_tower(where)
    if encoder.vocab_size != vocab_size:
        raise ValueError(f"text encoder {spec}: its vocabulary has {encoder.vocab_size} tokens, the "
                         f"tokenizer (data.tokenizer) gives {vocab_size}: use the encoder's own tokenizer")
    return FrozenTextEncoder(encoder, spec)


def _dual_encoder_text_tower(run_dir: Path) -> TextEncoder:
    from sslforge.eval.run import load_method

    _, _, method, _ = load_method(run_dir)
    return method.text_tower  # type: ignore[no-any-return]


__all__ = ["BertTextEncoder", "FrozenTextEncoder", "SmallTextEncoder", "TextEncoder", "TextFeatures",
           "build_text_encoder", "check_dual_encoder_run", "check_text_encoder_spec", "keep_out_of_state_dict",
           "masked_mean"]
