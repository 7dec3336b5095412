"""Text encoders, the CLIP loss of the dual encoder, FID and R-precision.

FID runs torchmetrics on a randomly initialised Inception-v3 written in torch-fidelity's file
format (no download), its batch norms calibrated on one batch so features are not vanishing;
it is checked against the Fréchet distance computed here in numpy from the same network's
features. The tests read its 64-d first pooling (`FID_FEATURES`): the same file, loading and
sums as the 2048-d pool3, without torchmetrics' eigendecomposition of a 2048 x 2048 matrix
(10-50 s of CPU per score). R-precision uses a stub scorer whose image and caption embeddings
coincide by construction, so matched images score exactly 1 and shuffled ones chance.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sslforge.data_pipeline.views import IMAGENET_MEAN, IMAGENET_STD
from sslforge.eval import EvalError
from sslforge.eval.fid import INCEPTION_FILE, INCEPTION_URL, FrechetDistance, check_inception_weights
from sslforge.eval.rprecision import CANDIDATES, RPrecision, mismatched_candidates, scoring
from sslforge.losses.clip import clip_loss
from sslforge.models.text import FrozenTextEncoder, SmallTextEncoder, build_text_encoder, check_text_encoder_spec
from tests.dist_harness import run_ranks

FID_FEATURES = 64

# ----------------------------------------------------------------------------- text encoders


def _captions(lengths: list[int], width: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return torch.randint(1, vocab, (len(lengths), width), generator=g) * mask, mask


def test_small_text_encoder_ignores_padding_and_pools_the_valid_words() -> None:
    torch.manual_seed(0)
    encoder = SmallTextEncoder(vocab_size=50, dim=8, word_dim=6).eval()
    ids, mask = _captions([3, 5, 1], 5, 50)
    words, sentence = encoder(ids, mask)
    assert words.shape == (3, 5, 8) and sentence.shape == (3, 8)
    assert torch.all(words[~mask] == 0)
    expected = torch.stack([words[i, :n].mean(0) for i, n in enumerate([3, 5, 1])])
    assert torch.allclose(sentence, expected, atol=1e-6)
    # more padding columns, and garbage ids under the padding: same features for the valid words
    wider = torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], 1)
    wider[~torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1)] = 7
    words2, sentence2 = encoder(wider, torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1))
    assert torch.allclose(words2[:, :5][mask], words[mask], atol=1e-6)
    assert torch.allclose(sentence2, sentence, atol=1e-6)
    # bidirectional: the first word's feature depends on the last valid word
    changed = ids.clone()
    changed[1, 4] = (changed[1, 4] % 49) + 1
    assert not torch.allclose(encoder(changed, mask).words[1, 0], words[1, 0])
    with pytest.raises(ValueError, match="prefix"):
        encoder(ids, mask.flip(1))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT written as `save_pretrained` does (the layout of bert-base-uncased)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    path = tmp_path_factory.mktemp("bert")
    BertModel(config).save_pretrained(path)
    return path


class _Owner(nn.Module):
    """A model holding a frozen text encoder beside its own trained layer (XMC-GAN's shape)."""

    def __init__(self, text: nn.Module) -> None:
        super().__init__()
        self.text, self.head = text, nn.Linear(4, 4)


def test_bert_encoder_is_frozen_pooled_over_valid_tokens_and_kept_out_of_checkpoints(tiny_bert: Path) -> None:
    from transformers import BertModel

    encoder = build_text_encoder(f"bert:{tiny_bert}", vocab_size=60)
    assert isinstance(encoder, FrozenTextEncoder) and encoder.dim == 16
    ids, mask = _captions([4, 2, 6], 6, 60)
    words, sentence = _Owner(encoder).train().text(ids, mask)  # the owner's train() leaves it in eval
    reference = BertModel.from_pretrained(tiny_bert).eval()
    hidden = reference(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    expected = torch.stack([hidden[i, :n].mean(0) for i, n in enumerate([4, 2, 6])])
    assert torch.allclose(sentence, expected, atol=1e-5)
    assert torch.allclose(words[mask], hidden[mask], atol=1e-5) and torch.all(words[~mask] == 0)
    assert not any(p.requires_grad for p in encoder.parameters()) and not sentence.requires_grad

    owner = _Owner(encoder)
    state = owner.state_dict()
    assert set(state) == {"head.weight", "head.bias"}  # no BERT weights in a checkpoint
    fresh = _Owner(build_text_encoder(f"bert:{tiny_bert}", vocab_size=60))
    fresh.load_state_dict(state)  # strict: the encoder's absent keys are not missing
    stale = {**state, "text.encoder.model.embeddings.word_embeddings.weight": torch.zeros(60, 16)}
    fresh.load_state_dict(stale)  # an old checkpoint's copy is not loaded over the pretrained weights
    assert torch.equal(fresh.text.encoder.model.embeddings.word_embeddings.weight,
                       reference.embeddings.word_embeddings.weight)
    with pytest.raises(ValueError, match="61 tokens|60 tokens"):
        build_text_encoder(f"bert:{tiny_bert}", vocab_size=61)


def test_text_encoder_specs_fail_before_training_naming_the_path(tmp_path: Path, tiny_bert: Path) -> None:
    missing = tmp_path / "no_bert"
    with pytest.raises(ValueError, match=f"{missing} does not exist.*config.json"):
        check_text_encoder_spec(f"bert:{missing}")
    (tmp_path / "half").mkdir()
    with pytest.raises(ValueError, match="config.json is missing"):
        check_text_encoder_spec(f"bert:{tmp_path / 'half'}")
    with pytest.raises(ValueError, match="data.tokenizer="):
        check_text_encoder_spec(f"bert:{tiny_bert}", tokenizer="words")
    check_text_encoder_spec(f"bert:{tiny_bert}", tokenizer=str(tiny_bert))
    with pytest.raises(ValueError, match=f"{tmp_path / 'run'}/config.yaml is missing.*dual_encoder run"):
        check_text_encoder_spec(f"dual_encoder:{tmp_path / 'run'}")
    with pytest.raises(ValueError, match="expected bert:"):
        check_text_encoder_spec("gpt:/x")

# ----------------------------------------------------------------------------- CLIP loss


def test_clip_loss_equals_the_symmetric_cross_entropy_of_cosine_logits() -> None:
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    t = torch.tensor(2.0, requires_grad=True)
    loss = clip_loss(image, text, t.exp())
    cos = np.array([[float(F.cosine_similarity(a, b, dim=0)) for b in text] for a in image]) * np.exp(2.0)

    def ce(logits: np.ndarray) -> float:
        return float(np.mean([np.log(np.exp(row).sum()) - row[i] for i, row in enumerate(logits)]))

    assert abs(loss.item() - (ce(cos) + ce(cos.T)) / 2) < 1e-5
    loss.backward()
    assert t.grad is not None and t.grad.abs() > 0  # the temperature is learned

# ----------------------------------------------------------------------------- FID


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Inception-v3 in torch-fidelity's format (its state dict, saved by torch.save)
    under the published file name; batch norms calibrated on one batch of random images."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(0)
    with mock.patch("torch_fidelity.feature_extractor_inceptionv3.torch.load", return_value={}), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="-")
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative: the running statistics of this one batch
    with torch.no_grad():
        net.train()(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8))
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(net.eval().state_dict(), path)
    return path


