"""Where equifast's time goes on a GPU: torch profiler over one equifast.measure call per case.

Not a benchmark (no JSON): a diagnostic for gpu-check sessions. Prints the top ops by device time
and by host time, so the engine's own share (stats, scores, cat, transforms) can be read beside
the model's forward.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_end_to_end as e2e  # noqa: E402


def profile_case(model_name: str, group: str, layers: str | None, images: int, batch: int) -> None:
    import equifast

    device = torch.device("cuda")
    case = dict(model=model_name, group=group, layers=layers, images=images, size=224, batch=batch)
    model, sources = e2e.build(case, seed=0)
    kwargs = e2e.measure_kwargs(case, device)
    equifast.measure(model, sources[:batch], **kwargs)  # warm-up: model on device, caches
    torch.cuda.synchronize()
    start = time.perf_counter()
    equifast.measure(model, sources, **kwargs)
    torch.cuda.synchronize()
    plain = time.perf_counter() - start
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        equifast.measure(model, sources, **kwargs)
        torch.cuda.synchronize()
    print(f"=== {model_name} {group} layers={layers or 'default'}: {images} images, "
          f"batch {batch}: {plain * 1e3:.1f} ms")
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=16, max_name_column_width=60))


def main() -> None:
    cases = [
        ("vit_tiny_patch16_224", "translation", None, 256, 128),
        ("resnet18", "translation", None, 256, 128),
        ("resnet18", "translation", "leaves", 64, 32),
    ]
    for case in cases:
        try:
            profile_case(*case)
        except Exception as error:  # a diagnostic: report and go on
            print(f"{case}: {type(error).__name__}: {error}")


if __name__ == "__main__":
    main()
