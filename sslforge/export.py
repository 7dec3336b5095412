"""`sslforge export RUN_OR_CKPT OUT`: the evaluated encoder as a plain state_dict other code loads.

What is exported is what sslforge evaluates: `method.encoder()` (DINO's teacher, MoCo's query
encoder, a supervised run's EMA backbone), with the run's classifier head when it has one
(`method.classifier()`: supervised runs, linear probes), unless `head=False`. The keys are the
library model's own, so the weights load with `strict=True` into
- torchvision's ResNet (`torchvision.models.resnet50()` ...): with the head as `fc`
  (`resnet50(num_classes=K)`); without one, `fc` is replaced by `nn.Identity()` before loading,
  so the model returns the (B, 2048) features sslforge evaluates. ResNet-10 (the demo backbone)
  is `torchvision.models.resnet.ResNet(BasicBlock, [1, 1, 1, 1])`. A run with the small-image
  stem (`model.small_stem`: 3x3 stride-1 conv1, no max-pool) cannot load into a stock model: the
  recipe replaces `conv1` and `maxpool` first, and says so.
- timm's VisionTransformer (`timm.create_model(name, num_classes=0 or K, img_size=...)`), the
  head as timm's `head`.
A linear probe's `BatchNorm1d(affine=False)` before its Linear (`method.feature_bn`) is folded
into the Linear with the running statistics (eval mode), so the plain model's `fc` gives the
probe's logits. FAN backbones (STL's) have no torchvision or timm model and are refused.

OUT holds `model.pt` (torch.save of a plain dict of tensors), `model.safetensors` when the
safetensors package is installed, and `export.json`: the method, run, checkpoint and step, the
library constructor and its arguments, the few lines of Python that rebuild and load the model
(`load_python`), and the evaluation preprocessing (read from `build_eval_transform`). Before
export.json is written those lines are run once here and the model they build must reproduce
sslforge's outputs, so every export's recipe has been checked.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from omegaconf import DictConfig
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.transforms import v2

from sslforge.eval import EvalError
from sslforge.methods.base import Method

FORMAT = "sslforge-export/1"
WEIGHTS = "model.pt"
SAFETENSORS = "model.safetensors"
METADATA = "export.json"
OUR_FILES = (WEIGHTS, SAFETENSORS, METADATA)
VERIFY_RTOL = 1e-4  # plain model vs sslforge, relative to the outputs' scale (folding rounds ~1e-7)

# torchvision's constructors, by block type and blocks per stage
_TORCHVISION_RESNETS = {(BasicBlock, (2, 2, 2, 2)): "resnet18", (BasicBlock, (3, 4, 6, 3)): "resnet34",
                        (Bottleneck, (3, 4, 6, 3)): "resnet50", (Bottleneck, (3, 4, 23, 3)): "resnet101",
                        (Bottleneck, (3, 8, 36, 3)): "resnet152"}
_SMALL_STEM_CONV = "torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)"


class ExportError(EvalError):
    """An export that cannot be made (a backbone with no library model, OUT not empty): one line, exit 2."""


class _Code(str):
    """An argument written as code (a class), not as a value: its repr is itself."""

    def __repr__(self) -> str:
        return str(self)


@dataclass
class PlainModel:
    """How to build the library model the weights load into: `constructor(*args, **kwargs)`,
    then each `replace` attribute set to its module (Python expressions), before loading."""

    library: str  # the package imported: torchvision or timm
    constructor: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    replace: dict[str, str] = field(default_factory=dict)

    def build_code(self) -> str:
        items = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.constructor}({', '.join(items)})"

    def load_python(self, export_dir: Path) -> str:
        """Standalone lines that build the model, load the export strictly and set eval mode."""
        return "\n".join([
            "import torch", f"import {self.library}", f"export_dir = {str(export_dir)!r}",
            f"model = {self.build_code()}",
            *(f"model.{attr} = {module}" for attr, module in self.replace.items()),
            f'model.load_state_dict(torch.load(f"{{export_dir}}/{WEIGHTS}", weights_only=True), strict=True)',
            "model.eval()", ""])


class Export(NamedTuple):
    """A method's encoder (and head) as a library model's weights, before anything is written."""

    state: dict[str, torch.Tensor]
    plain: PlainModel
    reference: nn.Module  # the sslforge network whose outputs the plain model must give
    feature_dim: int
    num_classes: int | None
    head_batchnorm_folded: bool


# ------------------------------------------------------------------ heads
def fold_linear_head(head: nn.Module) -> nn.Linear:
    """`head` as one Linear: a Linear as is; `Sequential(BatchNorm1d, Linear)` (a linear probe's
    feature BN) folded with the BN's running statistics, computed in float64:
    W' = W diag(s), b' = W t + b with s = gamma / sqrt(var + eps), t = beta - mean s."""
    if isinstance(head, nn.Linear):
        return head
    if not (isinstance(head, nn.Sequential) and len(head) == 2
            and isinstance(head[0], nn.modules.batchnorm._BatchNorm) and isinstance(head[1], nn.Linear)):
        raise ExportError(f"the classifier head is a {type(head).__name__}, not a Linear or a BatchNorm1d + "
                          "Linear; export the encoder alone with --no-head")
    bn, linear = head[0], head[1]
    if bn.running_mean is None or bn.running_var is None:
        raise ExportError("the classifier head's batch norm keeps no running statistics, so it has no fixed "
                          "form to fold into the Linear; export the encoder alone with --no-head")
    scale = (bn.running_var.double() + bn.eps).rsqrt()
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        shift = shift * bn.weight.double() + bn.bias.double()
        scale = scale * bn.weight.double()
    weight = linear.weight.double()
    folded = nn.Linear(linear.in_features, linear.out_features, dtype=linear.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(weight * scale[None, :])
        folded.bias.copy_(weight @ shift + (linear.bias.double() if linear.bias is not None else 0.0))
    return folded


def _head_of(method: Method, encoder: nn.Module) -> tuple[nn.Module, nn.Linear, bool] | None:
    """(classifier, its head as one Linear, whether a BN was folded), or None without a classifier."""
    classifier = method.classifier()
    if classifier is None:
        return None
    if getattr(classifier, "backbone", None) is not encoder or not isinstance(getattr(classifier, "head", None),
                                                                             nn.Module):
        raise ExportError(f"method {method.cfg.method.name}'s classifier is not its encoder + a head; "
                          "export the encoder alone with --no-head")
    return classifier, fold_linear_head(classifier.head), not isinstance(classifier.head, nn.Linear)


# ------------------------------------------------------------------ backbones
def _resnet_model(net: ResNet, num_classes: int | None) -> PlainModel:
    """torchvision's constructor for `net`'s depth (ResNet(block, layers) when it has none), the
    head as `fc` or an Identity in its place, the small-image stem put back when `net` has it."""
    block = type(net.layer1[0])
    layers = tuple(len(getattr(net, f"layer{i}")) for i in range(1, 5))
    name = _TORCHVISION_RESNETS.get((block, layers))
    kwargs = {"num_classes": num_classes} if num_classes else {}
    if name is None:
        plain = PlainModel("torchvision", "torchvision.models.resnet.ResNet",
                           [_Code(f"torchvision.models.resnet.{block.__name__}"), list(layers)], kwargs)
    else:
        plain = PlainModel("torchvision", f"torchvision.models.{name}", [], kwargs)
    if _has_small_stem(net):
        plain.replace.update(conv1=_SMALL_STEM_CONV, maxpool="torch.nn.Identity()")
    if not num_classes:
        plain.replace["fc"] = "torch.nn.Identity()"
    return plain


def _has_small_stem(net: ResNet) -> bool:
    """True for the 3x3 stride-1 stem without max-pool (backbones.py); False for torchvision's own."""
    conv = net.conv1
    if conv.kernel_size == (7, 7) and conv.stride == (2, 2) and isinstance(net.maxpool, nn.MaxPool2d):
        return False
    if conv.kernel_size == (3, 3) and conv.stride == (1, 1) and isinstance(net.maxpool, nn.Identity):
        return True
    raise ExportError(f"the ResNet's stem (conv1 {conv.kernel_size} stride {conv.stride}, "
                      f"{type(net.maxpool).__name__}) is neither torchvision's nor model.small_stem's")


