"""Image folders and file lists read with Pillow and a torch DataLoader (no DALI needed).

The same geometry as the DALI pipeline (DESIGN.md 5): timm's eval resize and a centre crop of
``input + 2 * margin``, delivered as uint8 sources for the crop translation protocol.

Accepted inputs:
    * an ImageNet-style folder: one subfolder per class; classes sorted by name as in torchvision's
      ``ImageFolder`` (so the synset folders of ImageNet give the usual class indices); the label
      is the class index; images are found recursively inside each class folder;
    * a flat folder of images: labels are None;
    * a single image file, a list of image paths (labels None) or of ``(path, label)`` pairs;
    * a ``.txt`` file list, one ``path [label]`` per line (DALI's ``file_list`` format), relative
      paths taken from the list's folder.

Bad input never stops a run: files that cannot be decoded (corrupt, truncated, empty, not an
image) are skipped and listed in ``ImageFolderSource.skipped`` as ``(path, reason)``. Greyscale,
palette, CMYK, alpha and 16-bit images are converted (see ``geometry.to_rgb``).

Example:
    >>> from equifast.data.geometry import Preprocess
    >>> data = ImageFolderSource("/imagenet/val", Preprocess((224, 224)), margin=32, batch_size=64)
    >>> for sources, labels, paths in data:  # sources (B, 3, 288, 288) uint8, labels (B,) int64
    ...     ...
    >>> data.skipped  # [(path, reason), ...] of the pass just made
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from equifast.data.geometry import (
    Preprocess,
    apply_crop_plan,
    as_margin,
    crop_plan,
    source_size,
    to_rgb,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderSource",
    "SkippedFilesWarning",
    "decode_file",
    "default_num_workers",
    "find_images",
    "is_path_list",
]

# torchvision's IMG_EXTENSIONS (compared lower-case)
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)

PathLike = str | os.PathLike


def default_num_workers() -> int:
    """``min(2, number of CPUs)``: decoding overlaps the model without crowding small machines."""
    return min(2, os.cpu_count() or 1)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _walk_images(folder: Path) -> list[Path]:
    """All image files under ``folder``, recursively, sorted; hidden entries (``.name``) skipped."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        # prune in place so os.walk does not descend into e.g. .ipynb_checkpoints
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(
            Path(root) / name
            for name in files
            if not name.startswith(".") and _is_image(Path(name))
        )
    return sorted(found)


def _no_images_error(path: Path, what: str) -> ValueError:
    return ValueError(
        f"no image files found in {what} {str(path)!r}: looked for files ending in "
        f"{', '.join(IMAGE_EXTENSIONS)} (any case), in the folder itself or in class subfolders"
    )


def find_images(
    path: PathLike | Sequence[PathLike] | Sequence[tuple[PathLike, int]],
) -> tuple[list[tuple[str, int]], list[str] | None]:
    """List the images of a folder, file list or sequence of paths, with labels.

    Args:
        path: see the module docstring for the accepted forms.

    Returns:
        ``(items, classes)``: items are ``(path, label)`` with label ``-1`` where there is none;
        classes are the sorted class-folder names for an ImageNet-style folder, else None.

    Raises:
        FileNotFoundError: the folder or file does not exist (names the path).
        ValueError: nothing that looks like an image is there (names the path and the extensions).
    """
    if isinstance(path, (str, os.PathLike)):
        root = Path(path).expanduser()
        if not root.exists():
            raise FileNotFoundError(
                f"image folder or file {str(root)!r} does not exist (expected a folder of images, "
                f"a folder of class subfolders, an image file or a .txt file list)"
            )
        if root.is_file():
            if root.suffix.lower() == ".txt":
                return _read_file_list(root), None
            return [(str(root), -1)], None
        return _scan_folder(root)

    items: list[tuple[str, int]] = []
    for entry in path:
        if isinstance(entry, (tuple, list)):
            file, label = entry
            items.append((str(file), int(label)))
        else:
            items.append((str(entry), -1))
    if not items:
        raise ValueError("the list of image files is empty")
    return items, None


def is_path_list(data) -> bool:
    """Whether ``data`` is a list or tuple of image paths (or of ``(path, label)`` pairs), the
    in-memory form of a ``.txt`` file list, rather than an iterable of image batches."""
    if type(data).__module__ == "numpy" and getattr(data, "ndim", None) == 1:
        data = data.tolist()  # a numpy array of paths (a column of a frame)
    if not isinstance(data, (list, tuple)) or not data:
        return False

    def is_path(entry) -> bool:
        return isinstance(entry, (str, os.PathLike))

    return all(
        is_path(entry)
        or (isinstance(entry, (tuple, list)) and len(entry) == 2 and is_path(entry[0])
            and isinstance(entry[1], int) and not isinstance(entry[1], bool))
        for entry in data
    )


