"""Typed configuration: OmegaConf structured schema, recipe loading and `key=value` overrides.

Every recipe is merged onto the schema, so an unknown key or a value of the wrong type fails
here, in the launching process, before any rank starts. Method-specific keys live under `method`
and are typed by the method's own dataclass (picked by `method.name`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # package data: in the wheel, and `recipes/` of a checkout
YAML_SUFFIXES = (".yaml", ".yml")


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key."""


@dataclass
class ViewConfig:
    """One augmentation pipeline; `count` crops are drawn with it (multi-crop).

    `size` None crops at `data.image_size`; a size is in pixels at the `data.image_size` of
    the recipe (or command line) that wrote it, and scales with that image size (see
    `load_config`). `geometry_of` makes a view that shares another's geometry: crop i of this
    view is cut from the same box of the image, flipped alike, as crop i of view `geometry_of`
    (an earlier view with the same count), so its patch grid lines up with that crop's; its own
    `scale` and `flip_p` are not used, and its photometric ops are its own (none: STL's clean
    view for the token labeler)."""

    size: Optional[int] = None
    count: int = 1
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    solarize_p: float = 0.0
    randaugment: Optional[str] = None  # timm's RandAugment spec, e.g. rand-m9-mstd0.5-inc1 (DeiT, FAN)
    erase_p: float = 0.0  # random erasing (timm's, per-pixel noise) on the normalised crop
    geometry_of: Optional[int] = None  # index of the view whose crop boxes and flips this one reuses


@dataclass
class DataConfig:
    train: str = "???"
    val: Optional[str] = None
    knn_train: Optional[str] = None  # labelled bank for kNN; defaults to `train`
    image_size: int = 224
    mode: str = "finite"  # finite | resampled
    samples_per_epoch: Optional[int] = None  # required in resampled mode
    shuffle_buffer: int = 1000
    num_workers: int = 4
    views: List[ViewConfig] = field(default_factory=list)  # empty: the method's own views
    tokenizer: str = "words"  # captions: words (built-in, hashed words) | a local Hugging Face tokenizer directory
    max_tokens: int = 17  # captions are cut or padded to this many tokens (XMC-GAN's COCO setting)


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # resnet10/18/34/50/101 | vit_tiny/small/base (models/backbones.py)
    small_stem: Optional[bool] = None  # ResNets; None: automatic for images <= 64 px
    patch_size: Optional[int] = None  # ViTs; None: 16, or 4 for images <= 64 px
    num_heads: Optional[int] = None  # ViTs; None: the model's standard (MoCo v3's ViT-S: 12)
    depth: Optional[int] = None  # ViTs and FANs: number of blocks (None: the variant's)
    drop_path: float = 0.0  # ViTs: stochastic-depth rate of the last block
    vit_init: str = "timm"  # ViTs: timm | dino | moco (the published initialisations)
    vit_frozen_patch_embed: bool = False  # MoCo v3: random patch projection, frozen
    vit_sincos_pos_embed: bool = False  # MoCo v3: fixed 2-D sin-cos position embedding
    sync_bn: bool = True
    proj_hidden_dim: int = 2048
    proj_output_dim: int = 128


@dataclass
class PartOptimConfig:
    """One part's optimiser (`PartsMethod`): unset keys take `optim`'s value."""

    every: int = 1  # the part updates at the steps t with (t + 1) % every == 0
    name: Optional[str] = None
    base_lr: Optional[float] = None
    lr_scaling: Optional[str] = None
    lr_schedule: Optional[str] = None
    min_lr: Optional[float] = None
    warmup_epochs: Optional[float] = None
    weight_decay: Optional[float] = None
    momentum: Optional[float] = None
    betas: Optional[List[float]] = None


@dataclass
class OptimConfig:
    name: str = "lars"  # lars | adamw | sgd
    batch_size: int = 256  # global, summed over ranks
    base_lr: float = 0.3  # scaled by `lr_scaling` with the global batch / 256
    lr_scaling: str = "linear"  # linear | sqrt | none
    lr_schedule: str = "cosine"  # cosine (after the warm-up, down to min_lr) | constant (GANs)
    min_lr: float = 0.0
    warmup_epochs: float = 10.0
    warmup_start_lr: float = 0.0  # the lr the linear warm-up starts from, absolute as min_lr (SwAV: 0.3)
    weight_decay: float = 1e-6
    weight_decay_end: Optional[float] = None  # set: per-step cosine from weight_decay to it (DINO)
    momentum: float = 0.9
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    lars_eta: float = 0.001
    exclude_bias_and_norm: bool = True
    parts: Dict[str, PartOptimConfig] = field(default_factory=dict)  # PartsMethod: one entry per part