def _vit_model(cfg: DictConfig, net: nn.Module, num_classes: int | None) -> PlainModel:
    """timm.create_model with the registered name of the backbone's size and patch (the size's
    patch-16 name, patch_size given, when timm registers none), and what differs from it."""
    import timm

    patch = net.patch_embed.patch_size[0]
    exact = f"{cfg.model.backbone}_patch{patch}_224"
    name = exact if timm.is_model(exact) else f"{cfg.model.backbone}_patch16_224"
    kwargs: dict[str, Any] = {"num_classes": num_classes or 0, "img_size": net.patch_embed.img_size[0]}
    if name != exact:
        kwargs["patch_size"] = patch
    if cfg.model.depth is not None:
        kwargs["depth"] = len(net.blocks)
    if cfg.model.num_heads is not None:
        kwargs["num_heads"] = net.blocks[0].attn.num_heads
    kwargs.update(dynamic_img_size=net.dynamic_img_size, dynamic_img_pad=net.patch_embed.dynamic_img_pad)
    return PlainModel("timm", "timm.create_model", [name], kwargs)


def _plain_model(cfg: DictConfig, encoder: nn.Module, num_classes: int | None) -> tuple[PlainModel, str]:
    """The library model for `encoder` and the name its head has there; ExportError otherwise."""
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(encoder, ResNet):
        return _resnet_model(encoder, num_classes), "fc"
    if isinstance(encoder, VisionTransformer) and cfg.model.backbone.startswith("vit_"):
        return _vit_model(cfg, encoder, num_classes), "head"
    if cfg.model.backbone.startswith("fan_"):
        raise ExportError(f"backbone {cfg.model.backbone} (model.backbone): FAN has no torchvision or timm model "
                          "to load into; export supports torchvision ResNets and timm ViTs")
    raise ExportError(f"method {cfg.method.name}'s encoder is a {type(encoder).__name__}, not a torchvision "
                      "ResNet or a timm VisionTransformer; export supports those")


