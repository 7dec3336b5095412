"""`sslforge eval tsd`: test-time adaptation of a trained classifier by TSD (test-time
self-distillation; Wang et al., "Feature Alignment and Uniformity for Test Time Adaptation",
CVPR 2023) as the official code does it (`SakurajimaMaiii/TSD` `code/adapt_algorithm.py` class
`TSD`, run by `unsupervise_adapt.py`; REFERENCE.md "TSD"). The classifier is split at its last
nn.Linear: everything before it (the backbone, and a linear probe's feature batch norm) is the
featurizer f, the Linear is the head.

    memory <- the head's weight rows (T3A's warm-up supports) with the head's label, entropy
              and softmax on each
    for each batch x of the unlabelled stream, in order:
        z = f(x);  p = head(z)                               p is what TSD predicts for x
        memory += (z, argmax p, H(p), softmax p); then, per predicted class, only its
                  `filter_k` entries of lowest entropy stay (the entropy filter)
        c_k = sum of the remaining L2-normalised z of class k          (prototypes)
        L = mean_i KL(softmax_k <z_i/|z_i|_1, c_k/|c_k|_1> || softmax(sg softmax p_i))
            + lam * mean_{i, j in 3-NN(z_i)} cos(z_i, m_j) |softmax p_i - s_j|^2
        one Adam step on L over every parameter
    official defaults: lr 1e-4, filter_k 100, lam 0, batch 128

The L1 norms are the official ones (`F.normalize(z, 1)`: 1 is the norm's order there), kept
because they are what the published numbers come from. Deviations, where the official line
cannot be what is meant: its neighbour term is `-cos * |p - s|^2` on the raw logits p (minimised
at infinity); here it is minimised, on probabilities, as the paper's local clustering describes
(with the official lam = 0 it is off either way); `filter_k = -1` keeps every entry (the official
slice `[:-1]` drops one per class).

What is reported, as the official script scores it: the top-1 of p, each batch's logits taken
before that batch's step, so each image is predicted once, online, by the model adapted on the
batches before it ("TSD"); beside it the unadapted classifier on the same images ("before"). The
official script keeps the network in train mode, so batch norm normalises with each test batch's
statistics: `norm="batch"` (default) puts the batch norm layers, and nothing else, in train mode;
`norm="source"` keeps the trained running statistics. Under "batch" the table also shows those
statistics alone (the same network, no step: the `BN` baseline of the official file), which tells
what TSD's loss adds to them.

Zero learning rate: the Adam step moves no parameter (bit-identical), so TSD's predictions are
the network's own: exactly the unadapted classifier's under `norm="source"`, and under "batch"
exactly the batch-statistics row (no learning, only the normalisation the official code uses).

Distributed: TSD is sequential (the memory and weights at batch t depend on every batch before),
so one process adapts over the whole stream, in shard order (the built-in and img2dataset shards
are shuffled; a class-sorted set is a non-i.i.d. stream, which TSD was not evaluated on). Several
ranks are refused rather than each silently adapting its own share.
"""
from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from sslforge.eval import EvalError

RESULT_FILE = "tsd.json"
NEIGHBOURS = 3  # `topk_cluster(..., k=3)` in the official forward
NORMS = ("batch", "source")


@dataclass(frozen=True)
class TSDSettings:
    """The official defaults (`unsupervise_adapt.py` arguments and the `TSD` signature)."""

    lr: float = 1e-4
    filter_k: int = 100  # entries kept per class; -1 keeps all
    lam: float = 0.0  # weight of the neighbour term
    norm: str = "batch"  # batch norm statistics: each test batch's ("batch") or the trained ones

    def check(self) -> None:
        if self.lr < 0:
            raise EvalError(f"--lr must be >= 0, got {self.lr}")
        if self.filter_k == 0 or self.filter_k < -1:
            raise EvalError(f"--filter-k must be a positive count or -1 (keep all), got {self.filter_k}")
        if self.norm not in NORMS:
            raise EvalError(f"--norm must be one of {NORMS}, got {self.norm!r}")


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax of each row."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