@dataclass
class EngineConfig:
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0, 1 or 2
    precision: str = "fp32"  # fp32 | bf16 (DeepSpeed torch_autocast: fp32 weights, bf16 compute)
    grad_clip: float = 0.0  # 0 disables
    grad_clip_mode: str = "global"  # global: norm over all parameters | per_param: each one's (DINO)
    backend: str = "auto"  # auto | nccl | gloo
    collective_timeout_min: int = 60  # long rank-0 work (clustering, eval) must not trip it
    peer_timeout_s: float = 20.0  # a rank silent this long is dead: every rank exits (launcher/watchdog.py)


@dataclass
class TrainConfig:
    epochs: int = 100
    steps: Optional[int] = None  # overrides epochs when set
    seed: int = 0
    log_every_steps: int = 10
    ckpt_every_steps: int = 500
    keep_last: int = 3
    on_nonfinite: str = "skip"  # skip | stop
    max_nonfinite_steps: int = 20  # consecutive skipped steps before the run stops


@dataclass
class EvalConfig:
    every_epochs: int = 1  # evaluate every N epochs and once at the end; 0: never (unless at_end)
    at_end: Optional[bool] = None  # evaluate the last step; None: when every_epochs > 0
    knn_k: int = 20
    knn_temperature: float = 0.07
    batch_size: int = 256
    inception_weights: Optional[str] = None  # FID (generative methods): local Inception file; None: no FID
    fid_samples: int = 5000  # generated and real images compared by FID at each evaluation
    dual_encoder: Optional[str] = None  # R-precision (text-to-image): run dir of a dual_encoder run


@dataclass
class LoggingConfig:
    wandb_mode: str = "offline"  # online | offline | disabled
    wandb_project: str = "sslforge"
    wandb_entity: Optional[str] = None
    progress: bool = True


@dataclass
class SlurmConfig:
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: Optional[int] = None  # default: one task per GPU
    cpus_per_task: int = 10
    mem: Optional[str] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time: str = "72:00:00"
    signal_delay_s: int = 120
    max_requeues: int = 20


@dataclass
class MethodConfig:
    name: str = "???"


@dataclass
class Config:
    name: str = "run"
    run_dir: str = "runs/${name}"
    resume: str = "auto"  # auto | none | path to a checkpoint directory
    allow_changes: List[str] = field(default_factory=list)  # keys a resume may change (resume_guard.py)
    method: Any = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


_CHOICES = {
    "data.mode": ("finite", "resampled"),
    "optim.name": ("lars", "adamw", "sgd"),
    "optim.lr_scaling": ("linear", "sqrt", "none"),
    "optim.lr_schedule": ("cosine", "constant"),
    "engine.precision": ("fp32", "bf16"),
    "engine.backend": ("auto", "nccl", "gloo"),
    "engine.zero_stage": (0, 1, 2),
    "engine.grad_clip_mode": ("global", "per_param"),
    "model.vit_init": ("timm", "dino", "moco"),
    "train.on_nonfinite": ("skip", "stop"),
    "logging.wandb_mode": ("online", "offline", "disabled"),
}


def recipe_path(recipe: str) -> Path:
    """A recipe name from the packaged recipes (`sslforge recipes`) or a path to a YAML file."""
    candidate = Path(recipe)
    if candidate.suffix in YAML_SUFFIXES:
        if not candidate.is_file():
            raise ConfigError(f"recipe file not found: {recipe}")
        return candidate
    named = RECIPES_DIR / f"{recipe}.yaml"
    if not named.is_file():
        raise ConfigError(f"unknown recipe '{recipe}'; known: {', '.join(list_recipes())}")
    return named


def list_recipes() -> list[str]:
    """The packaged recipes' names; finding none means a broken installation, not an empty list."""
    names = sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml"))
    if not names:
        raise ConfigError(f"no recipes found in {RECIPES_DIR}: the sslforge installation is incomplete; reinstall it")
    return names