def _image_sets() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    real = torch.rand(8, 3, 16, 16, generator=g)
    fake = (torch.rand(8, 3, 16, 16, generator=g) * 0.6).pow(2)  # darker, other statistics
    return real, fake


def _numpy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64 with
    symmetric eigendecompositions (the PSD form of Tr sqrt(S_a S_b))."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


def test_fid_matches_the_frechet_distance_of_the_inception_features(inception_file: Path) -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    real, fake = _image_sets()
    fid = FrechetDistance(inception_file, features=FID_FEATURES)
    for half in (slice(0, 3), slice(3, 8)):  # batches accumulate
        fid.update(real[half], real=True)
        fid.update((fake[half] * 255).round().to(torch.uint8), real=False)  # uint8 and [0, 1] alike
    score = fid.compute()
    net = FeatureExtractorInceptionV3("inception-v3-compat", [str(FID_FEATURES)],
                                     feature_extractor_weights_path=str(inception_file))
    with torch.no_grad():
        feats = [net((x * 255).round().to(torch.uint8))[0].double().numpy() for x in (real, fake)]
    expected = _numpy_fid(*feats)
    assert expected > 1e-3 and abs(score - expected) < 1e-3 * expected
    fid.update(real, real=True)
    fid.update(real, real=False)
    assert abs(fid.compute()) < 1e-4 * expected  # FID(x, x) = 0


