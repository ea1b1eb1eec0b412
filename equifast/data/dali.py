"""Image folders and file lists decoded with NVIDIA DALI (DESIGN.md 5).

Same interface and geometry as :class:`equifast.data.folder.ImageFolderSource` (the Pillow
fallback): iterating yields ``(sources, labels, paths)`` with uint8 sources
``(B, 3, H + 2 * my, W + 2 * mx)``; ``len``, ``classes``, ``skipped`` and ``upscaled`` mean the
same.

Pipeline: ``fn.readers.file`` (the file list of :func:`equifast.data.folder.find_images`) ->
``fn.decoders.image`` (``device="mixed"`` with CUDA, ``"cpu"`` and ``device_id=None`` without) ->
``fn.resize`` to the exact per-image size of :func:`equifast.data.geometry.crop_plan` (timm's eval
resize, antialiased, the model's interpolation) -> ``fn.slice`` of the crop-protocol source at the
plan's offsets -> CHW uint8 -> ``DALIGenericIterator`` -> torch. The per-image sizes and offsets are
computed in Python from each file's header (read once in the constructor) and fed alongside the
reader with ``fn.external_source``, so the crop lands on the same pixels as the fallback's.

Bad files: a DALI decoding error aborts the whole pipeline, so every file is checked in the
constructor (non-empty, Pillow can identify and ``verify`` it, a JPEG ends with its EOI marker).
Files that fail are listed in ``skipped`` with the reason on every pass. Files DALI does not decode
to 8-bit RGB the way Pillow's loaders do (16/32-bit and float images, palette images with
transparency, anything not JPEG/PNG/BMP/PNM/TIFF/WebP in a plain mode) are decoded with Pillow
(:func:`equifast.data.folder.decode_file`) in their places. Should DALI still fail on a file during
a pass, the rest of the pass is finished by Pillow (never a dead run).

Batches: the fallback's, whichever decoder reads a file. Batch ``i`` holds the files
``i * batch_size`` to ``(i + 1) * batch_size`` of the sorted list that can be read, in that order
(fewer where files are skipped). The chance comparison pairs each image with the next one of its
batch, so only the same grouping compares the same images as ``loader="folder"`` and
``equifast.naive``. The pixels still differ: DALI's resize rounds apart from Pillow's (about 15%
of the pixels by one level, up to 20 of 255 at sharp edges), which moves scores by about 1e-3;
hence ``loader="auto"`` decodes with DALI only for a CUDA engine.

Sharding is done here, as in the fallback: shard ``k`` takes images ``k, k + num_shards, ...``;
each process's DALI reader reads only its shard's files.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from equifast.data.folder import PathLike, decode_file, default_num_workers, select_items
from equifast.data.geometry import Preprocess, as_margin, crop_plan, source_size

__all__ = ["DaliFolderSource", "dali_available"]

# Pillow modes DALI's decoder turns into the same 8-bit RGB as ``geometry.to_rgb``
_DALI_MODES = {"RGB", "L", "RGBA", "LA", "CMYK", "YCbCr", "P", "1"}
_DALI_FORMATS = {"JPEG", "PNG", "BMP", "PPM", "TIFF", "WEBP"}


def dali_available() -> bool:
    """Whether ``nvidia.dali`` imports."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no DALI"
        return False
    return True


