"""Typed training configuration: dataclasses, YAML files of differences, command-line overrides.

A run is described by one :class:`TrainConfig`::

    run:    RunConfig     name, stage (coarse | refine), iterations, batch size, seed, intervals
    data:   DataConfig    capture folder, data lists, views, scan points, augmentation, caches
    loss:   LossConfig    v2v / scan-to-mesh / edge weights
    optim:  OptimConfig   AdamW, learning rates, schedule, clipping, AMP
    model:  CoarseConfig (stage "coarse") or RefineConfig (stage "refine")

The dataclass defaults are the paper's values (coarse stage). YAML files hold only the
DIFFERENCES from these defaults and may inherit from other files::

    inherit: base.yaml            # or a list; paths relative to this file; later files win
    run: {name: coarse, iterations: 500000}
    loss: {w_s2m: 10.0}

Command-line overrides ``key.sub=value`` are applied last; the value is parsed with
``yaml.safe_load`` (``run.iterations=100``, ``data.max_views=null``,
``model.unet_widths=[8,16,16]``, ``loss.v2v_weights={eyeballs: 1.0}``).

Typing rules (:func:`load_config`): unknown keys and wrong types raise
:class:`~tempeh.errors.ConfigError` naming the full dotted key and the file (or the override)
that set it. ``int`` is accepted for ``float`` fields; numeric strings such as ``1e-3`` (which
PyYAML reads as a string) are accepted for ``float`` fields; ``bool`` is never accepted as a
number; lists become tuples for tuple fields; ``null`` only for ``Optional`` fields. A field
holding a mapping (``v2v_weights``) is replaced as a whole by a later file or override; nested
dataclasses are merged key by key.

:func:`save_config` writes the fully resolved config (every field) as YAML; loading that file
gives an equal config. :func:`config_hash` is a stable hash of the resolved values.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import yaml

from tempeh.errors import ConfigError
from tempeh.geometry.regions import (COARSE_EDGE_WEIGHTS, EYEBALLS_ONLY_VERTEX_WEIGHTS,
                                     PRETRAIN_VERTEX_WEIGHTS, REFINE_EDGE_WEIGHTS, WEIGHT_GROUPS)
from tempeh.losses import ROBUST_KINDS, V2V_KINDS
from tempeh.models.coarse import CoarseConfig
from tempeh.models.refine import RefineConfig

logger = logging.getLogger(__name__)

__all__ = [
    "AugmentConfig", "DataConfig", "LossConfig", "OptimConfig", "RunConfig", "StageConfig",
    "TrainConfig", "MODEL_CONFIGS", "VERTEX_WEIGHT_PRESETS", "EDGE_WEIGHT_PRESETS",
    "load_config", "config_from_dict", "config_to_dict", "save_config", "config_hash",
    "validate_config", "resolve_vertex_weights", "resolve_edge_weights", "parse_override",
]

PathLike = Union[str, os.PathLike]

#: model config class of each stage.
MODEL_CONFIGS: Dict[str, type] = {"coarse": CoarseConfig, "refine": RefineConfig}

#: named v2v vertex-weight presets (group -> weight, see tempeh.geometry.regions).
VERTEX_WEIGHT_PRESETS: Dict[str, Dict[str, float]] = {
    "all": dict(PRETRAIN_VERTEX_WEIGHTS),
    "eyeballs": dict(EYEBALLS_ONLY_VERTEX_WEIGHTS),
}

#: named edge-regulariser weight presets.
EDGE_WEIGHT_PRESETS: Dict[str, Dict[str, float]] = {
    "coarse": dict(COARSE_EDGE_WEIGHTS),
    "refine": dict(REFINE_EDGE_WEIGHTS),
}


# ============================================================================ dataclasses
@dataclass
class AugmentConfig:
    """Training-time image augmentation (``tempeh.data.augment``)."""

    enabled: bool = True
    """Augment training samples (validation and test samples are never augmented unless
    ``on_validation``)."""
    scale_range: Tuple[float, float] = (0.9, 1.1)
    """Range of the random zoom factor ``s ~ U(lo, hi)`` per view; the zoomed image is cropped
    (zoom-in) or padded with zeros (zoom-out) back to the original size at a uniformly random
    offset, and the intrinsics follow exactly. ``(1, 1)`` disables it."""
    brightness_sigma: float = 0.33
    """Std of the brightness factor ``1 + sigma * N(0, 1)`` (paper: 0.33). We draw ONE factor
    per grey image (per view); the reference draws three per-channel factors on its RGB copy of
    a grey image, which tints it. Result clipped to [0, 1]. 0 disables it."""
    on_validation: bool = False
    """Also augment validation samples (the reference does; we do not by default)."""


@dataclass
class DataConfig:
    """Where the data is and how samples are made (``tempeh.data.CaptureDataset``)."""

    root: Optional[str] = None
    """Capture folder in the tempeh layout (``data_specs/capture_layout.md``); relative to the
    working directory. Required for training."""
    train_list: str = "data_lists/train.json"
    """Training data list (JSON ``[[subject, sequence, frame], ...]``); relative to ``root``."""
    val_list: Optional[str] = "data_lists/val.json"
    """Validation data list, relative to ``root``; None: no validation."""
    image_downsample: float = 1.0
    """Downsampling factor relative to the STORED images (INTER_AREA on the 8-bit images; new
    size ``round(W / k) x round(H / k)``, intrinsics updated exactly). The paper stores images
    at 1/4 of 1600x1200 and uses 2 for the coarse stage, 1 for refinement."""
    rotate_portrait: bool = True
    """Turn portrait views (H > W) 90 degrees counter-clockwise, cameras included
    (``Cameras.rotate90``), so that every view is landscape and the views stack (as the
    reference does); False: views of different shapes are an error."""
    cameras: Optional[List[str]] = None
    """Camera names to use, in this order; None: every camera with an image in the frame
    folder (sorted by name)."""
    min_views: int = 8
    """Fewest views of a training batch (the paper samples 8..16)."""
    max_views: Optional[int] = 16
    """Most views of a training batch; None: all available. Evaluation uses all views."""
    scan_points: int = 20000
    """Scan points per sample (coarse 20000, refinement 15000), a random subset drawn without
    replacement; a scan with fewer points is zero-padded and ``scan_valid`` marks real points."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Image augmentation."""
    coarse_cache_dir: Optional[str] = None
    """Folder of cached coarse-stage meshes ``<subject>/<sequence>/<sequence>.<frame>.ply``
    (relative to the working directory). REQUIRED for stage "refine": a missing file is an
    error naming it, never a fallback to the registration."""
    coarse_cache_units: Literal["m", "cm", "mm"] = "m"
    """Unit of the cached coarse meshes' coordinates."""
    use_cache: Optional[str] = None
    """HDF5 cache written by ``tools/build_cache.py`` (relative to the working directory);
    None: read PNGs, calibrations, scans and meshes from ``root``. The cache's image
    downsampling must equal ``image_downsample``."""
    num_workers: int = 2
    """DataLoader worker processes (0: load in the main process)."""
    skip_bad_frames: bool = False
    """False: a frame with missing or unreadable data is an error naming the file. True: it is
    skipped, logged and counted."""


