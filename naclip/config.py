"""Hydra glue: the config folder, the structured schema that fails early, and one-line validation."""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib
import logging
import math
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from naclip.attention import get_attention
from naclip.clip import PRECISIONS
from naclip.encoder import list_archs

log = logging.getLogger(__name__)

# Keys that change how a job runs or where it reports, never its numbers: they stay out of the job folder name
# (conf/config.yaml hydra.job.config.override_dirname.exclude_keys lists the same keys) and out of the
# skip check, so a finished result is reused whatever their values.
RUNTIME_KEYS: tuple[str, ...] = (
    "logger",
    "num_workers",
    "batch_size",
    "crop_batch_size",
    "backbone.device",
    "log_every",
    "force",
    "text_cache_dir",
    "output_root",
    "experiment_name",
)


def config_dir() -> str:
    """The `conf/` folder: shipped inside the installed package, or the repository's in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"naclip's config folder is missing (looked in {here / 'conf'} and {here.parent / 'conf'})")


@dataclass
class BackboneConfig:
    name: str = MISSING
    model: str = MISSING
    pretrained: str | None = "openai"
    quick_gelu: bool | None = None
    precision: str = "fp32"
    device: str = "auto"


@dataclass
class AttentionConfig:
    name: str = MISSING
    sigma: float | None = None


@dataclass
class ArchConfig:
    name: str = MISSING


@dataclass
class ProxyConfig:
    """A second vision model (timm) for ProxyCLIP and CASS; name "none" (model null) = no proxy."""

    name: str = "none"
    model: str | None = None
    pretrained: str | None = None


@dataclass
class ProxyCLIPOptions:
    """method=proxyclip: shift and scale of the proxy similarity (naclip.methods.proxyclip)."""

    beta: float = 1.2
    gamma: float = 3.0


@dataclass
class CASSOptions:
    """method=cass: options of naclip.methods.cass (the authors' per-dataset values in conf/protocol/cass_*)."""

    sigma: float = 5.0
    scale_factor: float = 10.0
    k_eigen: int = 20
    scale_singular_values: bool = True
    global_semantics_weight: float = 0.0
    mean_vector_weight: float = 0.0
    h_threshold: float = 0.0
    whole_image_semantics: bool = True
    proxy_size: int | None = None  # the proxy's square input side (518 for DINOv2 as the authors); null = crop's


@dataclass
class RefineConfig:
    name: str = "none"
    steps: int = 10
    dilations: list[int] = field(default_factory=lambda: [8, 16])


@dataclass
class DatasetConfig:
    name: str = MISSING
    layout: str = MISSING
    root: str | None = None
    split: str | None = None
    class_names: str = MISSING
    ignore_index: int = 255
    reduce_zero_label: bool = False
    short_side: int = 336
    max_long_side: int = 2048
    slide_crop: int = 224
    slide_stride: int = 112
    prob_thd: float = 0.0
    area_thd: float = 0.0  # SCLIP's small-region suppression (0 = off)
    logit_scale: float = 40.0
    pad_crops: bool = False  # ClearCLIP: zero-pad slide crops to whole patches (centred), cut the logits back out
    protocol: str = "dataset"  # where the protocol values come from: the dataset's own, or a method's (conf/protocol/)
    hf_path: str | None = None
    hf_name: str | None = None
    data_files: Any = None
    image_column: str = "image"
    label_column: str = "label"
    num_images: int | None = None
    image_size: list[int] | None = None
    seed: int = 0
    # the class whose display name is "background" (its synonyms are prompts); null: 0 where the class-name file's
    # class 0 is background (naclip.data.catalog.default_background_index), else none
    background_index: int | None = None
    expected_images: int | None = None  # images the published protocol evaluates on this split


@dataclass
class LoggerConfig:
    name: str = "local"
    project: str = "naclip"
    entity: str | None = None
    mode: str | None = None
    log_images: int = 0
    init_timeout: float = 30.0


@dataclass
class ResCLIPConfig:
    """Options of `method=resclip` (naclip.methods.resclip); per-dataset values come from conf/protocol/resclip_*."""

    base: str = "naclip"  # naclip | sclip | clearclip: the last block ResCLIP modifies
    sigma: float = 5.0
    logit_scale: float = 40.0  # the first pass's temperature; conf/method/resclip.yaml ties it to the protocol's
    temp_thd: float = 0.25
    rcs_weights: list[float] = field(default_factory=lambda: [2.0, 0.3])
    sfr_weights: list[float] = field(default_factory=lambda: [2.1, 0.7])
    rcs_blocks: list[int] = field(default_factory=lambda: [5, 6, 7, 8])
    delete_same_entity: bool = True


@dataclass
class SCCLIPConfig:
    """Options of `method=scclip` (naclip.methods.scclip): the authors' block indices and weights."""

    pre_adjust_idx: int = 8
    post_adjust_idx: int = 3
    multi_start_idx: int = 3
    multi_end_idx: int = 10
    res_cls: float = 0.3
    beta: float = 0.4
    n_neighbors: int = 30
    contamination: float = 0.05


@dataclass
class GemOptions:
    """`gem.*`: GEM's self-self path (naclip.methods.gem), named after the authors' gem_depth, ss_attn_iter and
    ss_attn_temp."""

    depth: int = 7  # the last depth-1 blocks get the path
    iterations: int = 1
    temperature: float | None = None  # None = adaptive (mean token norm × 1/√d)


@dataclass
class ClipSurgeryOptions:
    """`clip_surgery.*`: CLIP Surgery's v-v path (naclip.methods.clip_surgery)."""

    depth: int = 7  # the last depth-1 blocks get the path


@dataclass
class MethodConfig:
    """The groups every app shares: they define the model and the method."""

    backbone: BackboneConfig = MISSING
    attention: AttentionConfig = MISSING
    arch: ArchConfig = MISSING
    refine: RefineConfig = MISSING
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    proxyclip: ProxyCLIPOptions = field(default_factory=ProxyCLIPOptions)
    cass: CASSOptions = field(default_factory=CASSOptions)
    gem: GemOptions = field(default_factory=GemOptions)
    clip_surgery: ClipSurgeryOptions = field(default_factory=ClipSurgeryOptions)
    resclip: ResCLIPConfig = field(default_factory=ResCLIPConfig)
    scclip: SCCLIPConfig = field(default_factory=SCCLIPConfig)
    method_options: dict[str, Any] = field(default_factory=dict)  # a plug-in method's options (no schema node)
    plugins: list[str] = field(default_factory=list)  # modules imported before validation (register_attention)


@dataclass
class RunConfig(MethodConfig):
    method: str = "naclip"  # set by the `method` group: the preset the attention, arch and protocol came from
    dataset: DatasetConfig = MISSING
    logger: LoggerConfig = MISSING
    experiment_name: str = "default"
    output_root: str = "outputs"
    seed: int = 0
    batch_size: int = 1
    crop_batch_size: int = 64
    num_workers: int = 2
    log_every: int = 50
    max_images: int | None = None
    force: bool = False
    on_error: str = "raise"
    text_cache_dir: str | None = None


@dataclass
class PredictConfig(MethodConfig):
    method: str = "naclip"  # set by the `method` group, as for naclip.run
    protocol: str = "dataset"  # set by the method's protocol file (conf/protocol/<method>.yaml): whose values these are
    image: str = MISSING
    classes: Any = MISSING
    background: list[str] = field(default_factory=list)
    prob_thd: float = 0.0
    area_thd: float = 0.0
    logit_scale: float = 40.0
    short_side: int = 336
    max_long_side: int = 2048
    slide_crop: int = 224
    slide_stride: int = 112
    pad_crops: bool = False
    crop_batch_size: int = 64
    alpha: float = 0.5
    output_root: str = "outputs"
    out: str = MISSING
    text_cache_dir: str | None = None


def load_backbone(cfg: Any, device: str, timings: dict[str, float] | None = None) -> Any:
    """The CLIP model of a run or predict config, its load logged; `timings` receives `seconds_model_load`."""
    from naclip.clip import load_clip

    backbone = cfg.backbone
    weights = "random weights" if backbone.pretrained is None else f"weights {backbone.pretrained}"
    log.info("loading CLIP %s (%s, %s) on %s", backbone.model, weights, backbone.precision, device)
    start = time.perf_counter()
    model = load_clip(backbone.model, backbone.pretrained, device, backbone.precision, quick_gelu=backbone.quick_gelu)
    seconds = time.perf_counter() - start
    log.info("model loaded in %.1f s", seconds)
    if timings is not None:
        timings["seconds_model_load"] = round(seconds, 3)
    return model


def load_proxy(cfg: Any, device: str) -> Any:
    """The proxy model of a run or predict config (see naclip.proxy), or None when `proxy.model` is null."""
    from naclip.proxy import load_proxy as build

    proxy = cfg.get("proxy")
    if proxy is None or proxy.model is None:
        return None
    weights = "random weights" if proxy.pretrained is None else f"weights {proxy.pretrained}"
    log.info("loading proxy %s (%s, %s) on %s", proxy.name, proxy.model, weights, device)
    return build(proxy.model, proxy.pretrained, device, name=proxy.name)


def method_spec(cfg: Any) -> tuple[str | None, dict[str, Any]]:
    """The registered method a config selects and its options (the top-level node named after it, e.g.
    ``resclip.base``, or ``method_options`` for a plug-in method the schema has no node for); (None, {}) for the
    presets that only set the last block's attention and arch."""
    from naclip.methods import list_methods

    name = cfg.get("method")
    extra = cfg.get("method_options") or {}
    if name not in list_methods():
        if extra:
            raise ValueError(
                f"method_options given but method {name!r} is not registered; registered: "
                f"{list_methods()} (is its module in `plugins`?)"
            )
        return None, {}
    node = cfg.get(name)
    if node is not None and extra:
        raise ValueError(f"method {name!r} takes its options from `{name}.*`, not method_options")
    chosen = node if node is not None else extra
    return name, (OmegaConf.to_container(chosen, resolve=True) if OmegaConf.is_config(chosen) else dict(chosen))


def build_segmenter(
    cfg: Any,
    class_names: list[list[str]],
    protocol: Any,
    device: str,
    timings: dict[str, float] | None = None,
    model: Any = None,
    proxy: Any = None,
) -> tuple[Any, tuple, tuple]:
    """The model and segmenter a run or predict config describes: (segmenter on device, mean, std).

    `protocol` holds slide_crop, slide_stride, pad_crops, logit_scale, prob_thd and area_thd (the dataset group,
    or predict's top level). `timings`, when given, receives `seconds_model_load` and `seconds_text_classifier`
    (both steps take seconds to minutes, so they are logged and reported apart from the evaluation time).
    `model`: the backbone already loaded (fused sweeps build many segmenters on one model); None loads it. `proxy`: the
    proxy model already loaded (likewise); None loads the one `proxy` names, if any.
    """
    from naclip.clip import image_mean_std
    from naclip.segmenter import Segmenter
    from naclip.text import get_tokenizer

    backbone = cfg.backbone
    if model is None:
        model = load_backbone(cfg, device, timings)
    log.info("building the text classifier for %d classes", len(class_names))
    loaded = time.perf_counter()
    method, options = method_spec(cfg)
    if method is not None and cfg.get("proxy") is not None and cfg.proxy.model is not None:
        options["proxy"] = proxy if proxy is not None else load_proxy(cfg, device)
    segmenter = Segmenter(
        model,
        class_names,
        method=method,
        method_options=options,
        attention=cfg.attention.name,
        arch=cfg.arch.name,
        sigma=cfg.attention.sigma,
        slide_crop=protocol.slide_crop,
        slide_stride=protocol.slide_stride,
        logit_scale=protocol.logit_scale,
        prob_thd=protocol.prob_thd,
        area_thd=protocol.area_thd,
        pad_crops=protocol.pad_crops,
        pamr=cfg.refine.name == "pamr",
        pamr_steps=cfg.refine.steps,
        pamr_dilations=tuple(cfg.refine.dilations),
        crop_batch_size=cfg.crop_batch_size,
        cache_dir=cfg.text_cache_dir,
        tokenizer=get_tokenizer(backbone.model, random_weights=backbone.pretrained is None),
    ).to(device)
    built = time.perf_counter()
    log.info("text classifier ready in %.1f s", built - loaded)
    if timings is not None:
        timings["seconds_text_classifier"] = round(built - loaded, 3)
    return segmenter, *image_mean_std(backbone.model, backbone.pretrained)


def _drop_key(tree: dict[str, Any], dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if rest and isinstance(tree.get(head), dict):
        _drop_key(tree[head], rest)
    elif not rest:
        tree.pop(head, None)


def result_config(resolved: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved run config that can change a result: the config without `RUNTIME_KEYS`.

    Two jobs with equal result configs compute the same numbers, so the skip check compares only this part.
    """
    kept = copy.deepcopy(resolved)
    for key in RUNTIME_KEYS:
        _drop_key(kept, key)
    return kept


NAME_MAX = 255  # bytes in one path component on common file systems


def _dirname(overrides: str) -> str:
    """A job folder name from its overrides: never empty, no path separators, at most NAME_MAX bytes.

    A longer name (e.g. from a long ``dataset.root``) keeps a readable prefix and ends with a hash of the whole
    name, so it stays the same for the same overrides and differs for different ones.
    """
    name = re.sub(r"[/\\]+", "_", overrides) or "default"
    raw = name.encode()
    if len(raw) <= NAME_MAX:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:16]
    prefix = raw[: NAME_MAX - len(digest) - 1].decode(errors="ignore")  # never cut a character in two
    return f"{prefix}-{digest}"


def patch_size(model: str) -> int:
    """The vision tower's patch size from open_clip's model config (1 when unknown); no model is built."""
    import open_clip

    vision = (open_clip.get_model_config(model) or {}).get("vision_cfg", {})
    patch = vision.get("patch_size", 1)
    return int(max(patch) if isinstance(patch, list | tuple) else patch)


def register() -> None:
    """Register the schemas and the `naclip.dirname` resolver (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=RunConfig)
    cs.store(name="schema_predict", node=PredictConfig)
    if not OmegaConf.has_resolver("naclip.dirname"):
        OmegaConf.register_new_resolver("naclip.dirname", _dirname)
    if not OmegaConf.has_resolver("naclip.groups"):
        OmegaConf.register_new_resolver("naclip.groups", _group_options)


def _group_options(*groups: str) -> str:
    """`group: option, ...` per line for these config groups: an app's --help lists only the groups it accepts."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    return "\n".join(f"{group}: {', '.join(sorted(loader.get_group_options(group)))}" for group in groups)


def _check_known_keys(cfg: Any) -> None:
    """Top-level keys added with `+key=...` that the schema does not know are typos, not settings."""
    schema = OmegaConf.get_type(cfg)
    if schema not in (RunConfig, PredictConfig):
        return
    known = [f.name for f in fields(schema)]
    unknown = [key for key in cfg if key not in known]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(known)}"
        raise ValueError(f"unknown config key {unknown[0]!r}{hint}")


def load_plugins(modules: Any) -> None:
    """Import the user's modules named in `plugins`, so that what they register is known before validation."""
    for module in modules or ():
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"plugins: cannot import {module!r} ({err}); is it on PYTHONPATH?") from err
        except Exception as err:  # the module's own code fails (SyntaxError, NameError, ...): name it, no traceback
            reason = " ".join(f"{type(err).__name__}: {err}".split())
            raise ValueError(f"plugins: importing {module!r} failed ({reason}); fix that module") from err


def check_protocol_choice() -> None:
    """`protocol=X` names a file of conf/protocol (or of a search-path folder); an optional group alone would skip
    a misspelt name silently. The default choice, `<method>_<dataset>`, may have no file: the dataset's own values."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    if not (HydraConfig.initialized() and GlobalHydra.instance().is_initialized()):
        return
    choices = HydraConfig.get().runtime.choices
    choice = choices.get("protocol")
    if choice is None or choice == f"{choices.get('method')}_{choices.get('dataset')}":
        return
    valid = GlobalHydra.instance().config_loader().get_group_options("protocol")
    if choice not in valid:
        raise ValueError(f"unknown protocol {choice!r}; valid choices: {valid} (unset = the method's own)")


# Protocol numbers of a run's dataset group (or predict's top level) that a NaN or inf would turn into a lost run.
_PROTOCOL_NUMBERS = ("prob_thd", "area_thd", "logit_scale", "alpha")


def validate(cfg: Any) -> None:
    """Checks the schema cannot express; raises ValueError with one line naming the bad value."""
    _check_known_keys(cfg)
    load_plugins(cfg.get("plugins"))
    method_spec(cfg)
    check_protocol_choice()
    get_attention(cfg.attention.name)
    if cfg.arch.name not in list_archs():
        raise ValueError(f"unknown arch {cfg.arch.name!r}; valid choices: {list_archs()}")
    sigma = cfg.attention.sigma
    if get_attention(cfg.attention.name).uses_sigma and (sigma is None or not math.isfinite(sigma) or sigma <= 0):
        raise ValueError(f"attention.sigma must be a positive number for attention={cfg.attention.name}, got {sigma}")
    if cfg.backbone.precision not in PRECISIONS:
        raise ValueError(f"unknown backbone.precision {cfg.backbone.precision!r}; valid: {list(PRECISIONS)}")
    proxy = cfg.get("proxy")
    if proxy is not None and proxy.model is not None:
        from naclip.proxy import uses_proxy

        if not uses_proxy(method_spec(cfg)[0]):
            raise ValueError(f"proxy={proxy.name} is used only by methods with a second vision model (proxyclip, cass)")
    if cfg.refine.name not in ("none", "pamr"):
        raise ValueError(f"unknown refine {cfg.refine.name!r}; valid choices: ['none', 'pamr']")
    protocol = cfg.dataset if "dataset" in cfg else cfg
    prefix = "dataset." if "dataset" in cfg else ""
    for key in _PROTOCOL_NUMBERS:
        value = protocol.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{prefix}{key} must be a finite number, got {value}")
    area_thd = cfg.dataset.area_thd if "dataset" in cfg else cfg.get("area_thd", 0.0)
    if not 0.0 <= area_thd < 1.0:
        raise ValueError(f"area_thd must be in [0, 1) (a share of the predicted foreground area), got {area_thd}")
    for key in ("batch_size", "crop_batch_size"):
        if key in cfg and cfg[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]}")
    if "max_images" in cfg and cfg.max_images is not None and cfg.max_images < 1:
        raise ValueError(f"max_images must be >= 1 (or null for the whole split), got {cfg.max_images}")
    if "on_error" in cfg and cfg.on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {cfg.on_error!r}")