def test_missing_inception_weights_name_the_file_its_url_and_the_key(tmp_path: Path) -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert INCEPTION_URL == URL_INCEPTION_V3  # the file torchmetrics' extractor loads
    missing = tmp_path / INCEPTION_FILE
    with pytest.raises(ValueError) as info:
        check_inception_weights(missing)
    message = str(info.value)
    assert str(missing) in message and INCEPTION_URL in message and "eval.inception_weights" in message
    assert "\n" not in message

# ----------------------------------------------------------------------------- R-precision


class _StubScorer(nn.Module):
    """Caption "c<k> ..." is the random pattern P[k] in [0, 1]^(3x4x4); an image drawn for it is
    that pattern. Both towers read the pattern back exactly (the text one through the built-in
    tokenizer's id of the word c<k>), so an image's embedding equals its caption's."""

    def __init__(self, patterns: torch.Tensor) -> None:
        from sslforge.data_pipeline.captions import word_id

        super().__init__()
        self.register_buffer("patterns", patterns)
        self.anchor = nn.Parameter(torch.zeros(1))  # where the scorer lives
        self.cfg = SimpleNamespace(data=SimpleNamespace(image_size=4, tokenizer="words", max_tokens=4))
        self.pattern_of = {word_id(f"c{k}"): k for k in range(len(patterns))}

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (images * std + mean).flatten(1)

    def text_embedding(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return self.patterns[[self.pattern_of[int(i)] for i in text_ids[:, 1]]]  # after the start token


def _retrieval_set(n: int = 240, distinct: int = 160) -> dict:
    """n samples whose captions repeat (sample i has caption k = i % distinct, its image the
    pattern of k)."""
    g = torch.Generator().manual_seed(3)
    patterns = torch.rand(distinct, 3, 4, 4, generator=g)
    k = torch.arange(n) % distinct
    return {"patterns": patterns.flatten(1), "images": patterns[k], "captions": [f"c{i} shape" for i in k.tolist()],
            "index": torch.arange(n) + 1000}


def _r_precision(data: dict, images: torch.Tensor, rows: slice) -> float:
    with scoring(_StubScorer(data["patterns"])) as scorer:
        metric = RPrecision(scorer, seed=5)
        middle = (rows.start + rows.stop) // 2
        for part in (slice(rows.start, middle), slice(middle, rows.stop)):
            metric.update(images[part], data["captions"][part], data["index"][part])
    return metric.compute()


def _half_shuffled(data: dict) -> torch.Tensor:
    images = data["images"].clone()
    images[::2] = images[::2].roll(7, dims=0)
    return images


def test_r_precision_is_one_for_matching_images_and_chance_for_shuffled_ones() -> None:
    data = _retrieval_set()
    n = len(data["index"])
    assert _r_precision(data, data["images"], slice(0, n)) == 1.0
    shuffled = data["images"][torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    assert _r_precision(data, shuffled, slice(0, n)) < 0.04  # chance: 1 / CANDIDATES
    half = _r_precision(data, _half_shuffled(data), slice(0, n))
    assert 0.45 < half < 0.55


def test_mismatched_candidates_are_distinct_other_captions_keyed_by_the_sample() -> None:
    classes = np.arange(300) % 150
    drawn = mismatched_candidates(17, 3, classes, seed=0)
    assert len(drawn) == CANDIDATES - 1 == len(set(drawn.tolist()))
    assert not np.any(classes[drawn] == classes[3])
    assert np.array_equal(drawn, mismatched_candidates(17, 3, classes, seed=0))
    assert not np.array_equal(drawn, mismatched_candidates(18, 3, classes, seed=0))
    with pytest.raises(EvalError, match="needs 99 captions"):
        mismatched_candidates(0, 0, np.arange(60), seed=0)


def _scores_on_my_share(inception: str) -> tuple[float, float]:
    """This rank's half of the FID images and R-precision samples (rank 0 the first half)."""
    from sslforge import distributed

    r, world = distributed.rank(), distributed.world_size()
    real, fake = _image_sets()
    share = slice(r * len(real) // world, (r + 1) * len(real) // world)
    fid = FrechetDistance(inception, features=FID_FEATURES)
    fid.update(real[share], real=True)
    fid.update(fake[share], real=False)
    data = _retrieval_set()
    n = len(data["index"])
    return fid.compute(), _r_precision(data, _half_shuffled(data), slice(r * n // world, (r + 1) * n // world))


# ----------------------------------------------------------------------------- the dual encoder

SMALL_DUAL = ("optim.name=sgd", "method.embed_dim=16", "method.word_dim=8")  # SGD: see test_trainer_equivalence


def _step_and_checkpoint(run_dir: str, *overrides: str) -> dict:
    """`one_step` of the tiny dual encoder; on 1 rank the run directory also gets a checkpoint
    of the initial weights and its config, as a trained run has."""
    from sslforge import distributed
    from sslforge.config import save_config
    from tests.trainer_fixtures import one_step_of, step_trainer

    result = one_step_of(run_dir, "dual_encoder_synth", *overrides)
    if distributed.world_size() == 1:
        trainer = step_trainer(run_dir, *overrides, recipe="dual_encoder_synth")
        trainer.save()
        save_config(trainer.cfg, Path(run_dir) / "config.yaml")
    return result


def _on_each_rank(run_dir: str, inception: str, *overrides: str) -> tuple[dict, tuple[float, float]]:
    """Every multi-rank computation of this module in one start of the ranks (the slow part):
    a dual encoder step, and this rank's share of FID and R-precision."""
    return _step_and_checkpoint(run_dir, *overrides), _scores_on_my_share(inception)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory, inception_file: Path) -> dict:
    """`_on_each_rank` on 1 rank with all of the data and on 2 ranks with half each; the 1-rank
    directory is a dual encoder run (a checkpoint and its config)."""
    root = tmp_path_factory.mktemp("dual")
    ((single_step, single_scores),) = run_ranks(_on_each_rank, 1, str(root / "one"), str(inception_file), *SMALL_DUAL)
    pair = run_ranks(_on_each_rank, 2, str(root / "two"), str(inception_file), *SMALL_DUAL)
    return {"run": root / "one", "single_step": single_step, "pair_steps": [p[0] for p in pair],
            "single_scores": single_scores, "pair_scores": [p[1] for p in pair]}


def test_fid_and_r_precision_on_two_ranks_equal_one(ranks: dict) -> None:
    single, pair = ranks["single_scores"], ranks["pair_scores"]
    assert pair[0] == pair[1]
    assert single[0] > 1e-3 and abs(pair[0][0] - single[0]) < 1e-6 * single[0]
    assert 0.45 < single[1] < 0.55 and abs(pair[0][1] - single[1]) < 1e-12


def test_dual_encoder_step_on_two_ranks_equals_one(ranks: dict) -> None:
    from tests.trainer_fixtures import assert_two_ranks_equal_one

    single = ranks["single_step"]
    assert_two_ranks_equal_one(single, ranks["pair_steps"])
    assert single["grads"]["logit_scale"].abs() > 0  # the temperature learns, from both ranks' pairs


def test_a_dual_encoder_run_is_a_frozen_text_encoder(ranks: dict) -> None:
    from sslforge.data_pipeline.captions import build_tokenizer
    from sslforge.trainer.checkpoint import load_module_weights

    run = ranks["run"]
    vocab = build_tokenizer("words", 17).vocab_size
    encoder = build_text_encoder(f"dual_encoder:{run}", vocab)
    weights, _ = load_module_weights(run)
    assert torch.equal(encoder.encoder.embed.weight, weights["text_tower.embed.weight"])
    assert encoder.dim == 16 and not any(p.requires_grad for p in encoder.parameters())
    assert set(_Owner(encoder).state_dict()) == {"head.weight", "head.bias"}
    check_text_encoder_spec(f"dual_encoder:{run}", tokenizer="words")
    with pytest.raises(ValueError, match="was trained on data.tokenizer=words"):
        check_text_encoder_spec(f"dual_encoder:{run}", tokenizer="/some/bert")
    with pytest.raises(ValueError, match="vocabulary"):
        build_text_encoder(f"dual_encoder:{run}", vocab + 1)


def test_eval_files_are_checked_before_training(ranks: dict, tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from sslforge.eval.generation import check_eval_config

    run = ranks["run"]

    def cfg(**entries: object) -> object:
        eval_keys = {"inception_weights": None, "dual_encoder": None, **entries}
        return OmegaConf.create({"eval": eval_keys, "method": {"text_encoder": f"dual_encoder:{run}"}})

    with pytest.raises(ValueError, match=f"{tmp_path / 'w.pth'} does not exist.*{INCEPTION_URL}"):
        check_eval_config(cfg(inception_weights=str(tmp_path / "w.pth")))
    with pytest.raises(ValueError, match="eval.dual_encoder=.*config.yaml is missing"):
        check_eval_config(cfg(dual_encoder=str(tmp_path)))
    with pytest.raises(ValueError, match="also method.text_encoder"):  # the GAN's own text encoder
        check_eval_config(cfg(dual_encoder=str(run)))


def test_caption_batches_thin_the_set_evenly_and_carry_captions(synth_data: dict) -> None:
    from sslforge.data_pipeline.captions import build_tokenizer
    from sslforge.eval.generation import caption_batches

    env = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    batches = list(caption_batches(synth_data["val"], 16, 64, env, 0, "words", 17, samples=100))
    index = torch.cat([b["index"] for b in batches])
    assert len(index) == 100 and index.min() < 3 and index.max() > 252  # spread over all 256
    assert all(b["image"].dtype == torch.uint8 and b["image"].shape[1:] == (3, 16, 16) for b in batches)
    ids, mask = build_tokenizer("words", 17)(batches[0]["caption"])
    assert torch.equal(ids, batches[0]["text_ids"]) and torch.equal(mask, batches[0]["text_mask"])


def test_eval_commands_refuse_bad_input_in_one_line(ranks: dict, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from sslforge.cli import main
    from sslforge.eval.generation import check_generator

    run = str(ranks["run"])
    missing = tmp_path / INCEPTION_FILE
    assert main(["eval", "fid", run, "--real", run, "--inception-weights", str(missing)]) == 2
    error = capsys.readouterr().err
    assert str(missing) in error and INCEPTION_URL in error and len(error.strip().splitlines()) == 1
    assert main(["eval", "rprecision", run, "--dual-encoder", str(tmp_path), "--data", run]) == 2
    assert "eval.dual_encoder" in capsys.readouterr().err
    with pytest.raises(EvalError, match="does not generate images from captions"):
        check_generator(nn.Linear(1, 1), run)  # what `eval fid | rprecision` says of a dual encoder run