def _parent_path(parent: str, child: Path) -> Path:
    """The file that `inherits: PARENT` in the recipe file `child` names: PARENT (a name, or a
    path ending in .yaml) beside `child` first, so a user's recipes can build on each other, then
    the packaged recipe of that name. A file is never its own parent: a copy of
    `slurm/xmcgan_coco.yaml` that keeps its name still inherits the packaged `xmcgan_coco`."""
    file = parent if Path(parent).suffix in YAML_SUFFIXES else f"{parent}.yaml"
    for candidate in (child.parent / file, RECIPES_DIR / file):
        if candidate.is_file() and candidate.resolve() != child.resolve():
            return candidate
    raise ConfigError(f"recipe {child} inherits '{parent}', which is neither a file beside it nor a packaged recipe "
                      "(see `sslforge recipes`)")


class _ConfigLoader(yaml.SafeLoader):
    """The one reading rule for recipes, `key=value` overrides and saved configs: YAML's
    structure (mappings, lists, quotes, null as `null`, `~` or nothing), but every other plain
    scalar stays text, and the schema's type for its key converts it (`1e-6`, `yes`, `0.9`).
    YAML 1.1's own typing would read the SLURM time `48:00:00` as the base-60 number 172800,
    `010` as 8, `on` as true and `2024-01-01` as a date: other text in a string key."""


# PyYAML keeps implicit typing in this class attribute (OmegaConf's loader edits it the same
# way); only null and the merge key `<<` are kept.
_KEPT_TAGS = ("tag:yaml.org,2002:null", "tag:yaml.org,2002:merge")
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag in _KEPT_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_ConfigLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{source} is not valid YAML: {getattr(exc, 'problem', None) or exc}{where}") from None


def _recipe_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[dict]:
    """A recipe's mappings, the root of its `inherits: OTHER` chain first."""
    if path in seen:
        raise ConfigError(f"recipe inheritance loops through {path}")
    raw = _parse_yaml(path.read_text(), f"recipe {path}") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a mapping")
    parent = raw.pop("inherits", None)
    below = [] if parent is None else _recipe_layers(_parent_path(str(parent), path), seen + (path,))
    return [*below, raw]


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """`key=value` items as (key, value); values are read like recipe values."""
    pairs = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form key=value")
        pairs.append((key.strip(), _parse_yaml(text, f"override '{item}'")))
    return pairs


def dotted_key(key: str) -> str:
    """`data.views[0].size` -> `data.views.0.size`: one spelling for matching keys."""
    return re.sub(r"\[(\d+)\]", r".\1", key)


def _method_schema(name: str) -> Any:
    from sslforge.methods import method_config_class

    try:
        return method_config_class(name)
    except KeyError as exc:
        raise ConfigError(f"method.name: {exc.args[0]}") from None


def _method_name(layers: list[dict], pairs: list[tuple[str, Any]]) -> str:
    """The last `method.name` given; overrides come after the recipe chain."""
    sections = [layer.get("method") for layer in layers]
    given = [s.get("name") for s in sections if isinstance(s, dict)]
    given = [name for name in given + [v for k, v in pairs if k == "method.name"] if name]
    if not given:
        raise ConfigError("method.name is missing from the recipe")
    return str(given[-1])


def _apply_layer(cfg: DictConfig, apply: Callable[[DictConfig], None],
                 writes_size: Callable[[int], bool]) -> None:
    """Apply one layer (a recipe file, or the overrides) in place. A view size is in pixels at
    the image size of the layer that wrote it, so when this layer changes `data.image_size`,
    the sizes it does not write itself scale by new/old: multi-crop stays in proportion
    (224/96 at 224 become 32/14 at 32)."""
    before = cfg.data.image_size
    apply(cfg)
    after = cfg.data.image_size
    if after != before and before > 0:
        for i, view in enumerate(cfg.data.views):
            if view.size is not None and not writes_size(i):
                view.size = max(1, round(view.size * after / before))


def _merge_recipe(cfg: DictConfig, layer: dict) -> None:
    data = layer.get("data")
    writes_views = isinstance(data, dict) and "views" in data  # a list replaces the one below
    _apply_layer(cfg, lambda c: c.merge_with(layer), lambda i: writes_views)


