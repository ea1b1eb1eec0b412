"""Models by name, with their preprocessing, and weights only from the local cache.

``load_model("resnet50")`` builds a timm model, ``load_model("tv:resnet50")`` a torchvision one.
Pretrained weights are taken from the local caches only (the Hugging Face hub cache and torch
hub's ``checkpoints`` folder), never downloaded: a survey of hundreds of models on a machine without
internet must neither hang nor fail on weights. A model whose weights are not cached is built with
random initialization and says so in ``LoadedModel.note``, so that survey results can tell a
trained model from an untrained one.

Example:
    >>> loaded = load_model("resnet18")
    >>> loaded.pretrained, loaded.note
    (False, 'random init: no pretrained weights in the local cache (looked for ...)')
    >>> loaded.preprocess.input_size, loaded.preprocess.crop_pct
    ((224, 224), 0.95)
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from equifast.data.geometry import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, Preprocess
from equifast.layers import describe_error, input_channels

__all__ = ["LoadedModel", "UnknownModelError", "from_module", "load_model", "load_model_sized",
           "preprocess_for"]

_TV_PREFIXES = ("tv:", "torchvision:")
_TIMM_PREFIX = "timm:"

# timm's own defaults when a pretrained_cfg leaves a field out (timm.data.resolve_data_config)
_DEFAULT_INPUT_SIZE = (224, 224)
_DEFAULT_CROP_PCT = 0.875
_DEFAULT_INTERPOLATION = "bilinear"


class UnknownModelError(ValueError):
    """A model name that neither timm nor torchvision knows; the message lists close names."""


@dataclass
class LoadedModel:
    """A model ready for measurement, with what is known about it.

    Attributes:
        model: the module, in eval mode, on the CPU.
        name: the name as given (e.g. 'resnet50', 'resnet50.a1_in1k', 'tv:resnet50').
        source: 'timm', 'torchvision' or 'module' (a user-given module).
        pretrained: whether trained weights were actually loaded.
        note: how the weights came about, e.g. "random init: no pretrained weights in the local
            cache (...)" or "pretrained weights from /root/.cache/...".
        preprocess: input size, crop_pct, interpolation, mean and std the model expects.
        weights: path of the loaded weight file, None for random init.
    """

    model: nn.Module
    name: str
    source: str
    pretrained: bool
    note: str
    preprocess: Preprocess
    weights: str | None = None


# --------------------------------------------------------------------------------------------
# preprocessing


def _crop_pct_for(crop: int, resize: int) -> float:
    """crop_pct such that timm's ``floor(crop / crop_pct)`` gives exactly ``resize``.

    torchvision states the resize size (e.g. crop 224, resize 232); ``224 / (224 / 232)`` can land a
    hair below 232 in floating point and floor to 231, so the ratio is nudged down until it
    does not.
    """
    crop_pct = crop / resize
    while math.floor(crop / crop_pct) < resize:
        crop_pct = math.nextafter(crop_pct, 0.0)
    return crop_pct


def _as_hw(value: Any) -> tuple[int, int] | None:
    """``(H, W)`` from an int, an ``(H, W)`` pair or a ``(C, H, W)`` triple; None otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if (
        isinstance(value, (tuple, list))
        and len(value) in (2, 3)
        and all(isinstance(v, int) for v in value)
    ):
        return int(value[-2]), int(value[-1])
    return None


def _preprocess_from_cfg(cfg: Mapping[str, Any]) -> Preprocess:
    """Preprocess from a timm ``pretrained_cfg``-like mapping; timm's defaults fill gaps."""
    input_size = _as_hw(cfg.get("input_size")) or _DEFAULT_INPUT_SIZE
    interpolation = cfg.get("interpolation") or _DEFAULT_INTERPOLATION
    if interpolation not in INTERPOLATIONS:
        # e.g. 'random' (training only): timm's eval transform would fail on it; bilinear is
        # timm's default
        interpolation = _DEFAULT_INTERPOLATION
    mean = tuple(cfg.get("mean") or IMAGENET_MEAN)
    std = tuple(cfg.get("std") or IMAGENET_STD)
    if len(mean) == 1:  # single-channel stats (some configs) apply to all three channels
        mean = mean * 3
    if len(std) == 1:
        std = std * 3
    crop_mode = cfg.get("crop_mode") or "center"
    if crop_mode not in ("center", "squash"):
        # 'border' pads with the mean colour; the crop protocol must not see artificial borders
        crop_mode = "center"
    return Preprocess(
        input_size=input_size,
        crop_pct=float(cfg.get("crop_pct") or _DEFAULT_CROP_PCT),
        interpolation=interpolation,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        crop_mode=crop_mode,
    )


