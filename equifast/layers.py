"""Choosing the layers to measure, and hooking them.

Layers are named by their module path (``model.named_modules()``). A selection is any mix of:

- ``None`` / ``"default"``: the output of every stage or block: timm's ``feature_info`` where the
  model has it, otherwise the top-level children, the largest container opened until there are
  eight or more (torchvision's ``features.0``, ``features.1``...; heads are never opened).
- exact names (``"layer3"``, ``"blocks.5"``) and glob patterns, whose ``*`` and ``?`` stay
  within one dotted part of a name and ``**`` crosses the dots: ``"layer*"`` is a ResNet's four
  stages, ``"blocks.*"`` each block of a ViT, ``"layer*.1"`` the second block of each stage,
  ``"blocks.**"`` every module under the blocks, ``"**conv1"`` every ``conv1`` at any depth;
- module types (``torch.nn.Conv2d``): every module of that type; or their class names, the form
  the command line takes (``"Conv2d"``, ``"nn.Conv2d"``, ``"BasicBlock"``), where no module has
  that name;
- ``"leaves"``: every module without children.

Example:
    >>> import torchvision
    >>> model = torchvision.models.resnet18()
    >>> select_layers(model, ["layer1", "layer2.*.conv1"])
    ['layer1', 'layer2.0.conv1', 'layer2.1.conv1']
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import traceback
import warnings
import weakref
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .layouts import (
    GROWTH,
    FeatureLayout,
    detect_layout,
    grown_grid_of,
    stride_from_growth,
    token_count_rank,
)

LayerSpec = str | type | Sequence[str | type] | None


# Default layers without timm's feature_info: at least this many modules, found by opening the
# largest container (torchvision's `features`, `encoder.layers`, `trunk_output`) level by level.
_MIN_DEFAULT_LAYERS = 8
# Heads are never opened: their parts see pooled vectors, not the feature maps of the trunk.
_HEAD_NAMES = {"fc", "head", "heads", "classifier", "logits", "last_linear", "pre_logits"}


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _only_reshapes(module: nn.Module) -> bool:
    """Whether ``module`` passes its input on with another shape only."""
    return isinstance(module, (nn.Flatten, nn.Unflatten, nn.Identity)) or (
        type(module).__name__ == "Permute" and not any(True for _ in module.parameters()))


def _open_containers(model: nn.Module) -> list[str]:
    """Top-level children; while there are fewer than ``_MIN_DEFAULT_LAYERS``, the child holding the
    most parameters (not a head, with submodules, not one of a series of stages of one class) is
    replaced by its own children. A ModuleList is always opened: it has no forward of its own, so
    a hook on it would never run. Modules that only reshape are left out."""
    modules = dict(model.named_modules())

    def kept(names: list[str]) -> list[str]:
        # A module that only reshapes (Flatten, torchvision's Permute, Identity) gives the values
        # of the module before it again (Swin's norm and permute, avgpool and flatten).
        layers = [name for name in names if not _only_reshapes(modules[name])]
        return layers or names

    layers = kept([name for name, _ in model.named_children()])

    def children_of(name: str) -> list[str]:
        return kept([f"{name}.{child}" for child, _ in modules[name].named_children()])

    def parent_of(name: str) -> str:
        return name.rsplit(".", 1)[0] if "." in name else ""

    def in_a_series(name: str) -> bool:
        # One of several siblings of one class (torchvision RegNet's AnyStage block1..block4,
        # MaxViT's stages, the Conv2dNormActivation of a stem): a series of stages, of which
        # opening one would measure it at another depth than its peers. Plain Sequentials are
        # containers of anything (ShuffleNet's stages and its conv5), not a series by class.
        kind = type(modules[name])
        return kind is not nn.Sequential and any(
            other != name and type(modules[other]) is kind and parent_of(other) == parent_of(name)
            for other in layers)

    def expandable(name: str) -> bool:
        module = modules[name]
        return (name.rsplit(".", 1)[-1] not in _HEAD_NAMES and len(children_of(name)) > 1
                and _parameter_count(module) > 0 and not in_a_series(name))

    while True:
        lists = [n for n in layers if isinstance(modules[n], nn.ModuleList)]
        if lists:
            at = layers.index(lists[0])
            layers[at:at + 1] = children_of(lists[0])
            continue
        if len(layers) >= _MIN_DEFAULT_LAYERS:
            return layers
        candidates = [n for n in layers if expandable(n)]
        if not candidates:
            return layers
        largest = max(candidates, key=lambda n: _parameter_count(modules[n]))
        at = layers.index(largest)
        layers[at:at + 1] = children_of(largest)


def _feature_entries(model: nn.Module
                     ) -> tuple[list[tuple[str, dict, bool]], list[str], dict[str, str]]:
    """The entries of a timm ``feature_info`` resolved to the modules of ``model``, in order:
    ``(name, entry, through_list)``; the module names of the entries the model lacks; and the
    names it lacks that were taken as another container's children (:func:`_renamed_stages`).

    A features_only wrapper keeps a ``FeatureInfo`` of the out_indices it returns, under its
    own module names (:func:`_features_only_name`). A ``ModuleList`` there (CoaT's
    ``serial_blocks1``) has no forward of its own and its hook would never run: its last module,
    whose output is the stage's, stands for it (``through_list``).
    """
    feature_info = getattr(model, "feature_info", None)
    if callable(getattr(feature_info, "get_dicts", None)):
        feature_info = feature_info.get_dicts()
    if not isinstance(feature_info, (list, tuple)):
        return [], [], {}
    names = dict(model.named_modules())
    declared = [(info["module"], info) for info in feature_info
                if isinstance(info, dict) and info.get("module")]
    renamed = _renamed_stages([module for module, _ in declared if module not in names
                               and _features_only_name(module, names) is None], names)
    entries: list[tuple[str, dict, bool]] = []
    missing: list[str] = []
    for module, info in declared:
        if module not in names:
            resolved = _features_only_name(module, names) or renamed.get(module)
            if resolved is None:
                missing.append(module)
                continue
            module = resolved
        through_list = isinstance(names[module], nn.ModuleList)
        while isinstance(names[module], nn.ModuleList) and len(names[module]):
            module = f"{module}.{len(names[module]) - 1}"
        entries.append((module, info, through_list))
    return entries, missing, renamed


# Names of the containers that hold a network's stages or blocks (timm, torchvision).
_STAGE_CONTAINERS = frozenset({"stages", "blocks", "layers", "stage", "block", "layer"})
_INDEXED_NAME = re.compile(r"^(?P<stem>.+)\.(?P<index>\d+)$")


def _renamed_stages(lacking: Sequence[str], names: Mapping[str, nn.Module]) -> dict[str, str]:
    """``feature_info`` names ``<stem>.<i>`` that the model lacks, mapped to the children of the
    container they mean: timm's Twins and MViTv2 declare ``block.0``... for modules named
    ``blocks.0``... and ``stages.0``.... The container is a ModuleList or Sequential beside
    where the stem would be, named as the stem's plural or singular (``blocks`` for ``block``)
    with a child at every index declared; else the one container there with a stage
    container's name (``stages``, ``layers``, ...) and exactly as many children as the entries
    ask for. Empty where the names have no common stem or no such container is found: the
    entries stay missing (and a warning names them)."""
    matches = [_INDEXED_NAME.match(name) for name in lacking]
    if not matches or not all(matches) or len({match["stem"] for match in matches}) != 1:
        return {}
    stem = matches[0]["stem"]
    parent, _, base = stem.rpartition(".")
    needed = max(int(match["index"]) for match in matches) + 1
    beside = {name: module for name, module in names.items()
              if name and name.rpartition(".")[0] == parent
              and isinstance(module, (nn.ModuleList, nn.Sequential))}
    plural = [name for name, module in beside.items()
              if name.rpartition(".")[2] in (base + "s", base.removesuffix("s"))
              and len(module) >= needed]
    stages = [name for name, module in beside.items()
              if name.rpartition(".")[2] in _STAGE_CONTAINERS and len(module) == needed]
    container = plural if len(plural) == 1 else stages if not plural and len(stages) == 1 else None
    if container is None:
        return {}
    return {name: f"{container[0]}.{match['index']}" for name, match in zip(lacking, matches)}


def _feature_info_reductions(model: nn.Module) -> dict[str, float | None]:
    """The modules a timm ``feature_info`` names (stage outputs) that ``model`` has, each with the
    reduction (stride) it declares, in the order of ``feature_info``."""
    found: dict[str, float | None] = {}
    for module, info, _ in _feature_entries(model)[0]:
        if module not in found:
            reduction = info.get("reduction")
            found[module] = (float(reduction) if isinstance(reduction, (int, float))
                             and not isinstance(reduction, bool) and reduction > 0 else None)
    return found


def _features_only_name(module: str, names: Mapping[str, nn.Module]) -> str | None:
    """A ``feature_info`` module name as a timm features_only wrapper names it: its own
    children flatten dotted names (FeatureListNet's ``stages_0`` for ``stages.0``), or keep
    the whole model as a child (FeatureGetterNet's ``model.blocks.9``)."""
    flat = module.replace(".", "_")
    if flat in names:
        return flat
    nested = [name for name in names if name.endswith(f".{module}")]
    return nested[0] if len(nested) == 1 else None


def _warn_missing_features(model: nn.Module) -> None:
    """Warn about ``feature_info`` entries that name no module of the model (timm's HRNet names
    ``stem`` and ``stage1``, which its classification model does not have): they are not
    measured; and about those taken as another container's children (:func:`_renamed_stages`:
    Twins, MViTv2), naming the modules taken."""
    entries, missing, renamed = _feature_entries(model)
    if missing:
        warnings.warn(
            f"{type(model).__name__}'s feature_info names modules it does not have "
            f"({', '.join(map(str, missing))}): those stages are not among the default layers; "
            "name the modules that make them in layers=[...] to measure them",
            stacklevel=4,
        )
    if renamed:
        taken = [module for module, info, _ in entries if info["module"] in renamed]
        container = next(iter(renamed.values())).rpartition(".")[0]
        warnings.warn(
            f"{type(model).__name__}'s feature_info names modules it does not have "
            f"({', '.join(renamed)}): taken as the children of its {container!r} "
            f"({', '.join(taken)}); name other modules in layers=[...] if those are not its "
            "stages",
            stacklevel=4,
        )


def _feature_info_modules(model: nn.Module) -> list[str]:
    """The modules a timm ``feature_info`` names (stage outputs) that ``model`` has."""
    return list(_feature_info_reductions(model))


def _declared_channels(model: nn.Module) -> dict[str, int]:
    """Module name -> the channels (``num_chs``) timm's ``feature_info`` declares for it, of the
    model and of every submodule with a ``feature_info`` (an outer declaration wins; not for
    the module standing for a ``ModuleList``, whose channels the list's entry declares)."""
    declared: dict[str, int] = {}
    for prefix, module in model.named_modules():
        for name, info, through_list in _feature_entries(module)[0]:
            if not through_list and isinstance(info.get("num_chs"), int):
                declared.setdefault(f"{prefix}.{name}" if prefix else name, info["num_chs"])
    return declared


def warn_undeclared_channels(model: nn.Module, layouts: Mapping[str, FeatureLayout]) -> None:
    """Warn about layers whose channels are not those timm's ``feature_info`` declares for them:
    the declaration describes other tensors (HRNet declares its incre_modules' outputs under
    the names of its stages), so the layer is not the feature timm means by that name."""
    declared = _declared_channels(model)
    differ = [f"{name} ({layout.channels}, declared {declared[name]})"
              for name, layout in layouts.items()
              if name in declared and layout.kind != "vector"
              and layout.channels != declared[name]]
    if differ:
        warnings.warn(
            f"{len(differ)} layer(s) have other channels than timm's feature_info declares for "
            f"them: {', '.join(differ[:3])}{'; ...' if len(differ) > 3 else ''}. The modules' "
            "own outputs are measured, which are not the features timm returns under those "
            "names (features_only)",
            stacklevel=4,
        )


def declared_reductions(model: nn.Module) -> dict[str, float]:
    """Module name -> the reduction (stride) timm's ``feature_info`` declares for its output, of
    the model and of every submodule that has a ``feature_info`` (a wrapped timm model, or the
    model beside its initialized copy; names as in ``model.named_modules()``; an outer
    declaration wins)."""
    declared: dict[str, float] = {}
    for prefix, module in model.named_modules():
        for name, reduction in _feature_info_reductions(module).items():
            if reduction is not None:
                declared.setdefault(f"{prefix}.{name}" if prefix else name, reduction)
    return declared


def default_layers(model: nn.Module) -> list[str]:
    """The stage/block outputs: timm ``feature_info`` modules (of the model, or of the outermost
    submodule that has them), else the top-level children, with the trunk opened until there are a
    few (``features.0`` ... of a torchvision MobileNet, the ``encoder.layers`` of a torchvision
    ViT)."""
    # The model's own feature_info, else that of the outermost submodule that has one (a timm
    # model wrapped in the user's module: its stages, under the wrapper's names).
    for prefix, module in model.named_modules():
        found = _feature_info_modules(module)
        if found:
            _warn_missing_features(module)
            return [f"{prefix}.{name}" if prefix else name for name in found]
    children = _open_containers(model)
    if not children:
        raise ValueError(
            f"{type(model).__name__} has no submodules to measure; pass layers=[...] with module "
            "names of a model that has them"
        )
    _warn_unresolved_features(model, children)
    return children


def _warn_unresolved_features(model: nn.Module, children: Sequence[str]) -> None:
    """Warn when a timm ``feature_info`` names none of the modules its model has and
    :func:`_renamed_stages` cannot settle which it means (its names share no stem, or no
    container or several fit them): the default layers are then the top-level children, not
    the stages it means."""
    for _, module in model.named_modules():
        entries, missing, _ = _feature_entries(module)
        if entries:
            return
        if missing:
            listed = ", ".join(map(str, missing[:4])) + (", ..." if len(missing) > 4 else "")
            shown = ", ".join(children[:6]) + (", ..." if len(children) > 6 else "")
            warnings.warn(
                f"{type(module).__name__}'s feature_info names modules it does not have "
                f"({listed}), so its stage outputs are not known: the default layers are the "
                f"model's top-level children, opened ({len(children)}: {shown}); name the "
                "stages in layers=[...] to measure them",
                stacklevel=4,
            )
            return


def is_broad_selection(layers: LayerSpec, model: nn.Module | None = None) -> bool:
    """Whether a selection names modules only indirectly (the default, ``"leaves"``, a module type
    or its class name, a glob). Such a selection may catch modules that cannot be measured
    (auxiliary heads that do not run in eval mode, dropout skipped by fused attention,
    window-attention internals whose first axis is not the batch): those are left out with a
    warning, while a module asked for by its exact name is an error. Class names are told from
    module names with ``model``."""
    if layers is None or isinstance(layers, type):
        return True
    specs = [layers] if isinstance(layers, str) else list(layers)
    names = {n for n, _ in model.named_modules()} if model is not None else set()
    return any(
        isinstance(spec, type) or spec in ("default", "leaves") or any(c in spec for c in "*?[")
        or (model is not None and spec not in names and bool(_modules_of_class(model, spec)))
        for spec in specs
    )


def _modules_of_class(model: nn.Module, class_name: str) -> set[str]:
    """Names of the modules that are instances of a class called ``class_name`` (its last dotted
    part: ``"nn.Conv2d"`` is ``Conv2d``), subclasses included, as ``isinstance`` has it."""
    wanted = class_name.rsplit(".", 1)[-1]
    return {name for name, module in model.named_modules()
            if name and any(cls.__name__ == wanted for cls in type(module).__mro__)}


def select_layers(model: nn.Module, layers: LayerSpec = None) -> list[str]:
    """Resolve a layer selection to module names, in the model's module order.

    Args:
        model: The model.
        layers: The selection (module docstring).

    Returns:
        Module names, in the order of ``model.named_modules()``, without duplicates.

    Raises:
        ValueError: A name or pattern matches nothing (the message lists close names).
    """
    if layers is None or layers == "default":
        return default_layers(model)
    specs = [layers] if isinstance(layers, (str, type)) else list(layers)
    modules = dict(model.named_modules())
    order = {name: i for i, name in enumerate(modules)}
    chosen: set[str] = set()
    for spec in specs:
        if spec == "default":
            chosen.update(default_layers(model))
        elif spec == "leaves":
            chosen.update(
                n for n, m in modules.items() if n and not any(True for _ in m.children())
            )
        elif isinstance(spec, type):
            matched = {n for n, m in modules.items() if n and isinstance(m, spec)}
            if not matched:
                raise ValueError(f"no module of type {spec.__name__} in {type(model).__name__}")
            chosen.update(matched)
        elif isinstance(spec, str):
            if any(ch in spec for ch in "*?["):
                pattern = _glob_pattern(spec)
                matched = {n for n in modules if n and pattern.match(n)}
            elif spec in modules and spec:
                matched = {spec}
            else:
                matched = _modules_of_class(model, spec)
            if not matched:
                # the name under a wrapper first (DataParallel's 'module.', a model wrapped in
                # nn.Sequential(normalize, model): '1.layer1'), then names that look alike
                close = [n for n in modules if n.endswith("." + spec)][:5]
                close += [n for n in difflib.get_close_matches(
                    spec, [n for n in modules if n], n=5, cutoff=0.5) if n not in close]
                classes = sorted({type(m).__name__ for n, m in modules.items() if n})
                close += difflib.get_close_matches(spec.rsplit(".", 1)[-1], classes, n=3,
                                                   cutoff=0.6)
                hint = f"; close names: {close}" if close else ""
                raise ValueError(
                    f"layer {spec!r} matches no module of {type(model).__name__}{hint} "
                    "(names as in model.named_modules(); globs like 'layer*' and class names "
                    "like 'Conv2d' work too)"
                )
            chosen.update(matched)
        elif isinstance(spec, nn.Module):
            named = [n for n, m in modules.items() if m is spec and n]
            where = (f"; it is named {named[0]!r} in the model: pass that name" if named
                     else "; it is not a submodule of the model")
            raise TypeError("a layer is a name, glob or module type, found a module "
                            f"({type(spec).__name__}){where}")
        else:
            raise TypeError(f"a layer is a name, glob or module type, found {type(spec).__name__}")
    return sorted(chosen, key=order.__getitem__)


def _glob_pattern(glob: str) -> re.Pattern:
    """A glob over module names as a regular expression: ``*`` and ``?`` within one dotted part,
    ``**`` across parts, ``[...]`` (``[!...]``) a character class, as in :mod:`fnmatch`.

    Within one part, like a shell's ``*`` within one folder: with :mod:`fnmatch`, whose ``*``
    crosses dots, ``"layer*"`` matched every one of the 60-odd modules under a ResNet's stages,
    not the four stages.
    """
    parts, i = [], 0
    while i < len(glob):
        if glob.startswith("**", i):
            parts.append(".*")
            i += 2
        elif glob[i] == "*":
            parts.append("[^.]*")
            i += 1
        elif glob[i] == "?":
            parts.append("[^.]")
            i += 1
        elif glob[i] == "[":
            # as fnmatch: a ']' first in the class (after an optional '!') is a member
            end = i + 1 + (glob[i + 1:i + 2] == "!")
            end = glob.find("]", end + 1 if glob[end:end + 1] == "]" else end)
            if end < 0:
                parts.append(re.escape("["))
                i += 1
                continue
            members = glob[i + 1:end].replace("\\", "\\\\")
            if members.startswith("!"):
                members = "^" + members[1:]
            parts.append(f"[{members}]")
            i = end + 1
        else:
            parts.append(re.escape(glob[i]))
            i += 1
    return re.compile("".join(parts) + r"\Z")


def check_layer_keys(model: nn.Module, per_layer, what: str) -> None:
    """The keys of a per-layer dict (``layouts=``, ``align=``) must be module names of ``model``.

    A key that names no module was ignored: a typo (``"layer3"`` for ``"layer3.1"``) left the
    layer at its detected layout or its estimated offset, and the result did not say so.

    Raises:
        ValueError: A key names no module (the message lists close names).
    """
    if not isinstance(per_layer, Mapping):
        return
    modules = [n for n, _ in model.named_modules() if n]
    unknown = [key for key in per_layer if key not in modules]
    if unknown:
        close = sorted({c for key in unknown if isinstance(key, str)
                        for c in difflib.get_close_matches(key, modules, n=5, cutoff=0.5)})
        hint = (f"; close names: {close}" if close
                else f"; its modules: {modules}" if len(modules) <= 12 else "")
        raise ValueError(
            f"{what}: {unknown} name no module of {type(model).__name__}{hint}; expected the "
            "keys to be layer names as in model.named_modules()"
        )


def first_tensor(output, batch: int | None = None,
                 grid: tuple[float, float] | None = None) -> torch.Tensor | None:
    """The tensor a layer outputs: itself, or of a tuple or list the first one whose first axis is
    the ``batch`` (TNT's blocks return ``(pixel_tokens (B * 196, 16, C), patch_tokens (B, 197,
    C))``: the patch tokens are the layer's image-level features), else the first tensor.

    ``grid`` (rows, columns the layer is declared to have: the input size over its
    ``feature_info`` reduction) chooses among several batch-first feature maps: an HRNet stage
    returns one per resolution, highest first, and timm declares the stage's stride to be that of
    its lowest-resolution branch.
    """
    if isinstance(output, torch.Tensor):
        return output
    if not isinstance(output, (tuple, list)):
        return None
    tensors = [t for t in output if isinstance(t, torch.Tensor)]
    if batch is not None:
        batch_first = [t for t in tensors if t.dim() >= 1 and t.shape[0] == batch]
        if grid is not None:
            maps = [t for t in batch_first if t.dim() == 4]
            if len({tuple(t.shape[-2:]) for t in maps}) > 1:
                return min(maps, key=lambda t: abs(math.log(t.shape[-2] / grid[0]))
                           + abs(math.log(t.shape[-1] / grid[1])))
        if batch_first:
            return batch_first[0]
    return tensors[0] if tensors else None


class LayerOutputError(ValueError):
    """A hooked layer's output cannot be measured (not a tensor, or not batch first)."""


# What run_probe's message advises by default: the arguments of measure (engine and naive loop).
PROBE_ADVICE = ("If the model is built for another input size, pass input_size=(H, W) (and "
                "sources of that size plus the group's margin); if it runs in another dtype, "
                "pass dtype=...")


def run_probe(module: nn.Module, probe: torch.Tensor, hooks: "LayerHooks", context,
              advice: str = PROBE_ADVICE, by_name: bool = False) -> None:
    """One forward of ``probe`` under ``context`` with ``hooks``; a failure of the model itself
    (not of a layer's output) becomes one RuntimeError that names the probe's shape, dtype and
    device and the usual causes, as the engine and the naive loop both report it. ``advice``:
    what the caller's arguments can change (:data:`PROBE_ADVICE` for ``measure``).
    ``by_name``: the model was built by name, for the probe's size where it takes one (advice
    to build it so would send the caller round in a circle)."""
    try:
        with context, hooks:
            module(probe)
    except LayerOutputError:
        raise  # says which layer and why: not a matter of the input size
    except Exception as error:
        shape = " x ".join(map(str, probe.shape))
        dtype = str(probe.dtype).replace("torch.", "")
        fixed = fixed_input_size(module)
        size = tuple(probe.shape[-2:])
        if by_name and size[0] != size[1] and getattr(module, "image_size", None) is not None:
            # torchvision's ViT takes one side (image_size): built by name for square sizes only
            advice = ("torchvision's ViT takes square inputs only (one image_size); given by "
                      "name it is built for the size measured when that is square: measure at a "
                      f"square size. {advice}")
        elif by_name and (fixed is not None or timm_fixes_input_size(module)):
            # Built by name for this size where it takes one: the size itself is not one the
            # model can take (windows, attention biases or branches laid out for other sizes).
            default = fixed if fixed is not None and fixed != size else timm_input_size(module)
            advice = ("The model was built by name for this input size where it takes one, and "
                      "does not run at it: its windows, attention biases or branches take only "
                      "some sizes. Measure at a size it takes"
                      + (f" (its configuration: {default[0]} x {default[1]}; sizes usually step "
                         "by its total stride, 32 for most)" if default else "")
                      + f". {advice}")
        elif fixed is not None and size != fixed:
            # The input-size advice alone misleads here: input_size=(H, W) was often given.
            advice = (f"The model takes only {fixed[0]} x {fixed[1]} inputs (its patch embedding "
                      "checks the size): build it for the size measured (timm: "
                      "create_model(name, img_size=(H, W)) or dynamic_img_size=True; "
                      "torchvision: image_size=H), or give the model by name, which builds it "
                      f"at input_size, or measure at {fixed[0]} x {fixed[1]}. {advice}")
        elif fixed is None and timm_fixes_input_size(module):
            # Sizes built into other parts (LeViT's attention biases, for example) that no
            # patch embedding names: timm's configuration says so, though not which size.
            advice = ("timm builds this model for one input size (its pretrained_cfg says "
                      "fixed_input_size): build it for the size measured "
                      "(create_model(name, img_size=(H, W))), or give the model by name, which "
                      "builds it at input_size, or measure at the size it was built for. "
                      f"{advice}")
        elif _TOO_SMALL.search(str(error)):
            default = timm_input_size(module)
            advice = ("The input is too small for the model: after its downsampling a kernel "
                      "is wider than what is left of the image. Measure at a larger size"
                      + (f" (timm's configuration of this model: {default[0]} x {default[1]})"
                         if default else "") + f". {advice}")
        elif _SIZES_DIFFER.search(str(error)):
            # Branches that meet again (DLA, HRNet, U-Nets) round an odd size apart.
            advice = ("Feature maps of different sizes met: the input size is likely not a "
                      "multiple of the model's total stride (32 for most image models). Measure "
                      "at a multiple of it. " + advice)
        raise RuntimeError(
            f"the model failed on its probe input ({shape}, {dtype} on {probe.device}): "
            f"{describe_error(error)}. {advice}"
        ) from error


# What torch says when two feature maps that should align do not (an element-wise op or a cat).
_SIZES_DIFFER = re.compile(r"The size of tensor a \(\d+\) must match the size of tensor b|"
                           r"Sizes of tensors must match except in dimension")
# What torch says when a convolution or pooling window no longer fits the downsampled input.
_TOO_SMALL = re.compile(r"Kernel size can't be greater than actual input size|"
                        r"Output size is too small")


def _timm_configs(module: nn.Module) -> Iterator[dict]:
    """The timm configurations (``pretrained_cfg``, older ``default_cfg``) of ``module`` and
    its submodules, outermost first."""
    for sub in module.modules():
        cfg = getattr(sub, "pretrained_cfg", None) or getattr(sub, "default_cfg", None)
        if isinstance(cfg, dict):
            yield cfg


def timm_input_size(module: nn.Module) -> tuple[int, int] | None:
    """``(H, W)`` of a timm model's configuration (``pretrained_cfg["input_size"]``), if any."""
    for cfg in _timm_configs(module):
        size = cfg.get("input_size")
        if isinstance(size, (tuple, list)) and len(size) == 3:
            return int(size[1]), int(size[2])
    return None


def describe_error(error: BaseException) -> str:
    """``"Type: message"``; for an error without a message (a bare ``assert`` in a model's
    code, or timm's ``_assert(cond, '')`` as its halo attention checks the sizes it takes), where
    it was raised instead:
    ``"AssertionError at timm/layers/halo_attn.py:208: _assert(H % self.block_size == 0, '')"``.
    """
    message = str(error).strip().rstrip(".")
    if message:
        return f"{type(error).__name__}: {message}"
    # torch._assert (timm's _assert) raises for its caller: name the caller
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.name != "_assert"]
    if not frames:
        return type(error).__name__
    frame = frames[-1]
    path = Path(frame.filename).as_posix()
    path = path.rsplit("site-packages/", 1)[-1]  # the package's own path, not the environment's
    where = f"{type(error).__name__} at {path}:{frame.lineno}"
    return f"{where}: {frame.line}" if frame.line else where


def fixed_input_size(module: nn.Module) -> tuple[int, int] | None:
    """``(H, W)`` a model accepts alone, where it says so: a timm patch embedding that checks
    the size (``strict_img_size``), or torchvision's ``VisionTransformer`` (``image_size``)."""
    for sub in module.modules():
        size = getattr(sub, "img_size", None)
        if (getattr(sub, "strict_img_size", False) and not getattr(sub, "dynamic_img_pad", False)
                and isinstance(size, (tuple, list)) and len(size) == 2):
            return int(size[0]), int(size[1])
        size = getattr(sub, "image_size", None)
        if isinstance(size, int) and hasattr(sub, "conv_proj"):
            return size, size
    return None


def timm_fixes_input_size(module: nn.Module) -> bool:
    """Whether a timm model in ``module`` is marked as built for one input size
    (``pretrained_cfg["fixed_input_size"]``: ViTs, LeViT, Swin, MaxViT, ...)."""
    for cfg in _timm_configs(module):
        if "fixed_input_size" in cfg:
            return bool(cfg["fixed_input_size"])
    return False


class LayerHooks:
    """Forward hooks on named modules that pass each output to ``callback(name, tensor)``.

    Use as a context manager so the hooks are always removed. The batch size of each forward is
    read off the model's input, so that a layer's output is checked to keep the images apart
    (first axis = batch) before anything is computed from it.
    """

    def __init__(self, model: nn.Module, names: Iterable[str],
                 callback: Callable[[str, torch.Tensor], None], lenient: bool = False,
                 record_shapes: bool = False) -> None:
        self.model, self.names, self.callback = model, list(names), callback
        # The output shape of each hooked layer at its first call (and with record_shapes of
        # every module of the model, hooked or not), so that a layer's shape can be read
        # against the rest of the forward, and named where the layer cannot be measured.
        self.record_shapes = record_shapes
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.handles: list = []
        self.batch: int | None = None
        self.input_size: tuple[int, int] | None = None
        # feature_info's declared strides: which of a multi-resolution output is the layer's
        # (read at the first output that is a tuple or list: hooks are built for every forward)
        self.reductions: dict[str, float] | None = None
        self.warned_branches: set[str] = set()
        # lenient: an output that cannot be measured is noted here (name -> reason), not raised
        self.lenient = lenient
        self.unmeasurable: dict[str, str] = {}
        # calls of each hooked module in the forwards so far (a shared module runs several
        # times per forward; its first call is the one measured)
        self.calls: dict[str, int] = {}
        # unrolled tokens (timm's Hiera) are passed on in raster order
        self.reroll: TokenReroll | None = None

    def __enter__(self) -> LayerHooks:
        modules = dict(self.model.named_modules())
        self.reroll = token_reroll_of(self.model, modules)
        self.handles.append(self.model.register_forward_pre_hook(self._read_batch,
                                                                 with_kwargs=True))
        if self.record_shapes:
            for name, module in modules.items():
                if name and not isinstance(module, torch.jit.ScriptModule):
                    self.handles.append(module.register_forward_hook(self._shape_hook(name)))
        for name in self.names:
            if isinstance(modules[name], torch.jit.ScriptModule):
                # torch.jit.script / trace: a graph runs in its place, and forward hooks can
                # neither be registered on it nor run in it (nor in its submodules)
                problem = (
                    f"layer {name!r} is a TorchScript module ({type(modules[name]).__name__}, "
                    "from torch.jit.script or torch.jit.trace): forward hooks do not run in "
                    "TorchScript; measure the model before scripting that part, or leave it "
                    "out of layers=[...]"
                )
                if not self.lenient:
                    self.__exit__()
                    raise LayerOutputError(problem)
                self.unmeasurable[name] = problem
                continue
            self.handles.append(modules[name].register_forward_hook(self._hook(name)))
        return self

    def _shape_hook(self, name: str):
        def hook(module, inputs, output):
            tensor = first_tensor(output, self.batch)
            if tensor is not None and name not in self.shapes:
                self.shapes[name] = tuple(int(s) for s in tensor.shape)

        return hook

    def _read_batch(self, module, args, kwargs) -> None:
        images = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        self.batch = int(images.shape[0]) if images is not None and images.dim() >= 1 else None
        self.input_size = (tuple(int(s) for s in images.shape[-2:])
                           if images is not None and images.dim() == 4 else None)

    def _warn_if_several_maps(self, name: str, output, grid) -> None:
        """A layer that outputs feature maps of several sizes (a multi-resolution stage, or the
        token branches of a multi-scale ViT such as CrossViT) where no declared stride chooses
        among them (``grid``, see :func:`first_tensor`: it chooses among 4-D maps only): the
        first is measured, and the user is told which."""
        if not isinstance(output, (tuple, list)) or self.batch is None:
            return
        # (size, channels) of each batch-first map: (h, w) of a 4-D map, the token count of 3-D
        # tokens (channels last); maps of one kind only (tokens beside attention weights are no
        # branches).
        maps = [t for t in output if isinstance(t, torch.Tensor) and t.dim() in (3, 4)
                and t.shape[0] == self.batch]
        if len({t.dim() for t in maps}) != 1 or (grid is not None and maps[0].dim() == 4):
            return
        sizes = [(tuple(t.shape[-2:]), t.shape[1]) if t.dim() == 4 else ((t.shape[1],), t.shape[2])
                 for t in maps]
        if len({size for size, _ in sizes}) > 1:
            self.warned_branches.add(name)
            warnings.warn(
                f"layer {name!r} outputs {len(sizes)} feature maps of different sizes "
                f"({', '.join(f'{c} channels' for _, c in sizes)}; no stride its model "
                "declares in feature_info chooses among them); the first is measured. To "
                "measure another, hook the module that makes it",
                stacklevel=2)

    def _declared_grid(self, name: str) -> tuple[float, float] | None:
        if self.reductions is None:
            self.reductions = declared_reductions(self.model)
        reduction = self.reductions.get(name)
        if reduction is None or self.input_size is None:
            return None
        return (max(self.input_size[0] / reduction, 1.0), max(self.input_size[1] / reduction, 1.0))

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.calls[name] = self.calls.get(name, 0) + 1
            if name in self.unmeasurable:
                return
            several = isinstance(output, (tuple, list))  # (only these need the strides)
            grid = self._declared_grid(name) if several else None
            tensor = first_tensor(output, self.batch, grid)
            if tensor is not None:
                self.shapes.setdefault(name, tuple(int(size) for size in tensor.shape))
            if several and name not in self.warned_branches:
                self._warn_if_several_maps(name, output, grid)
            problem = None
            if tensor is None:
                problem = (
                    f"layer {name!r} outputs {type(output).__name__}, expected a tensor (or a "
                    "tuple holding one); leave it out of layers=[...]"
                )
            elif self.batch is not None and (tensor.dim() == 0 or tensor.shape[0] != self.batch):
                problem = (
                    f"layer {name!r} outputs shape {tuple(tensor.shape)}, whose first axis is not "
                    f"the batch of {self.batch} images: it does not keep the images apart "
                    "(sequence-first tokens, pixel tokens of all patches, attention internals); "
                    "measure a module whose output is batch first, or leave it out of "
                    "layers=[...]"
                )
            elif not tensor.is_floating_point():
                # integer, boolean (a quantized or thresholded map) and complex outputs (an FFT)
                problem = (
                    f"layer {name!r} outputs a {str(tensor.dtype).replace('torch.', '')} tensor "
                    f"of shape {tuple(tensor.shape)}, expected floating-point features "
                    "(float16, bfloat16, float32 or float64); measure a module whose output is "
                    "floating point, or leave it out of layers=[...]"
                )
            elif (self.reroll is not None and name in self.reroll.modules and tensor.dim() == 3
                  and not self.reroll.fits(tensor)):
                problem = (
                    f"layer {name!r} outputs shape {tuple(tensor.shape)} after "
                    f"{self.reroll.source!r} unrolled the tokens, but no stage has "
                    f"{tensor.shape[1]} tokens (stages: {sorted(self.reroll.orders)}), so they "
                    "cannot be put back in raster order; leave it out of layers=[...]"
                )
            if problem is not None:
                if not self.lenient:
                    raise LayerOutputError(problem)
                self.unmeasurable[name] = problem
                return
            if self.reroll is not None and name in self.reroll.modules and tensor.dim() == 3:
                tensor = self.reroll(tensor)
            self.callback(name, tensor)

        return hook

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def input_channels(model: nn.Module) -> int:
    """The channels a model's input has: its ``in_chans`` (timm), else the ``in_channels`` of
    its first 2-D convolution (a patch embedding is one too), else 3."""
    declared = getattr(model, "in_chans", None)
    if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
        return declared
    for module in model.modules():
        # (a lazy convolution knows its channels only after its first input; a scripted one is
        # a ScriptModule that keeps the name and the attributes of its class)
        scripted = (isinstance(module, torch.jit.ScriptModule)
                    and getattr(module, "original_name", None) == "Conv2d")
        if (isinstance(module, nn.Conv2d) or scripted) and int(module.in_channels) > 0:
            return int(module.in_channels)
    return 3


def prefix_tokens_of(model: nn.Module) -> int | None:
    """The prefix tokens (class, distillation, register) the model says it has: timm's
    ``num_prefix_tokens`` of the model, or of the outermost submodule that has it (a wrapped
    model); None when none says."""
    for _, module in model.named_modules():
        value = getattr(module, "num_prefix_tokens", None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


class TokenReroll:
    """Puts back in raster order the tokens of a model that unrolls them (timm's Hiera).

    Hiera's ``Unroll`` reorders its patch tokens so that the tokens of each pooling window lie in
    consecutive blocks (``x.view(B, 4, N // 4, C).amax(1)`` is then a 2 x 2 max-pool), and its
    ``Reroll`` undoes that for the output of any block (``reroll(x, block) -> (B, H, W, C)``).
    Within a stage every token tensor is in one order; the stages differ in their token counts
    (each pooling divides it), so the order of a tensor is told by its count.

    Attributes:
        modules: The modules that run on unrolled tokens (registered after the ``Unroll``:
            Hiera registers its modules in the order they run).
        orders: ``{tokens: index}``: ``tokens.index_select(1, index)`` is the raster order of
            ``(B, tokens, C)`` unrolled tokens.
        source: The ``Unroll`` module's name (for messages).
    """

    def __init__(self, modules: frozenset[str], orders: dict[int, torch.Tensor],
                 source: str) -> None:
        self.modules, self.orders, self.source = modules, orders, source
        self._on_device: dict[tuple[int, torch.device], torch.Tensor] = {}

    def fits(self, tensor: torch.Tensor) -> bool:
        return tensor.dim() == 3 and int(tensor.shape[1]) in self.orders

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)`` unrolled tokens in raster order (a gather: a new tensor)."""
        count = int(tensor.shape[1])
        key = (count, tensor.device)
        if key not in self._on_device:
            self._on_device[key] = self.orders[count].to(tensor.device)
        return tensor.index_select(1, self._on_device[key])


# The raster orders of each Reroll module (None: unreadable), read once: they never change
# (Hiera runs at one input size). The module names are not kept here: they depend on the model
# that holds the Reroll (a wrapper prefixes them).
_RASTER_ORDERS: "weakref.WeakKeyDictionary[nn.Module, dict[int, torch.Tensor] | None]" = (
    weakref.WeakKeyDictionary())


def _unroll_of(modules: Mapping[str, nn.Module]) -> tuple[str | None, list[str]]:
    """The name of the ``Unroll`` module among a model's ``modules`` (``named_modules()``, in
    their order; None without one) and the modules registered from it on (which see its
    order)."""
    unroll, after = None, []
    for name, module in modules.items():
        if unroll is None and type(module).__name__ == "Unroll":
            unroll = name
        if unroll is not None:
            after.append(name)
    return unroll, after


def _raster_orders(reroll: nn.Module) -> dict[int, torch.Tensor] | None:
    """``{tokens: index}`` of a timm ``Reroll``, read by rerolling the token indices themselves
    for each block it knows; None where it cannot be read (no 2-D ``schedule``, a result that is
    not a permutation, or one token count in two orders)."""
    schedule = getattr(reroll, "schedule", None)
    if not isinstance(schedule, dict) or not schedule:
        return None
    orders: dict[int, torch.Tensor] = {}
    # (normal tensors even under inference_mode: the align probe's backward goes through
    # index_select, which keeps its index)
    with torch.inference_mode(False), torch.no_grad():
        for block in sorted(schedule):
            try:
                _, size = schedule[block]
                size = [int(s) for s in size]
                if len(size) != 2:
                    return None
                count = math.prod(size)
                unrolled = torch.arange(count).view(1, count, 1)
                raster = reroll(unrolled, block)
            except Exception:  # any other Reroll than timm's
                return None
            if tuple(raster.shape) != (1, *size, 1):
                return None
            index = raster.reshape(-1).contiguous()
            if not torch.equal(index.sort().values, torch.arange(count)):
                return None
            if count in orders and not torch.equal(orders[count], index):
                return None
            orders[count] = index
    return orders


def token_reroll_of(model: nn.Module,
                    modules: Mapping[str, nn.Module] | None = None) -> TokenReroll | None:
    """How to put the model's unrolled tokens back in raster order (:class:`TokenReroll`), from
    its timm ``Reroll`` module; None for a model that does not unroll them, or whose unrolled
    order cannot be read (:func:`token_order_of` then leaves its token layers out).
    ``modules``: ``dict(model.named_modules())`` where the caller has it (hooks are set up for
    every forward)."""
    modules = dict(model.named_modules()) if modules is None else modules
    unroll, after = _unroll_of(modules)
    if unroll is None:
        return None
    reroll = next((m for m in modules.values() if type(m).__name__ == "Reroll"), None)
    if reroll is None:
        return None
    if reroll not in _RASTER_ORDERS:
        _RASTER_ORDERS[reroll] = _raster_orders(reroll)
    orders = _RASTER_ORDERS[reroll]
    return None if orders is None else TokenReroll(frozenset(after), orders, unroll)


def token_order_of(model: nn.Module) -> dict[str, str]:
    """The modules whose tokens are not in raster order and cannot be put back in it, each with
    why.

    timm's Hiera reorders its tokens (``Unroll``) so that pooling windows lie together in memory;
    read as a raster grid they are scrambled, and shifts that are multiples of the stride would
    score about 0 while marked exact. Its ``Reroll`` tells how to undo that
    (:func:`token_reroll_of`; :class:`LayerHooks` does it), so this is empty for Hiera itself. A
    model with an ``Unroll`` and no readable ``Reroll`` has every module registered after the
    ``Unroll`` listed; the patch embedding before it is not.
    """
    modules = dict(model.named_modules())
    unroll, after = _unroll_of(modules)
    if unroll is None or token_reroll_of(model, modules) is not None:
        return {}
    return {name: (f"its tokens are in the unrolled order of {unroll!r} "
                   f"({type(model).__name__}), not a raster grid")
            for name in after}


# Modules whose 4-D output is a feature map by what they compute, never an attention map:
# convolutions, normalizations, pooling and the elementwise activations (the softmax family
# excepted: attention weights come out of it).
_GRID_MODULES = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm, nn.LayerNorm, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.PReLU, nn.ELU, nn.Mish,
)


def attention_map_candidates(model: nn.Module, names: Iterable[str]) -> set[str]:
    """The modules among ``names`` whose ``(B, heads, L, L)`` output may be attention weights:
    leaves (a block or stage outputs features, not its attention weights; those come out of a
    softmax, a dropout, an identity or a talking-heads linear) that are no convolution,
    normalization, pooling or elementwise activation. LeViT's stem at 128 px makes 64 x 64 and
    16 x 16 maps where its stages have 64 and 16 tokens: read by shape alone they passed for
    attention maps and were left out."""
    modules = dict(model.named_modules())
    return {name for name in names if name in modules
            and not any(True for _ in modules[name].children())
            and not isinstance(modules[name], _GRID_MODULES)}


def measurable_layers(
    names: list[str], captured: Mapping[str, torch.Tensor], unmeasurable: Mapping[str, str],
    input_size: tuple[int, int], overrides: Mapping[str, str], lenient: bool,
    prefix_hint: int | None = None, token_order: Mapping[str, str] | None = None,
    calls: Mapping[str, int] | None = None,
    channels_first: Mapping[str, str] | None = None,
    attention_candidates: Collection[str] | None = None,
) -> tuple[list[str], dict]:
    """The probed layers that can be measured, with their layouts (``prefix_hint``: see
    :func:`prefix_tokens_of` and :func:`equifast.layouts.detect_layout`; ``token_order``: see
    :func:`token_order_of`: token layers of such a model are left out, or an error when named;
    ``calls``: how often each layer ran in the probe's one forward, :attr:`LayerHooks.calls`;
    ``channels_first``: the modules whose 3-D output is ``(B, C, L)``, each with why,
    :func:`channels_first_of`: token layers among them are left out, or an error when named;
    ``attention_candidates``: the layers whose output may be read as attention weights,
    :func:`attention_map_candidates`; None: all).

    A broad selection (``lenient``: default layers, ``"leaves"``, types, globs) leaves out, with
    one warning, the layers that did not run (auxiliary heads in eval mode, dropout that fused
    attention skips), whose output is not batch first, or whose shape fits no layout; a layer
    asked for by name is an error instead.
    """
    if not names:
        raise ValueError("layers: the selection is empty; name at least one module (or pass "
                         "layers=None for the default stage outputs)")
    dropped: dict[str, str] = dict(unmeasurable)
    for name in names:
        if name not in captured and name not in dropped:
            if not lenient:
                missing = [n for n in names if n not in captured]
                raise ValueError(f"layers {missing} did not run in the model's forward pass")
            dropped[name] = "did not run in the model's forward pass"
    # Attention maps ((B, heads, L, L), or (B, L, L, heads) in talking heads) fit a square grid
    # as well as a feature map does, but their axes are tokens, not positions: L x L where L is
    # the token count of a layer of the same forward.
    token_counts = {int(t.shape[1]) for t in captured.values() if t.dim() == 3}
    channels_first = channels_first or {}
    layouts = {}

    def leave_out(name: str, problem: str) -> None:
        """A layer that cannot be measured: an error when named, else left out with a reason."""
        if not lenient:
            raise ValueError(problem)
        dropped[name] = problem

    for name in names:
        if name in dropped:
            continue
        shape = tuple(captured[name].shape)
        if lenient and name not in overrides and len(shape) == 4 and (
                attention_candidates is None or name in attention_candidates) and (
                shape[2] == shape[3] in token_counts or shape[1] == shape[2] in token_counts):
            dropped[name] = (f"output {shape} is an attention map (tokens x tokens of the "
                             f"model's {max(shape[1], shape[2])}-token layers), not a grid")
            continue
        if name in channels_first and name not in overrides and len(shape) == 3:
            leave_out(name, f"layer {name!r} outputs shape {shape} with its channels first and "
                            f"its positions last: {channels_first[name]}; it is no (B, L, C) "
                            "token grid. Measure the block that holds it, or leave it out of "
                            "layers=[...]")
            continue
        if _same_for_every_image(captured[name]):
            leave_out(name, f"layer {name!r} gives the same features (shape {shape}) for the two "
                            "different probe images: it does not depend on the input (a "
                            "positional encoding computed from the grid size), so its "
                            "equivariance, invariance and chance would all compare one fixed "
                            "map with itself; leave it out of layers=[...]")
            continue
        try:
            layouts[name] = detect_layout(captured[name].shape, input_size,
                                          layout=overrides.get(name), name=name,
                                          prefix_hint=prefix_hint)
        except ValueError as error:
            if not lenient or name in overrides:
                raise
            dropped[name] = str(error)
            continue
        if token_order and name in token_order and layouts[name].layout == "NLC":
            del layouts[name]
            leave_out(name, f"layer {name!r} outputs tokens (shape {shape}) but "
                            f"{token_order[name]}: its positions cannot be re-aligned; measure "
                            "layers before the reordering (the patch embedding)")
    shown = "; ".join(f"{n}: {why}" for n, why in list(dropped.items())[:3])
    if dropped:
        warnings.warn(f"{len(dropped)} of {len(names)} selected layers cannot be measured and are "
                      f"left out ({shown}{'; ...' if len(dropped) > 3 else ''})", stacklevel=4)
    kept = [n for n in names if n in layouts]
    if not kept:
        raise ValueError(f"none of the {len(names)} selected layers can be measured: {shown}")
    repeated = {n: calls[n] for n in kept if calls and calls.get(n, 0) > 1}
    if repeated:
        # A module used at several places of the forward (a shared ReLU, a block applied twice):
        # one hook sees every call, and only the first is measured (so that every image counts
        # once); the later calls are not measured at all.
        listed = ", ".join(f"{n} ({k} calls)" for n, k in list(repeated.items())[:8])
        more = f" and {len(repeated) - 8} more" if len(repeated) > 8 else ""
        warnings.warn(
            f"{len(repeated)} selected layer(s) run more than once per forward: {listed}{more}. "
            "Each is measured at its first call only; to measure another call, hook a module "
            "that runs once there (a wrapper around the shared module, or the module after it)",
            stacklevel=4)
    return kept, layouts


def channels_first_of(model: nn.Module, shapes: Mapping[str, tuple[int, ...]],
                      input_size: tuple[int, int]) -> dict[str, str]:
    """The modules whose 3-D output is ``(B, C, L)``, channels first and positions last, each
    with why: ``nn.Unfold`` (VOLO's outlook attention: ``(B, C * k * k, L)``), and the
    token-mixing MLPs of MLP-Mixer, ResMLP and gMLP, which work on transposed tokens.

    Read as ``(B, L, C)`` such an output passes for a token grid far too often: Mixer's
    ``(B, 512, 196)`` as 6 prefix tokens and 22 x 23 cells of stride 10, VOLO's unfolded
    ``(B, 1728, 16)`` at 64 px as 6 + 41 x 42. ``shapes`` are the output shapes of the modules
    in one forward (:attr:`LayerHooks.shapes`). A ``(B, A, X)`` output is transposed tokens
    when another module outputs ``(B, X, A)`` and ``X`` are the positions: a 4-D output holds
    ``X`` positions of ``A`` channels (the patch embedding's ``(B, A, h, w)``, ``h * w = X``), or,
    without one, ``X`` tokens read as a grid of the input better than ``A`` do
    (:func:`equifast.layouts.token_count_rank`); so are the modules of the same MLP (its
    children and siblings) whose second axis holds those ``A`` channels (its hidden
    ``(B, C, hidden)`` layers).
    """
    three = {name: shape for name, shape in shapes.items() if len(shape) == 3}
    modules = dict(model.named_modules())
    found: dict[str, str] = {
        name: "nn.Unfold puts each k x k patch's channels first, (B, C * k * k, L)"
        for name in three if isinstance(modules.get(name), nn.Unfold)}
    by_tokens: dict[tuple[int, int], str] = {}
    for name, (_, tokens, channels) in three.items():
        by_tokens.setdefault((tokens, channels), name)

    # (positions, channels) of the 4-D outputs read either way, NCHW and NHWC: the patch
    # embedding's (B, C, h, w) says that its h * w tokens of C channels are (B, h * w, C), which
    # token counts alone can leave open (at 112 px a 3 x 3 grid of stride 32 fits less closely
    # than 64 channels as an 8 x 8 grid of stride 14).
    grids = set()
    for shape in shapes.values():
        if len(shape) == 4:
            grids.update({(shape[2] * shape[3], shape[1]), (shape[1] * shape[2], shape[3])})

    def transposed(first: int, last: int) -> bool:
        """Whether (B, first, last) is (B, C, L): channels first."""
        if ((first, last) in grids) != ((last, first) in grids):
            return (last, first) in grids
        return token_count_rank(last, input_size) < token_count_rank(first, input_size)

    for name, (_, first, last) in three.items():
        partner = by_tokens.get((last, first))
        if (name not in found and partner is not None and first != last
                and transposed(first, last)):
            found[name] = (f"the transpose of {partner!r}'s {three[partner]} (a token-mixing "
                           "MLP works on (B, C, L))")
    grew = True
    while grew:
        grew = False
        for name, (_, first, _) in three.items():
            parent = name.rpartition(".")[0]
            if name in found or not parent:
                continue
            kin = next((other for other in found if three[other][1] == first
                        and parent in (other, other.rpartition(".")[0])), None)
            if kin is not None:
                found[name] = (f"its channel axis is that of {kin!r} {three[kin]} beside it, "
                               "in the same token-mixing MLP")
                grew = True
    return found


def _same_for_every_image(tensor: torch.Tensor) -> bool:
    """Whether a probe output (two different random images) is the same for both images while
    varying within each: a layer that does not depend on the input (EdgeNeXt's Fourier
    positional encoding, (B, C, h, w) from the grid size alone). A constant output (a dead
    layer) is not one: it is measured and reported as constant."""
    if tensor.dim() < 2 or tensor.shape[0] < 2:
        return False
    first = tensor[0].detach()
    return bool(torch.equal(first, tensor[1].detach())
                and not torch.equal(first, first.flatten()[0].expand_as(first)))


def refine_layouts(
    model: nn.Module, layouts: Mapping[str, FeatureLayout], input_size: tuple[int, int],
    device, dtype, overrides: Mapping[str, str] | None = None, growth: int = GROWTH,
    report: dict | None = None, lenient: bool = True,
) -> dict[str, FeatureLayout]:
    """``layouts`` as a second shape probe, ``growth`` pixels larger on both sides, tells them.

    One input size cannot tell a stride from a border lost to unpadded convolutions, nor two
    strides on a small grid, nor always a channel axis from a grid axis (``(N, 32, 17, 9)`` at
    33 x 17 pixels; see :mod:`equifast.layouts`). How the output grows with the input can: grid
    axes gain ``growth / stride`` cells, a channel axis none. A model that does not run at the
    larger size (a ViT built for one size) keeps what one size gave, with the strides timm's
    ``feature_info`` declares where they give the grids (:func:`_declared_strides`); a layer
    whose grid does not grow (adaptive pooling) keeps what one size gave; a layout given in
    ``overrides`` keeps its reading.
    ``report["stride_probe"]``, when a dict is given, says which it was and why.

    A layer whose output is not batch first at the larger size splits the grid into windows
    there (DaViT's and EfficientViT-M's window attention pad the grid to whole windows): at the
    measured size one window of one image was batch first, but its cells include the padding,
    and it is no grid of the image. Such a layer is left out with a warning (``lenient``: a
    broad selection) or is an error; a layout given in ``overrides`` keeps it.
    """
    overrides = overrides or {}
    report = {} if report is None else report
    spatial = [name for name, layout in layouts.items() if layout.kind == "spatial"]
    if not spatial:
        report["stride_probe"] = "not needed: no spatial layer"
        return dict(layouts)
    height, width = input_size
    grown_size = (height + growth, width + growth)
    shapes: dict[str, torch.Size] = {}

    def keep(name: str, tensor: torch.Tensor) -> None:
        shapes.setdefault(name, tensor.shape)

    hooks = LayerHooks(model, spatial, keep, lenient=True)
    # What each layer's module receives at the larger size: a layer whose grid does not grow but
    # maps the grid it receives one to one (an adaptive pooling to the size it is given) has
    # that grid's stride (_resampling_layers).
    received = _ReceivedShapes(model, spatial)
    try:
        with torch.inference_mode(), hooks:
            model(torch.zeros(1, input_channels(model), *grown_size, device=device, dtype=dtype))
    except Exception as error:  # noqa: BLE001 - a model that fails there keeps one size's reading
        message = " ".join(str(error).split())
        report["stride_probe"] = (
            f"one input size: the model did not run at {grown_size[0]}x{grown_size[1]} "
            f"({type(error).__name__}: {message[:160]})")
        refined, declared = _declared_strides(model, layouts, input_size)
        if declared:
            report["stride_probe"] += (
                "; strides as timm's feature_info declares them: " + ", ".join(
                    f"{name} ({_format_stride(refined[name].stride)})" for name in declared[:8])
                + (f" and {len(declared) - 8} more" if len(declared) > 8 else ""))
        return refined
    finally:
        received.remove()
    report["stride_probe"] = (f"two input sizes: {height}x{width} and "
                              f"{grown_size[0]}x{grown_size[1]}")
    refined = dict(layouts)

    def leave_out(problems: dict[str, str]) -> None:
        """Refuse the first of these layers (a named one), or warn and leave them all out."""
        messages = list(problems.values())
        if not lenient:
            raise ValueError(messages[0])
        warnings.warn(f"{len(messages)} of {len(layouts)} selected layers cannot be measured "
                      f"and are left out ({'; '.join(messages[:2])}"
                      f"{'; ...' if len(messages) > 2 else ''})", stacklevel=4)
        for name in problems:
            del refined[name]

    windowed = [name for name in hooks.unmeasurable if name in refined and name not in overrides]
    if windowed:
        leave_out({name: (
            f"layer {name!r} is batch first at {height}x{width} pixels but not at "
            f"{grown_size[0]}x{grown_size[1]} (it outputs shape {hooks.shapes[name]} for one "
            "image): it splits the grid into windows, and at the measured size one padded "
            "window stood for the image's grid; measure the block that holds it, or pass "
            f"layouts={{{name!r}: ...}} to measure it at this size anyway")
            for name in windowed})
        spatial = [name for name in spatial if name not in windowed]
    fixed: list[str] = []
    previous: int | None = None  # the stride of the layer before
    for name in spatial:
        if name not in shapes:
            continue
        layout = layouts[name]
        if name not in overrides:
            layout = _grown_reading(layout, tuple(shapes[name]), input_size, name)
        grown = grown_grid_of(layout, shapes[name], grown_size)
        stride = None if grown is None else stride_from_growth(
            (layout.grid_h, layout.grid_w), grown, input_size, growth, multiple_of=previous)
        refined[name] = layout if stride is None else dataclasses.replace(layout, stride=stride)
        if stride is not None:
            previous = int(stride[0])  # (layers are in module order: the one before, mostly)
        if grown == (layout.grid_h, layout.grid_w) and name not in overrides:
            fixed.append(name)
    resampling, padded = _resampling_layers(model, fixed, refined, input_size, device, dtype)
    for name in fixed:
        # One to one at this size (torchvision's AlexNet pools its 6 x 6 cells of stride 32 to
        # 6 x 6 at 224 px, which one size reads as stride 37): the stride of the grid it
        # receives, from how that grows.
        layout, shape = refined[name], received.shapes.get(name)
        if name in resampling or name in padded or shape is None:
            continue
        grown = grown_grid_of(layout, shape, grown_size)
        stride = None if grown is None else stride_from_growth(
            (layout.grid_h, layout.grid_w), grown, input_size, growth)
        if stride is not None:
            refined[name] = dataclasses.replace(layout, stride=stride)
    fixed = resampling
    if padded:
        leave_out({name: (
            f"layer {name!r} keeps a {refined[name].grid_h}x{refined[name].grid_w} grid at "
            f"{height}x{width} and {grown_size[0]}x{grown_size[1]} pixels, while {block!r}, "
            f"which holds it, outputs {cells[0]}x{cells[1]} cells: it works on windows padded "
            "beyond the image's grid (window attention on a grid smaller than one window), "
            "and its cells are no grid of the image; measure the block that holds it, or pass "
            f"layouts={{{name!r}: ...}} to measure it anyway")
            for name, (block, cells) in padded.items()})
    if fixed:
        fixed = [f"{name} ({refined[name].grid_h}x{refined[name].grid_w}, stride "
                 f"{_format_stride(refined[name].stride)})" for name in fixed]
        # Adaptive pooling to a fixed size (VGG's avgpool): its cells are input positions at
        # one stride only where it maps the cells before it one to one (VGG at 224 px, not
        # warned); at other sizes it resamples them, and shifts re-align only approximately.
        report["stride_probe"] += f"; grid did not grow: {', '.join(fixed)}"
        warnings.warn(
            f"{len(fixed)} layer(s) keep the same grid at {height}x{width} and "
            f"{grown_size[0]}x{grown_size[1]} pixels and resample the grid they receive: "
            f"{', '.join(fixed)}. Their cells are not the input's positions at one stride "
            "(adaptive pooling to a fixed size), so shifts re-align there only approximately; "
            "measure the layer before, or run at the model's native input size.",
            UserWarning, stacklevel=3)
    return refined


def _declared_fit(layout: FeatureLayout, reduction: float, input_size: tuple[int, int]) -> bool:
    """Whether a stride of ``reduction`` pixels gives the layer's grid at ``input_size``: by
    rounding up or down, or after an unpadded convolution lost a border of less than one more
    stride (PiT's 16-pixel patches at stride 8: 7 cells of 64 pixels)."""
    if reduction != int(reduction) or reduction < 1:
        return False
    return all(-reduction < size - reduction * cells < 2 * reduction
               for size, cells in zip(input_size, (layout.grid_h, layout.grid_w)))


def _declared_strides(model: nn.Module, layouts: Mapping[str, FeatureLayout],
                      input_size: tuple[int, int]) -> tuple[dict[str, FeatureLayout], list[str]]:
    """``layouts`` with the strides timm's ``feature_info`` declares, for a model that runs at
    one input size only (a ViT whose position embedding is built for it), and the names whose
    stride changed.

    One size leaves a small grid's stride open: a patch-14 ViT's 4 x 4 tokens at 56 px read as
    stride 16 (the power of two among 12..18), PiT's 7 x 7 cells at 64 px (16-pixel patches at
    stride 8, without padding) as 9. A declared reduction that gives the layer's grid is taken,
    also for the other layers of that grid (a block's attention or MLP beside the block), where
    the layers of one grid declare one reduction; a layer of another grid, whose module declares
    nothing (the leaves inside a stage), takes the one reduction of the model that gives its
    grid, where only one does (PiT's 8, 16 and 32: 8 for 7 x 7 cells at 64 px).
    """
    declared = declared_reductions(model)
    by_grid: dict[tuple[int, int], set[float]] = {}
    for name, layout in layouts.items():
        reduction = declared.get(name)
        if (layout.kind == "spatial" and reduction is not None
                and _declared_fit(layout, reduction, input_size)):
            by_grid.setdefault((layout.grid_h, layout.grid_w), set()).add(reduction)
    refined = dict(layouts)
    changed: list[str] = []
    for name, layout in layouts.items():
        if layout.kind != "spatial":
            continue
        reductions = by_grid.get((layout.grid_h, layout.grid_w)) or {
            r for r in set(declared.values()) if _declared_fit(layout, r, input_size)}
        if len(reductions) != 1:
            continue
        stride = (float(next(iter(reductions))),) * 2
        if layout.stride != stride:
            refined[name] = dataclasses.replace(layout, stride=stride)
            changed.append(name)
    return refined, changed


class _ReceivedShapes:
    """Forward pre-hooks that record the shape of the first tensor each named module receives
    (:attr:`shapes`), until :meth:`remove`."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        modules = dict(model.named_modules())
        self._handles = []
        for name in names:
            module = modules.get(name)
            if module is not None and not isinstance(module, torch.jit.ScriptModule):
                self._handles.append(module.register_forward_pre_hook(
                    functools.partial(self._remember, name)))

    def _remember(self, name: str, module, args) -> None:
        tensor = first_tensor(args[0], batch=1) if args else None
        if tensor is not None:
            self.shapes.setdefault(name, tuple(tensor.shape))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _resampling_layers(model: nn.Module, names: Sequence[str],
                       layouts: Mapping[str, FeatureLayout], input_size: tuple[int, int], device,
                       dtype) -> tuple[list[str], dict[str, tuple[str, tuple[int, int]]]]:
    """Of ``names`` (layers whose grid is the same at two input sizes), those that resample the
    grid they receive at ``input_size``, and those that work on windows padded beyond the
    image's grid: ``(resampling, {name: (enclosing block, its grid)})``.

    The others receive a grid of their own size (VGG's adaptive pooling at 224 px), so their
    cells are the input's positions one to one. One forward of one image, only when some layer
    has a fixed grid; a layer whose input cannot be read as a grid counts as resampling. The
    input is the first tensor of a list (CrossViT's blocks take one token tensor per branch);
    tokens (``NLC``) are a grid of the layer's size when there are as many as its prefix and
    grid hold. A layer that receives a grid of its own size keeps it because of what comes
    before: the model resized its input (CrossViT's scale_image), which is no resampling only
    where some leaf module receives the input at its own size.

    A fixed grid finer than that of the nearest enclosing module with another grid is one
    window padded beyond the image's grid: DaViT's and EfficientViT-M's window attention at
    64 px pads a last stage of 2 x 2 cells into one 7 x 7 window at both probe sizes, which
    had read as a grid of stride 9 (a grid that outgrows one window at the larger size is
    caught by :func:`refine_layouts` before: it is no longer batch first there)."""
    if not names:
        return [], {}
    modules = dict(model.named_modules())
    received = _ReceivedShapes(model, names)
    enclosing: dict[str, tuple[int, ...]] = {}
    handles = []
    for block in {".".join(name.split(".")[:end]) for name in names if name in modules
                  for end in range(1, name.count(".") + 1)}:
        def remember_output(module, args, output, block=block):
            tensor = first_tensor(output, batch=1)
            if tensor is not None:
                enclosing.setdefault(block, tuple(tensor.shape))
        if not isinstance(modules[block], torch.jit.ScriptModule):  # (takes no hooks)
            handles.append(modules[block].register_forward_hook(remember_output))
    unresized = False  # whether a leaf module received a map of the input's size

    def input_sized(module, args):
        nonlocal unresized
        tensor = args[0] if args else None
        if isinstance(tensor, torch.Tensor) and tensor.dim() == 4:
            unresized |= input_size in (tuple(tensor.shape[2:]), tuple(tensor.shape[1:3]))
    handles += [module.register_forward_pre_hook(input_sized) for name, module in modules.items()
                if name and not any(True for _ in module.children())
                and not isinstance(module, torch.jit.ScriptModule)]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, input_channels(model), *input_size, device=device, dtype=dtype))
    except Exception:  # noqa: BLE001 - then every one of them is reported
        return list(names), {}
    finally:
        received.remove()
        for handle in handles:
            handle.remove()
    padded = {}
    for name in names:
        layout = layouts[name]
        for end in range(name.count("."), 0, -1):  # the nearest enclosing module first
            block = ".".join(name.split(".")[:end])
            cells = _grid_cells(enclosing.get(block), input_size)
            if cells is not None and cells != (layout.grid_h, layout.grid_w):
                if cells[0] * cells[1] < layout.grid_h * layout.grid_w:
                    padded[name] = (block, cells)
                break
    resampling = []
    for name in names:
        if name in padded:
            continue
        layout, shape = layouts[name], received.shapes.get(name)
        grid = None
        if shape is not None and len(shape) == 4:
            grid = shape[2:] if layout.layout == "NCHW" else shape[1:3]
        elif shape is not None and len(shape) == 3 and layout.layout == "NLC":
            if shape[1] == layout.prefix + layout.grid_h * layout.grid_w:
                grid = (layout.grid_h, layout.grid_w)
        if grid != (layout.grid_h, layout.grid_w) or not unresized:
            resampling.append(name)
    return resampling, padded


def _grid_cells(shape: tuple[int, ...] | None,
                input_size: tuple[int, int]) -> tuple[int, int] | None:
    """The ``(rows, columns)`` of an output of ``shape`` read as a spatial grid, else None."""
    if shape is None or len(shape) not in (3, 4):
        return None
    try:
        layout = detect_layout(shape, input_size)
    except ValueError:
        return None
    return (layout.grid_h, layout.grid_w) if layout.kind == "spatial" else None


def _format_stride(stride: tuple[float, float]) -> str:
    """``16`` or ``14 x 17`` (pixels per cell along y and x)."""
    stride_y, stride_x = stride
    if stride_y == stride_x:
        return f"{stride_y:g}"
    return f"{stride_y:g} x {stride_x:g}"


def _grown_reading(layout: FeatureLayout, grown: tuple[int, ...], input_size: tuple[int, int],
                   name: str) -> FeatureLayout:
    """A 4-D reading swapped to the other one when the grown output says that its channel axis is
    a grid axis: the axis that did not grow holds the channels."""
    if len(grown) != 4 or layout.layout not in ("NCHW", "NHWC"):
        return layout
    if layout.layout == "NCHW":
        shape = (grown[0], layout.channels, layout.grid_h, layout.grid_w)
        swapped = "NHWC" if grown[1] != shape[1] and grown[3] == shape[3] else None
    else:
        shape = (grown[0], layout.grid_h, layout.grid_w, layout.channels)
        swapped = "NCHW" if grown[3] != shape[3] and grown[1] == shape[1] else None
    if swapped is None:
        return layout
    try:
        return detect_layout(shape, input_size, layout=swapped, name=name)
    except ValueError:
        return layout
