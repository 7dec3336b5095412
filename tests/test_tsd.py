"""`sslforge eval tsd` (test-time self-distillation, CVPR 2023): its pieces against formulas
restated here, whole steps against the official forward restated in plain loops, a zero learning
rate that changes nothing, and the gain on the built-in shapes under Gaussian noise, end to end
through the CLI on the session's linear-probe run."""
from __future__ import annotations

import json
import math
import shutil
from copy import deepcopy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sslforge.eval import EvalError
from sslforge.eval.tsd import (TSD, Memory, TSDSettings, adapt_stream, class_prototypes, consistency_loss,
                               neighbour_loss, select_supports, split_classifier, tsd_from_run)
from sslforge.launcher.env import DistEnv
from tests.test_cli import sslforge

CPU = torch.device("cpu")
SHIFT = ("gaussian_noise", 3)  # the probe's top-1 falls from about 85% to about 16%
MIN_GAIN = 15.0  # percentage points; measured +32 (15.6% -> 47.7%) on the helpers' copy of these runs


class Tiny(nn.Module):
    """A classifier shaped like the probes: `.backbone` (conv, batch norm, pooling) and `.head`."""

    def __init__(self, head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.head = head if head is not None else nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny()
    with torch.no_grad():  # running statistics unlike any batch's, so "batch" and "source" differ
        model.backbone[1].running_mean.uniform_(-1, 1)
        model.backbone[1].running_var.uniform_(0.5, 2)
    return model.eval()


def _batches(count: int = 4, size: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(size, 3, 8, 8, generator=g) for _ in range(count)]


# ---------------------------------------------------------------- the pieces

def test_entropy_filter_keeps_the_lowest_entropy_entries_of_each_class() -> None:
    g = torch.Generator().manual_seed(0)
    labels, entropy = torch.randint(0, 4, (40,), generator=g), torch.rand(40, generator=g)
    labels[labels == 2] = 1  # class 2 empty
    for k in (1, 3, 100):
        kept = select_supports(labels, entropy, 4, k).tolist()
        expected = [i for c in range(4)
                    for _, i in sorted((float(entropy[i]), i) for i in range(40) if labels[i] == c)[:k]]
        assert kept == expected
    assert sorted(select_supports(labels, entropy, 4, -1).tolist()) == list(range(40))


def test_prototypes_point_along_the_class_means_of_normalised_features() -> None:
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(10, 5, generator=g), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 1])
    prototypes = class_prototypes(features, labels, 3)
    for c in (0, 1):
        members = [features[i] / features[i].norm() for i in range(10) if labels[i] == c]
        mean = torch.stack(members).mean(0)
        assert torch.allclose(F.normalize(prototypes[c], dim=0), mean / mean.norm(), atol=1e-6)
    assert torch.equal(prototypes[2], torch.zeros(5))  # no entry of class 2


def test_consistency_loss_on_a_hand_made_example() -> None:
    z = torch.tensor([[1.0, -3.0], [2.0, 2.0]], requires_grad=True)
    prototypes = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -4.0]])
    logits = torch.tensor([[3.0, 0.0, 1.0], [0.0, 2.0, 0.0]], requires_grad=True)
    total = 0.0
    for i in range(2):
        zl1 = [v / sum(abs(u) for u in z[i].tolist()) for v in z[i].tolist()]
        sims = [sum(a * b / sum(abs(u) for u in c.tolist()) for a, b in zip(zl1, c.tolist())) for c in prototypes]
        q = [math.exp(s) / sum(math.exp(t) for t in sims) for s in sims]
        probs = [math.exp(v) / sum(math.exp(u) for u in logits[i].tolist()) for v in logits[i].tolist()]
        t = [math.exp(v) / sum(math.exp(u) for u in probs) for v in probs]  # softmax of the probabilities
        total += sum(qk * (math.log(qk) - math.log(tk)) for qk, tk in zip(q, t))
    loss = consistency_loss(z, prototypes, logits)
    assert loss.item() == pytest.approx(total / 2, rel=1e-6)
    loss.backward()
    assert z.grad is not None and logits.grad is None  # the classifier's side is the teacher


def test_neighbour_loss_on_a_hand_made_example() -> None:
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    memory = Memory(torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]]), torch.zeros(4, dtype=torch.long),
                    torch.zeros(4), torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.6, 0.4]]))
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]], requires_grad=True)
    terms = []
    for i in range(2):
        cos = [float(F.cosine_similarity(z[i], m, dim=0)) for m in memory.features]
        p = logits[i].softmax(0).tolist()
        for j in sorted(range(4), key=lambda j: -cos[j])[:3]:
            terms.append(cos[j] * sum((a - b) ** 2 for a, b in zip(p, memory.scores[j].tolist())))
    loss = neighbour_loss(z, memory, logits)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    loss.backward()
    assert logits.grad is not None and loss.item() > 0  # minimised: neighbours' predictions pulled together