def describe(cfg: DictConfig, method: Method, head: bool = True) -> Export:
    """The export of `method` (nothing written): its encoder's weights under the library
    model's names, with the classifier head (BN folded) unless `head` is False."""
    encoder = method.encoder()
    found = _head_of(method, encoder) if head else None
    num_classes = found[1].out_features if found else None
    plain, head_name = _plain_model(cfg, encoder, num_classes)
    state = {k: v.detach().clone().contiguous() for k, v in encoder.state_dict().items()}
    if found is None:
        probe = torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size)
        with torch.no_grad():
            dim = encoder.eval()(probe).shape[1]
        return Export(state, plain, encoder, dim, None, False)
    classifier, linear, folded = found
    state.update({f"{head_name}.{k}": v.detach().clone().contiguous() for k, v in linear.state_dict().items()})
    return Export(state, plain, classifier, linear.in_features, num_classes, folded)


# ------------------------------------------------------------------ preprocessing
def eval_preprocessing(image_size: int) -> dict[str, Any]:
    """What `build_eval_transform(image_size)` does to an RGB image, step by step, as data (and
    timm's `crop_pct` for it); a step this cannot describe is an error, not a silent omission."""
    from sslforge.data_pipeline.views import build_eval_transform

    out: dict[str, Any] = {"color": "RGB"}
    for step in build_eval_transform(image_size).transforms:
        if isinstance(step, v2.Resize):
            out.update(resize_shorter_side=step.size[0], interpolation=step.interpolation.value,
                       antialias=step.antialias)
        elif isinstance(step, v2.CenterCrop):
            out["center_crop"] = list(step.size)
        elif isinstance(step, v2.ToDtype) and step.scale:
            out["scale"] = "uint8 / 255 to [0, 1]"
        elif isinstance(step, v2.Normalize):
            out.update(mean=list(step.mean), std=list(step.std))
        elif not isinstance(step, v2.PILToTensor):
            raise ExportError(f"the evaluation transform has a step export cannot describe: {step}")
    out["input_size"] = [3, *out["center_crop"]]
    out["crop_pct"] = out["center_crop"][0] / out["resize_shorter_side"]
    return out


