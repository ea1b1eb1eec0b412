"""The initialization baseline: what a freshly initialized copy of the architecture scores.

Part of a network's equivariance comes from its architecture (convolutions, strides, padding),
not from learning; an untrained network can even score higher than a trained one (DESIGN.md
section 1.9). ``equifast.measure(model, ..., baseline="init")`` therefore measures, in the same run
and on the same transformed images, a seeded fresh copy of the architecture beside the model, and
reports next to each score the copy's score (``init``) and the difference (``learned = value -
init``), each with its 95% interval (the same bootstrap resamples of the same images, so that the
interval of ``learned`` is a paired one).

How the copy is built, the first that applies:

1. The model was given by name (``"resnet18"``, ``"tv:resnet50"``): the same name, built again
   with ``pretrained=False``.
2. A timm model (it carries a ``pretrained_cfg`` with its architecture) that timm rebuilds with the
   same parameter names and shapes: ``timm.create_model(architecture, pretrained=False,
   num_classes=...)``, timm's own initialization.
3. Otherwise a deep copy whose modules are re-initialized: ``reset_parameters()`` of every module
   that has one (convolutions, linear layers, norms, ...), then the model's own ``init_weights()``
   where it has one (timm's ViTs, Swin, ...). Parameters that neither covers (a position
   embedding of a custom module, say) would keep their trained values: they are named in a
   warning and in ``result.config["baseline"]["kept"]``. Pass ``baseline=<module>`` (an
   initialized copy you built) to control the initialization yourself.

Example:
    >>> import torch, equifast
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    >>> images = torch.rand(4, 3, 48, 48)
    >>> result = equifast.measure(net, images, group="rotate:90", layers=["0"],
    ...                           baseline="init", bootstrap=0, progress=False)
    >>> sorted(c for c in result.frame.columns if c.startswith(("init", "learned")))
    ['init', 'init_hi', 'init_lo', 'learned', 'learned_hi', 'learned_lo']
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["InitCopy", "WithBaseline", "init_copy", "init_copy_by_name", "member_name",
           "same_parameters"]

# The two models inside WithBaseline, as module-name prefixes.
TRAINED, INIT = "trained", "init"


@dataclass
class InitCopy:
    """A freshly initialized copy of a model and how it was made.

    Attributes:
        module: the copy, in eval mode.
        how: a short description (recorded in ``result.config["baseline"]``).
        kept: names of parameters no initializer covered (they hold the model's values).
    """

    module: nn.Module
    how: str
    kept: list[str] = field(default_factory=list)


def member_name(prefix: str, name: str) -> str:
    """The name of layer ``name`` of the model held as ``prefix`` inside :class:`WithBaseline`."""
    return f"{prefix}.{name}" if name else prefix


class WithBaseline(nn.Module):
    """The model and its initialized copy as one module: both run on every input.

    The engine hooks the layers of both (``trained.<layer>``, ``init.<layer>``) in one forward,
    so that they see the same transformed images; the output is the model's own.
    """

    def __init__(self, trained: nn.Module, init: nn.Module) -> None:
        super().__init__()
        self.trained = trained
        self.init = init

    def forward(self, images: torch.Tensor):
        output = self.trained(images)
        self.init(images)
        return output


def same_parameters(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules hold parameters and buffers of the same names and shapes."""
    shapes_a = {k: tuple(v.shape) for k, v in a.state_dict().items()}
    shapes_b = {k: tuple(v.shape) for k, v in b.state_dict().items()}
    return shapes_a == shapes_b


def _timm_rebuild(model: nn.Module) -> nn.Module | None:
    """A fresh timm build of ``model``'s architecture, or None where timm cannot give the same
    parameter names and shapes (a model built with other arguments, or not a timm model)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    architecture = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not architecture:
        return None
    try:
        import timm

        fresh = timm.create_model(architecture, pretrained=False, **_timm_build_arguments(model))
    except Exception:  # noqa: BLE001 - any failure means: use the generic re-initialization
        return None
    return fresh if same_parameters(fresh, model) else None


def _timm_build_arguments(model: nn.Module) -> dict:
    """The ``timm.create_model`` arguments a model was built with, as far as it shows them:
    ``num_classes``, ``in_chans`` (a greyscale model), ``img_size`` (a ViT built for another
    size) and ``features_only`` with its ``out_indices`` (a features wrapper, whose
    ``FeatureInfo`` says which)."""
    from .layers import input_channels

    kwargs: dict = {}
    feature_info = getattr(model, "feature_info", None)
    if callable(getattr(feature_info, "get_dicts", None)):
        kwargs["features_only"] = True
        out_indices = getattr(feature_info, "out_indices", None)
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
    elif isinstance(getattr(model, "num_classes", None), int):
        kwargs["num_classes"] = model.num_classes
    if input_channels(model) != 3:
        kwargs["in_chans"] = input_channels(model)
    inner = getattr(model, "model", model) if kwargs.get("features_only") else model
    img_size = getattr(getattr(inner, "patch_embed", None), "img_size", None)
    if img_size is not None:
        kwargs["img_size"] = tuple(int(v) for v in img_size)
    return kwargs


def _reinitialize(model: nn.Module) -> tuple[nn.Module, str, list[str]]:
    """A deep copy with every ``reset_parameters()`` and the model's ``init_weights()`` run."""
    fresh = copy.deepcopy(model)
    covered: set[str] = set()
    for prefix, module in fresh.named_modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
            covered.update(f"{prefix}.{n}" if prefix else n
                           for n, _ in module.named_parameters(recurse=False))
    how = "deep copy, reset_parameters() of every module that has one"
    init_weights = getattr(fresh, "init_weights", None)
    if callable(init_weights):
        try:
            init_weights()
        except TypeError:  # an init_weights that needs arguments: not the model's own init
            pass
        else:
            how += ", then the model's init_weights()"
            covered.update(n for n, _ in fresh.named_parameters())
    kept = [n for n, _ in fresh.named_parameters() if n not in covered]
    return fresh, how, kept


def check_baseline(baseline) -> None:
    """``baseline`` is ``None``, ``"init"``, a module or an :class:`InitCopy`, else a
    ``ValueError`` (checked before a model is built)."""
    if not (baseline is None or isinstance(baseline, (nn.Module, InitCopy))
            or (isinstance(baseline, str) and baseline == "init")):
        raise ValueError("baseline: expected None, 'init' or an initialized copy of the model "
                         f"(an nn.Module), found {baseline!r}")


def resolve_baseline(baseline, model: nn.Module, seed: int, name: str | None = None,
                     input_size: tuple[int, int] | None = None) -> InitCopy | None:
    """The :class:`InitCopy` that ``baseline`` asks for (see :func:`equifast.measure`).

    ``"init"``: :func:`init_copy` of ``model``; a module or an :class:`InitCopy`: that copy, which
    must hold the model's parameter names and shapes; ``None``: none.

    Raises:
        ValueError: another kind of ``baseline``, or a module of another architecture.
    """
    check_baseline(baseline)
    if baseline is None:
        return None
    if isinstance(baseline, str):
        return init_copy(model, seed, name, input_size)
    fresh = baseline if isinstance(baseline, InitCopy) else InitCopy(
        baseline.eval(), f"a module given as baseline= ({type(baseline).__name__})")
    if not same_parameters(fresh.module, model):
        raise ValueError("baseline: expected a module of the model's architecture (the same "
                         f"parameter names and shapes), found another "
                         f"({type(fresh.module).__name__})")
    return fresh


def init_copy_by_name(name: str, seed: int, input_size: tuple[int, int] | None = None,
                      **load_kwargs) -> InitCopy:
    """The model ``name`` (:func:`equifast.models.load_model`) built with ``pretrained=False``,
    seeded with ``seed``; the global random state is left as it was.

    ``input_size`` builds a model that fixes its input size (a ViT) for it, as
    :func:`equifast.models.load_model_sized` does for the model itself; ``load_kwargs`` go to
    ``load_model``. A model loaded the same way without cached weights under
    ``torch.manual_seed(seed)`` is this very copy, so that its ``learned`` scores are exactly 0.
    """
    from .models import load_model_sized

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        # without checkpoint_path: load_model would load those weights whatever pretrained says
        load_kwargs = {k: v for k, v in load_kwargs.items() if k != "checkpoint_path"}
        fresh = load_model_sized(name, input_size, **{**load_kwargs, "pretrained": False}).model
    return InitCopy(fresh.eval(), f"{name!r} built again with pretrained=False")


def init_copy(model: nn.Module, seed: int, name: str | None = None,
              input_size: tuple[int, int] | None = None) -> InitCopy:
    """A freshly initialized copy of ``model``'s architecture, seeded with ``seed``.

    The global random state is left as it was. See the module docstring for how it is built.

    Args:
        model: the model to copy (its weights are not touched).
        seed: the seed of the initialization.
        name: the model's name when it was given by name (``"resnet18"``, ``"tv:resnet50"``).
        input_size: the input size a model given by name was built for (:func:`init_copy_by_name`).

    Returns:
        An :class:`InitCopy` on the model's device and dtype, in eval mode.
    """
    kept: list[str] = []
    fresh = None
    if name is not None:
        by_name = init_copy_by_name(name, seed, input_size)
        if same_parameters(by_name.module, model):
            fresh, how = by_name.module, by_name.how
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if fresh is None:
            fresh = _timm_rebuild(model)
            if fresh is not None:
                how = "timm.create_model(architecture, pretrained=False)"
        if fresh is None:
            fresh, how, kept = _reinitialize(model)
    reference = next(model.parameters(), None)
    if reference is not None:
        fresh.to(device=reference.device, dtype=reference.dtype)
    if kept:
        shown = ", ".join(kept[:8]) + (f" and {len(kept) - 8} more" if len(kept) > 8 else "")
        warnings.warn(
            f"baseline='init': {len(kept)} parameters have no initializer (no reset_parameters() "
            f"of their module, no init_weights() of the model) and keep the model's values in "
            f"the initialized copy: {shown}. Pass baseline=<a freshly built module> to set them.",
            stacklevel=3,
        )
    return InitCopy(fresh.eval(), how, kept)
