"""The measurement loop (DESIGN.md section 2).

For every batch of sources: one ``transform_images`` launch builds the stacked batch (identity block
first, then every group element of the chunk), one forward of the model runs it, and forward hooks
reduce each chosen layer's output to the six statistics per image, element, channel and comparison
(``equivariance_stats``) and drop the features. Only per-image scores are kept.

Example:
    >>> import equifast, timm
    >>> model = timm.create_model("resnet18").eval()
    >>> group = equifast.Translation([8, 16])
    >>> result = equifast.measure(model, "samples", group=group)  # doctest: +SKIP
    >>> print(result.format_summary())                            # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import _ext, ops
from . import distributed as _dist
from .align import (
    AlignSpec,
    AsMade,
    GridAnchors,
    drop_unwritten,
    find_offsets,
    global_gates_cut,
    probe_dtypes,
    probe_inputs,
    record_outputs,
    version_of,
    warn_estimated_offsets,
    widened_to,
)
from .arguments import (
    check_count,
    check_finite_pixels,
    check_run_arguments,
    image_shape_error,
    warn_raw_float_pixels,
)
from .baseline import (
    INIT,
    TRAINED,
    InitCopy,
    WithBaseline,
    check_baseline,
    member_name,
    resolve_baseline,
)
from .data.folder import is_path_list, no_images_message, warn_skipped
from .data.geometry import (
    LUMA_WEIGHTS,
    channel_normalization,
    image_sources,
    is_image_list,
    warn_cropped_batch,
    warn_unmargined_sources,
)
from .groups import (
    IDENTITY,
    PROTOCOL_CODES,
    Group,
    check_circular,
    check_mask,
    default_group,
    feature_disc,
    feature_source_affines,
    invert_affine,
    is_integer_affine,
    parse_group,
)
from .layers import (
    PROBE_ADVICE,
    LayerHooks,
    LayerSpec,
    attention_map_candidates,
    channels_first_of,
    check_layer_keys,
    input_channels,
    is_broad_selection,
    measurable_layers,
    prefix_tokens_of,
    refine_layouts,
    run_probe,
    select_layers,
    token_order_of,
    warn_undeclared_channels,
)
from .layouts import FeatureLayout
from .ops import COMPARISONS, check_channel_map, merge_stats
from .result import (
    BASELINE_COLUMNS,
    FRAME_COLUMNS,
    MODEL_COLUMNS,
    Result,
    deserves_logits_warning,
    is_headless,
    logits_of,
    warn_not_logits,
    warn_undefined_chance,
    warn_undefined_elements,
)
from .scores import check_metrics, corr_vs_chance, score_stats

DataSpec = Any  # tensor, iterable of (images, labels), folder path, file list, Pillow
#                 images, or "samples"/None


@dataclass
class Batch:
    """Sources of one batch: ``(B, 3, Hs, Ws)`` uint8 or float, labels ``(B,)`` or ``None``."""

    sources: torch.Tensor
    labels: torch.Tensor | None = None


@dataclass
class _Layer:
    name: str
    depth: int
    layout: FeatureLayout
    offset: tuple[float, float]
    source_affines: np.ndarray  # (K, 2, 3) feature-grid source maps
    exact: np.ndarray  # (K,) bool
    wrap: list[int]  # (K,) circular elements that wrap on this grid (FeatureLayout.tiles)
    disc: tuple[float, float, float, float] | None  # mask="disc" on this grid (groups.feature_disc)
    scores: dict[str, list[np.ndarray]] = field(default_factory=dict)  # metric -> [(3, K, B)]
    # pooled=True: per chunk of a batch (lo, (3, Kc, C, 6) statistics merged over its images,
    # (3, Kc, B) whether each image had a valid position: the images behind the pooled n)
    pooled: list[tuple] = field(default_factory=list)
    # channel_map="linear": the sums of the fits (first pass), then the maps (F, 3, K, C, C + 1)
    linear_sums: dict[str, torch.Tensor] | None = None
    linear_maps: torch.Tensor | None = None


def resolve_group(group: Group | str | None) -> Group:
    """A :class:`Group`, a spec string (``"translate:8,16"``) or ``None`` (the default group)."""
    if group is None:
        return default_group()
    if isinstance(group, str):
        return parse_group(group)
    if isinstance(group, Group):
        return group
    raise TypeError(f"group: expected a Group, a spec string or None, found {type(group).__name__}")


def _check_sources(images: torch.Tensor, where: str) -> torch.Tensor:
    if isinstance(images, np.ndarray):  # a batch as an array, as the data may be one
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{where}: expected a tensor of images, found {type(images).__name__}")
    given = tuple(images.shape)
    if images.dim() == 3:
        images = images.unsqueeze(0)  # one image (3, H, W)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise image_shape_error(where, given)
    if images.shape[0] == 0:
        raise ValueError(f"{where}: the batch holds no images (shape {tuple(images.shape)})")
    if not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise TypeError(f"{where}: expected uint8 or floating images, found {images.dtype}")
    check_finite_pixels(images, where)
    warn_raw_float_pixels(images)
    if images.shape[1] == 1:  # grey, as RGB: its luma is itself, and an RGB model sees grey
        images = images.expand(-1, 3, -1, -1).contiguous()
    return images


def _to_grey(images: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` -> ``(N, 1, H, W)``: the luma of transformed images, for a model that
    takes one channel. Transformed with the grey mean and std in every channel, their luma is
    the normalized grey image, the fill (0) included: both are linear."""
    weights = torch.tensor(LUMA_WEIGHTS, dtype=images.dtype, device=images.device)
    return (images * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)


def _center_crop(sources: torch.Tensor, size: tuple[int, int], where: str) -> torch.Tensor:
    height, width = sources.shape[-2:]
    if height < size[0] or width < size[1]:
        raise ValueError(
            f"{where}: sources of {height}x{width} are smaller than the {size[0]}x{size[1]} the "
            "measurement needs (model input plus twice the largest shift for the crop protocol); "
            "pass larger images, a smaller input_size, or a translation with protocol='circular'"
        )
    top, left = (height - size[0]) // 2, (width - size[1]) // 2
    return sources[..., top:top + size[0], left:left + size[1]]


def _check_labels(labels, count: int, total: int, limit: int | None,
                  what: str) -> torch.Tensor | None:
    """``labels=`` of the ``count`` measured images of ``total`` (the first ``limit``) as a long
    tensor: one per measured image, or one per image, of which those measured are kept."""
    if labels is None:
        return None
    labels = torch.as_tensor(labels).long()
    if limit and labels.shape == (total,):
        labels = labels[:limit]  # labels of all the images: keep those measured
    if labels.shape != (count,):
        raise ValueError(f"labels: expected one per image of {what}, shape ({count},); found "
                         f"{tuple(labels.shape)}")
    return labels