def _read_file_list(list_file: Path) -> list[tuple[str, int]]:
    items: list[tuple[str, int]] = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # "path label": the label is the last field when it is an integer, so paths may hold spaces
        head, _, tail = line.rpartition(" ")
        if head and tail.lstrip("-").isdigit():
            file, label = head.strip(), int(tail)
        else:
            file, label = line, -1
        file_path = Path(file)
        if not file_path.is_absolute():
            file_path = list_file.parent / file_path
        items.append((str(file_path), label))
    if not items:
        raise ValueError(f"the file list {str(list_file)!r} names no files")
    return items


def _scan_folder(root: Path) -> tuple[list[tuple[str, int]], list[str] | None]:
    subdirs = sorted(
        entry.name
        for entry in os.scandir(root)
        if entry.is_dir() and not entry.name.startswith(".")
    )
    class_files = {name: _walk_images(root / name) for name in subdirs}
    flat = sorted(
        Path(entry.path)
        for entry in os.scandir(root)
        if entry.is_file() and not entry.name.startswith(".") and _is_image(Path(entry.name))
    )
    if any(class_files.values()):
        # ImageNet-style. Empty class folders keep their index (as in a partial copy of ImageNet
        # val): dropping them would shift every later label against the model's outputs.
        items = [
            (str(file), label) for label, name in enumerate(subdirs) for file in class_files[name]
        ]
        if flat:
            warnings.warn(
                f"{str(root)!r} has class subfolders ({len(subdirs)}, with {len(items)} images), "
                f"so its {len(flat)} image file(s) outside them (e.g. {flat[0].name!r}) are not "
                f"measured: move them into a class folder, or pass a folder of their own",
                stacklevel=3,
            )
        return items, subdirs
    if not flat:
        raise _no_images_error(root, "folder")
    return [(str(file), -1) for file in flat], None


