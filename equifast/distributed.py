"""Several processes on one measurement (``torchrun``; DESIGN.md section 6).

``torchrun --nproc_per_node=N -m equifast measure ...`` (or a script that calls
:func:`equifast.measure` under ``torchrun``, or under a process group the caller initialised)
splits the images between the processes and combines what they measured:

* **Shards by batch.** The images are cut into the batches one process would use, and batch ``i``
  goes to rank ``i % world`` (tensors, ``"samples"``, iterables, folders alike). A batch is the
  same batch as in one process, so the scores that pair images inside a batch (``chance``) and
  the per-batch statistics of ``pooled=True`` are the same too. A folder's ranks decode only
  their own files; an iterable is read whole by every rank (each keeps its own batches), so it
  should be cheap to read (tensors in memory); a folder is the way for big data.
* **Combines at the end.** One ``all_gather_object`` brings every rank's per-batch score arrays,
  pooled statistics, consistency / top-1 / top-5 rows, skipped files and image counts to every
  rank; they are put back in the order of the batches and scored as in one process, so every rank
  returns the same complete :class:`equifast.Result`, and its bootstrap intervals equal the
  single-process ones (the config, with the timing, is rank 0's).
* **Same model, same offsets.** The parameters and buffers are broadcast from rank 0 (as
  ``DistributedDataParallel`` does), and the alignment offsets of the ranks are compared (they are
  found with a fixed seed, so they agree; if they do not, rank 0's are used with a warning).

A process group is initialised here when the process was started by ``torchrun`` (``WORLD_SIZE >
1``) and nobody initialised one: NCCL when the device is CUDA, Gloo on the CPU; without a device,
``cuda:LOCAL_RANK`` when CUDA is present. Without ``torchrun`` and without a process group nothing
here runs: the single-process path has no collectives.

Folders read with DALI are exact too, except that DALI decodes its files in batches of its own
after dropping unreadable ones, so ``chance`` and pooled values can then differ from one process
within their uncertainty.

Example:
    torchrun --nproc_per_node=4 -m equifast measure --model resnet50 --data /imagenet/val \\
        --out results/r50.parquet
"""

from __future__ import annotations

import atexit
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

__all__ = [
    "Shard",
    "backend_for",
    "combine",
    "init",
    "is_main",
    "launch",
    "launched",
    "local_rank",
    "rank",
    "setup",
    "shard_items",
    "shutdown",
    "world_size",
]

_created = False  # whether this module initialised the process group


@dataclass(frozen=True)
class Shard:
    """This process's part of a measurement: batch ``i`` belongs to rank ``i % world``."""

    rank: int
    world: int
    device: torch.device | None = None

    def owns(self, batch_index: int) -> bool:
        return batch_index % self.world == self.rank


def _dist():
    import torch.distributed as dist

    return dist


def _initialized() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def launched() -> bool:
    """Whether ``torchrun`` (or a launcher that sets ``WORLD_SIZE``) started several processes."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def rank() -> int:
    """This process's rank: the process group's, else ``$RANK`` of a launch, else 0."""
    if _initialized():
        return _dist().get_rank()
    return int(os.environ.get("RANK", "0") or 0) if launched() else 0


def world_size() -> int:
    """Number of processes: the process group's, else ``$WORLD_SIZE`` of a launch, else 1."""
    if _initialized():
        return _dist().get_world_size()
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def local_rank() -> int:
    """This process's rank on its machine (``$LOCAL_RANK``; the CUDA device it uses)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_main() -> bool:
    """Whether this process prints and writes files (rank 0, or no several processes)."""
    return rank() == 0


def _device_for(device: str | torch.device | None) -> torch.device | None:
    """The device of this rank: none given -> ``cuda:LOCAL_RANK`` when CUDA is present (else
    ``None``: the model's); a bare ``cuda`` -> ``cuda:LOCAL_RANK``; anything else unchanged."""
    if device is None:
        return torch.device("cuda", local_rank()) if torch.cuda.is_available() else None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank())
    return device


def backend_for(device: str | torch.device | None) -> str:
    """``"nccl"`` when this rank measures on CUDA, else ``"gloo"``."""
    resolved = _device_for(device)
    return "nccl" if resolved is not None and resolved.type == "cuda" else "gloo"


def init(device: str | torch.device | None = None) -> bool:
    """Initialise the process group of a ``torchrun`` launch unless it already is.

    Returns:
        True when this call created it (then :func:`shutdown` destroys it).
    """
    global _created
    if _initialized() or not launched():
        return False
    dist = _dist()
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(_device_for(device))
    dist.init_process_group(backend)
    _created = True
    return True


def shutdown() -> None:
    """Destroy the process group if :func:`init` created it."""
    global _created
    if _created and _initialized():
        _dist().destroy_process_group()
    _created = False


@contextmanager
def launch(device: str | torch.device | None = None) -> Iterator[int]:
    """Initialise the process group of a ``torchrun`` launch for the block (if it is one and none
    is initialised), and destroy it afterwards when this created it. Yields the rank."""
    created = init(device)
    try:
        yield rank()
    finally:
        if created:
            shutdown()