def _apply_overrides(cfg: DictConfig, pairs: list[tuple[str, Any]]) -> None:
    def apply(c: DictConfig) -> None:
        for key, value in pairs:
            part = key.split(".")
            if part[:2] == ["optim", "parts"] and len(part) > 3 and part[2] not in c.optim.parts:
                c.optim.parts[part[2]] = PartOptimConfig()  # a part named first by an override
            OmegaConf.update(c, key, value, merge=True)

    keys = {dotted_key(k) for k, _ in pairs}
    _apply_layer(cfg, apply, lambda i: bool(keys & {"data", "data.views", f"data.views.{i}", f"data.views.{i}.size"}))


_VIEW_ITEM = re.compile(r"data\.views\.(\d+)(\.|$)")


def _apply_view_items(cfg: DictConfig, pairs: list[tuple[str, Any]]) -> None:
    """`data.views.N.KEY=VALUE` overrides, applied last: on the views as the recipe and the other
    overrides left them, or, when the recipe leaves `data.views` to the method, on the method's
    own views (at the final image size and method options), which then become the run's."""
    from sslforge.methods import method_class

    if not cfg.data.views:
        try:
            cfg.data.views = method_class(cfg.method.name).views(cfg)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    count = len(cfg.data.views)
    for key, value in pairs:
        index = int(_VIEW_ITEM.match(key).group(1))  # type: ignore[union-attr]
        if index >= count:
            raise ConfigError(f"invalid key '{key}': data.views has {count} view(s), numbered 0 to {count - 1} "
                              "(a whole list is given as data.views=[{...}, ...])")
        OmegaConf.update(cfg, key, value, merge=True)