def test_split_at_the_last_linear_also_through_a_probes_feature_batch_norm() -> None:
    model = Tiny(nn.Sequential(nn.BatchNorm1d(6, affine=False), nn.Linear(6, 4))).eval()
    featurizer, head = split_classifier(model)
    x = torch.randn(5, 3, 8, 8)
    assert head is model.head[1] and torch.equal(head(featurizer(x)), model(x))
    with pytest.raises(EvalError, match="nn.Linear"):
        split_classifier(nn.Sequential(nn.Flatten(), nn.Linear(192, 4)))


# ---------------------------------------------------------------- whole steps

def _reference_run(model: Tiny, batches: list[torch.Tensor], lr: float, filter_k: int) -> list[torch.Tensor]:
    """The official TSD forward restated with one Python list of (feature, logits) entries; the
    network in train mode (the official script's); every parameter under Adam."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    entropy = lambda logits: float(-(logits.softmax(0) * logits.log_softmax(0)).sum())  # noqa: E731
    warmup = model.head.weight.detach().clone()
    bank = list(zip(warmup, model.head(warmup).detach()))
    outputs = []
    for x in batches:
        z = model.backbone(x)
        p = model.head(z)
        bank += list(zip(z.detach(), p.detach()))
        classes = range(p.shape[1])
        bank = [bank[i] for c in classes
                for _, i in sorted((entropy(l), i) for i, (_, l) in enumerate(bank) if int(l.argmax()) == c)[:filter_k]]
        sums = [sum((f / f.norm() for f, l in bank if int(l.argmax()) == c), torch.zeros(z.shape[1])) for c in classes]
        loss = 0
        for i in range(len(z)):
            sims = torch.stack([(z[i] / z[i].abs().sum()) @ (s / s.abs().sum().clamp_min(1e-12)) for s in sums])
            q, teacher = sims.softmax(0), p[i].detach().softmax(0).softmax(0)
            loss = loss + (q * (q.log() - teacher.log())).sum() / len(z)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        outputs.append(p.detach())
    return outputs


def test_steps_follow_the_official_forward() -> None:
    batches = _batches()
    expected = _reference_run(_tiny(), batches, lr=1e-2, filter_k=5)
    tsd = TSD(_tiny(), TSDSettings(lr=1e-2, filter_k=5))
    for x, want in zip(batches, expected):
        assert torch.allclose(tsd.step(x), want, atol=1e-5)
    assert not torch.allclose(expected[-1], _tiny().train()(batches[-1]), atol=1e-3)  # the steps did move it


@pytest.mark.parametrize("norm", ["source", "batch"])
def test_zero_learning_rate_changes_no_parameter_and_predicts_as_the_network(norm: str) -> None:
    model = _tiny()
    tsd = TSD(deepcopy(model), TSDSettings(lr=0.0, norm=norm))
    plain = deepcopy(model)
    if norm == "batch":
        plain.backbone[1].train()  # the same network normalising with each batch's statistics
    for x in _batches():
        adapted = tsd.step(x)
        with torch.no_grad():
            assert torch.equal(adapted, plain(x))
    assert tsd.model.backbone[0].weight.grad is not None  # the step ran, with gradients
    for (name, adapted), original in zip(tsd.model.named_parameters(), model.parameters()):
        assert adapted.detach().numpy().tobytes() == original.detach().numpy().tobytes(), name


def test_several_ranks_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    two = DistEnv(rank=0, world_size=2, local_rank=0, device=CPU, backend="gloo")
    monkeypatch.setattr("sslforge.launcher.env.init_distributed", lambda backend="auto": two)
    with pytest.raises(EvalError, match="one process"):
        tsd_from_run(tmp_path)


# ---------------------------------------------------------------- the linear-probe run

def test_zero_learning_rate_reports_the_unadapted_accuracy(linear_run: Path, shapes: dict[str, str]) -> None:
    from sslforge.eval.run import load_method

    _, cfg, method, _ = load_method(linear_run)
    classifier = method.classifier()
    for norm in ("source", "batch"):
        counts = adapt_stream(classifier, shapes["val"], cfg.data.image_size, CPU, TSDSettings(lr=0.0, norm=norm),
                              *SHIFT, workers=1)
        assert counts.after == (counts.before if norm == "source" else counts.norm_only)
        assert counts.samples == 1000


def test_tsd_recovers_accuracy_under_gaussian_noise(linear_run: Path, shapes: dict[str, str], tmp_path: Path) -> None:
    run = Path(shutil.copytree(linear_run, tmp_path / "probe"))  # the shared run stays as other tests expect it
    done = sslforge("eval", "tsd", str(run), "--data", shapes["val"], "--corruption", SHIFT[0],
                    "--severity", str(SHIFT[1]), "--workers", "1", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((run / "tsd.json").read_text())
    assert result["samples"] == 1000 and (result["lr"], result["filter_k"], result["lam"]) == (1e-4, 100, 0.0)
    assert result["after_top1"] >= result["before_top1"] + MIN_GAIN, result
    assert "TSD (online, norm batch)" in done.stdout
    record = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["eval"] == "tsd" and record["tsd_after_top1"] == result["after_top1"]
    assert record["corruption"] == SHIFT[0] and record["severity"] == SHIFT[1]