def _actual_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The input size a module was built for, where it records one.

    timm keeps ``pretrained_cfg['input_size']`` at the weights' size even when the model is built
    with ``img_size=64``; the patch embedding knows the real one. torchvision's ViT stores
    ``image_size``.
    """
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None and isinstance(getattr(model, "model", None), nn.Module):
        patch_embed = getattr(model.model, "patch_embed", None)  # timm's FeatureGetterNet
    size = _as_hw(getattr(patch_embed, "img_size", None)) if patch_embed is not None else None
    if size is not None and not getattr(patch_embed, "dynamic_img_size", False):
        return size
    return _as_hw(getattr(model, "image_size", None))


def preprocess_for(model: nn.Module) -> Preprocess:
    """Preprocessing for a module: its timm ``pretrained_cfg`` if it has one, else ImageNet's.

    Args:
        model: any module; timm models carry ``pretrained_cfg`` (older ones ``default_cfg``).

    Returns:
        The :class:`Preprocess`; ImageNet defaults (224 x 224, crop_pct 0.875, bilinear, ImageNet
        mean and std) where the module says nothing, with the input size the module was built for
        where it records one (a ViT's patch embedding).
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if cfg is not None and not isinstance(cfg, Mapping):
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else vars(cfg)
    preprocess = _preprocess_from_cfg(cfg or {})
    actual = _actual_input_size(model)
    if actual is not None and actual != preprocess.input_size:
        preprocess = _replace_input_size(preprocess, actual)
    return preprocess


def check_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device``, once it names one this machine has.

    Raises:
        ValueError: not a device string, or a CUDA device when there is none (or not that many).
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', found {device!r}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(resolved)!r}: no CUDA GPU is available here "
                             "(torch.cuda.is_available() is False); use device='cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(resolved)!r}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return resolved


def model_dtype_for(model: nn.Module, dtype: torch.dtype | None,
                    device: torch.device) -> tuple[torch.dtype, bool]:
    """The dtype a measurement runs ``model`` in, and whether under bfloat16 autocast.

    Args:
        model: the module (its parameters tell its own dtype).
        dtype: the caller's choice, or None.
        device: where it runs.

    Returns:
        ``(dtype, autocast)``: ``dtype`` when given; else the model's own floating dtype when it
        is not float32 (a float64 or half model runs as it is); else float32, under bfloat16
        autocast on CUDA.

    Raises:
        TypeError: ``dtype`` is not a floating ``torch.dtype``.
    """
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(
                "dtype: expected a floating torch.dtype (torch.float32, torch.float64, "
                f"torch.bfloat16, torch.float16) or None, found {dtype!r}"
            )
        return dtype, False
    own = next((t.dtype for t in model.parameters() if t.is_floating_point()), None)
    if own is not None and own != torch.float32:
        return own, False
    return torch.float32, device.type == "cuda"


def _replace_input_size(preprocess: Preprocess, size: tuple[int, int]) -> Preprocess:
    # keep crop_pct: the same share of the image at the new size, as timm's eval does
    return Preprocess(
        input_size=size,
        crop_pct=preprocess.crop_pct,
        interpolation=preprocess.interpolation,
        mean=preprocess.mean,
        std=preprocess.std,
        crop_mode=preprocess.crop_mode,
    )


# --------------------------------------------------------------------------------------------
# offline weights


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hugging Face hub offline for the duration: no request leaves the machine.

    huggingface_hub reads ``HF_HUB_OFFLINE`` into ``constants`` at import, so setting the
    environment variable alone would not reach an already imported hub; both are set and restored.
    """
    previous_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = None
    previous_constant = None
    with contextlib.suppress(ImportError):
        from huggingface_hub import constants  # type: ignore[no-redef]

        previous_constant = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if previous_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous_env
        if constants is not None:
            constants.HF_HUB_OFFLINE = previous_constant


def _torch_hub_checkpoint(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps ``url``: ``<hub>/checkpoints/<name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _hf_cached_file(repo_id: str, filenames: list[str]) -> str | None:
    """First of ``filenames`` in the local Hugging Face cache for ``repo_id``; no network."""
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:
        return None
    repo, _, revision = repo_id.partition("@")  # timm allows 'org/name@revision'
    for filename in filenames:
        found = try_to_load_from_cache(
            repo, filename, cache_dir=constants.HF_HUB_CACHE, revision=revision or None
        )
        if isinstance(found, str):  # it can also return a "known missing" sentinel object
            return found
    return None


def _hf_filenames(filename: str | None) -> list[str]:
    """The files timm tries for a hub repo, in its order: safetensors alternatives first."""
    filename = filename or "pytorch_model.bin"
    names: list[str] = []
    with contextlib.suppress(ImportError, AttributeError):
        from timm.models._hub import _get_safe_alternatives  # private, hence the guard

        names.extend(_get_safe_alternatives(filename))
    return [*names, filename]


@dataclass
class _CachedWeights:
    path: str
    via: str  # 'hf-hub' (load through timm's hub path, offline) or 'file' (pass the file to timm)


def _find_timm_weights(cfg: Mapping[str, Any]) -> tuple[_CachedWeights | None, list[str]]:
    """Look for a timm config's weights in the local caches.

    Returns:
        ``(found, looked)``: the cached weights or None, and human-readable places looked at.
    """
    looked: list[str] = []
    hf_hub_id = cfg.get("hf_hub_id")
    url = cfg.get("url")
    file = cfg.get("file")
    if file:
        looked.append(str(file))
        if Path(file).exists():
            return _CachedWeights(str(file), "file"), looked
    if hf_hub_id:
        names = _hf_filenames(cfg.get("hf_hub_filename"))
        looked.append(f"hf-hub {hf_hub_id} ({', '.join(names)})")
        found = _hf_cached_file(hf_hub_id, names)
        if found:
            return _CachedWeights(found, "hf-hub"), looked
    if url and cfg.get("source") != "hf-hub":
        checkpoint = _torch_hub_checkpoint(url)
        looked.append(str(checkpoint))
        if checkpoint.is_file():
            return _CachedWeights(str(checkpoint), "file"), looked
    return None, looked


# --------------------------------------------------------------------------------------------
# names


def _tv_classification_models() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _unknown(name: str, candidates: list[str], what: str, probe: str | None = None,
             tag: str = "") -> UnknownModelError:
    """The error of a name that is no model: the close names among ``candidates`` (of
    ``probe``, the name without its pretrained tag or with the short ``tv:`` prefix), each with
    ``tag`` where timm has those weights."""
    close = difflib.get_close_matches(probe or name, candidates, n=8, cutoff=0.6)
    if tag:
        import timm

        # 'resnet1B.a1_in1k': the close architectures, with the tag where timm has it ('resnet18
        # .a1_in1k'); matching the whole name found other tags' lookalikes (resnet101_clip)
        tagged = set(timm.list_pretrained(f"*.{tag}"))
        close = [f"{c}.{tag}" if f"{c}.{tag}" in tagged else c for c in close]
    hint = f" Close names: {', '.join(close)}." if close else ""
    return UnknownModelError(
        f"unknown model {name!r}: {what}.{hint} timm names are listed by "
        f"timm.list_models('pattern*'); torchvision classification models are named "
        f"'tv:<name>' (torchvision.models.list_models())."
    )


def _check_timm_name(name: str) -> None:
    import timm
    from timm.models import get_pretrained_cfg

    if name.lower().startswith(("hf-hub:", "hf_hub:")):
        # timm's hub scheme fetches the config from the network; it is not a timm name here
        repo = name.split(":", 1)[1]
        own = repo.rsplit("/", 1)[-1]
        hint = (f" name the timm model instead, {own!r}, with its weights in the Hugging Face cache"
                if timm.is_model(own.partition(".")[0]) else
                " name a timm architecture (with an optional pretrained tag) instead")
        raise UnknownModelError(
            f"unknown model {name!r}: the hf-hub: scheme is not supported (models are built "
            f"from timm's registry and weights come from the local caches only);{hint}")
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        tv_names = [f"tv:{n}" for n in _tv_classification_models()]
        raise _unknown(name, [*timm.list_models(), *tv_names], "timm has no such architecture",
                       probe=arch, tag=tag)
    if tag:
        try:
            get_pretrained_cfg(name)
        except RuntimeError:
            tags = timm.list_pretrained(f"{arch}.*")
            raise UnknownModelError(
                f"unknown model {name!r}: timm has architecture {arch!r} but no pretrained tag "
                f"{tag!r}; its tags are: {', '.join(tags) or '(none)'}"
            ) from None


# --------------------------------------------------------------------------------------------
# loaders


def _random_note(reason: str) -> str:
    return f"random init: {reason}"


def _load_timm(name: str, pretrained: bool | None, kwargs: dict[str, Any]) -> LoadedModel:
    import timm
    from timm.models import get_pretrained_cfg

    _check_timm_name(name)
    cfg_obj = get_pretrained_cfg(name)
    cfg = cfg_obj.to_dict() if cfg_obj is not None else {}

    model: nn.Module | None = None
    weights: str | None = None
    note: str
    if kwargs.get("checkpoint_path"):
        # the user's own checkpoint: timm loads it; nothing to look up
        model = timm.create_model(name, pretrained=False, **kwargs)
        weights = str(kwargs["checkpoint_path"])
        note = f"weights from checkpoint_path {weights}"
    elif pretrained is False:
        note = _random_note("pretrained=False")
    elif not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):
        note = _random_note(f"timm has no pretrained weights for {name!r}")
    else:
        found, looked = _find_timm_weights(cfg)
        if found is None:
            note = _random_note(
                f"no pretrained weights in the local cache (looked for {'; '.join(looked)})"
            )
        else:
            create_kwargs = dict(kwargs)
            if found.via == "file":
                # hand timm the cached file itself, so its url path (which may download) never runs
                overlay = dict(create_kwargs.pop("pretrained_cfg_overlay", None) or {})
                overlay["file"] = found.path
                create_kwargs["pretrained_cfg_overlay"] = overlay
            try:
                with _offline():
                    model = timm.create_model(name, pretrained=True, **create_kwargs)
                weights = found.path
                note = f"pretrained weights from {found.path}"
            except Exception as error:  # a broken or mismatched cache entry must not stop a survey
                model = None
                note = _random_note(
                    f"loading cached weights {found.path} failed ({type(error).__name__}: {error})"
                )

    if model is None:
        model = timm.create_model(name, pretrained=False, **kwargs)
    loaded_ok = weights is not None
    preprocess = preprocess_for(model)
    size = _as_hw(kwargs.get("img_size"))
    if size is not None:
        preprocess = _replace_input_size(preprocess, size)
    return LoadedModel(model.eval(), name, "timm", loaded_ok, note, preprocess, weights)


def _tv_preprocess(weights: Any) -> Preprocess:
    """Preprocess from a torchvision weights enum's eval transform (ImageClassification)."""
    try:
        transform = weights.transforms()
        crop = int(transform.crop_size[0])
        resize = int(transform.resize_size[0])
        interpolation = transform.interpolation.value  # InterpolationMode -> 'bilinear', ...
        return Preprocess(
            input_size=(crop, crop),
            crop_pct=_crop_pct_for(crop, resize),
            interpolation=interpolation
            if interpolation in INTERPOLATIONS
            else _DEFAULT_INTERPOLATION,
            mean=tuple(transform.mean),  # type: ignore[arg-type]
            std=tuple(transform.std),  # type: ignore[arg-type]
        )
    except (AttributeError, TypeError, IndexError, ValueError):
        return Preprocess(input_size=_DEFAULT_INPUT_SIZE)


def _load_torchvision(
    name: str, arch: str, pretrained: bool | None, kwargs: dict[str, Any]
) -> LoadedModel:
    import torchvision

    available = _tv_classification_models()
    if arch not in available:
        raise _unknown(
            name, [f"tv:{n}" for n in available], "torchvision has no such classification model",
            probe=f"tv:{arch}",
        )

    default_weights = None
    with contextlib.suppress(ValueError, AttributeError):
        default_weights = torchvision.models.get_model_weights(arch).DEFAULT

    model: nn.Module | None = None
    weights_path: str | None = None
    if pretrained is False:
        note = _random_note("pretrained=False")
    elif default_weights is None:
        note = _random_note(f"torchvision has no pretrained weights for {arch!r}")
    else:
        checkpoint = _torch_hub_checkpoint(default_weights.url)
        if not checkpoint.is_file():
            note = _random_note(
                f"no pretrained weights in the local cache (looked for {checkpoint})"
            )
        else:
            try:
                # load_state_dict_from_url reads an existing checkpoint file without any request
                model = torchvision.models.get_model(arch, weights=default_weights, **kwargs)
                weights_path = str(checkpoint)
                note = f"pretrained weights {default_weights} from {checkpoint}"
            except Exception as error:  # corrupt file, num_classes mismatch, ...
                model = None
                note = _random_note(
                    f"loading cached weights {checkpoint} failed ({type(error).__name__}: {error})"
                )
    if model is None:
        model = torchvision.models.get_model(arch, weights=None, **kwargs)

    preprocess = (
        _tv_preprocess(default_weights)
        if default_weights is not None
        else Preprocess(_DEFAULT_INPUT_SIZE)
    )
    size = _as_hw(kwargs.get("image_size")) or _actual_input_size(model)
    if size is not None and size != preprocess.input_size:
        preprocess = _replace_input_size(preprocess, size)
    return LoadedModel(
        model.eval(), name, "torchvision", weights_path is not None, note, preprocess, weights_path
    )


def load_model(name: str, pretrained: bool | None = None, **kwargs: Any) -> LoadedModel:
    """Build a timm or torchvision model by name, with cached weights if there are any.

    Names: a timm model ('resnet50', 'vit_small_patch16_224', with an optional pretrained tag
    'resnet50.a1_in1k', or prefixed 'timm:resnet50'), or a torchvision classification model
    prefixed 'tv:' ('tv:resnet50').

    Weights are looked up in the local caches only, without any network request: the Hugging Face
    hub cache (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``) and torch hub's checkpoints
    folder (``TORCH_HOME``, default ``~/.cache/torch/hub/checkpoints``). When they are not there,
    or fail to load, the model is randomly initialized and ``note`` says why. To make weights
    available, download them once on a machine with internet (e.g. ``timm.create_model(name,
    pretrained=True)``) and copy the cache.

    Args:
        name: model name, see above.
        pretrained: None (default): load cached weights if present, else random init. True: the
            same, but also warn when no weights could be loaded. False: random init.
        **kwargs: passed to ``timm.create_model`` (e.g. ``img_size=64`` for a ViT,
            ``num_classes``, ``checkpoint_path``) or ``torchvision.models.get_model``.

    Returns:
        :class:`LoadedModel` with the model in eval mode and its :class:`Preprocess` (from timm's
        ``pretrained_cfg`` or torchvision's weights transforms; the input size follows
        ``img_size`` / ``image_size`` when given).

    Raises:
        UnknownModelError: (a ValueError) the name is not a timm or torchvision model; the message
            lists close names.
    """
    name = name.strip()
    if name.startswith(_TV_PREFIXES):
        arch = name.split(":", 1)[1]
        loaded = _load_torchvision(name, arch, pretrained, kwargs)
    else:
        timm_name = name[len(_TIMM_PREFIX) :] if name.startswith(_TIMM_PREFIX) else name
        loaded = _load_timm(timm_name, pretrained, kwargs)
        loaded.name = name
    if pretrained is True and not loaded.pretrained:
        warnings.warn(
            f"{name}: pretrained weights requested but not loaded; {loaded.note}", stacklevel=2
        )
    return loaded


def load_model_sized(name: str, input_size: tuple[int, int] | None = None,
                     **kwargs: Any) -> LoadedModel:
    """:func:`load_model`, built for ``input_size`` where the model fixes its input size.

    timm models that fix their input size when built (ViT, Swin, ...) take ``img_size``,
    torchvision's ViT ``image_size`` (square inputs) and its MaxViT ``input_size``: at a given
    ``input_size`` they are built for it, so that they run on inputs of that size (and their
    position embeddings have the matching shape). Models without such an argument (CNNs)
    take any input size as they are. The command line, the survey and
    ``equifast.measure(name, ...)`` build models by name through this function.

    Args:
        name: model name (:func:`load_model`).
        input_size: ``(H, W)`` of the input, or None for the model's default.
        **kwargs: passed to :func:`load_model`; an ``img_size`` given there wins.

    Returns:
        The :class:`LoadedModel`.

    Raises:
        TypeError: the model's own, other than its not taking the size (a bad argument in
            ``kwargs``, a constructor that fails at this size): raised, not retried at another
            size.
        ValueError: the constructor refuses the size (an AssertionError or ValueError of its
            own), naming the size and the model's message.
    """
    if input_size is None or "img_size" in kwargs or "image_size" in kwargs:
        return load_model(name, **kwargs)
    size = (int(input_size[0]), int(input_size[1]))
    if name.strip().startswith(_TV_PREFIXES):
        # torchvision's ViT takes one side, `image_size` (square inputs only); its MaxViT, whose
        # window and grid partitions are laid out for one size, takes `input_size`.
        attempts = [{"image_size": size[0]}] if size[0] == size[1] else []
        attempts.append({"input_size": size})
    else:
        attempts = [{"img_size": size}]
    for sized in attempts:
        try:
            return load_model(name, **sized, **kwargs)
        except TypeError as error:
            # Only a model that does not take the size (a CNN) is built again without it: it
            # takes any input size as it is. Another TypeError (a bad argument in kwargs, a bug
            # in the model's constructor) is the model's error, not a reason to build it at
            # another size.
            if not _rejects_keyword(error, next(iter(sized))):
                raise
        except UnknownModelError:
            raise
        except (AssertionError, ValueError) as error:
            # The constructor's own check of the size (NesT: the patch size must divide it;
            # MaxViT: its partitions must): said with the size, as a survey logs it.
            raise ValueError(f"model {name!r} cannot be built for input size {size[0]} x "
                             f"{size[1]}: {describe_error(error)}. Measure at a size it takes "
                             "(its configuration's input_size, or a multiple of its patch size "
                             "or total stride)") from error
    return load_model(name, **kwargs)


def _rejects_keyword(error: TypeError, keyword: str) -> bool:
    """Whether ``error`` is the refusal of ``keyword`` by a callable that does not take it:
    Python's (``ResNet.__init__() got an unexpected keyword argument 'img_size'``, what
    torchvision and most timm classes raise) or the one timm's models that take ``**kwargs``
    raise themselves (HRNet, VoVNet, MetaFormer / PoolFormer:
    ``VovNet.__init__() got unexpected keyword argument(s): ['img_size']``)."""
    quoted = re.escape(repr(keyword))
    return re.search(rf"\bunexpected keyword argument {quoted}"
                     rf"|\bunexpected keyword argument\(s\): \[[^\]]*{quoted}",
                     str(error)) is not None


@dataclass
class MeasuredModel:
    """The module a measurement runs, resolved from its ``model`` argument."""

    module: nn.Module
    preprocess: Preprocess
    name: str
    note: str = ""
    pretrained: bool | None = None
    by_name: str | None = None  # the name it was built by (its initialized copy is built so too)
    channels: int = 3  # of its input: 1 for a greyscale model, fed the luma of the images
    compiled: bool = False  # given torch.compile'd: module is the one it wraps

    def own_names(self, layers, layouts, align):
        """``layers``, ``layouts`` and ``align`` with the layer names of :attr:`module`: a
        compiled model's names (``_orig_mod.layer1``) lose their prefix."""
        if not self.compiled:
            return layers, layouts, align
        return (_strip_compiled_prefix(layers), _strip_compiled_prefix(layouts),
                _strip_compiled_prefix(align) if isinstance(align, Mapping) else align)


def check_input_channels(model: nn.Module) -> int:
    """:func:`input_channels`, which must be 3 (RGB) or 1 (grey: equifast feeds luma)."""
    channels = input_channels(model)
    if channels not in (1, 3):
        raise ValueError(
            f"model: its input has {channels} channels (its first convolution's in_channels); "
            "equifast measures models of RGB (3) or greyscale (1) images: wrap it in a module "
            f"that takes RGB images and makes its {channels} input channels (or build it with "
            "in_chans=3 or 1)"
        )
    return channels


def compiled_original(model: nn.Module) -> nn.Module | None:
    """The module ``torch.compile`` wrapped (``model._orig_mod``), or None for another module."""
    original = getattr(model, "_orig_mod", None)
    return original if isinstance(original, nn.Module) else None


def resolve_model(model: nn.Module | str, seed: int, input_size: tuple[int, int] | None,
                  model_name: str | None = None) -> MeasuredModel:
    """The module ``equifast.measure`` and ``equifast.naive.measure`` run, in eval mode.

    A name is built by :func:`load_model_sized` (for ``input_size`` where the model fixes its
    size), with a random init seeded with ``seed``, as on the command line and in a survey, so
    that a run can be repeated; the caller's random state is left as it was. A module that
    ``torch.compile`` wrapped is measured through the module it wraps: forward hooks cannot run
    inside a compiled graph (dynamo would trace the statistics code into it), and the numbers
    are the eager module's anyway.

    Raises:
        TypeError: ``model`` is neither a module nor a name.
        ValueError: its input has other channels than 3 or 1, it has compiled submodules, or
            it is a TorchScript module.
    """
    if isinstance(model, str):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loaded = load_model_sized(model, input_size)
        return MeasuredModel(loaded.model.eval(), loaded.preprocess, model_name or loaded.name,
                             loaded.note, loaded.pretrained, by_name=model,
                             channels=check_input_channels(loaded.model))
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model: expected an nn.Module or a model name, found {type(model).__name__}"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError(
            f"model: a TorchScript module ({type(model).__name__}, from torch.jit.script or "
            "torch.jit.trace) runs its forward as a graph, where forward hooks do not run, so "
            "its layers cannot be measured; pass the eager nn.Module it was made from (or a "
            "torch.compile'd one)"
        )
    original = compiled_original(model)
    if original is not None:
        warnings.warn(
            "model: a torch.compile'd module is measured through the module it wraps "
            f"({type(original).__name__}, model._orig_mod) in eager mode: forward hooks cannot "
            "run inside a compiled graph. Layer names are those of model._orig_mod",
            stacklevel=3,
        )
        model = original
    compiled_parts = [name for name, module in model.named_modules()
                      if name and compiled_original(module) is not None]
    if compiled_parts:
        raise ValueError(
            f"model: its submodules {compiled_parts[:3]} are torch.compile'd: forward hooks "
            "cannot run inside a compiled graph; measure the model before compiling them (or "
            "compile the whole model: it is then measured through the module it wraps)"
        )
    name = model_name or getattr(model, "default_cfg", {}).get("architecture") or type(
        model).__name__
    return MeasuredModel(model.eval(), preprocess_for(model), name,
                         channels=check_input_channels(model), compiled=original is not None)