def load_config(recipe: str, overrides: list[str] | None = None) -> DictConfig:
    """Recipe + overrides merged onto the typed schema, validated; raises ConfigError."""
    layers = _recipe_layers(recipe_path(recipe))
    pairs = [(dotted_key(key), value) for key, value in parse_overrides(overrides or [])]
    view_items = [(key, value) for key, value in pairs if _VIEW_ITEM.match(key)]
    cfg = OmegaConf.structured(Config(method=_method_schema(_method_name(layers, pairs))()))
    try:
        for layer in layers:
            _merge_recipe(cfg, layer)
        _apply_overrides(cfg, [pair for pair in pairs if pair not in view_items])
        if view_items:
            _apply_view_items(cfg, view_items)
        for view in cfg.data.views:
            if view.size is None:
                view.size = cfg.data.image_size
        from sslforge.methods import method_class

        method_class(cfg.method.name).resolve_config(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from None
    validate(cfg)
    return cfg  # type: ignore[return-value]


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    key = dotted_key(key) if key else key  # the spelling of the override that set it
    msg = str(exc).splitlines()[0]
    if "not in struct" in str(exc) or "Key '" in msg and "not in" in msg:
        return f"unknown config key '{key}'"
    return f"invalid value for '{key}': {msg}" if key else msg


def validate(cfg: DictConfig) -> None:
    """Checks the schema cannot express: choices, ranges, required combinations."""
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"invalid value for '{key}': {value!r}; expected one of {allowed}")
    missing = [k for k in ("data.train",) if OmegaConf.is_missing(cfg, k)]
    if missing:
        raise ConfigError(f"missing required config key '{missing[0]}'")
    positive = ["optim.batch_size", "train.epochs", "data.image_size", "train.keep_last",
                "train.ckpt_every_steps", "train.log_every_steps"]
    for key in positive:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"invalid value for '{key}': must be > 0")
    if cfg.engine.peer_timeout_s <= 0:
        raise ConfigError("invalid value for 'engine.peer_timeout_s': must be > 0")
    if cfg.train.steps is not None and cfg.train.steps <= 0:
        raise ConfigError("invalid value for 'train.steps': must be > 0")
    if cfg.data.mode == "resampled" and not cfg.data.samples_per_epoch:
        raise ConfigError("'data.samples_per_epoch' is required when data.mode=resampled")
    if cfg.data.num_workers < 0:
        raise ConfigError("invalid value for 'data.num_workers': must be >= 0")
    if cfg.optim.name == "lars" and cfg.engine.zero_stage > 0:
        raise ConfigError("invalid value for 'engine.zero_stage': LARS's layer-wise trust ratio needs "
                          "whole parameters, which ZeRO stage 1/2 flattens; use 0 or optim.name=adamw")
    if cfg.engine.grad_clip_mode == "per_param" and cfg.engine.grad_clip and cfg.engine.zero_stage > 0:
        raise ConfigError("invalid value for 'engine.grad_clip_mode': per_param clipping needs each "
                          "parameter's whole gradient, which ZeRO stage 1/2 partitions; use zero_stage 0")
    from sslforge.models.backbones import check_model_config  # here: the CLI imports config early

    try:
        check_model_config(cfg.model, cfg.data.image_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if len(cfg.optim.betas) != 2:
        raise ConfigError("invalid value for 'optim.betas': expected two numbers")
    for i, view in enumerate(cfg.data.views):
        if view.size <= 0:
            raise ConfigError(f"invalid value for 'data.views.{i}.size': must be > 0")
        if len(view.scale) != 2 or not 0 < view.scale[0] <= view.scale[1] <= 1:
            raise ConfigError(f"invalid value for 'data.views.{i}.scale': expected 0 < lo <= hi <= 1")
    from sslforge.data_pipeline.views import check_views

    try:
        check_views(cfg.data.views)
    except ValueError as exc:
        raise ConfigError(f"data.views: {exc}") from None
    from sslforge.methods import method_class
    from sslforge.trainer.parts import check_parts_config

    try:
        check_parts_config(cfg, getattr(method_class(cfg.method.name), "part_names", ()))
        method_class(cfg.method.name).check_config(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _check_part_choices(cfg)
    if method_class(cfg.method.name).needs_captions:
        _check_tokenizer(cfg)
    from sslforge.eval.generation import check_eval_config

    try:
        check_eval_config(cfg)  # the Inception file for FID, the R-precision scorer run
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_buildable(cfg: DictConfig) -> None:
    """Build the method's networks on the meta device (shapes only: no memory, no initialisation
    cost), so that what only a constructor can check (a head wider than the backbone's output, a
    backbone a method cannot use) fails in the launching process, in seconds, before any rank
    starts. Not part of `load_config`: the ranks build the real networks right away."""
    import contextlib
    import io
    import warnings

    import torch

    from sslforge.methods import build_method

    try:  # quietly: what a constructor says (weights it loads, on meta a no-op) the ranks say again
        with torch.device("meta"), warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            build_method(cfg)
    except ValueError as exc:
        raise ConfigError(f"{cfg.method.name} cannot be built with this config: {exc}") from None


def _check_tokenizer(cfg: DictConfig) -> None:
    """A caption method's tokenizer loads (a local directory that is there and holds one)."""
    from sslforge.data_pipeline import DataError
    from sslforge.data_pipeline.captions import build_tokenizer

    try:
        build_tokenizer(cfg.data.tokenizer, cfg.data.max_tokens)
    except DataError as exc:
        raise ConfigError(f"invalid value for 'data.tokenizer': {exc}") from None


def _check_part_choices(cfg: DictConfig) -> None:
    """Each part's optimiser settings pass the checks `optim`'s own pass."""
    from sslforge.trainer.parts import part_config

    for name in cfg.optim.parts:
        optim = part_config(cfg, name).optim
        for key in ("name", "lr_scaling", "lr_schedule"):
            if optim[key] not in _CHOICES[f"optim.{key}"]:
                raise ConfigError(f"invalid value for 'optim.parts.{name}.{key}': {optim[key]!r}; "
                                  f"expected one of {_CHOICES[f'optim.{key}']}")
        if len(optim.betas) != 2:
            raise ConfigError(f"invalid value for 'optim.parts.{name}.betas': expected two numbers")
        if optim.name == "lars" and cfg.engine.zero_stage > 0:
            raise ConfigError(f"invalid value for 'optim.parts.{name}.name': LARS needs engine.zero_stage=0")


def evaluates_at_end(cfg: DictConfig) -> bool:
    """Whether a run evaluates its last step: `eval.at_end`, which by default follows
    `eval.every_epochs` (a run evaluated during training is evaluated once more at its end, when
    its last step is not an epoch's evaluation already; `every_epochs=0` turns evaluation off)."""
    return cfg.eval.every_epochs > 0 if cfg.eval.at_end is None else bool(cfg.eval.at_end)


def save_config(cfg: DictConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tmp.replace(path)


def load_resolved(path: Path) -> DictConfig:
    """A run directory's saved config (already validated), typed again for attribute access."""
    raw = _parse_yaml(path.read_text(), str(path))
    schema = OmegaConf.structured(Config(method=_method_schema(raw["method"]["name"])()))
    return OmegaConf.merge(schema, raw)  # type: ignore[return-value]