def _check_file(path: str) -> tuple[str, tuple[int, int] | None, str | None]:
    """``(route, (H, W), reason)``: route 'dali', 'pil' or 'skip' (then reason says why)."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "skip", None, "empty file (0 bytes)"
        with open(path, "rb") as handle:
            img = Image.open(handle)
            fmt, mode, (w, h) = img.format, img.mode, img.size
            transparent_palette = mode == "P" and "transparency" in img.info
            img.verify()
            if fmt == "JPEG":
                handle.seek(max(0, size - 64))
                if b"\xff\xd9" not in handle.read():
                    return "skip", None, "truncated or corrupt JPEG (no end-of-image marker)"
    except UnidentifiedImageError:
        return "skip", None, "not an image file Pillow can identify (unknown or corrupt header)"
    except Exception as error:  # noqa: BLE001 - a bad file is skipped, never a dead run
        return "skip", None, f"{type(error).__name__}: {error}"
    if fmt in _DALI_FORMATS and mode in _DALI_MODES and not transparent_palette:
        return "dali", (h, w), None
    return "pil", (h, w), None


class DaliFolderSource:
    """Batches of crop-protocol sources decoded by DALI; see the module docstring.

    Args:
        path: a folder (ImageNet-style or flat), an image file, a ``.txt`` file list, or a sequence
            of paths or ``(path, label)`` pairs (as :func:`equifast.data.folder.find_images`).
        preprocess: the model's preprocessing config.
        margin: ``(my, mx)`` (or one int): the largest shift of the group, in input pixels.
        batch_size: images per batch.
        num_workers: DALI CPU threads. Default :func:`equifast.data.folder.default_num_workers`.
        limit: at most this many images, spread evenly over the sorted list (as the fallback).
        shard_id: this process's shard.
        num_shards: number of shards; shard ``k`` takes images ``k, k + num_shards, ...``.
        device: None (CUDA when available), 'cpu' or 'cuda[:i]': where DALI decodes.

    Raises:
        ImportError: DALI is not installed.
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
        device: str | torch.device | None = None,
    ) -> None:
        if not dali_available():
            raise ImportError(
                "NVIDIA DALI is not installed (pip install nvidia-dali-cuda130); use "
                "equifast.data.folder.ImageFolderSource or loader='folder'"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers is None:
            num_workers = default_num_workers()
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available")

        self.path = path
        self.preprocess = preprocess
        self.margin = as_margin(margin)
        self.batch_size = batch_size
        self.num_workers = num_workers

        items, self.classes = select_items(path, limit, shard_id, num_shards)
        self.items: list[tuple[str, int]] = items
        self.has_labels = any(label >= 0 for _, label in items)

        self._bad: list[tuple[str, str]] = []
        self._dali: list[tuple[str, int]] = []  # (path, label) decoded by DALI
        self._plans = []  # their crop plans
        self._pil: list[tuple[str, int]] = []  # decoded by Pillow
        for file, label in items:
            route, hw, reason = _check_file(file)
            if route == "skip":
                self._bad.append((file, reason or "unknown error"))
            elif route == "pil":
                self._pil.append((file, label))
            else:
                self._dali.append((file, label))
                self._plans.append(crop_plan(hw, preprocess, self.margin))  # type: ignore[arg-type]
        self.skipped: list[tuple[str, str]] = list(self._bad)
        self.upscaled = 0

    def __len__(self) -> int:
        """Number of image files (bad ones included, as the fallback)."""
        return len(self.items)

    @property
    def num_batches(self) -> int:
        """Upper bound of the batches one pass yields (fewer when whole batches are skipped)."""
        return -(-len(self.items) // self.batch_size)

    @property
    def source_size(self) -> tuple[int, int]:
        """``(Hs, Ws)`` of every source."""
        return source_size(self.preprocess, self.margin)

    def _pipeline(self):
        from nvidia.dali import fn, pipeline_def, types

        plans, batch = self._plans, self.batch_size
        count = len(plans)
        n_batches = -(-count // batch)
        src_h, src_w = self.source_size

        def params(iteration: int):
            # the reader pads the last batch with its last file: pad the parameters alike; the
            # iterator may prefetch into the next epoch, which starts at file 0 again
            start = (iteration % n_batches) * batch
            rows = [plans[min(start + k, count - 1)] for k in range(batch)]
            sizes = [np.array(p.resize_hw, dtype=np.float32) for p in rows]
            anchors = [np.array((p.top, p.left), dtype=np.float32) for p in rows]
            return sizes, anchors

        interp = {
            "nearest": types.INTERP_NN,
            "bilinear": types.INTERP_LINEAR,
            "bicubic": types.INTERP_CUBIC,
            "lanczos": types.INTERP_LANCZOS3,
            "box": types.INTERP_TRIANGULAR,
            "hamming": types.INTERP_TRIANGULAR,
        }[self.preprocess.interpolation]
        cuda = self.device.type == "cuda"

        @pipeline_def(
            batch_size=batch,
            num_threads=max(1, self.num_workers),
            device_id=(self.device.index or 0) if cuda else None,
            prefetch_queue_depth=2,
            exec_dynamic=False,
        )
        def pipe():
            jpegs, index = fn.readers.file(
                files=[file for file, _ in self._dali],
                labels=list(range(count)),
                random_shuffle=False,
                pad_last_batch=True,
                name="reader",
            )
            sizes, anchors = fn.external_source(
                source=params, num_outputs=2, batch=True
            )
            images = fn.decoders.image(
                jpegs,
                device="mixed" if cuda else "cpu",
                output_type=types.RGB,
                adjust_orientation=False,  # Pillow (the fallback, timm) ignores EXIF orientation
            )
            # sizes and anchors stay CPU: fn.resize's size is an argument input and fn.slice takes
            # its anchor/shape from the CPU even for GPU data
            images = fn.resize(
                images,
                size=sizes,
                mode="default",
                interp_type=interp,
                antialias=True,
            )
            images = fn.slice(
                images,
                anchors,
                np.array((src_h, src_w), dtype=np.float32),
                axis_names="HW",
                normalized_anchor=False,
                normalized_shape=False,
                out_of_bounds_policy="trim_to_shape",
            )
            # uint8 throughout: fn.resize rounds to nearest and saturates, like Pillow's
            images = fn.transpose(images, perm=[2, 0, 1])
            return images, index

        return pipe()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, list[str]]]:
        # The batches are those of the Pillow fallback: slices of ``batch_size`` files of the
        # sorted list, less the files that cannot be read, with the files DALI does not decode
        # taken by Pillow in their places. The chance comparison pairs each image with the next
        # one of its batch, so both loaders (and equifast.naive, which always reads with Pillow)
        # must group the same images in the same order to give the same scores.
        self.skipped = []
        self.upscaled = 0
        route = {file: "skip" for file, _ in self._bad}
        route.update((file, "pil") for file, _ in self._pil)
        route.update((file, "dali") for file, _ in self._dali)
        reason = dict(self._bad)
        decoded = self._dali_images()
        src_h, src_w = self.source_size
        for lo in range(0, len(self.items), self.batch_size):
            rows: list[tuple[str, int]] = []
            images: list[torch.Tensor] = []
            for file, label in self.items[lo : lo + self.batch_size]:
                if route[file] == "skip":
                    self.skipped.append((file, reason[file]))
                    continue
                image = next(decoded) if route[file] == "dali" else None
                if image is None:  # a Pillow file, or DALI gave up before this one
                    item = decode_file(file, label, self.preprocess, self.margin)
                    if item.source is None:
                        self.skipped.append((file, item.reason or "unknown error"))
                        continue
                    image = item.source
                    self.upscaled += item.upscaled
                rows.append((file, label))
                images.append(image)
            if not rows:
                continue
            sources = torch.empty(
                (len(rows), 3, src_h, src_w), dtype=torch.uint8, device=self.device
            )
            for i, image in enumerate(images):
                sources[i].copy_(image)
            labels = torch.tensor([label for _, label in rows], dtype=torch.long)
            yield sources, (labels if self.has_labels else None), [file for file, _ in rows]

    def _dali_images(self) -> Iterator[torch.Tensor | None]:
        """The DALI-routed files' sources, one by one in list order; ``None`` for each file left
        once DALI has failed (those are decoded with Pillow by the caller), forever after the
        last one."""
        done = 0
        if self._dali:
            from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

            try:
                pipe = self._pipeline()
                pipe.build()
                iterator = DALIGenericIterator(
                    pipe,
                    ["images", "index"],
                    reader_name="reader",
                    last_batch_policy=LastBatchPolicy.PARTIAL,
                    auto_reset=False,
                )
                for out in iterator:
                    images = out[0]["images"]
                    index = out[0]["index"].view(-1).long().tolist()
                    if index != list(range(done, done + len(index))):
                        raise RuntimeError(f"DALI returned files out of order: {index[:4]}...")
                    self.upscaled += sum(self._plans[i].upscaled for i in index)
                    for i in range(len(index)):
                        done += 1
                        yield images[i]
            except (RuntimeError, StopIteration) as error:
                if "out of order" in str(error):
                    raise
                # a file passed the checks but DALI could not decode it: finish with Pillow
                rest = len(self._dali) - done
                if rest:
                    first_line = str(error).splitlines()[0] if str(error) else ""
                    warnings.warn(
                        f"DALI failed after {done} images ({type(error).__name__}: {first_line}); "
                        f"decoding the remaining {rest} with Pillow",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        while True:
            yield None

    def __repr__(self) -> str:
        return (
            f"DaliFolderSource({str(self.path)!r}, images={len(self)}, classes="
            f"{len(self.classes) if self.classes else None}, source_size={self.source_size}, "
            f"batch_size={self.batch_size}, num_workers={self.num_workers}, "
            f"device={str(self.device)!r})"
        )