@dataclass
class LossConfig:
    """Loss weights (``tempeh.losses``); only non-zero terms are computed."""

    w_v2v: float = 1.0
    """Weight of the masked vertex-to-vertex loss against the registration."""
    v2v_weights: Union[str, Dict[str, float]] = "all"
    """Per-region v2v vertex weights: a preset (``all``: every vertex 1, coarse pretraining;
    ``eyeballs``: eyeballs only) or a mapping group -> weight (groups of
    ``tempeh.geometry.regions.WEIGHT_GROUPS``; groups not named get 0)."""
    v2v_kind: str = "mse"
    """Penalty of the v2v and box losses: ``mse`` (reference, mm^2) or ``dist`` (mean Euclidean
    distance, mm; :func:`tempeh.losses.v2v_loss`)."""
    w_s2m: float = 0.0
    """Weight of the robust scan-to-mesh (point-to-surface) loss (paper: 10 after pretraining)."""
    s2m_sigma_mm: float = 10.0
    """Geman-McClure scale of the scan-to-mesh loss, mm."""
    s2m_kind: str = "sqrt_gm"
    """Robust penalty of the scan-to-mesh loss: sqrt_gm (reference) | gm | l1 | l2."""
    w_edge: float = 0.0
    """Weight of the edge regulariser against the registration (coarse 1.0, refinement 0.3)."""
    edge_weights: Union[str, Dict[str, float]] = "coarse"
    """Edge-regulariser vertex weights: a preset (``coarse`` | ``refine``) or a mapping
    group -> weight (groups not named get 1)."""
    w_box: float = 0.0
    """Weight of the localizer loss (coarse stage with ``model.template_prior_sigma_mm > 0``
    only; not in the paper): the v2v loss (all vertices, mm^2) between the registration and the
    template posed by the localizer's box alone, so the localizer learns the head's similarity
    pose directly instead of only through the soft-argmax."""


