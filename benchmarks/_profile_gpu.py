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

DEVICE = "cuda"  # of the named cases (a CPU dry run sets "cpu")


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


def compare_scoring(model_name: str, group: str, layers: str | None, images: int, batch: int,
                    rounds: int = 3) -> None:
    """The loop's time with the layers of a forward scored together and one by one, alternately."""
    import equifast
    from equifast import engine

    device = torch.device("cuda")
    case = dict(model=model_name, group=group, layers=layers, images=images, size=224, batch=batch)
    model, sources = e2e.build(case, seed=0)
    kwargs = e2e.measure_kwargs(case, device)
    equifast.measure(model, sources[:batch], **kwargs)
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for _ in range(rounds):
            for together in (True, False):
                engine._SCORE_LAYERS_TOGETHER = together
                torch.cuda.synchronize()
                result = equifast.measure(model, sources, **kwargs)
                torch.cuda.synchronize()
                times[together].append(result.config["timings"]["batches"])
    finally:
        engine._SCORE_LAYERS_TOGETHER = None
    median = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    print(f"--- scoring {model_name} {group} layers={layers or 'default'}: loop over batches "
          f"together {median[True]:.1f} ms, one by one {median[False]:.1f} ms "
          f"({median[False] / median[True]:.2f}x)")


def profile_floor(model_name: str, group: str, layers: str | None, images: int,
                  batch: int) -> None:
    """The bare forwards of the engine's plan for the same case (bench_end_to_end's floor)."""
    import equifast

    device = torch.device(DEVICE)
    case = dict(model=model_name, group=group, layers=layers, images=images, size=224, batch=batch)
    model, sources = e2e.build(case, seed=0)
    model = model.to(device)
    kwargs = e2e.measure_kwargs(case, device)
    result = equifast.measure(model, sources[:batch], **kwargs)
    count = len(e2e.make_group(group).elements)
    floors = e2e.floor_plans(model, case, int(result.config["elements_per_chunk"]),
                             int(result.config["blocks_per_forward"]), count, device)
    name, fn = next((k, v) for k, v in floors.items() if k.startswith("engine"))
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    plain = time.perf_counter() - start
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"=== floor {name} of {model_name} {group}: {images} images, batch {batch}: "
          f"{plain * 1e3:.1f} ms")
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60))


def loop_time(model_name: str, group: str, layers: str | None, images: int, batch: int) -> None:
    """The engine's loop over the batches (config timings) beside the whole call, three times."""
    import equifast

    device = torch.device(DEVICE)
    case = dict(model=model_name, group=group, layers=layers, images=images, size=224, batch=batch)
    model, sources = e2e.build(case, seed=0)
    kwargs = e2e.measure_kwargs(case, device)
    equifast.measure(model, sources[:batch], **kwargs)
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = equifast.measure(model, sources, **kwargs)
        torch.cuda.synchronize()
        whole = time.perf_counter() - start
        timings = {k: round(v * 1e3, 1) for k, v in result.config["timings"].items()
                   if isinstance(v, float)}
        print(f"--- {model_name} {group}: whole {whole * 1e3:.1f} ms, timings (ms) {timings}")


def parse_case(text: str) -> tuple:
    """``model:group:layers:images:batch`` (layers ``default`` for the stage outputs)."""
    model_name, group, layers, images, batch = text.split(":")
    return model_name, group, None if layers == "default" else layers, int(images), int(batch)


def main() -> None:
    if len(sys.argv) > 1:  # profile the cases named, each with its floor
        for text in sys.argv[1:]:
            case = parse_case(text)
            for fn in (loop_time, profile_case, profile_floor):
                try:
                    fn(*case)
                except Exception as error:  # a diagnostic: report and go on
                    print(f"{text} {fn.__name__}: {type(error).__name__}: {error}")
        return
    for case in [("resnet18", "translation", "leaves", 128, 128),
                 ("vit_tiny_patch16_224", "translation", None, 512, 128),
                 ("resnet18", "translation", None, 512, 128)]:
        try:
            compare_scoring(*case)
        except Exception as error:  # a diagnostic: report and go on
            print(f"{case}: {type(error).__name__}: {error}")
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