def _strip_compiled_prefix(layers):
    """Layer names given as the compiled module names them (``_orig_mod.layer1``), as the module
    it wraps does (``layer1``): in a selection, or as the keys of a per-layer mapping (``layouts``,
    ``align``); other values unchanged."""
    prefix = "_orig_mod."

    def strip(spec):
        return spec[len(prefix):] if isinstance(spec, str) and spec.startswith(prefix) else spec

    if isinstance(layers, Mapping):  # layouts= and align= per layer
        return {strip(name): value for name, value in layers.items()}
    if isinstance(layers, (list, tuple)):
        return [strip(spec) for spec in layers]
    return strip(layers)


def from_module(
    model: nn.Module,
    name: str | None = None,
    pretrained: bool = True,
    note: str = "user-given module; weights as given",
    preprocess: Preprocess | None = None,
) -> LoadedModel:
    """Wrap a module the user built as a :class:`LoadedModel` (source 'module').

    Args:
        model: the module; it is put in eval mode.
        name: a name for results; the class name by default.
        pretrained: whether its weights are trained (equifast cannot tell).
        note: free text stored with results.
        preprocess: its preprocessing; :func:`preprocess_for` by default.

    Returns:
        The :class:`LoadedModel`.
    """
    return LoadedModel(
        model=model.eval(),
        name=name or type(model).__name__,
        source="module",
        pretrained=pretrained,
        note=note,
        preprocess=preprocess or preprocess_for(model),
    )