@dataclass
class OptimConfig:
    """Optimiser and schedule (AdamW with two parameter groups)."""

    lr: float = 1e-3
    """Base learning rate (paper: 1e-3, constant)."""
    localizer_lr: float = 1e-4
    """Fixed learning rate of the coarse localizer's parameters (reference: 1e-4)."""
    weight_decay: float = 0.01
    """AdamW weight decay (the PyTorch default, as in the reference)."""
    betas: Tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    schedule: Literal["constant", "step", "cosine"] = "constant"
    """Base-lr schedule: constant | step (x step_gamma at each milestone) | cosine (to 0)."""
    step_milestones: Tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
    """Fractions of ``run.iterations`` at which the step schedule multiplies by step_gamma."""
    step_gamma: float = 0.5
    """Factor of the step schedule."""
    warmup_iterations: int = 0
    """Linear warm-up of the base lr over this many iterations (0: none)."""
    grad_clip: Optional[float] = None
    """Clip the global gradient norm to this value; None: no clipping."""
    amp: bool = False
    """Mixed precision (CUDA only; ignored with a warning on CPU)."""


@dataclass
class RunConfig:
    """One training stage (VHAP-style: each stage its own config, resumable)."""

    name: str = "coarse"
    """Run name; the run directory is ``out_dir/name``."""
    stage: Literal["coarse", "refine"] = "coarse"
    """Which network is trained; selects the ``model`` config class."""
    iterations: int = 300000
    """Optimisation steps of this stage (paper: 300k pretraining, 500k coarse, 150k refine)."""
    batch_size: int = 2
    """Samples per step (per process in distributed runs)."""
    seed: int = 0
    """Seed of the model initialisation, view sampling and augmentation."""
    log_interval: int = 100
    """Steps between scalar logs."""
    val_interval: int = 5000
    """Steps between validation passes (0: never)."""
    checkpoint_interval: int = 50000
    """Steps between checkpoints (a final checkpoint is always written)."""
    keep_last_k: int = 3
    """Checkpoints kept in the run directory (older ones are deleted; 0: keep all)."""
    out_dir: str = "runs"
    """Parent folder of run directories, relative to the working directory."""
    init_from: Optional[str] = None
    """Run directory (or checkpoint file) of a previous stage whose weights initialise this one
    (coarse after pretraining); the optimiser state is not taken over."""
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""


#: the brief's alternative name of :class:`RunConfig`.
StageConfig = RunConfig


@dataclass
class TrainConfig:
    """Everything a training run needs; ``model`` is a ``CoarseConfig`` or a ``RefineConfig``
    according to ``run.stage``."""

    run: RunConfig = field(default_factory=RunConfig)
    """Stage, length, batch and bookkeeping."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss weights."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser."""
    model: Union[CoarseConfig, RefineConfig] = field(default_factory=CoarseConfig)
    """Network of ``run.stage``."""


# ============================================================================ typing helpers
_FLOAT_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_MISSING = object()


class _TypeMismatch(Exception):
    """Internal: value does not match the annotation (message says what was expected)."""


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is None:
        return getattr(tp, "__name__", str(tp))
    if origin is Union:
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    args = typing.get_args(tp)
    name = getattr(origin, "__name__", str(origin))
    return f"{name}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"