# ------------------------------------------------------------------ writing
def check_out_dir(out: Path, force: bool) -> None:
    """OUT must be a new or empty directory, or `force` (which replaces an earlier export's files)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"export directory {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"export directory {out} is not empty; pass --force to write the export into it")


def _write_weights(state: dict[str, torch.Tensor], out: Path) -> dict[str, str]:
    """model.pt, and model.safetensors when safetensors is installed; {format: file name}."""
    torch.save(state, out / WEIGHTS)
    written = {"pytorch": WEIGHTS}
    try:
        from safetensors.torch import save_file
    except ImportError:
        return written
    save_file(state, str(out / SAFETENSORS), metadata={"format": "pt"})
    written["safetensors"] = SAFETENSORS
    return written


def verify(export: Export, code: str, image_size: int) -> float:
    """Runs the recorded load recipe and returns the largest difference between its model's and
    sslforge's outputs on two random images; ExportError when they disagree."""
    namespace: dict[str, Any] = {}
    exec(compile(code, METADATA, "exec"), namespace)  # code this module wrote, run to check it
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = export.reference.eval()(x)
        got = namespace["model"](x)
    if got.shape != expected.shape:
        raise ExportError(f"the exported model gives outputs of shape {tuple(got.shape)}, sslforge "
                          f"{tuple(expected.shape)}")
    diff = float((got - expected).abs().max())
    if diff > VERIFY_RTOL * max(1.0, float(expected.abs().max())):
        raise ExportError(f"the exported model's outputs differ from sslforge's by up to {diff:.3g}")
    return diff


def export_run(source: Path, out: Path, force: bool = False, head: bool = True) -> dict[str, Any]:
    """Export the encoder of the run or checkpoint at `source` into the directory `out`;
    returns what export.json holds."""
    from sslforge.eval.run import load_method
    from sslforge.trainer.checkpoint import find_checkpoints, tag_for

    check_out_dir(out, force)
    run_dir, cfg, method, step = load_method(source)
    export = describe(cfg, method, head)
    out.mkdir(parents=True, exist_ok=True)
    for name in OUR_FILES:
        (out / name).unlink(missing_ok=True)
    weights = _write_weights(export.state, out)
    code = export.plain.load_python(out.resolve())
    try:
        diff = verify(export, code, cfg.data.image_size)
    except Exception:
        for name in OUR_FILES:
            (out / name).unlink(missing_ok=True)
        raise
    checkpoint = find_checkpoints(source).root / tag_for(step)
    provenance = {"run_dir": str(run_dir.resolve()), "checkpoint": str(checkpoint.resolve()), "step": step}
    meta = _metadata(cfg, provenance, export, code, weights, diff)
    (out / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _metadata(cfg: DictConfig, provenance: dict[str, Any], export: Export, code: str, weights: dict[str, str],
              diff: float) -> dict[str, Any]:
    """export.json: where the weights come from, how to load them, what input they expect."""
    import importlib

    library = importlib.import_module(export.plain.library)
    meta: dict[str, Any] = {"format": FORMAT, "method": cfg.method.name, "run_name": cfg.name, **provenance}
    if "source" in cfg.method:  # a linear probe: the pretrained run its encoder comes from
        meta["method_source"] = cfg.method.source
    meta.update({
        "weights": weights,
        "model": {"backbone": cfg.model.backbone, **asdict(export.plain),
                  "library_version": library.__version__, "feature_dim": export.feature_dim,
                  "num_classes": export.num_classes, "head_batchnorm_folded": export.head_batchnorm_folded,
                  "small_stem": "conv1" in export.plain.replace},
        "preprocessing": eval_preprocessing(cfg.data.image_size),
        "load_python": code,
        "verified_max_abs_diff": diff,
        "torch_version": torch.__version__,
    })
    return meta


__all__ = ["ExportError", "PlainModel", "describe", "eval_preprocessing", "export_run", "fold_linear_head"]