@dataclass
class Memory:
    """Test features seen so far with the head's prediction on each (T3A's supports)."""

    features: torch.Tensor  # (M, d)
    labels: torch.Tensor  # (M,) predicted class
    entropy: torch.Tensor  # (M,)
    scores: torch.Tensor  # (M, K) softmax

    @classmethod
    def of(cls, features: torch.Tensor, logits: torch.Tensor) -> "Memory":
        features, logits = features.detach(), logits.detach()
        return cls(features, logits.argmax(1), softmax_entropy(logits), logits.softmax(1))

    def __add__(self, other: "Memory") -> "Memory":
        return Memory(*(torch.cat(pair) for pair in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[torch.Tensor, ...]:
        return self.features, self.labels, self.entropy, self.scores

    def take(self, index: torch.Tensor) -> "Memory":
        return Memory(*(t[index] for t in self.astuple()))


def select_supports(labels: torch.Tensor, entropy: torch.Tensor, num_classes: int, filter_k: int) -> torch.Tensor:
    """Indices kept by the entropy filter: per predicted class, in class order, its `filter_k`
    entries of lowest entropy (lowest first); all of them with -1."""
    kept = []
    for k in range(num_classes):
        members = torch.nonzero(labels == k).flatten()
        order = members[torch.argsort(entropy[members], stable=True)]
        kept.append(order if filter_k == -1 else order[:filter_k])
    return torch.cat(kept)


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, d): per class, the sum of its L2-normalised features (the official `weights.T`; zero
    for an empty class). Its direction is that of the class mean; the loss normalises it."""
    one_hot = F.one_hot(labels, num_classes).to(features.dtype)
    return one_hot.T @ F.normalize(features, dim=1)


def consistency_loss(features: torch.Tensor, prototypes: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Self-distillation (official `prototype_loss(z, weights.T, scores)`, tau 1):
    KL(softmax_k s_ik || softmax(sg softmax p_i)) summed over classes, mean over the batch, with
    s_ik = <z_i / |z_i|_1, c_k / |c_k|_1>: the official `F.normalize(x, 1)` passes 1 as the
    norm's order, not the dim. The gradient reaches the features only."""
    similarity = F.normalize(features, p=1, dim=1) @ F.normalize(prototypes, p=1, dim=1).T
    teacher = logits.detach().softmax(1).log_softmax(1)
    return F.kl_div(teacher, similarity.softmax(1), reduction="none").sum(1).mean()


def neighbour_loss(features: torch.Tensor, memory: Memory, logits: torch.Tensor,
                   k: int = NEIGHBOURS) -> torch.Tensor:
    """Local alignment: each sample's probabilities pulled towards those stored with its k most
    similar memory entries, weighted by the cosine (features detached: the gradient reaches the
    head's output only); mean over samples and neighbours."""
    cosines = F.normalize(features.detach(), dim=1) @ F.normalize(memory.features, dim=1).T
    near, index = cosines.topk(min(k, cosines.shape[1]), dim=1)
    gap = (logits.softmax(1)[:, None, :] - memory.scores[index]).square().sum(-1)
    return (near * gap).mean()


def split_classifier(classifier: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(featurizer, final Linear) of a classifier with `.backbone` and a `.head` that is an
    nn.Linear or an nn.Sequential ending in one (a linear probe with feature batch norm)."""
    head = getattr(classifier, "head", None)
    backbone = getattr(classifier, "backbone", None)
    if isinstance(head, nn.Linear) and backbone is not None:
        return backbone, head
    if isinstance(head, nn.Sequential) and len(head) and isinstance(head[-1], nn.Linear) and backbone is not None:
        return nn.Sequential(backbone, *head[:-1]), head[-1]
    raise EvalError("TSD adapts a classifier with a `.backbone` and a `.head` ending in nn.Linear; "
                    f"got {type(classifier).__name__}")


def set_norm_mode(model: nn.Module, norm: str) -> None:
    """Eval mode, except batch norm layers in train mode (each batch's statistics) for "batch"."""
    model.eval()
    if norm == "batch":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()


class TSD:
    """Adapts `model` in place (pass a copy to keep the original), one step per `step(x)`."""

    def __init__(self, model: nn.Module, settings: TSDSettings) -> None:
        settings.check()
        self.model, self.settings = model, settings
        self.featurizer, self.head = split_classifier(model)
        set_norm_mode(model, settings.norm)
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)  # "all" of the official --update_param: a probe's frozen encoder too
        self.optimizer = torch.optim.Adam(params, lr=settings.lr)
        with torch.no_grad():
            warmup = self.head.weight.detach().clone()
            self.memory = Memory.of(warmup, self.head(warmup))
        self.num_classes = self.head.out_features

    def step(self, images: torch.Tensor) -> torch.Tensor:
        """The logits of `images` before this step (what TSD reports), then one step on them."""
        features = self.featurizer(images)
        logits = self.head(features)
        memory = self.memory + Memory.of(features, logits)
        self.memory = memory.take(select_supports(memory.labels, memory.entropy, self.num_classes,
                                                  self.settings.filter_k))
        prototypes = class_prototypes(self.memory.features, self.memory.labels, self.num_classes)
        loss = consistency_loss(features, prototypes, logits)
        if self.settings.lam:
            loss = loss + self.settings.lam * neighbour_loss(features, self.memory, logits)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return logits.detach()


@dataclass
class StreamResult:
    """Correct predictions over one pass of the stream."""

    before: float  # the unadapted classifier
    after: float  # TSD, online
    norm_only: float | None  # the unadapted network with test-batch statistics (norm "batch")
    samples: int
    skipped: int


def _shift(corruption: str | None, severity: int, seed: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The [0, 1] crops under `corruption` (each sample's draws keyed by its index and `seed`,
    as `eval robustness` draws them), or unchanged."""
    from sslforge.eval.corruptions import corrupt, sample_seeds

    if corruption is None:
        return lambda images, index: images
    return lambda images, index: corrupt(images, corruption, severity, sample_seeds(seed, corruption, severity, index))


@contextmanager
def _progress(paths: list[str]) -> Iterator[Callable[[int], None]]:
    """A progress bar over the stream (adaptation steps: the long part on a real set)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sslforge.data_pipeline.planning import ShardSet

    with Progress(TextColumn("[bold]adapting (TSD)"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task("images", total=ShardSet.open(paths).total)
        yield lambda n: bar.advance(task, n)


def _frozen(classifier: nn.Module, norm: str) -> nn.Module:
    copy = deepcopy(classifier).requires_grad_(False)
    set_norm_mode(copy, norm)
    return copy


def adapt_stream(classifier: nn.Module, shards: str, image_size: int, device: torch.device, settings: TSDSettings,
                 corruption: str | None = None, severity: int = 3, seed: int = 0, batch_size: int = 128,
                 workers: int = 2, progress: bool = False) -> StreamResult:
    """One pass over `shards` in order (evaluation transform, the shift applied before the
    normalisation), each batch scored by the unadapted classifier (eval mode), by it with
    test-batch statistics (norm "batch") and by TSD adapting a copy. `classifier` (on `device`)
    is left as it was; labels are read only to score."""
    from sslforge.data_pipeline.eval_stream import eval_batches
    from sslforge.data_pipeline.shards import expand_shards
    from sslforge.eval.classify import label_problem, split_eval_transform

    settings.check()
    torch.manual_seed(seed)
    to_unit, normalize = split_eval_transform(image_size)
    shift = _shift(corruption, severity, seed)
    source = _frozen(classifier, "source")
    norm_only = _frozen(classifier, "batch") if settings.norm == "batch" else None
    tsd = TSD(deepcopy(source), settings)
    hits, samples, skipped = torch.zeros(3, dtype=torch.float64), 0, 0
    paths = expand_shards(shards)
    with _progress(paths) if progress else nullcontext() as advance:
        for batch in eval_batches(paths, to_unit, batch_size, 0, 1, workers):
            labels = batch["label"].to(device)
            if settings.norm == "batch" and len(labels) == 1:
                raise EvalError("one image cannot be normalised with its own batch statistics (--norm batch): "
                                f"choose a --batch-size that leaves no single image at the end ({samples + 1} read)")
            images = normalize(shift(batch["image"].to(device), batch["index"]))
            with torch.no_grad():
                logits = [source(images), *([norm_only(images)] if norm_only is not None else [])]
            problem = label_problem(labels, logits[0].shape[1], shards)
            if problem:
                raise EvalError(problem)
            logits.insert(1, tsd.step(images))
            for k, scored in enumerate(logits):
                hits[k] += float((scored.argmax(1) == labels).sum())
            samples, skipped = samples + len(labels), skipped + batch["skipped"]
            if advance is not None:
                advance(len(labels))
    if samples == 0:
        raise EvalError(f"no readable samples to adapt on in {shards}")
    return StreamResult(float(hits[0]), float(hits[1]), float(hits[2]) if norm_only is not None else None,
                        samples, skipped)


def summarize(counts: StreamResult) -> dict[str, Any]:
    """Top-1 in % (before, after, batch statistics alone) and the change TSD makes."""
    def pct(hits: float | None) -> float | None:
        return None if hits is None else 100.0 * hits / counts.samples

    before, after = pct(counts.before), pct(counts.after)
    return {"before_top1": before, "after_top1": after, "gain": after - before,
            "norm_only_top1": pct(counts.norm_only), "samples": counts.samples, "skipped": counts.skipped}


def tsd_table(result: dict[str, Any]) -> Table:
    shift = f"{result['corruption']} s{result['severity']}" if result["corruption"] else "no corruption"
    table = Table(title=f"TSD of step {result['step']} on {result['data']} ({shift}, {result['samples']} images, "
                        f"lr {result['lr']:g}, filter_k {result['filter_k']}, lam {result['lam']:g})")
    table.add_column("classifier")
    table.add_column("top-1", justify="right")
    table.add_column("change", justify="right")
    table.add_row("before (unadapted)", f"{result['before_top1']:.2f}", "")
    if result["norm_only_top1"] is not None:
        table.add_row("test-batch BN statistics only", f"{result['norm_only_top1']:.2f}",
                      f"{result['norm_only_top1'] - result['before_top1']:+.2f}")
    table.add_row(f"TSD (online, norm {result['norm']})", f"{result['after_top1']:.2f}", f"{result['gain']:+.2f}")
    return table


def tsd_from_run(source: Path, data: str | None = None, corruption: str | None = None, severity: int = 3,
                 settings: TSDSettings = TSDSettings(), batch_size: int = 128, workers: int = 2,
                 seed: int = 0) -> dict[str, Any]:
    """TSD on the classifier of the run at `source` (run or checkpoint directory) over `data`
    (default the run's data.val): prints the table, writes RUN_DIR/tsd.json and appends a record
    to metrics.jsonl. One process only (see the module docstring)."""
    from sslforge.eval.corruptions import check_corruptions
    from sslforge.eval.run import append_metrics, load_method
    from sslforge.launcher.env import init_distributed

    settings.check()
    if corruption is not None:
        check_corruptions([corruption], [severity])
    env = init_distributed("auto")
    if env.world_size > 1:
        raise EvalError(f"TSD adapts one model over one ordered stream: run it as one process, not {env.world_size} "
                        "ranks")
    run_dir, cfg, method, step = load_method(source)
    classifier = method.classifier()
    if classifier is None:
        raise EvalError(f"method {cfg.method.name} has no classifier: TSD adapts a supervised or linear-probe run")
    data = data or cfg.data.val
    if not data:
        raise EvalError(f"no shards to adapt on: pass --data or set data.val in {run_dir / 'config.yaml'}")
    counts = adapt_stream(classifier.to(env.device), data, cfg.data.image_size, env.device, settings, corruption,
                          severity, seed, batch_size, workers, progress=True)
    result = {**summarize(counts), **asdict(settings), "step": step, "source": str(source), "run_dir": str(run_dir),
              "data": data, "corruption": corruption, "severity": severity if corruption else None, "seed": seed,
              "batch_size": batch_size}
    Console().print(tsd_table(result))
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=1))
    append_metrics(run_dir, {"step": step, "eval": "tsd", "tsd_before_top1": result["before_top1"],
                             "tsd_after_top1": result["after_top1"], "tsd_norm_only_top1": result["norm_only_top1"],
                             "corruption": corruption, "severity": result["severity"], "data": data,
                             **asdict(settings)})
    return result


__all__ = ["Memory", "RESULT_FILE", "TSD", "TSDSettings", "adapt_stream", "class_prototypes", "consistency_loss",
           "neighbour_loss", "select_supports", "split_classifier", "summarize", "tsd_from_run", "tsd_table"]