class DataPlan:
    """Turns the ``data`` argument into batches of sources of the right size."""

    def __init__(self, data: DataSpec, labels, batch_size: int, input_size, preprocess, group,
                 num_workers: int | None, limit: int | None, loader: str = "auto",
                 shard: _dist.Shard | None = None, device: torch.device | None = None):
        self.skipped: list[tuple[str, str]] = []
        # Several processes: this rank reads the batches it owns and records their global order.
        self.shard = shard
        self.batch_keys: list[int] = []
        self.skipped_keys: list[int] = []
        self.loader = "tensor"
        if type(data).__module__ == "numpy" and getattr(data, "ndim", 0) >= 3:
            # an array of images is a tensor of them (a copy where its strides are negative)
            data = torch.from_numpy(np.ascontiguousarray(data))
        if input_size is not None:
            import dataclasses

            preprocess = dataclasses.replace(preprocess, input_size=tuple(input_size))
        self.preprocess = preprocess
        self.total: int | None = None
        check_loader(loader, data)
        if data is None or (isinstance(data, str) and data == "samples"):
            from .data.samples import load_samples

            self.input_size = tuple(input_size or preprocess.input_size)
            self.margin = group.margin(*self.input_size)
            sources, _ = load_samples(preprocess, margin=self.margin)
            total = sources.shape[0]
            sources = sources[:limit] if limit else sources
            # labels of the photographs, in their order (equifast.data.samples.sample_names())
            labels = _check_labels(labels, sources.shape[0], total, limit,
                                   "the sample photographs")
            self._tensor_batches(sources, labels, batch_size)
            self.loader = "samples"
        elif is_image_list(data):
            # decoded images: resized and cropped with the model's preprocessing, as files are
            self.input_size = tuple(input_size or preprocess.input_size)
            self.margin = group.margin(*self.input_size)
            images = [data] if not isinstance(data, (list, tuple)) else list(data)
            total = len(images)
            images = images[:limit] if limit else images
            labels = _check_labels(labels, len(images), total, limit, "the images")
            self._tensor_batches(image_sources(images, preprocess, self.margin), labels,
                                 batch_size)
            self.loader = "images"
        elif labels is not None and not isinstance(data, torch.Tensor):
            where = ("a folder has the labels of its class subfolders (ImageNet layout) or of "
                     "its .txt file list ('path label' lines), and a list of files those of its "
                     "(path, label) pairs" if isinstance(data, (str, Path)) or is_path_list(data)
                     else "an iterable gives them with each batch, as (images, labels)")
            raise ValueError(f"labels: given for data of type {type(data).__name__}, which "
                             f"takes no separate labels: {where}; expected labels=None here "
                             "(labels= is for a tensor of images, Pillow images or the sample "
                             "photographs)")
        elif isinstance(data, (str, Path)) or is_path_list(data):
            from .data.dali import DaliFolderSource, dali_available
            from .data.folder import ImageFolderSource

            if loader == "dali" and not dali_available():
                raise ImportError("loader='dali': NVIDIA DALI is not installed (pip install "
                                  "nvidia-dali-cuda130); use loader='folder' or 'auto'")
            use_dali = folder_uses_dali(loader, device, num_workers)
            self.input_size = tuple(input_size or preprocess.input_size)
            self.margin = group.margin(*self.input_size)
            kwargs = {} if num_workers is None else {"num_workers": num_workers}
            if use_dali and device is not None:
                # DALI decodes where the model runs: on the GPU ("mixed") only for a CUDA engine
                kwargs["device"] = device
            if not use_dali and device is not None and device.type == "cuda":
                # pinned in the loader's own thread, so that the engine's copy to the GPU
                # neither waits for the GPU nor stages the batch itself
                kwargs["pin_memory"] = True
            source = DaliFolderSource if use_dali else ImageFolderSource
            self.loader = "dali" if use_dali else "folder"
            if shard is not None:
                self._shard_folder(source, data, batch_size, limit, use_dali, kwargs)
                return
            self.folder = source(data, preprocess, self.margin, batch_size, limit=limit, **kwargs)
            self.total = len(self.folder)
            self._iter = self._folder_batches
        elif isinstance(data, torch.Tensor):
            sources = _check_sources(data, "data")
            total = sources.shape[0]
            if limit:
                sources = sources[:limit]
            self._set_geometry(sources.shape[-2:], input_size, group)
            labels = _check_labels(labels, sources.shape[0], total, limit, "the images")
            self._tensor_batches(sources, labels, batch_size)
        elif isinstance(data, Iterable):
            self._iterable = data
            self._input_size_arg, self._group = input_size, group
            self.input_size = None
            self.margin = None
            self.loader = "iterable"
            self._limit = limit
            self._warned_crop = False
            self._iter = self._iterable_batches
        else:
            raise TypeError(
                "data: expected a tensor of images (B, 3, H, W), an iterable of (images, labels) "
                "batches, a folder path, a list of image paths, Pillow images or 'samples'; found "
                f"{type(data).__name__}"
            )

    def _set_geometry(self, source_hw, input_size, group: Group) -> None:
        source_h, source_w = int(source_hw[0]), int(source_hw[1])
        if input_size is not None:
            self.input_size = (int(input_size[0]), int(input_size[1]))
            self.margin = group.margin(*self.input_size)
        else:
            # The sources are the crop-protocol sources: the input is what is left of them after
            # the largest shift on each side.
            margin = group.margin(source_h, source_w)
            self.input_size = (source_h - 2 * margin[0], source_w - 2 * margin[1])
            if min(self.input_size) < 1:
                raise ValueError(
                    f"data: sources of {source_h}x{source_w} leave no image after a margin of "
                    f"{margin} on each side for the group's shifts (crop protocol); pass larger "
                    "images or a group with smaller shifts (e.g. group='translate:2,4')"
                )
            self.margin = group.margin(*self.input_size)
            model_size = self.preprocess.input_size
            # measure -> DataPlan -> here for a tensor (an iterable's first batch: deeper)
            warn_unmargined_sources((source_h, source_w), margin, model_size,
                                    group.margin(*model_size), stacklevel=4)
        self.source_size = (self.input_size[0] + 2 * self.margin[0],
                            self.input_size[1] + 2 * self.margin[1])

    def _tensor_batches(self, sources: torch.Tensor, labels, batch_size: int) -> None:
        self.total = sources.shape[0]
        self._sources, self._labels, self._batch_size = sources, labels, batch_size
        self._iter = self._tensor_iter
        if self.shard is not None:
            self.total = _dist.owned_images(self.total, batch_size, self.shard)

    def _tensor_iter(self) -> Iterator[Batch]:
        first, step = (0, 1) if self.shard is None else (self.shard.rank, self.shard.world)
        for start in range(first * self._batch_size, self._sources.shape[0],
                           step * self._batch_size):
            if self.shard is not None:
                self.batch_keys.append(start // self._batch_size)
            sources = self._sources[start:start + self._batch_size]
            labels = None if self._labels is None else self._labels[start:start + len(sources)]
            if self.loader == "tensor":
                sources = _center_crop(sources, self.source_size, "data")
            yield Batch(sources, labels)

    def _folder_batches(self) -> Iterator[Batch]:
        for sources, labels, _paths in self.folder:
            self.skipped = list(self.folder.skipped)
            yield Batch(sources, labels)
        self.skipped = list(self.folder.skipped)

    def _iterable_batches(self) -> Iterator[Batch]:
        seen = 0
        labelled: bool | None = None  # whether the batches carry labels (the first one says)
        for index, item in enumerate(self._iterable):
            labels = None
            if isinstance(item, (tuple, list)):
                if len(item) == 0:
                    raise ValueError(f"data batch {index}: empty tuple")
                images = item[0]
                labels = item[1] if len(item) > 1 else None
            else:
                images = item
            images = _check_sources(images, f"data batch {index}")
            if self.input_size is None:
                self._set_geometry(images.shape[-2:], self._input_size_arg, self._group)
            if labels is not None:
                labels = torch.as_tensor(labels).long().view(-1)
                if labels.shape[0] != images.shape[0]:
                    raise ValueError(f"data batch {index}: {images.shape[0]} images but "
                                     f"{labels.shape[0]} labels")
            if self._limit is not None:
                images = images[: self._limit - seen]
                labels = None if labels is None else labels[: images.shape[0]]
                if images.shape[0] == 0:
                    break
            if labelled is None:
                labelled = labels is not None
            elif labelled != (labels is not None):
                # checked here, not after all the forwards: top-1 / top-5 need a label (or -1,
                # unknown) for every image
                raise ValueError(
                    f"data batch {index}: "
                    + ("no labels, but the batches before it have labels" if labelled
                       else "has labels, but the batches before it have none")
                    + "; expected every batch as (images, labels) or every one without labels "
                    "(a label of -1 marks an image whose class is unknown)")
            seen += images.shape[0]
            # (once per plan, not per pass: channel_map="linear" reads the data twice)
            if self._input_size_arg is None and not self._warned_crop:
                self._warned_crop = warn_cropped_batch(f"data batch {index}",
                                                       images.shape[-2:], self.source_size,
                                                       stacklevel=3)
            cropped = _center_crop(images, self.source_size, f"data batch {index}")
            if self.shard is not None:
                if not self.shard.owns(index):  # read (and checked) by every rank, kept by one
                    continue
                self.batch_keys.append(index)
            yield Batch(cropped, labels)

    def _shard_folder(self, source, data, batch_size, limit, use_dali, kwargs) -> None:
        from .data.folder import select_items

        # Whole batches of the one-process order (not every world-th file), so that the batches,
        # and what is paired inside them, are the same as in one process.
        items, _ = select_items(data, limit)
        self._positions = _dist.shard_items(len(items), batch_size, self.shard)
        mine = [items[i] for i in self._positions]
        self._has_labels = any(label >= 0 for _, label in items)
        self._batch_size = batch_size
        self.total = len(mine)
        self.folder = None
        if mine:
            if use_dali and self.shard.device is not None:
                kwargs = {**kwargs, "device": self.shard.device}
            self.folder = source(mine, self.preprocess, self.margin, batch_size, **kwargs)
        self._iter = self._sharded_folder_batches

    def _sharded_folder_batches(self) -> Iterator[Batch]:
        if self.folder is None:
            return
        paths = [path for path, _ in self.folder.items]
        position = dict(zip(reversed(paths), reversed(self._positions)))  # first occurrence
        cursor = 0
        for sources, labels, batch_paths in self.folder:
            # both loaders yield in file order (a repeated file stays where it is)
            cursor = paths.index(batch_paths[0], cursor)
            self.batch_keys.append(self._positions[cursor] // self._batch_size)
            if labels is None and self._has_labels:  # other ranks' files have labels
                labels = torch.full((sources.shape[0],), -1, dtype=torch.long)
            self._set_skipped(position)
            yield Batch(sources, labels)
        self._set_skipped(position)

    def _set_skipped(self, position: dict[str, int]) -> None:
        self.skipped = list(self.folder.skipped)
        self.skipped_keys = [position.get(path, 0) for path, _ in self.skipped]

    def __iter__(self) -> Iterator[Batch]:
        return self._iter()


# Input pixels per forward on the CPU: 32 images of 112 px, 8 of 224 px. The activations of the
# largest forward set the peak memory, while the speed per image varies with the forward's size
# only irregularly on 2 cores (oneDNN's blocking and the heap both change with the shapes).
# Measured in fresh processes, 8 images per batch: at 224 px, one block per forward (this
# budget) against four (the former default of 32 images) took 0.96-0.97x the time with a peak of
# 122-138 against 276-370 MiB (convnext_atto) and 220-228 against 459-514 MiB (resnet18); at
# 112 px, forwards of 16 images instead of 32 put convnext_atto's peak below the naive loop's
# (71-78 against 81-83 MiB) but made its loop 1.11-1.24x slower with translations.
# Tried and left (2026-11-27): also bounding the largest module output of a forward to 16 MiB
# (bare resnet18 forwards at 112 px: 0.209 s for 56 images in forwards of 8, 0.229 s of 32, as
# conv1's 0.8 MB an image leaves the cache). The engine then ran resnet18 in forwards of 16:
# translations 1.71 s against 1.89 s, but rotations 1.04 against 0.94 s and all leaves 1.49
# against 1.29 s, as more forwards mean more statistics calls per layer and identity blocks kept.
CPU_PIXELS_PER_FORWARD = 32 * 112 * 112

# channel_map="linear": folds of the images (fit on one, score on the other), the default ridge
# penalty relative to the features' scale, and the most memory the fits may hold at once (the
# sums of one pass over the data; layers beyond it are fitted in further passes).
LINEAR_FOLDS = 2
LINEAR_RIDGE = 1e-3
LINEAR_FIT_BYTES = 8 << 30


def folder_uses_dali(loader: str, device: torch.device | str | None,
                     num_workers: int | None) -> bool:
    """Whether a folder is decoded by DALI: ``loader="dali"``, or ``"auto"`` for a CUDA engine
    when DALI imports (not with ``num_workers=0``, which asks for decoding in the calling
    process). On the CPU ``"auto"`` reads with Pillow: DALI's resize rounds apart from Pillow's
    (about 15% of the pixels by one level, up to 20 of 255 at sharp edges), and its decoding on
    the GPU, its point, does not apply; so the engine reads the very pixels that equifast.naive
    and timm's own loaders read, and gives their scores."""
    from .data.dali import dali_available

    if loader != "auto":
        return loader == "dali"
    on_cuda = device is not None and torch.device(device).type == "cuda"
    return on_cuda and num_workers != 0 and dali_available()


def check_loader(loader: str, data: DataSpec) -> None:
    """A ValueError for an unknown ``loader``, or one given for data that is not files (the
    sample photographs, a tensor, an iterable), which no loader reads: the command line refuses
    ``--loader`` without ``--data`` in the same way."""
    if loader not in ("auto", "dali", "folder"):
        raise ValueError(f"loader must be 'auto', 'dali' or 'folder', got {loader!r}")
    reads_files = isinstance(data, (str, Path)) and str(data) != "samples" or is_path_list(data)
    if loader != "auto" and not reads_files:
        what = "the sample photographs" if data is None or (
            isinstance(data, str) and data == "samples") else f"a {type(data).__name__}"
        raise ValueError(f"loader={loader!r}: a loader reads an image folder, a list of image "
                         f"files or a .txt file list, but the data is {what}; expected "
                         "loader='auto' here")


def _default_plan(batch: int, elements: int, pixels: int, device: torch.device) -> tuple[int, int]:
    """``(elements, blocks)`` per forward for a batch of ``batch`` images of ``pixels`` pixels.

    On the CPU a forward holds at most the blocks (of ``batch`` images each, the identity block
    counted) that ``CPU_PIXELS_PER_FORWARD`` allows, at least one: with one, the identity block
    has a forward to itself, and every forward is as large as one of the naive loop's. On a GPU
    fill the device (about 1024 images) and let out-of-memory halve the plan.
    """
    if device.type == "cpu":
        blocks = max(1, CPU_PIXELS_PER_FORWARD // max(batch * pixels, 1))
        chunk = max(1, min(elements, blocks))
        return chunk, min(blocks, chunk + 1)
    chunk = max(1, min(elements, 1024 // max(batch, 1) - 1))
    return chunk, chunk + 1


def _forward_bounds(count: int, chunk: int, blocks: int | None = None) -> list[tuple[int, int]]:
    """The elements ``[lo, hi)`` of each forward of a batch: the first forward carries the identity
    block, every forward at most ``chunk`` elements and at most ``blocks`` blocks, the identity
    block counted (default ``chunk + 1``: the identity block rides along with ``chunk``
    elements). With ``blocks=1`` the first forward is the identity block alone
    (``lo == hi == 0``): the identity block leads the first forward, not every forward with
    ``lo == 0``.

    As few forwards as these limits allow, with the blocks spread evenly over them (9 blocks in
    chunks of 3 elements: 3 + 3 + 3 blocks, not 4 + 3 + 2): the largest forward sets the peak
    memory of the activations, the number of forwards the time.
    """
    if count == 0:
        return []
    blocks = chunk + 1 if blocks is None else blocks
    if chunk < 1 or blocks < 1:
        raise ValueError(f"forward plan: expected at least one element and one block per "
                         f"forward, found {chunk} and {blocks}")
    first_most = min(chunk, blocks - 1)  # elements beside the identity block
    later_most = min(chunk, blocks)
    forwards = 1 + -(-max(0, count - first_most) // later_most)
    if forwards == 1:
        return [(0, count)]
    per_forward = -(-(count + 1) // forwards)  # blocks, the identity block included
    first = min(first_most, per_forward - 1)
    rest, later = count - first, forwards - 1
    sizes = [first] + [rest // later + (1 if i < rest % later else 0) for i in range(later)]
    bounds, lo = [], 0
    for size in sizes:
        bounds.append((lo, lo + size))
        lo += size
    return bounds


def measure(
    model: nn.Module | str,
    data: DataSpec = "samples",
    group: Group | str | None = None,
    layers: LayerSpec = None,
    metrics: Sequence[str] | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    *,
    labels: torch.Tensor | Sequence[int] | None = None,
    input_size: tuple[int, int] | None = None,
    layouts: Mapping[str, str] | None = None,
    align: AlignSpec = "auto",
    subpixel: str = "bilinear",
    channel_map: str = "identity",
    ridge: float = LINEAR_RIDGE,
    mask: str | None = None,
    comparisons: Sequence[str] = COMPARISONS,
    pooled: bool = False,
    bootstrap: int = 1000,
    seed: int = 0,
    elements_per_chunk: int | None = None,
    dtype: torch.dtype | None = None,
    channels_last: bool | None = None,
    limit: int | None = None,
    num_workers: int | None = None,
    loader: str = "auto",
    progress: bool = True,
    model_name: str | None = None,
    force_reference: bool = False,
    distributed: bool | None = None,
    baseline: str | nn.Module | InitCopy | None = None,
) -> Result:
    """Measure how equivariant every chosen layer of ``model`` is under ``group``.

    Args:
        model: A module (put in eval mode here), or a timm name / ``"tv:<torchvision name>"``.
        data: Images: a tensor ``(N, 3, H, W)`` (uint8 0..255 is normalized with the model's mean
            and std; float is taken as already preprocessed), an iterable of ``images`` or
            ``(images, labels)`` batches (tensors or numpy arrays; every one with labels or
            none), a folder path
            (ImageNet layout or flat), an image file, a ``.txt`` file list, a list of image paths
            (or of ``(path, label)`` pairs), a Pillow image or a list of them (resized and
            cropped with the model's preprocessing, as files are), a numpy array (as a tensor),
            or ``"samples"`` (the embedded photographs).
            Tensors and batches are the *sources*: for the crop protocol they hold the model
            input plus the group's margin on each side (``group.margin(H, W)`` at the input size:
            the largest shift in whole pixels), so ``(N, 3, 288, 288)``
            sources give 224 x 224 inputs under the default 32-pixel shifts; a warning says so
            when sources of at least the model's input size would be measured smaller. With
            ``input_size`` given, the central window of that size plus the margin is used.
            Pixels that come from outside a source (zero protocol, the corners of a rotation)
            are 0 after normalization (the mean colour). Files that cannot be read are left out,
            listed in ``Result.skipped`` and named in a :class:`SkippedFilesWarning`.
        group: The group elements (default: translations by 8, 16, 32 pixels along each axis).
        layers: Layers to measure (:func:`equifast.layers.select_layers`; default: stage outputs).
        metrics: Scores (:data:`equifast.scores.METRICS`; default ``DEFAULT_METRICS``).
        batch_size: Images per batch (before stacking the ``K + 1`` transformed copies).
        device: ``"cpu"``, ``"cuda"``... (default: the model's device).
        labels: Class labels of a tensor ``data`` or of the sample photographs, one per image
            (for top-1 / top-5; -1: unknown). A folder has its labels from its class subfolders,
            and an iterable gives them with each batch: passing ``labels`` there is an error.
        input_size: ``(H, W)`` of the model input (default: from the data, or the model's config).
        layouts: Override the detected layout per layer (``{"blocks.3": "NLC"}``).
        align: Grid offsets (:mod:`equifast.align`): ``"auto"``, ``"center"``, ``"corner"``, a
            number or an ``(offset_y, offset_x)`` pair for every layer (stride-1 layers too), or
            a dict of those per layer.
        subpixel: Re-alignment by a fraction of a feature pixel: ``"bilinear"`` or ``"skip"`` (NaN).
        channel_map: ``"identity"`` (each channel against itself) or ``"match"``: each channel
            against the channel of the other map it correlates with best, per image and element
            (DESIGN.md 1.6): equivariance up to a permutation of channels, as a learned rotated
            copy of a filter shows it. The chance comparison is matched too, so that
            ``corr_vs_chance`` discounts what matching alone gains. Slower: it runs the
            pure-PyTorch statistics (a ``C x C`` matrix per image and element).
            ``"linear"`` (Lenc & Vedaldi): each channel against ``M b + c``, the affine map of
            all channels of the other map ``b`` that best predicts the transformed image's
            features, fitted by ridge least squares per layer, element and comparison on the
            other half of the images (two folds: even and odd positions in the data's order;
            each image is scored with the map fitted on the other fold, never on itself). It
            reads the data twice (a pass to fit, a pass to score), keeps two ``C x C``
            float64 matrices per fold, comparison and element of every layer (beyond
            :data:`LINEAR_FIT_BYTES`, the layers are fitted in groups, a pass each), and needs
            data that can be read again (not a one-shot iterator) and at least two images.
        ridge: ``channel_map="linear"`` only: the ridge penalty ``lambda = ridge *
            trace(S_bb) / C`` of the fit (relative to the features' scale; positive).
        mask: ``None`` (every valid position counts) or ``"disc"``: a position counts only where
            it and the position its content came from both lie inside the disc inscribed in the
            model input (:func:`equifast.groups.feature_disc`: radius ``(min(H, W) - 1) / 2``
            about the image centre). Rotations about the centre then all compare the same
            positions, whatever the angle, instead of the square less the corners each angle
            brings in from outside the image. Not with the circular protocol.
        comparisons: Which of ``("eq", "inv", "chance")`` to report.
        pooled: Score the statistics merged over all images (CIs over batches) instead of the mean
            of per-image scores.
        bootstrap: Resamples of the 95% bootstrap intervals (0: none).
        seed: Seed of the bootstrap and the alignment probe.
        elements_per_chunk: Group elements per forward; the first forward of a batch also holds
            the identity block, whose features are kept for the later forwards. Default: chosen
            for the device: on the CPU about 400,000 input pixels per forward (32 images of
            112 px, 8 of 224 px; never less than one block of ``batch_size`` images, and then the
            identity block has a forward of its own), on a GPU about 1024 images.
        dtype: Model dtype on the device; the model is converted in place, as by ``Module.to``
            (default: the model's own dtype when it is not float32, so that a float64 or half
            model runs as it is; else float32 on the CPU and bfloat16 autocast on CUDA).
        channels_last: Input memory format (default: True on CUDA).
        limit: Use at most this many images. Of a folder or file list: this many files, spread
            evenly over the sorted list; unreadable ones among them are skipped, not replaced.
        num_workers: Loader workers for a folder (DALI: CPU threads).
        loader: For a folder: 'dali' (NVIDIA DALI), 'folder' (Pillow) or 'auto' (DALI on a
            CUDA device when it imports, unless ``num_workers=0``; Pillow on the CPU, where the
            engine then reads the very pixels ``equifast.naive`` reads: DALI's resize rounds
            apart from Pillow's, which moves scores by about 1e-3).
        progress: Show a progress bar over the images, and one over the layers the
            ``align="auto"`` probe reads where that takes more than two seconds.
        model_name: Name recorded in the result (default: the timm name or the class name).
        force_reference: Use the pure-PyTorch reference ops even when kernels are compiled.
        distributed: Split the images between the processes of a ``torchrun`` launch or of an
            initialised ``torch.distributed`` group, and combine the statistics
            (:mod:`equifast.distributed`): None (default) when there are several processes, True
            (an error without them), False never. Every rank returns the same complete result;
            only rank 0 shows a progress bar. Without a device, each rank uses ``cuda:LOCAL_RANK``
            when CUDA is present.
        baseline: ``"init"``: also measure a freshly initialized copy of the architecture
            (seeded with ``seed``; :mod:`equifast.baseline` says how it is built) in the same
            forwards, on the same images, and fill the frame's ``init`` and ``learned`` (``value -
            init``) columns with their 95% intervals (paired: the same resamples of the same
            images). A module (or an :class:`equifast.baseline.InitCopy`): that initialized copy
            (same architecture; moved to the model's device and dtype in place). None
            (default): no baseline; those columns are NaN.

    Returns:
        A :class:`equifast.Result`.

    Example:
        >>> import torch, equifast
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular"))
        >>> images = torch.rand(4, 3, 16, 16)
        >>> group = equifast.Translation([1, 2], protocol="circular")
        >>> result = equifast.measure(net, images, group=group, progress=False)
        >>> rows = result.frame.query("comparison == 'eq' and metric == 'corr'")
        >>> round(float(rows.value.min()), 5)
        1.0
    """
    started = time.perf_counter()
    group = resolve_group(group)
    metric_names = check_metrics(metrics)
    if isinstance(comparisons, str):
        comparisons = [comparisons]
    unknown = [c for c in comparisons if c not in COMPARISONS]
    if unknown:
        raise ValueError(f"comparisons: expected some of {COMPARISONS}, found {unknown}")
    if not comparisons:
        raise ValueError(f"comparisons: expected at least one of {COMPARISONS}, found none")
    if subpixel not in ("bilinear", "skip"):
        raise ValueError(f"subpixel: expected 'bilinear' or 'skip', found {subpixel!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, found {batch_size}")
    input_size = check_run_arguments(input_size, align, limit, bootstrap)
    check_channel_map(channel_map)
    if channel_map == "linear":
        check_linear_run(data, ridge)
    check_mask(mask, list(group))
    if elements_per_chunk is not None:
        check_count("elements_per_chunk", elements_per_chunk, 1, "a positive integer or None")
    check_baseline(baseline)

    from .models import check_device, model_dtype_for, resolve_model

    resolved = resolve_model(model, seed, input_size, model_name)
    module, preprocess, model_name = resolved.module, resolved.preprocess, resolved.name
    note, pretrained = resolved.note, resolved.pretrained
    by_name = resolved.by_name  # the name a model was given by: its copy is built by name too
    layers, layouts, align = resolved.own_names(layers, layouts, align)
    check_layer_keys(module, layouts, "layouts")
    check_layer_keys(module, align, "align")
    channels = resolved.channels  # 1: a greyscale model, fed the luma of the images
    module.eval()
    shard, device = _dist.setup(distributed, device)
    if shard is not None and channel_map == "linear":
        raise ValueError("channel_map='linear' is not available with distributed=True yet (the "
                         "fits would need the sums of every rank); measure in one process")
    if device is None:
        parameter = next(module.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    device = check_device(device)
    model_dtype, autocast = model_dtype_for(module, dtype, device)
    module.to(device)
    if dtype is not None:
        module.to(dtype)  # in place, as Module.to: the caller's model stays in this dtype
    if channels_last is None:
        channels_last = device.type == "cuda"
    fresh = resolve_baseline(baseline, module, seed, by_name, input_size)
    if fresh is not None:
        parameter = next(module.parameters(), None)
        fresh.module.to(device, parameter.dtype if parameter is not None else None)
    if shard is not None:
        _dist.sync_module(module)  # every rank measures rank 0's weights
        if fresh is not None:
            _dist.sync_module(fresh.module)
        progress = progress and shard.rank == 0

    plan = DataPlan(data, labels, batch_size, input_size, preprocess, group, num_workers, limit,
                    loader, shard, device)
    batches = iter(plan)
    first = next(batches, None)
    if shard is not None:
        _dist.total_images(0 if first is None else first.sources.shape[0])  # a rank may have none
    elif first is None:
        raise ValueError(no_images_message(plan.skipped))
    height, width = plan.input_size
    margin = plan.margin
    check_circular(list(group), height, width)  # before the probe: a group error is cheap

    names = select_layers(module, layers)
    setup_started = time.perf_counter()
    probe_report: dict[str, str] = {}
    names, layer_layouts, offsets = probe_layers(module, names, (height, width), layouts or {},
                                                 align, device, model_dtype, seed,
                                                 lenient=is_broad_selection(layers, module),
                                                 report=probe_report,
                                                 by_name=by_name is not None,
                                                 progress=progress)
    if shard is not None:
        offsets = _dist.agree(offsets, "alignment offsets")
        probe_report["offset_readings"] = _dist.agree(probe_report["offset_readings"],
                                                      "ways of finding the alignment offsets")
    probe_seconds = time.perf_counter() - setup_started

    elements = list(group)
    count = len(elements)
    image_matrices = group.matrices(height, width, with_identity=False)
    if shard is None or shard.rank == 0:
        warn_estimated_offsets(probe_report["offset_readings"], image_matrices[:, :, :2],
                               stacklevel=2)
    wrap = [int(e.protocol == "circular") for e in elements]
    # The layers, keyed by the names the hooks see. With a baseline both models run as one
    # module (WithBaseline), and the copy's layers take the model's layouts and offsets: the
    # same geometry, and a difference of the two scores that no offset estimate moves.
    runner: nn.Module = module
    keys = {name: name for name in names}
    copy_keys: dict[str, str] = {}
    if fresh is not None:
        runner = WithBaseline(module, fresh.module)
        keys = {name: member_name(TRAINED, name) for name in names}
        copy_keys = {name: member_name(INIT, name) for name in names}
    state: dict[str, _Layer] = {}
    for depth, name in enumerate(names):
        layout = layer_layouts[name]
        disc = None
        if layout.kind == "vector":
            affines = np.tile(np.array([[1.0, 0, 0], [0, 1.0, 0]]), (count, 1, 1))
        else:
            affines = feature_source_affines(image_matrices, layout.stride, offsets[name])
            if mask == "disc":
                disc = feature_disc((height, width), layout.stride, offsets[name])
        exact = np.array([is_integer_affine(a) for a in affines])
        layer_wrap = wrap if layout.tiles((height, width)) else [0] * count
        state[keys[name]] = _Layer(name, depth, layout, offsets[name], affines, exact, layer_wrap,
                                   disc)
        if name in copy_keys:
            state[copy_keys[name]] = _Layer(name, depth, layout, offsets[name], affines, exact,
                                            layer_wrap, disc)
    hooked = list(state)
    # channel_map="linear": the layers whose fits each pass over the data accumulates
    fit_groups = check_linear_memory(state, count) if channel_map == "linear" else []

    # Image-space source maps of the transform: identity first.
    all_elements = [IDENTITY] + elements
    image_sources = np.stack([invert_affine(e.matrix(height, width)) for e in all_elements])
    protocols = [PROTOCOL_CODES[e.protocol] for e in all_elements]
    first_size = batch_size if first is None else first.sources.shape[0]  # None: a rank's share

    if elements_per_chunk is not None:
        chunk, blocks = elements_per_chunk, elements_per_chunk + 1
    else:
        chunk, blocks = _default_plan(min(batch_size, first_size), count, height * width, device)
    context: dict[str, Any] = {}
    headless = is_headless(module)  # num_classes=0: the output is pooled features, not logits

    # When the elements take several forwards, the first one holds the identity block and the
    # others only their elements: the identity features of each layer are kept from the first
    # forward (one block of each measured layer's output) instead of being recomputed per forward.
    identity: dict[str, torch.Tensor] = {}
    # CPU: bound the resident size across batches (_HeapTrimmer). Checked between batches, never
    # inside the hooks: measured on vit_tiny (64 images, 12 layers), trimming there kept the peak
    # 140 MiB lower but made the run 1.6x slower (the trims and the page faults of re-using the
    # pages).
    trimmer = _HeapTrimmer() if device.type == "cpu" else None
    # Scores of the batch, kept on the device until the batch is done (_fetch_batch): a copy to
    # the host per layer would wait for the GPU and leave it idle while the next layers launch.
    # Each entry: (layer names, lo, (metrics, 3, Kc, B, layers) scores).
    tables: list[tuple[list[str], int, torch.Tensor]] = []
    # Statistics of this forward's layers waiting to be scored together (see _score_together).
    pending: list[tuple[str, torch.Tensor]] = []
    together = _score_together(device)

    def score(names: list[str], lo: int, stats: torch.Tensor, channel_counts) -> None:
        scores = score_stats(stats, metric_names, channel_counts=channel_counts)
        table = torch.stack([scores[metric] for metric in metric_names])
        tables.append((names, lo, table if channel_counts is not None else table[..., None]))

    def score_pending() -> None:
        if not pending:
            return
        stats = [s for _, s in pending]
        score([n for n, _ in pending], context["lo"],
              stats[0] if len(stats) == 1 else torch.cat(stats, dim=-2),
              [s.shape[-2] for s in stats])
        pending.clear()

    def on_output(name: str, tensor: torch.Tensor) -> None:
        # A module that runs several times in one forward (a shared ReLU) is measured at its
        # first call, so that every image counts once.
        if name in context["seen"]:
            return
        context["seen"].add(name)
        layer = state[name]
        lo, hi, batch = context["lo"], context["hi"], context["batch"]
        # The very tensor the layer measured last output, unchanged since (an nn.Identity, a
        # Dropout in eval mode: in timm's resnet18 16 of its 77 leaves, in vit_tiny 99 of 201):
        # its statistics, not computed again (see _unchanged_output).
        version = version_of(tensor)
        twin = None if channel_map == "linear" else _unchanged_output(
            context["last"], tensor, version, layer, state, identity, context["first"], name)
        reference = None
        if context["first"]:  # the identity block leads this forward
            if hi < count:
                # (a twin shares its kept features: the same values)
                identity[name] = identity[twin] if twin is not None else tensor[:batch].clone()
            if hi == 0:
                # The identity block alone: compared in the later forwards, whose twins are
                # told by the features they share, so it is recorded all the same.
                context["last"] = _measured(tensor, version, name, None)
                return
        else:
            # Passed beside the elements' features, not stacked with them: a copy of every
            # measured layer's output per forward cost more than its statistics (resnet18 at
            # 224 px, one block per forward: torch.cat 2.4x the time of equivariance_stats).
            reference = identity[name]
        linear = None
        if channel_map == "linear":
            # images in folds by their place in the data (even, odd): each is scored with the
            # map fitted on the other fold
            folds = (context["image_offset"] + torch.arange(batch)) % LINEAR_FOLDS
            if context["fitting"]:  # the passes that fit: sums for the fits only
                if name not in context["fit_group"]:
                    return  # fitted in another pass
                fit_pending.append((name, lo, hi, _layer_fit_sums(tensor, layer, lo, hi, batch,
                                                                  subpixel, reference, folds)))
                return
            linear = (layer.linear_maps[:, :, lo:hi], (folds + 1) % LINEAR_FOLDS)
        if twin is not None:
            stats = context["last"].stats.clone()
        else:
            stats = _layer_stats(tensor, layer, lo, hi, batch, layer.wrap, subpixel, channel_map,
                                 force_reference, reference, linear)
            if batch == 1:
                stats[2] = 0  # no other image to compare with: chance is undefined
        context["last"] = _measured(tensor, version, name, stats)
        if pooled:
            # (stats (3, Kc, B, C, 6); field 0 counts an image's valid positions)
            layer.pooled.append((lo, merge_stats(stats, dim=2), (stats[..., 0] > 0).any(-1)))
        if not together:
            score([name], lo, stats, None)
            return
        pending.append((name, stats))
        if sum(s.nbytes for _, s in pending) >= _SCORE_GROUP_BYTES:
            score_pending()

    consistency_rows: list[np.ndarray] = []
    top_rows: list[np.ndarray] = []
    images_done = 0
    progress_bar = None
    if progress:
        from tqdm.auto import tqdm

        # linear: a pass to fit each group of layers, then one to score
        passes = len(fit_groups) + 1 if channel_map == "linear" else 1
        progress_bar = tqdm(total=None if plan.total is None else passes * plan.total,
                            unit="img", desc=f"measure {model_name}", leave=False)
    skipped_shown = 0  # unreadable files of this pass over the data the bar has counted

    def advance(images: int) -> None:
        """Moves the bar by a batch's images and the files skipped since: the total counts every
        file of the plan, so that a folder with unreadable files still ends at 100%."""
        nonlocal skipped_shown
        if progress_bar is None:
            return
        skipped = len(plan.skipped)
        if skipped > skipped_shown:
            progress_bar.set_postfix(skipped=skipped, refresh=False)
        progress_bar.update(images + max(skipped - skipped_shown, 0))
        skipped_shown = skipped
    backend = "reference" if force_reference or not _ext.has_kernel(
        "equivariance_stats", device.type) else "compiled"
    if channel_map in ("match", "linear") and backend == "compiled":
        backend = "compiled transform, reference statistics"  # no kernel maps channels
    # channel_map="linear": the sums of the fits of the batch being run (committed when all its
    # forwards are done, so that a retry after running out of memory does not count them twice)
    fit_pending: list[tuple[str, int, int, dict[str, torch.Tensor]]] = []
    context["fitting"] = False

    def run_batch(batch: Batch) -> Callable[[], None]:
        """Launches the batch's forwards; returns what brings its results to the host.

        On a GPU the caller runs that after launching the next batch, so that the copies to the
        host wait for work that is already done, and the GPU never idles while the host launches.
        """
        nonlocal chunk, blocks
        sources = batch.sources
        # Each batch by its own dtype (an iterable may mix them): uint8 0..255 is normalized with
        # the model's mean and std, float is taken as already preprocessed.
        normalize = sources.dtype == torch.uint8
        mean, std = channel_normalization(preprocess, channels) if normalize else (None, None)
        if normalize and channels == 1:  # the grey mean and std in every channel (_to_grey)
            mean, std = mean * 3, std * 3
        if device.type == "cuda" and sources.device.type == "cpu" and not sources.is_pinned():
            # A copy from pageable memory makes the host wait until the GPU has drained its
            # queue (the driver stages it): pinned, it runs beside the previous batch's work.
            sources = sources.pin_memory()
        sources = sources.to(device, non_blocking=True)
        size = sources.shape[0]
        logits_blocks: list[torch.Tensor | None] = [None] * (count + 1)
        marks = _marks(state)
        bounds = _forward_bounds(count, chunk, blocks)
        forward = 0
        while forward < len(bounds):
            lo, hi = bounds[forward]
            chosen = ([0] if forward == 0 else []) + list(range(lo + 1, hi + 1))
            try:
                images = ops.transform_images(
                    sources, torch.from_numpy(image_sources[chosen]),
                    [protocols[i] for i in chosen], margin, (height, width), mean, std,
                    model_dtype, channels_last,
                    force_reference=force_reference,
                )
                if channels == 1:
                    images = _to_grey(images)
                context.update(lo=lo, hi=hi, first=forward == 0, batch=size, seen=set(),
                               last=None)
                if forward == 0:
                    fit_pending.clear()
                # (no_grad, not inference_mode: the outputs keep their version counters, which
                # tell an unchanged tensor from one an in-place op wrote; no slower, timed on
                # resnet18, convnext_atto and vit_tiny)
                with torch.no_grad(), LayerHooks(runner, hooked, on_output), \
                        torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                    output = runner(images)
                    score_pending()
            except torch.cuda.OutOfMemoryError:
                if blocks == 1:
                    raise
                _rollback(state, marks)
                tables.clear()
                pending.clear()
                # Halve the elements per forward; below one element beside the identity block,
                # give the identity block a forward of its own.
                chunk = max(1, chunk // 2)
                blocks = min(blocks - 1, chunk + 1)
                warnings.warn(f"out of memory: retrying with at most {chunk} elements and "
                              f"{blocks} blocks of images per forward", stacklevel=2)
                logits_blocks = [None] * (count + 1)
                identity.clear()
                fit_pending.clear()
                bounds = _forward_bounds(count, chunk, blocks)
                forward = 0
                continue
            logits = logits_of(output, headless)
            if logits is not None:
                per_block = logits.view(len(chosen), size, -1)
                for j, element in enumerate(chosen):
                    logits_blocks[element] = per_block[j]
            elif deserves_logits_warning(output, headless) and not context.get("warned_output"):
                context["warned_output"] = True
                warn_not_logits(output, stacklevel=3, headless=headless)  # the caller of measure
            forward += 1
        identity.clear()
        if context["fitting"]:
            for name, lo, hi, sums in fit_pending:
                _add_fit_sums(state[name], lo, hi, sums)
            fit_pending.clear()
            return lambda: None  # nothing to score or count in the pass that fits
        batch_tables = list(tables)
        tables.clear()
        end_marks = _marks(state)

        def finish() -> None:
            _fetch_batch(state, marks, end_marks, batch_tables, metric_names)
            if all(block is not None for block in logits_blocks):
                tally_logits(logits_blocks, batch.labels)

        return finish

    def tally_logits(logits_blocks: list[torch.Tensor], labels: torch.Tensor | None) -> None:
        """Consistency of the top-1 class under each element, and top-1 / top-5 hits."""
        reference = logits_blocks[0].argmax(-1)
        same = torch.stack([logits_blocks[k + 1].argmax(-1) == reference for k in range(count)])
        consistency_rows.append(same.float().cpu().numpy())  # (K, B)
        if labels is not None:
            labels_device = labels.to(reference.device)
            top5 = logits_blocks[0].topk(min(5, logits_blocks[0].shape[-1]), -1).indices
            hit1 = (top5[:, 0] == labels_device).float()
            hit5 = (top5 == labels_device[:, None]).any(-1).float()
            known = labels_device >= 0
            hit1[~known], hit5[~known] = math.nan, math.nan
            top_rows.append(torch.stack([hit1, hit5]).cpu().numpy())

    batches_started = time.perf_counter()
    context["image_offset"] = 0
    if channel_map == "linear":
        # The first passes fit the maps (DESIGN.md 1.6: fitted on one split, scored on another),
        # one pass per group of layers whose sums fit in memory together (check_linear_memory);
        # the last reads the data again and scores every image with the other fold's maps.
        for index, group_keys in enumerate(fit_groups):
            for key in group_keys:
                state[key].linear_sums = ops.empty_linear_sums(
                    LINEAR_FOLDS, count, _stats_channels(state[key]))
            context.update(fitting=True, image_offset=0, fit_group=set(group_keys))
            if index > 0:
                batches = iter(plan)
                first = next(batches, None)
            skipped_shown = 0  # a new pass lists its unreadable files anew
            for batch in _chain(first, batches):
                run_batch(batch)
                context["image_offset"] += batch.sources.shape[0]
                if trimmer is not None:
                    trimmer.after_batch()
                advance(batch.sources.shape[0])
            advance(0)
            if context["image_offset"] < LINEAR_FOLDS:
                raise ValueError(f"channel_map='linear': expected at least {LINEAR_FOLDS} images "
                                 f"(one fits the map that scores the other), found "
                                 f"{context['image_offset']}")
            for key in group_keys:
                state[key].linear_maps = ops.solve_linear_maps(state[key].linear_sums, ridge)
                state[key].linear_sums = None
        context.update(fitting=False, image_offset=0)
        batches = iter(plan)
        first = next(batches, None)
        skipped_shown = 0
    unfinished: Callable[[], None] | None = None  # the previous batch's finish (run_batch)
    for batch in _chain(first, batches):
        finish = run_batch(batch)
        if unfinished is not None:
            unfinished()
        unfinished = finish
        if trimmer is not None:
            trimmer.after_batch()
        images_done += batch.sources.shape[0]
        context["image_offset"] = images_done
        advance(batch.sources.shape[0])
    if unfinished is not None:
        unfinished()
    if progress_bar is not None:
        advance(0)  # files skipped after the last batch (a last batch of unreadable files)
        progress_bar.close()
    if shard is not None:
        images_done, plan.skipped = _dist.combine(state, consistency_rows, top_rows,
                                                  plan.batch_keys, images_done, plan.skipped,
                                                  plan.skipped_keys)

    frame_started = time.perf_counter()
    frame_arguments = (model_name, elements, comparisons, metric_names, pooled, bootstrap, seed,
                       count, len(names))
    if fresh is None:
        frame = _build_frame(state, *frame_arguments)
    else:
        distributions: dict = {}
        copy_distributions: dict = {}
        frame = _build_frame({k: state[k] for k in keys.values()}, *frame_arguments,
                             distributions=distributions)
        copy_frame = _build_frame({k: state[k] for k in copy_keys.values()}, *frame_arguments,
                                  distributions=copy_distributions)
        frame = _add_baseline(frame, copy_frame, distributions, copy_distributions)
    model_frame = _model_frame(model_name, consistency_rows, top_rows, bootstrap, seed)
    finished = time.perf_counter()
    elapsed = finished - started
    # Where the time went: fixed costs (loading, the layout / alignment probe, the frame with its
    # bootstrap) apart from the per-image loop over the batches.
    timings = {
        "setup": batches_started - started,
        "probe": probe_seconds,
        "batches": frame_started - batches_started,
        "frame": finished - frame_started,
    }
    config = {
        "model": model_name,
        "pretrained": pretrained,
        "note": note,
        "group": group.name,
        "elements": group.names,
        "layers": names,
        "layouts": {n: state[keys[n]].layout.layout for n in names},
        "stride_probe": probe_report.get("stride_probe"),
        # (vector layers have no grid, hence no offset: left out, so that the dict can be
        # passed back as align= to repeat the measurement)
        "offsets": {n: list(state[keys[n]].offset) for n in names
                    if not np.isnan(state[keys[n]].offset).all()},
        # how align= found each of them ("centroid": an estimate; equifast.align.READINGS)
        "offset_readings": {n: probe_report["offset_readings"][n] for n in names
                            if n in probe_report["offset_readings"]},
        "input_size": [height, width],
        "margin": list(margin),
        "batch_size": batch_size,
        "elements_per_chunk": chunk,
        "blocks_per_forward": blocks,
        "align": align if isinstance(align, (str, int, float)) else str(align),
        "subpixel": subpixel,
        "channel_map": channel_map,
        **({"ridge": ridge, "folds": LINEAR_FOLDS, "fit_passes": len(fit_groups)}
           if channel_map == "linear" else {}),
        "mask": mask,
        "metrics": list(metric_names),
        "pooled": pooled,
        "bootstrap": bootstrap,
        "seed": seed,
        "device": str(device),
        "dtype": "bfloat16-autocast" if autocast else str(model_dtype).replace("torch.", ""),
        "channels_last": bool(channels_last),
        "images": images_done,
        "loader": plan.loader,
        "backend": backend,
        "preprocess": {k: (list(v) if isinstance(v, tuple) else v)
                       for k, v in vars(preprocess).items()},
        "seconds": elapsed,
        "timings": timings,
        "images_per_second": images_done / elapsed if elapsed > 0 else None,
        "versions": {"torch": torch.__version__, "equifast": _version()},
        "baseline": None if fresh is None else {"how": fresh.how, "kept": fresh.kept,
                                                 "seed": seed},
    }
    if shard is not None:
        config = _dist.broadcast_object({**config, "world_size": shard.world})
    warn_undefined_elements(frame, subpixel)
    warn_undefined_chance(frame)
    if shard is None or shard.rank == 0:
        warn_skipped(plan.skipped, images_done)
    return Result(frame=frame, model_frame=model_frame, config=config, skipped=plan.skipped)


# Score the layers of a forward together (None: on every device but the CPU). On a GPU the
# launches set the time of scoring: about 40 small ops per call, once per forward instead of once
# per layer. The CPU has the compiled score_stats op, one call per layer; with torch ops there,
# scoring all of resnet18's leaves at once measured 0.75x the speed of layer by layer (the
# temporaries left the caches) and groups of 16 MiB the same speed, within the machine's noise.
_SCORE_LAYERS_TOGETHER: bool | None = None
# At most this many bytes of statistics wait to be scored together (bounds the memory they and
# the scores' temporaries take; with many wide layers a forward is scored in several groups).
_SCORE_GROUP_BYTES = 256 << 20


def _score_together(device: torch.device) -> bool:
    if _SCORE_LAYERS_TOGETHER is not None:
        return _SCORE_LAYERS_TOGETHER
    return device.type != "cpu"


_LIBC: Any = None
# How far the resident size may grow past its level after the first batch before the heap is
# trimmed (see _HeapTrimmer).
_TRIM_SLACK = 128 << 20


def _resident_bytes() -> int | None:
    """The process's resident size (Linux), or None where /proc/self/statm is not there."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _malloc_trim() -> bool:
    """Give the heap's free pages back to the OS (glibc); False where there is no glibc."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True


class _HeapTrimmer:
    """Keeps the resident size of a CPU run within ``_TRIM_SLACK`` of its level after the first
    batch, trimming the heap only when it grows past that.

    A stacked forward frees activations of a few MiB each; glibc then raises its mmap threshold,
    serves the next ones from the heap and keeps their pages when they are freed, so later forwards
    run without page faults. Small arrays kept across batches can pin freed space, and the heap
    then grew by about a forward per batch (measured in an earlier engine: vit_tiny at 112 px,
    800 -> 2350 MiB over 24 batches); ``malloc_trim`` returns free pages to the OS. But the next
    forward faults them in again: trimming after each batch with 64 MiB free (the earlier
    policy, which trimmed after every batch of these runs) cost 3-29% of the loop (timed
    alternately in one process, 8 batches: convnext_atto rotations 1.07 s against 0.78 s,
    translations 1.64 s against 1.29 s, resnet18 and vit_tiny 3-10%), while without trimming the
    resident size grew by 0 (convnext_atto), 20 (resnet18) and 46 MiB (vit_tiny) over 24 batches.
    So the trim is a bound, not a routine: after a trim the limit moves to the new resident size
    plus the slack, so that memory the run really holds (results) is not trimmed for again.
    """

    def __init__(self) -> None:
        self.limit: int | None = None

    def after_batch(self) -> None:
        resident = _resident_bytes()
        if resident is None:
            return
        if self.limit is None:
            self.limit = resident + _TRIM_SLACK
        elif resident > self.limit and _malloc_trim():
            after = _resident_bytes()
            self.limit = max(self.limit, (after if after is not None else resident) + _TRIM_SLACK)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("equifast")
    except Exception:  # noqa: BLE001 - not installed: running from a checkout
        return "unknown"


def _chain(first: Batch | None, rest: Iterator[Batch]) -> Iterator[Batch]:
    if first is not None:
        yield first
    yield from rest


def _marks(state: dict[str, _Layer]) -> dict[str, int]:
    """How many pooled chunks each layer holds (its scores arrive at _fetch_batch)."""
    return {name: len(layer.pooled) for name, layer in state.items()}


def _fetch_batch(state: dict[str, _Layer], marks: dict[str, int], end_marks: dict[str, int],
                 tables: list[tuple[list[str], int, torch.Tensor]], metric_names) -> None:
    """Bring a batch's scores (``tables``, emptied) and its pooled statistics (recorded between
    ``marks`` and ``end_marks``) to the host: scores as numpy arrays in each layer's ``scores``."""
    for names, lo, table in tables:
        values = table.cpu().numpy()  # (metrics, 3, Kc, B, layers): one copy for all its layers
        for i, name in enumerate(names):
            scores = state[name].scores
            for m, metric in enumerate(metric_names):
                # Copies: views would keep every table alive to the end of the run, small blocks
                # that glibc places between the forwards' large ones. On the CPU that let the
                # heap fragment: vit_tiny's resident size grew by about 13 MiB per batch (peak
                # 176 MiB against 103-122 MiB with copies, 64 images of 112 px).
                scores.setdefault(metric, []).append((lo, values[m, ..., i].copy()))
    tables.clear()
    for name, layer in state.items():
        start, end = marks[name], end_marks[name]
        layer.pooled[start:end] = [(lo, stats.cpu(), used.cpu())
                                   for lo, stats, used in layer.pooled[start:end]]


def _rollback(state: dict[str, _Layer], marks: dict[str, int]) -> None:
    """Drop the pooled statistics a failed batch already recorded, so that a retry does not count
    them twice (its scores are still in the batch's tables, which the caller empties)."""
    for name, layer in state.items():
        del layer.pooled[marks[name]:]


def probe_layers(module, names, input_size, overrides, align, device, dtype, seed,
                 lenient: bool = False, report: dict | None = None,
                 advice: str = PROBE_ADVICE, by_name: bool = False, progress: bool = False):
    """Layouts and grid offsets of the layers, from one probe forward.

    With ``align="auto"`` layers the gradient probe of :mod:`equifast.align` (seeded random inputs,
    gradients enabled) gives the output shapes too, so that the model runs once, not twice; without
    them one image under ``inference_mode`` gives the shapes. The gradient probe runs in float32
    where the model is in bfloat16 or float16 (:func:`~equifast.align.probe_dtypes`).

    Returns:
        ``(names, layouts, offsets)``: the names without default layers that did not run.
        ``report``, when given, gets ``"stride_probe"`` (:func:`refine_layouts`) and
        ``"offset_readings"`` (how each offset was found, :func:`find_offsets`). ``advice``
        and ``by_name``: what a failing model's message suggests
        (:func:`equifast.layers.run_probe`). ``progress``: a bar over the layers the gradient
        probe reads, where that takes a while (:func:`~equifast.align.find_offsets`).
    """
    per_layer = dict(align) if isinstance(align, Mapping) else {name: align for name in names}
    with_grad = any(per_layer.get(name, "auto") == "auto" for name in names)
    selected = names
    # Every attempt in this frame: the probe's warnings name the caller of measure by their
    # stack level.
    attempts = probe_dtypes(dtype) if with_grad else [dtype]
    for attempt, probe_dtype in enumerate(attempts):
        captured: dict[str, torch.Tensor] = {}
        made: dict[str, AsMade] = {}
        # (name, output): the first output of each layer; with gradients also as made
        keep = record_outputs(captured, made) if with_grad else captured.setdefault
        try:
            with widened_to(module, probe_dtype, dtype):
                if with_grad:
                    probe = probe_inputs(input_size, device, probe_dtype, seed=seed,
                                         channels=input_channels(module))
                    context = torch.enable_grad()
                else:
                    # Two different images, not one: a layer whose output does not follow the
                    # batch (XCiT's positional encoding, (1, C, h, w) for any batch) or does not
                    # depend on the input (EdgeNeXt's, (B, C, h, w)) shows it, and a broad
                    # selection leaves it out instead of failing on it in the measurement.
                    probe = probe_inputs(input_size, device, probe_dtype, seed=seed,
                                         channels=input_channels(module)).detach()
                    context = torch.inference_mode()
                hooks = LayerHooks(module, selected, keep, lenient=lenient, record_shapes=True)
                anchors = GridAnchors(module, input_size, probe.shape[0]) if with_grad else None
                with (global_gates_cut(module) if with_grad else contextlib.nullcontext()), \
                        (anchors or contextlib.nullcontext()):
                    run_probe(module, probe, hooks, context, advice, by_name)
                drop_unwritten(captured, made)
                names, layouts = measurable_layers(
                    selected, captured, hooks.unmeasurable, input_size, overrides, lenient,
                    prefix_tokens_of(module), token_order_of(module), calls=hooks.calls,
                    channels_first=channels_first_of(module, hooks.shapes, input_size),
                    attention_candidates=attention_map_candidates(module, selected))
                layouts = refine_layouts(module, layouts, input_size, device, probe_dtype,
                                         overrides, report=report, lenient=lenient)
                names = [name for name in names if name in layouts]
                warn_undeclared_channels(module, layouts)
                readings: dict[str, str] = {}
                offsets = find_offsets(module, layouts, input_size, align, device, probe_dtype,
                                       seed=seed, captured=(probe, captured) if with_grad else None,
                                       anchors=anchors, readings=readings, made=made,
                                       progress=progress)
        except Exception:
            if attempt == len(attempts) - 1:
                raise
            continue  # a model that fails in float32 is probed in its own dtype
        if report is not None:
            report["offset_readings"] = readings
        return names, layouts, offsets
    raise AssertionError("unreachable: the last attempt returns or raises")


@dataclass
class _Measured:
    """The output the engine measured last in a forward (see _unchanged_output)."""

    tensor: weakref.ref
    version: int  # the tensor's version counter then
    name: str
    stats: torch.Tensor | None  # None in a forward of the identity block alone


def _measured(tensor: torch.Tensor, version: int | None, name: str,
              stats: torch.Tensor | None) -> _Measured | None:
    """What _unchanged_output compares the next output with; None for a tensor without a
    version counter, which has no twin."""
    return None if version is None else _Measured(weakref.ref(tensor), version, name, stats)


def _unchanged_output(last: _Measured | None, tensor: torch.Tensor, version: int | None,
                      layer: _Layer, state: Mapping[str, _Layer],
                      identity: Mapping[str, torch.Tensor], first: bool,
                      name: str) -> str | None:
    """The layer measured last in this forward, where ``tensor`` is the very tensor it output
    and no in-place op wrote it since (the same version), and where the statistics read it the
    same way (layout, source maps, wrapping, disc) against the same identity features (later
    forwards: the object kept for both). Its statistics are then this layer's, bit for bit.
    An in-place activation (a new version) is measured anew. ``version``: the tensor's
    (:func:`~equifast.align.version_of`)."""
    if last is None or last.tensor() is not tensor or version != last.version:
        return None
    twin = state[last.name]
    if not (twin.layout == layer.layout and twin.wrap == layer.wrap and twin.disc == layer.disc
            and np.array_equal(twin.source_affines, layer.source_affines)):
        return None
    if not first and identity.get(name) is not identity.get(last.name):
        return None
    return last.name


def _op_view(tensor, layer: _Layer, reference: torch.Tensor | None):
    """``(tensor, reference, (layout, grid_h, grid_w, prefix), disc)`` as the ops take a layer's
    output: a vector as one channel of one row of positions (its entries), and the identity
    block stacked with the elements where the two are laid out differently."""
    layout = layer.layout
    if layout.kind == "vector":
        tensor = tensor.reshape(tensor.shape[0], 1, 1, -1)
        if reference is not None:
            reference = reference.reshape(reference.shape[0], 1, 1, -1)
    if reference is not None and not _lays_out_like(reference, tensor):
        tensor, reference = torch.cat([reference, tensor]), None  # the op needs one layout
    if layout.kind == "vector":
        return tensor, reference, ("NCHW", 1, tensor.shape[-1], 0), None
    return (tensor, reference, (layout.layout, layout.grid_h, layout.grid_w, layout.prefix),
            layer.disc)


def _layer_stats(tensor, layer: _Layer, lo, hi, batch, wrap, subpixel, channel_map,
                 force_reference, reference: torch.Tensor | None = None,
                 linear: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Statistics of elements ``[lo, hi)`` from a layer's output: ``tensor`` holds the identity
    block first, or, with ``reference`` (the identity block), the elements' blocks only.
    ``linear``: ``(maps, map_folds)`` of ``channel_map="linear"``."""
    affines = torch.from_numpy(layer.source_affines[lo:hi])
    tensor, reference, view, disc = _op_view(tensor, layer, reference)
    maps, map_folds = linear if linear is not None else (None, None)
    return ops.equivariance_stats(tensor, affines, wrap[lo:hi], batch, *view, subpixel, True,
                                  True, force_reference=force_reference, reference=reference,
                                  channel_map=channel_map, disc=disc, linear_maps=maps,
                                  map_folds=map_folds)


def _layer_fit_sums(tensor, layer: _Layer, lo, hi, batch, subpixel,
                    reference: torch.Tensor | None, folds: torch.Tensor) -> dict:
    """The linear-fit sums of elements ``[lo, hi)`` (as :func:`_layer_stats`)."""
    affines = torch.from_numpy(layer.source_affines[lo:hi])
    tensor, reference, view, disc = _op_view(tensor, layer, reference)
    return ops.linear_fit_sums(tensor, affines, layer.wrap[lo:hi], batch, *view, subpixel, True,
                               True, folds, LINEAR_FOLDS, reference=reference, disc=disc)


def _stats_channels(layer: _Layer) -> int:
    """Channels of a layer's statistics (a vector is one channel)."""
    return 1 if layer.layout.kind == "vector" else layer.layout.channels


def _add_fit_sums(layer: _Layer, lo: int, hi: int, sums: dict[str, torch.Tensor]) -> None:
    """Merge a batch's fit sums of elements ``[lo, hi)`` into the layer's."""
    current = {key: value[:, :, lo:hi] for key, value in layer.linear_sums.items()}
    for key, value in ops.merge_linear_sums(current, sums).items():
        layer.linear_sums[key][:, :, lo:hi] = value


def check_linear_run(data, ridge: float) -> None:
    """The arguments ``channel_map="linear"`` needs: data it can read twice, a positive ridge."""
    if isinstance(data, Iterator):
        raise ValueError(
            "channel_map='linear': data is a one-shot iterator "
            f"({type(data).__name__}), which cannot be read twice (once to fit the maps, once to "
            "score them); pass a tensor, a list of batches, a folder or file list instead")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not (
            math.isfinite(ridge) and ridge > 0):
        raise ValueError(f"ridge: expected a positive finite number, found {ridge!r}")


def check_linear_memory(state: dict[str, _Layer], elements: int,
                        limit: int | None = None) -> list[list[str]]:
    """The groups of layers whose fits (``channel_map="linear"``) are accumulated in one pass
    over the data each, so that no pass holds more than ``limit`` bytes of sums (default
    :data:`LINEAR_FIT_BYTES`): consecutive layers, as many as fit. A ValueError, before any
    forward, when one layer's sums alone, or the fitted maps of all layers (kept until the
    scoring pass, half the sums' size), would pass it."""
    limit = LINEAR_FIT_BYTES if limit is None else limit
    # two C x C float64 sums (s_bb, s_ab) per fold, comparison and element; the map is one C x C
    per_layer = {layer_key: LINEAR_FOLDS * 3 * elements * 2 * _stats_channels(layer) ** 2 * 8
                 for layer_key, layer in state.items()}
    widest = max(per_layer, key=per_layer.get)
    maps = sum(per_layer.values()) // 2
    what = (f"{LINEAR_FOLDS} folds x 3 comparisons x {elements} elements x two C x C float64 "
            "matrices per layer")
    if per_layer[widest] > limit or maps > limit:
        alone = per_layer[widest] > limit
        raise ValueError(
            "channel_map='linear': "
            + (f"the fits of one layer would hold {_gib(per_layer[widest])} ({what}; "
               if alone else
               f"the fitted maps of all layers would hold {_gib(maps)} (half the sums of "
               f"{what}; ")
            + f"the widest, {state[widest].name!r}, has C = {_stats_channels(state[widest])}); "
            f"expected at most {_gib(limit)}: measure fewer or narrower layers, or "
            "fewer group elements, per run")
    groups: list[list[str]] = []
    held = 0
    for layer_key, size in per_layer.items():
        if not groups or held + size > limit:
            groups.append([])
            held = 0
        groups[-1].append(layer_key)
        held += size
    return groups


def _gib(size: int) -> str:
    """Bytes as GiB with one decimal, or as bytes where that would read 0.0 GiB."""
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 // 20 else f"{size} bytes"


def _lays_out_like(reference: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Whether ``reference`` holds its images like ``tensor`` (shape and strides after the batch
    axis; the stride of an axis of size 1 is never used), as ``equivariance_stats`` needs."""
    if reference.shape[1:] != tensor.shape[1:] or reference.device != tensor.device:
        return False
    return all(size <= 1 or a == b for size, a, b in
               zip(tensor.shape[1:], reference.stride()[1:], tensor.stride()[1:]))


def _collect(parts: list[tuple[int, np.ndarray]], count: int) -> np.ndarray:
    """Stitch ``[(lo, (3, Kc, B))]`` chunks into ``(3, K, N)`` (chunks of a batch share ``B``)."""
    batches: list[np.ndarray] = []
    current: np.ndarray | None = None
    for lo, values in parts:
        if lo == 0:
            if current is not None:
                batches.append(current)
            current = np.full((3, count, values.shape[-1]), np.nan)
        current[:, lo:lo + values.shape[1]] = values
    if current is not None:
        batches.append(current)
    return np.concatenate(batches, axis=-1)


def bootstrap_means(values: np.ndarray, resamples: int, seed: int,
                    block: int = 100) -> np.ndarray | None:
    """Bootstrap means of ``(rows, n)`` values (NaN ignored) -> ``(rows, R)``; ``None`` if n < 2."""
    rows, n = values.shape
    if resamples <= 0 or n < 2:
        return None
    rng = np.random.default_rng(seed)
    valid = ~np.isnan(values)
    filled = np.where(valid & ~np.isinf(values), values, 0.0)
    # An infinite value (psnr of identical maps) makes the mean of a resample that draws it
    # infinite: counted apart, since inf * a weight of 0 would be NaN in the product.
    plus = (values == math.inf).astype(np.float64)
    minus = (values == -math.inf).astype(np.float64)
    infinite = bool(plus.any() or minus.any())
    out = np.empty((rows, resamples))
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            means = (filled @ weights.T) / (valid @ weights.T)
        if infinite:
            drawn_plus, drawn_minus = plus @ weights.T > 0, minus @ weights.T > 0
            means[drawn_plus] = math.inf
            means[drawn_minus] = -math.inf
            means[drawn_plus & drawn_minus] = math.nan
        out[:, start:start + size] = means
    return out


def bootstrap_interval(distribution: np.ndarray | None,
                       rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The 2.5 and 97.5 percentiles of each row of bootstrap means (NaN rows without them)."""
    if distribution is None:
        return np.full(rows, np.nan), np.full(rows, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low = np.nanpercentile(distribution, 2.5, axis=1)
        high = np.nanpercentile(distribution, 97.5, axis=1)
        # Rows holding an infinite resample (psnr of identical maps): linear interpolation
        # would give inf - inf = NaN, so take the resamples at the bounds (wider, never NaN).
        infinite = np.isinf(distribution).any(axis=1)
        if infinite.any():
            low[infinite] = np.nanpercentile(distribution[infinite], 2.5, axis=1,
                                             method="lower")
            high[infinite] = np.nanpercentile(distribution[infinite], 97.5, axis=1,
                                              method="higher")
        return low, high


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def _build_frame(state, model_name, elements, comparisons, metric_names, pooled, bootstrap, seed,
                 count, layer_count, distributions: dict | None = None) -> pd.DataFrame:
    """The tidy frame of the layers in ``state``; ``distributions``, when given, receives each
    row's bootstrap means (``(layer, element, comparison, metric) -> (R,)`` or None)."""
    element_names = [e.name for e in elements] + ["mean"]
    comparison_index = [COMPARISONS.index(c) for c in comparisons]
    records = []
    for layer in state.values():
        if pooled:
            # (not `distributions`: that argument collects the rows' resamples for the baseline)
            points, resamples, counts = _pooled_values(layer, metric_names, bootstrap, seed,
                                                       count)
        else:
            values = {m: _collect(layer.scores[m], count) for m in metric_names}  # (3, K, N)
        layout = layer.layout
        stride = layout.stride[0] if layout.stride[0] == layout.stride[1] else math.nan
        base = {
            "model": model_name, "layer": layer.name, "depth": layer.depth,
            "rel_depth": layer.depth / max(layer_count - 1, 1), "kind": layout.kind,
            "layout": layout.layout, "grid_h": layout.grid_h, "grid_w": layout.grid_w,
            "channels": layout.channels, "prefix": layout.prefix, "stride_y": layout.stride[0],
            "stride_x": layout.stride[1], "stride": stride, "offset_y": layer.offset[0],
            "offset_x": layer.offset[1], "pooled": pooled,
        }
        exact = list(layer.exact) + [bool(np.all(layer.exact))]
        # Rows of one layer: (metric, comparison, element) with their per-image values.
        keys = [(metric, COMPARISONS[c], k) for metric in metric_names for c in comparison_index
                for k in range(count + 1)]
        if pooled:
            point = np.array([points[m][COMPARISONS.index(c), k] for m, c, k in keys])
            dist = None if resamples is None else np.stack(
                [resamples[m][COMPARISONS.index(c), k] for m, c, k in keys])
            ns = np.array([counts[COMPARISONS.index(c), k] for m, c, k in keys])
        else:
            matrix = []
            for metric, comparison, k in keys:
                per_image = values[metric][COMPARISONS.index(comparison)]  # (K, N)
                matrix.append(per_image[k] if k < count else _nanmean(per_image, 0))
            matrix = np.array(matrix)
            point = _nanmean(matrix, 1) if matrix.shape[1] else np.full(len(matrix), np.nan)
            ns = (~np.isnan(matrix)).sum(1)
            dist = bootstrap_means(matrix, bootstrap, seed)
        low, high = bootstrap_interval(dist, len(keys))
        row_of = {}
        for i, (metric, comparison, k) in enumerate(keys):
            row_of[(metric, comparison, k)] = i
            records.append({**base, "element": element_names[k], "exact": exact[k],
                            "comparison": comparison, "metric": metric, "value": point[i],
                            "ci_low": low[i], "ci_high": high[i], "n": int(ns[i])})
            if distributions is not None:
                distributions[(layer.name, element_names[k], comparison, metric)] = (
                    None if dist is None else dist[i])
        # Normalized equivariance, from the means of eq and chance corr (same resamples).
        if "eq" in comparisons and "chance" in comparisons:
            for k in range(count + 1):
                i_eq, i_ch = row_of[("corr", "eq", k)], row_of[("corr", "chance", k)]
                value = float(corr_vs_chance(point[i_eq], point[i_ch]))
                ratio = None
                if dist is not None:
                    ratio = corr_vs_chance(dist[i_eq], dist[i_ch])[None, :]
                    lo_ci, hi_ci = bootstrap_interval(ratio, 1)
                else:
                    lo_ci, hi_ci = np.array([np.nan]), np.array([np.nan])
                if distributions is not None:
                    distributions[(layer.name, element_names[k], "eq", "corr_vs_chance")] = (
                        None if ratio is None else ratio[0])
                records.append({**base, "element": element_names[k], "exact": exact[k],
                                "comparison": "eq", "metric": "corr_vs_chance", "value": value,
                                "ci_low": float(lo_ci[0]), "ci_high": float(hi_ci[0]),
                                "n": int(min(ns[i_eq], ns[i_ch]))})
    return pd.DataFrame.from_records(records, columns=FRAME_COLUMNS)


_ROW_KEY = ["layer", "element", "comparison", "metric"]


def _add_baseline(frame: pd.DataFrame, copy_frame: pd.DataFrame, distributions: dict,
                  copy_distributions: dict) -> pd.DataFrame:
    """Fill ``frame``'s baseline columns from the initialized copy's frame of the same rows.

    ``learned`` is ``value - init``; its interval comes from the differences of the two rows'
    bootstrap means, which resample the same images (or batches) with the same seed: a paired
    interval, narrower than the two intervals side by side when the scores move together.
    """
    frame = frame.drop(columns=BASELINE_COLUMNS)
    copy_rows = copy_frame[_ROW_KEY + ["value", "ci_low", "ci_high"]].rename(
        columns={"value": "init", "ci_low": "init_lo", "ci_high": "init_hi"})
    frame = frame.merge(copy_rows, on=_ROW_KEY, how="left", validate="one_to_one")
    frame["learned"] = frame["value"] - frame["init"]
    differences = []
    for key in frame[_ROW_KEY].itertuples(index=False, name=None):
        a, b = distributions.get(key), copy_distributions.get(key)
        differences.append(None if a is None or b is None else a - b)
    resamples = next((len(d) for d in differences if d is not None), 0)
    if resamples:
        stacked = np.stack([np.full(resamples, np.nan) if d is None else d for d in differences])
        frame["learned_lo"], frame["learned_hi"] = bootstrap_interval(stacked, len(frame))
    else:
        frame["learned_lo"], frame["learned_hi"] = np.nan, np.nan
    return frame[FRAME_COLUMNS]


def _pooled_values(layer: _Layer, metric_names, bootstrap, seed, count):
    """Scores of the statistics merged over all images; CIs from resampling whole batches.

    Returns:
        ``(points, distributions, counts)``: ``{metric: (3, K + 1)}`` (the last column averages
        the elements), ``{metric: (3, K + 1, R)}`` or ``None`` with fewer than two batches, and
        ``(3, K + 1)`` the images that had a valid position (for the last column: under some
        element), the ``n`` of the rows: an image without one adds nothing to the statistics.
    """
    batches: list[torch.Tensor] = []
    used: list[torch.Tensor] = []
    for lo, stats, images in layer.pooled:  # stats (3, Kc, C, 6), chunks of a batch in order
        if lo == 0:
            batches.append(torch.zeros(3, count, stats.shape[-2], 6, dtype=torch.float64))
            used.append(torch.zeros(3, count, images.shape[-1], dtype=torch.bool))
        batches[-1][:, lo:lo + stats.shape[1]] = stats
        used[-1][:, lo:lo + images.shape[1]] = images
    stacked = torch.stack(batches)  # (nb, 3, K, C, 6)
    contributed = torch.cat(used, -1)  # (3, K, N)
    counts = torch.cat([contributed.sum(-1), contributed.any(1).sum(-1, keepdim=True)], 1)
    counts = counts.numpy()

    def scored(stats: torch.Tensor) -> dict[str, np.ndarray]:
        out = {}
        for metric, value in score_stats(stats, metric_names, pooled=True).items():
            value = value.numpy()  # (3, K)
            out[metric] = np.concatenate([value, _nanmean(value, 1)[:, None]], 1)
        return out

    points = scored(merge_stats(stacked, dim=0))
    if bootstrap <= 0 or stacked.shape[0] < 2:
        return points, None, counts
    rng = np.random.default_rng(seed)
    nb = stacked.shape[0]
    weights = rng.multinomial(nb, np.full(nb, 1.0 / nb), size=bootstrap).astype(np.float64)
    resampled = []
    for w in torch.from_numpy(weights):
        scaled = stacked.clone()
        # Taking a batch w times multiplies its count and its centred sums by w; means stay.
        for field_index in (0, 3, 4, 5):
            scaled[..., field_index] *= w.view(-1, 1, 1, 1)
        resampled.append(scored(merge_stats(scaled, dim=0)))
    distributions = {m: np.stack([r[m] for r in resampled], -1) for m in metric_names}
    return points, distributions, counts


def _model_frame(model_name, consistency_rows, top_rows, bootstrap, seed) -> pd.DataFrame:
    records = []
    if consistency_rows:
        consistency = np.concatenate(consistency_rows, axis=1).mean(0)  # per image, over elements
        rows = [("consistency", consistency)]
        if top_rows:
            top = np.concatenate(top_rows, axis=1)
            rows += [("top1", top[0]), ("top5", top[1])]
        matrix = np.array([r[1] for r in rows])
        low, high = bootstrap_interval(bootstrap_means(matrix, bootstrap, seed), len(rows))
        for i, (metric, per_image) in enumerate(rows):
            records.append({"model": model_name, "metric": metric,
                            "value": float(_nanmean(per_image[None], 1)[0]),
                            "ci_low": low[i], "ci_high": high[i],
                            "n": int((~np.isnan(per_image)).sum())})
    return pd.DataFrame.from_records(records, columns=MODEL_COLUMNS)