def select_items(
    path, limit: int | None = None, shard_id: int = 0, num_shards: int = 1
) -> tuple[list[tuple[str, int]], list[str] | None]:
    """The ``(path, label)`` items a loader reads, and the classes: :func:`find_images`, then
    ``limit`` evenly spaced picks, then shard ``shard_id`` of ``num_shards`` (every loader uses
    this, so they read the same files in the same order).
    """
    if not 0 <= shard_id < num_shards:
        raise ValueError(
            f"need 0 <= shard_id < num_shards, got shard_id={shard_id}, num_shards={num_shards}"
        )
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    items, classes = find_images(path)
    if limit is not None and limit < len(items):
        # evenly spaced picks: the first `limit` files of a sorted ImageNet folder would be
        # the first few classes only
        items = [items[(k * len(items)) // limit] for k in range(limit)]
    return items[shard_id::num_shards], classes


@dataclass
class _Decoded:
    """What a worker returns for one file: a source, or the reason it was skipped."""

    path: str
    label: int
    source: torch.Tensor | None = None
    reason: str | None = None
    upscaled: bool = False


class _SourceDataset(Dataset):
    """Decodes one file into its crop-protocol source; never raises for a bad file."""

    def __init__(
        self, items: list[tuple[str, int]], preprocess: Preprocess, margin: tuple[int, int]
    ):
        self.items = items
        self.preprocess = preprocess
        self.margin = margin

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> _Decoded:
        path, label = self.items[index]
        return decode_file(path, label, self.preprocess, self.margin)


def decode_file(
    path: str, label: int, preprocess: Preprocess, margin: tuple[int, int]
) -> _Decoded:
    """One file's crop-protocol source with Pillow, or the reason it cannot be read (never
    raises for a bad file). Shared with the DALI loader, which leaves some files to Pillow."""
    try:
        if os.path.getsize(path) == 0:
            return _Decoded(path, label, reason="empty file (0 bytes)")
        with open(path, "rb") as handle:
            img = Image.open(handle)
            # decode fully inside the try: Image.open only reads the header, and truncated or
            # corrupt data shows up here
            img.load()
        img = to_rgb(img)
        plan = crop_plan((img.height, img.width), preprocess, margin)
        source = apply_crop_plan(img, preprocess, plan)
        return _Decoded(path, label, source=source, upscaled=plan.upscaled)
    except UnidentifiedImageError:
        # Pillow's own message names a file handle, not the problem
        return _Decoded(
            path,
            label,
            reason="not an image file Pillow can identify (unknown or corrupt header)",
        )
    except Exception as error:  # any decoding failure is a skipped file, never a dead run
        return _Decoded(path, label, reason=f"{type(error).__name__}: {error}")


@dataclass
class _Batch:
    """A collated batch plus what the workers skipped while building it."""

    sources: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    upscaled: int = 0

    def pin_memory(self) -> _Batch:
        # DataLoader(pin_memory=True) calls this on custom batch types
        self.sources = self.sources.pin_memory()
        self.labels = self.labels.pin_memory()
        return self


def _collate(decoded: list[_Decoded]) -> _Batch:
    good = [item for item in decoded if item.source is not None]
    skipped = [
        (item.path, item.reason or "unknown error") for item in decoded if item.source is None
    ]
    if good:
        sources = torch.stack([item.source for item in good])  # type: ignore[misc]
    else:
        sources = torch.empty(0, dtype=torch.uint8)
    labels = torch.tensor([item.label for item in good], dtype=torch.long)
    return _Batch(
        sources, labels, [item.path for item in good], skipped, sum(item.upscaled for item in good)
    )


class ImageFolderSource:
    """Batches of crop-protocol sources from an image folder or file list.

    Iterating yields ``(sources, labels, paths)``:

    * ``sources``: uint8 ``(B, 3, H + 2 * my, W + 2 * mx)``, RGB (B may be smaller than
      ``batch_size`` where files were skipped; batches whose files were all bad are not yielded);
    * ``labels``: int64 ``(B,)`` class indices, or None when the input has no labels;
    * ``paths``: the B file paths.

    Attributes:
        path: the input as given.
        preprocess: the model's preprocessing config.
        margin: ``(my, mx)``.
        classes: sorted class-folder names of an ImageNet-style folder, else None.
        skipped: ``(path, reason)`` of files that could not be read in the latest pass.
        upscaled: how many images of the latest pass had to be resized above timm's eval scale so
            that the margin fits (see ``geometry.crop_plan``).

    Args:
        path: a folder (ImageNet-style or flat), an image file, a ``.txt`` file list, or a sequence
            of paths or ``(path, label)`` pairs.
        preprocess: the model's preprocessing config.
        margin: ``(my, mx)`` (or one int): the largest shift of the group, in input pixels.
        batch_size: images per batch.
        num_workers: decoding processes; 0 decodes in the calling process. Default
            :func:`default_num_workers`.
        limit: use at most this many images, spread evenly over the sorted list (so that a
            subset of an ImageNet-style folder still covers all classes), deterministic.
        shard_id: this process's shard, for several processes (torchrun) reading one dataset.
        num_shards: number of shards; shard ``k`` takes images ``k, k + num_shards, ...``.
        pin_memory: pin batches for faster host-to-GPU copies.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: no image files there, or bad arguments.
    """

    def __init__(
        self,
        path: PathLike | Sequence[PathLike] | Sequence[tuple[PathLike, int]],
        preprocess: Preprocess,
        margin: int | tuple[int, int] = (0, 0),
        batch_size: int = 32,
        num_workers: int | None = None,
        limit: int | None = None,
        shard_id: int = 0,
        num_shards: int = 1,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers is None:
            num_workers = default_num_workers()
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.path = path
        self.preprocess = preprocess
        self.margin = as_margin(margin)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory

        items, self.classes = select_items(path, limit, shard_id, num_shards)
        self.items: list[tuple[str, int]] = items
        self.has_labels = any(label >= 0 for _, label in items)
        self.skipped: list[tuple[str, str]] = []
        self.upscaled = 0

    def __len__(self) -> int:
        """Number of image files (before any is found unreadable)."""
        return len(self.items)

    @property
    def num_batches(self) -> int:
        """Upper bound of the batches one pass yields (fewer when whole batches are skipped)."""
        return -(-len(self.items) // self.batch_size)

    @property
    def source_size(self) -> tuple[int, int]:
        """``(Hs, Ws)`` of every source."""
        return source_size(self.preprocess, self.margin)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, list[str]]]:
        self.skipped = []
        self.upscaled = 0
        if not self.items:  # an empty shard
            return
        loader = DataLoader(
            _SourceDataset(self.items, self.preprocess, self.margin),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=self.pin_memory,
        )
        for batch in loader:
            # skipped files travel inside the batch, so those found by worker processes reach
            # this (main) process's list too
            self.skipped.extend(batch.skipped)
            self.upscaled += batch.upscaled
            if not batch.paths:
                continue
            yield batch.sources, (batch.labels if self.has_labels else None), batch.paths

    def __repr__(self) -> str:
        return (
            f"ImageFolderSource({str(self.path)!r}, images={len(self)}, classes="
            f"{len(self.classes) if self.classes else None}, source_size={self.source_size}, "
            f"batch_size={self.batch_size}, num_workers={self.num_workers})"
        )


class SkippedFilesWarning(UserWarning):
    """Files of a data source that could not be read were left out of a measurement (they are
    listed in ``Result.skipped``)."""


def warn_skipped(skipped: list[tuple[str, str]], measured: int) -> None:
    """One warning for the files a measurement left out, naming the first few and why."""
    if not skipped:
        return
    shown = "; ".join(f"{path}: {why}" for path, why in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    warnings.warn(
        f"{len(skipped)} file(s) of the data source could not be read and were left out "
        f"({measured} image(s) measured; Result.skipped lists them all): {shown}{more}",
        SkippedFilesWarning,
        stacklevel=3,
    )


def no_images_message(skipped: list[tuple[str, str]]) -> str:
    """The error of a data source that gave no image: the files it skipped and why, if any."""
    if not skipped:
        return "data: no images to measure (the data source is empty)"
    shown = "; ".join(f"{path}: {why}" for path, why in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return (f"data: no images to measure: every file of the source was skipped, {len(skipped)} "
            f"in all ({shown}{more})")