def _describe(value) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _coerce(value, tp):
    """Check ``value`` (from YAML) against annotation ``tp`` and return the typed value."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        if value is None:
            if type(None) in args:
                return None
            raise _TypeMismatch(f"expected {_type_name(tp)}, got null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a)
            except _TypeMismatch as err:
                errors.append(str(err))
        raise _TypeMismatch(f"expected {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _TypeMismatch(f"expected one of {', '.join(repr(a) for a in args)}, "
                            f"got {_describe(value)}")
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise _TypeMismatch(f"expected a list ({_type_name(tp)}), got {_describe(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce_item(v, args[0], i) for i, v in enumerate(value))
        if len(value) != len(args):
            raise _TypeMismatch(f"expected a list of {len(args)} items ({_type_name(tp)}), "
                                f"got {len(value)} items")
        return tuple(_coerce_item(v, a, i) for i, (v, a) in enumerate(zip(value, args)))
    if origin in (list, List, Sequence, typing.Sequence) or tp in (list, List):
        if not isinstance(value, (list, tuple)):
            raise _TypeMismatch(f"expected a list ({_type_name(tp)}), got {_describe(value)}")
        item = args[0] if args else Any
        return [_coerce_item(v, item, i) for i, v in enumerate(value)]
    if origin in (dict, Dict, Mapping, typing.Mapping) or tp in (dict, Dict):
        if not isinstance(value, Mapping):
            raise _TypeMismatch(f"expected a mapping ({_type_name(tp)}), got {_describe(value)}")
        kt, vt = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            k2 = _coerce(k, kt)
            try:
                out[k2] = _coerce(v, vt)
            except _TypeMismatch as err:
                raise _TypeMismatch(f"entry {k!r}: {err}") from None
        return out
    if tp is type(None):
        if value is None:
            return None
        raise _TypeMismatch(f"expected null, got {_describe(value)}")
    if value is None:
        raise _TypeMismatch(f"expected {_type_name(tp)}, got null (the field is not optional)")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _TypeMismatch(f"expected bool (true/false), got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        raise _TypeMismatch(f"expected int, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        raise _TypeMismatch(f"expected float, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _TypeMismatch(f"expected str, got {_describe(value)} (quote it)")
    raise _TypeMismatch(f"unsupported annotation {tp!r}")


def _coerce_item(value, tp, i: int):
    try:
        return _coerce(value, tp)
    except _TypeMismatch as err:
        raise _TypeMismatch(f"item {i}: {err}") from None


def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _model_class(stage) -> type:
    try:
        return MODEL_CONFIGS[stage]
    except (KeyError, TypeError):
        raise ConfigError(f"run.stage: expected one of {sorted(MODEL_CONFIGS)}, got {stage!r}") from None


# ============================================================================ building from layers
# A layer is (mapping, source): a YAML file's contents (minus 'inherit') or one override.
Layer = Tuple[Mapping, str]


def _sub_layers(layers: Sequence[Layer], key: str, prefix: str) -> List[Layer]:
    out = []
    for data, src in layers:
        if key in data:
            value = data[key]
            if not isinstance(value, Mapping):
                raise ConfigError(f"{prefix}{key}: expected a mapping of fields, got "
                                  f"{_describe(value)} (in {src})")
            out.append((value, src))
    return out


#: Keys that older resolved configs (``<run>/<stage>/config.yaml``) may hold and that no longer
#: have an effect: loading warns and ignores them, so old runs stay loadable.
RETIRED_KEYS: Dict[str, str] = {
    "model.localizer_lr_scale": "training always used optim.localizer_lr",
    "model.head_naive": "replaced by model.head_mode (naive | chunked | fused; same results)",
    "model.head_fused": "replaced by model.head_mode (naive | chunked | fused; same results)",
}


def _build(cls, layers: Sequence[Layer], prefix: str, stage: Optional[str] = None):
    """Instantiate dataclass ``cls`` from layered mappings (later layers win)."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for data, src in layers:
        for key in data:
            if prefix + key in RETIRED_KEYS:
                logger.warning("config key '%s%s' (in %s) is retired and ignored: %s", prefix, key,
                               src, RETIRED_KEYS[prefix + key])
                continue
            if key not in names:
                valid = ", ".join(sorted(names))
                raise ConfigError(f"unknown key '{prefix}{key}' (in {src}); valid keys of "
                                  f"{prefix.rstrip('.') or 'the top level'}: {valid}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        dotted = prefix + f.name
        if cls is TrainConfig and f.name == "model":
            sub_cls = _model_class(stage)
            kwargs[f.name] = _build(sub_cls, _sub_layers(layers, f.name, prefix), dotted + ".")
            continue
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, _sub_layers(layers, f.name, prefix), dotted + ".")
            continue
        value, src = _MISSING, None
        for data, s in layers:
            if f.name in data:
                value, src = data[f.name], s
        if value is _MISSING:
            continue  # dataclass default
        try:
            kwargs[f.name] = _coerce(value, tp)
        except _TypeMismatch as err:
            raise ConfigError(f"{dotted}: {err} (in {src})") from None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        srcs = sorted({s for _, s in layers})
        where = f" (in {', '.join(srcs)})" if srcs else ""
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}{where}") from None