def setup(distributed: bool | None, device: str | torch.device | None
          ) -> tuple[Shard | None, str | torch.device | None]:
    """Decide whether a measurement is split (``distributed``: None = when a process group of
    several ranks is initialised, or ``torchrun`` started several processes), and its device.

    Returns:
        ``(shard, device)``: ``(None, device)`` unchanged when not distributed.
    """
    if distributed is False:
        return None, device
    if not _initialized():
        if launched():
            if init(device):
                atexit.register(shutdown)
        elif distributed:
            raise ValueError(
                "distributed=True needs an initialised torch.distributed process group or a "
                "launch by torchrun (torchrun --nproc_per_node=N ...)"
            )
    if not _initialized() or _dist().get_world_size() < 2:
        return None, device
    device = _device_for(device)
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)  # object collectives on NCCL use the current device
    dist = _dist()
    return Shard(dist.get_rank(), dist.get_world_size(), device), device


def owned_images(total: int, batch_size: int, shard: Shard) -> int:
    """How many of ``total`` images (in batches of ``batch_size``) belong to ``shard``."""
    return sum(min(batch_size, total - start)
               for start in range(shard.rank * batch_size, total, shard.world * batch_size))


def shard_items(count: int, batch_size: int, shard: Shard) -> list[int]:
    """Indices of the items of the batches that belong to ``shard`` (batch ``i`` = items
    ``i * batch_size ...``), in order."""
    return [index for start in range(shard.rank * batch_size, count, shard.world * batch_size)
            for index in range(start, min(start + batch_size, count))]


def _all_gather(value: Any) -> list[Any]:
    dist = _dist()
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def total_images(have: int) -> int:
    """Sum of ``have`` over the ranks; a ValueError on every rank when it is 0."""
    total = sum(_all_gather(int(have)))
    if total == 0:
        raise ValueError("data: no images to measure (the data source is empty)")
    return total


def agree(value: Any, what: str) -> Any:
    """Rank 0's ``value``; warns when another rank computed a different one."""
    values = _all_gather(value)
    if any(repr(v) != repr(values[0]) for v in values[1:]):  # repr: NaN equals NaN
        warnings.warn(f"the ranks found different {what}; using rank 0's: {values[0]}",
                      stacklevel=2)
    return values[0]


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    box = [value]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def sync_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (one broadcast per device and dtype)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    dist = _dist()
    gloo = dist.get_backend() == "gloo"
    tensors = [t for t in list(module.parameters()) + list(module.buffers()) if t.numel()]
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    for (device, _dtype), members in groups.items():
        flat = _flatten_dense_tensors([t.detach() for t in members])
        if gloo and device.type != "cpu":
            flat = flat.cpu()
        dist.broadcast(flat, src=0)
        for tensor, synced in zip(members, _unflatten_dense_tensors(flat, members)):
            tensor.copy_(synced)


def _split(parts: Sequence[tuple]) -> list[list[tuple]]:
    """``[(lo, values, ...)]`` chunks (a chunk with ``lo == 0`` starts a batch) -> chunks per
    batch."""
    batches: list[list[tuple]] = []
    for chunk in parts:
        if chunk[0] == 0:
            batches.append([])
        batches[-1].append(chunk)
    return batches


def _rows(parts: list[dict], field: str, order: list[tuple[Any, int, int]]) -> list:
    # One row per batch on every rank (the usual case): in batch order. Otherwise (a model whose
    # output is not logits for some batches only), in rank order.
    if all(len(part[field]) == len(part["keys"]) for part in parts):
        return [parts[r][field][b] for _, r, b in order]
    return [row for part in parts for row in part[field]]


def combine(state: dict, consistency_rows: list, top_rows: list, batch_keys: Sequence[Any],
            images: int, skipped: Sequence[tuple[str, str]], skipped_keys: Sequence[Any] = ()
            ) -> tuple[int, list[tuple[str, str]]]:
    """Bring every rank's measurements to every rank, in the order of the batches.

    ``state`` (the engine's ``{layer: _Layer}``), ``consistency_rows`` and ``top_rows`` are
    replaced in place by those of all ranks; ``batch_keys`` orders this rank's batches among all
    (one key per batch, comparable across ranks), ``skipped_keys`` its skipped files.

    Returns:
        ``(images, skipped)`` of all ranks.
    """
    keys = list(batch_keys)
    local = {
        "keys": keys,
        "images": int(images),
        "skipped": list(skipped),
        "skipped_keys": list(skipped_keys) if skipped_keys else [0] * len(skipped),
        "scores": {name: {metric: _split(parts) for metric, parts in layer.scores.items()}
                   for name, layer in state.items()},
        "pooled": {name: _split(layer.pooled) for name, layer in state.items()},
        "consistency": list(consistency_rows),
        "top": list(top_rows),
    }
    for name, layer in local["scores"].items():
        for metric, batches in layer.items():
            if len(batches) != len(keys):
                raise RuntimeError(f"layer {name!r} {metric}: {len(batches)} batches recorded, "
                                   f"{len(keys)} read")
    parts = _all_gather(local)
    order = sorted((key, r, b) for r, part in enumerate(parts)
                   for b, key in enumerate(part["keys"]))
    for name, layer in state.items():
        metrics = dict.fromkeys(m for part in parts for m in part["scores"][name])
        layer.scores = {m: [chunk for _, r, b in order for chunk in parts[r]["scores"][name][m][b]]
                        for m in metrics}
        if any(part["pooled"][name] for part in parts):
            layer.pooled = [chunk for _, r, b in order for chunk in parts[r]["pooled"][name][b]]
    consistency_rows[:] = _rows(parts, "consistency", order)
    top_rows[:] = _rows(parts, "top", order)
    files = sorted((key, r, i) for r, part in enumerate(parts)
                   for i, key in enumerate(part["skipped_keys"]))
    return (sum(part["images"] for part in parts),
            [tuple(parts[r]["skipped"][i]) for _, r, i in files])