def _stage_of(layers: Sequence[Layer]) -> str:
    stage, src = "coarse", None
    for data, s in _sub_layers(layers, "run", ""):
        if "stage" in data:
            stage, src = data["stage"], s
    if stage not in MODEL_CONFIGS:
        raise ConfigError(f"run.stage: expected one of {sorted(MODEL_CONFIGS)}, got "
                          f"{_describe(stage)} (in {src})")
    return stage


def _source_of(layers: Sequence[Layer], dotted: str) -> Optional[str]:
    """The last layer that sets ``dotted`` (or a parent of it), for error messages."""
    found = None
    for data, src in layers:
        node = data
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            found = src
    return found


def config_from_layers(layers: Sequence[Layer]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from ``(mapping, source)`` layers."""
    cfg = _build(TrainConfig, layers, "", stage=_stage_of(layers))
    try:
        validate_config(cfg)
    except ConfigError as err:
        key = str(err).split(":", 1)[0]
        src = _source_of(layers, key)
        if src is None:
            raise
        raise ConfigError(f"{err} (in {src})") from None
    return cfg


def config_from_dict(data: Mapping, source: str = "<dict>") -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from one nested mapping of differences."""
    return config_from_layers([(data, source)])


# ============================================================================ YAML files
def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', None) or err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
    return data


def _file_layers(path: Path, stack: Tuple[Path, ...] = ()) -> List[Layer]:
    path = Path(path)
    real = path.resolve()
    if real in stack:
        chain = " -> ".join(str(p) for p in stack + (real,))
        raise ConfigError(f"{path}: inheritance cycle: {chain}")
    data = _read_yaml(path)
    inherit = data.pop("inherit", None)
    if inherit is None:
        parents = []
    elif isinstance(inherit, str):
        parents = [inherit]
    elif isinstance(inherit, list) and all(isinstance(p, str) for p in inherit):
        parents = inherit
    else:
        raise ConfigError(f"inherit: expected a file name or a list of file names, got "
                          f"{_describe(inherit)} (in {path})")
    layers: List[Layer] = []
    for p in parents:
        layers += _file_layers(path.parent / p, stack + (real,))
    layers.append((data, str(path)))
    return layers


def parse_override(text: str) -> Layer:
    """``"a.b.c=value"`` -> ``({"a": {"b": {"c": value}}}, source)``; value via yaml.safe_load."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE with a dotted KEY "
                          "(e.g. run.iterations=1000)")
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    if parts[0] == "inherit":
        raise ConfigError(f"override {text!r}: 'inherit' can only be set in a file")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from None
    data: Any = value
    for p in reversed(parts):
        data = {p: data}
    return data, f"override '{text}'"


def load_config(path: Optional[PathLike] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a config file (with its ``inherit`` chain) and apply ``key.sub=value`` overrides.

    Args:
        path: YAML file of differences from the defaults; None: defaults only.
        overrides: command-line overrides, applied in order after the files.
    Returns:
        A validated :class:`TrainConfig`.
    Raises:
        ConfigError naming the dotted key and the file or override at fault.
    """
    layers: List[Layer] = _file_layers(Path(path)) if path is not None else []
    layers += [parse_override(o) for o in overrides]
    return config_from_layers(layers)


# ============================================================================ saving, hashing
def config_to_dict(cfg) -> dict:
    """Every field of a config dataclass as plain YAML/JSON types (tuples become lists)."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def config_hash(cfg: TrainConfig) -> str:
    """Stable 16-hex-digit SHA-256 of the resolved config values (independent of key order
    and of which files set them)."""
    text = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def save_config(cfg: TrainConfig, path: PathLike) -> Path:
    """Write the fully resolved config (every field) to ``path`` as YAML, atomically.

    ``load_config(path)`` returns a config equal to ``cfg``.
    """
    from tempeh.io.mesh import atomic_write

    path = Path(path)
    header = (f"# tempeh resolved training config (every field), hash {config_hash(cfg)}\n"
              f"# model: {type(cfg.model).__name__}\n")
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None,
                          allow_unicode=True)
    with atomic_write(path, "w") as fh:
        fh.write(header + text)
    return path


# ============================================================================ validation
def _check_weights(value, presets: Mapping[str, Mapping[str, float]], key: str) -> None:
    if isinstance(value, str):
        if value not in presets:
            raise ConfigError(f"{key}: unknown preset {value!r} (presets: {', '.join(presets)})")
        return
    bad = sorted(set(value) - set(WEIGHT_GROUPS))
    if bad:
        raise ConfigError(f"{key}: unknown weight group(s) {bad} (groups: "
                          f"{', '.join(WEIGHT_GROUPS)})")
    neg = sorted(k for k, w in value.items() if not (w >= 0 and math.isfinite(w)))
    if neg:
        raise ConfigError(f"{key}: weights must be finite and >= 0 ({neg})")


def resolve_vertex_weights(value: Union[str, Mapping[str, float]]) -> Dict[str, float]:
    """``LossConfig.v2v_weights`` -> group -> weight (every group; unnamed groups get 0)."""
    _check_weights(value, VERTEX_WEIGHT_PRESETS, "loss.v2v_weights")
    if isinstance(value, str):
        return dict(VERTEX_WEIGHT_PRESETS[value])
    return {g: float(value.get(g, 0.0)) for g in WEIGHT_GROUPS}


def resolve_edge_weights(value: Union[str, Mapping[str, float]]) -> Dict[str, float]:
    """``LossConfig.edge_weights`` -> group -> weight (every group; unnamed groups get 1)."""
    _check_weights(value, EDGE_WEIGHT_PRESETS, "loss.edge_weights")
    if isinstance(value, str):
        return dict(EDGE_WEIGHT_PRESETS[value])
    return {g: float(value.get(g, 1.0)) for g in WEIGHT_GROUPS}


def validate_config(cfg: TrainConfig, for_training: bool = False) -> TrainConfig:
    """Check value ranges and cross-field rules; ConfigError naming the key.

    With ``for_training`` also the paths a run needs: ``data.root``, and
    ``data.coarse_cache_dir`` for stage "refine".
    """
    def need(ok: bool, key: str, msg: str):
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    r, d, l, o = cfg.run, cfg.data, cfg.loss, cfg.optim
    need(isinstance(cfg.model, MODEL_CONFIGS[r.stage]), "model",
         f"stage {r.stage!r} needs a {MODEL_CONFIGS[r.stage].__name__}, got {type(cfg.model).__name__}")
    need(bool(r.name) and "/" not in r.name and r.name not in (".", ".."), "run.name",
         f"must be a plain folder name, got {r.name!r}")
    need(r.iterations >= 0, "run.iterations", f"must be >= 0, got {r.iterations}")
    need(r.batch_size >= 1, "run.batch_size", f"must be >= 1, got {r.batch_size}")
    for k in ("log_interval", "val_interval", "checkpoint_interval", "keep_last_k"):
        need(getattr(r, k) >= 0, f"run.{k}", f"must be >= 0, got {getattr(r, k)}")
    need(r.device == "auto" or r.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", r.device) is not None,
         "run.device", f"expected auto, cpu, cuda or cuda:N, got {r.device!r}")
    need(d.image_downsample > 0 and math.isfinite(d.image_downsample), "data.image_downsample",
         f"must be > 0, got {d.image_downsample}")
    need(d.min_views >= 1, "data.min_views", f"must be >= 1, got {d.min_views}")
    need(d.max_views is None or d.max_views >= d.min_views, "data.max_views",
         f"must be >= data.min_views ({d.min_views}) or null, got {d.max_views}")
    if d.cameras is not None:
        need(len(d.cameras) >= d.min_views, "data.cameras",
             f"lists {len(d.cameras)} cameras, fewer than data.min_views={d.min_views}")
        need(len(set(d.cameras)) == len(d.cameras), "data.cameras", "has duplicate names")
    need(d.scan_points >= 1, "data.scan_points", f"must be >= 1, got {d.scan_points}")
    need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    lo, hi = d.augment.scale_range
    need(0 < lo <= hi, "data.augment.scale_range", f"need 0 < lo <= hi, got {(lo, hi)}")
    need(d.augment.brightness_sigma >= 0, "data.augment.brightness_sigma",
         f"must be >= 0, got {d.augment.brightness_sigma}")
    for k in ("w_v2v", "w_s2m", "w_edge", "w_box"):
        need(getattr(l, k) >= 0, f"loss.{k}", f"must be >= 0, got {getattr(l, k)}")
    if l.w_box > 0:
        need(r.stage == "coarse" and getattr(cfg.model, "template_prior_sigma_mm", 0) > 0,
             "loss.w_box", "needs the coarse stage with model.template_prior_sigma_mm > 0 "
             "(it trains the localizer's posed template)")
    if r.stage == "coarse" and getattr(cfg.model, "box_jitter_prob", 0) > 0:
        need(l.w_box > 0, "model.box_jitter_prob",
             "needs loss.w_box > 0: samples whose grid uses the jittered box train the localizer "
             "only through the box loss (and a step where every sample does would leave it unused, "
             "which DDP rejects)")
    need(l.s2m_sigma_mm > 0, "loss.s2m_sigma_mm", f"must be > 0, got {l.s2m_sigma_mm}")
    need(l.s2m_kind in ROBUST_KINDS, "loss.s2m_kind",
         f"expected one of {', '.join(ROBUST_KINDS)}, got {l.s2m_kind!r}")
    need(l.v2v_kind in V2V_KINDS, "loss.v2v_kind",
         f"expected one of {', '.join(V2V_KINDS)}, got {l.v2v_kind!r}")
    _check_weights(l.v2v_weights, VERTEX_WEIGHT_PRESETS, "loss.v2v_weights")
    _check_weights(l.edge_weights, EDGE_WEIGHT_PRESETS, "loss.edge_weights")
    need(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    need(o.localizer_lr >= 0, "optim.localizer_lr", f"must be >= 0, got {o.localizer_lr}")
    need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    need(all(0 <= b < 1 for b in o.betas), "optim.betas", f"must be in [0, 1), got {o.betas}")
    need(all(0 < m < 1 for m in o.step_milestones) and list(o.step_milestones) == sorted(o.step_milestones),
         "optim.step_milestones", f"must be increasing fractions in (0, 1), got {o.step_milestones}")
    need(o.step_gamma > 0, "optim.step_gamma", f"must be > 0, got {o.step_gamma}")
    need(o.warmup_iterations >= 0, "optim.warmup_iterations", "must be >= 0")
    need(o.grad_clip is None or o.grad_clip > 0, "optim.grad_clip",
         f"must be > 0 or null, got {o.grad_clip}")
    if for_training:
        need(d.root is not None, "data.root", "is required for training (the capture folder)")
        if r.stage == "refine":
            need(d.coarse_cache_dir is not None, "data.coarse_cache_dir",
                 "is required for stage 'refine' (the cached coarse meshes; there is no "
                 "fallback to the registrations)")
    return cfg
