"""End-to-end benchmark: ``equifast.measure`` against the naive loop ``equifast.naive.measure``.

For timm models with random init (``resnet18``, ``convnext_atto``, ``vit_tiny_patch16_224``), the
same uint8 sources and the groups ``Translation()`` (8, 16, 32 px along each axis, crop protocol)
and ``Rotation()`` (90, 180, 270 degrees), each case

1. runs ``equifast.measure`` and ``equifast.naive.measure`` with identical arguments
   (``progress=False``, ``bootstrap=0``, the same batch size, the default dtype and memory format of
   the device, which both share: float32 NCHW on the CPU, bfloat16 autocast channels-last on CUDA)
   and checks that their ``value`` columns agree (merged on layer / element / comparison / metric;
   largest absolute difference of ``corr`` below ``1e-3``);
2. times both (warm-up, then ``repeats`` interleaved rounds) and reports images/s (median) and
   the ratio (median over the rounds of the ratio within a round);
3. measures the peak memory of each: on the CPU the growth of the peak RSS of a fresh ``spawn``
   subprocess per variant (peak resident size ``VmHWM`` after the measurement minus the resident
   size just before it, model and data already built); on CUDA ``torch.cuda.max_memory_allocated``
   above the memory allocated before, each variant in turn in the benchmark's process;
4. times the *floor* in the same rounds: bare forwards (no hooks, ``inference_mode``) of the
   ``(K + 1) * B`` stacked images of every batch, over several chunkings (one element block per
   forward, the engine's chunking, everything at once); the fastest is the floor and
   ``overhead`` is equifast's time over it; ``overhead_steady`` is the time of equifast's loop
   over the batches (its ``config["timings"]``) over it, with the fixed per-call cost (setup,
   probe, frame) apart. Both are medians of per-round ratios: this machine's speed drifts by
   more than the overheads measured, so each ratio compares runs made side by side. On the CPU
   the agreement run and the rounds run under a pinned glibc heap (``--heap``, default
   ``reused``; ``common.cpu_heap``): left to glibc, a forward's page faults depend on what the
   variant before it left free.

``resnet18`` is measured in both layer modes: the default stage outputs and ``layers="leaves"``.

Output: ``<out>/end_to_end.json`` (rewritten after every case, ``"complete"`` once all ran) and a
table on stdout. Method: ``benchmarks/README.md``.

    .venv/bin/python benchmarks/bench_end_to_end.py --device cpu      # about 8 min on 2 cores
    .venv/bin/python benchmarks/bench_end_to_end.py --quick --models resnet18 --out /tmp/b
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODELS = ("resnet18", "convnext_atto", "vit_tiny_patch16_224")
GROUPS = ("translation", "rotation")
TOLERANCE = 1e-3
TARGETS = {"overhead_pct_max": 15.0, "speedup_min": 1.5, "memory_below_naive": True}


# --------------------------------------------------------------------------------------------------
# Cases


def make_group(name: str):
    import equifast

    return {"translation": equifast.Translation, "rotation": equifast.Rotation}[name]()


def make_model(name: str, size: int, seed: int) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    kwargs = {"img_size": size} if name.startswith("vit") else {}
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def make_sources(count: int, size: int, margin: tuple[int, int], seed: int) -> torch.Tensor:
    """uint8 crop-protocol sources: the model input plus ``margin`` on each side."""
    generator = torch.Generator().manual_seed(seed)
    shape = (count, 3, size + 2 * margin[0], size + 2 * margin[1])
    return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)


def measure_kwargs(case: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The arguments both loops get (dtype / memory format: the device defaults, shared by both)."""
    return dict(
        group=make_group(case["group"]),
        layers=case["layers"],
        batch_size=case["batch"],
        device=str(device),
        input_size=(case["size"], case["size"]),
        bootstrap=0,
        progress=False,
        seed=0,
    )


def build(case: dict[str, Any], seed: int):
    group = make_group(case["group"])
    margin = group.margin(case["size"], case["size"])
    model = make_model(case["model"], case["size"], seed)
    sources = make_sources(case["images"], case["size"], margin, seed)
    return model, sources


def run_variant(variant: str, model, sources, case, device):
    import equifast
    from equifast import naive

    fn = equifast.measure if variant == "equifast" else naive.measure
    return fn(model, sources, **measure_kwargs(case, device))


# --------------------------------------------------------------------------------------------------
# Correctness


def compare(fast, slow) -> dict[str, Any]:
    """The row-by-row check of ``equifast bench`` (equifast.bench.agreement) at ``TOLERANCE``."""
    from dataclasses import asdict

    from equifast.bench import agreement

    return asdict(agreement(fast, slow, TOLERANCE))


# --------------------------------------------------------------------------------------------------
# Memory: a fresh process per variant


def measure_cuda_memory(case, device, seed) -> dict[str, dict[str, Any]]:
    """Peak CUDA memory of each variant, in this process: ``max_memory_allocated`` counts what
    each run allocates above what was allocated before it, whatever ran earlier (no new process
    and CUDA context per variant, which costs about ten seconds each)."""
    found: dict[str, dict[str, Any]] = {}
    model, sources = build(case, seed)
    model = model.to(device)
    for variant in ("equifast", "naive"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_variant(variant, model, sources, case, device)
        torch.cuda.synchronize()
        found[variant] = {"cuda_peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20}
    return found


def measure_memory(case, device, seed, threads) -> dict[str, dict[str, Any]]:
    """Peak memory of each variant: on the CPU each in its own freshly spawned process, run side
    by side (equifast.bench.peak_memory, at this process's torch threads); on CUDA in this
    process."""
    if torch.device(device).type == "cuda":
        return measure_cuda_memory(case, torch.device(device), seed)
    from equifast.bench import peak_memory

    model, sources = build(case, seed)
    return peak_memory(model, sources, timeout=600, **measure_kwargs(case, device))


# --------------------------------------------------------------------------------------------------
# The floor: bare forwards of the stacked images


def floor_plans(model, config: dict[str, Any]) -> dict[str, Any]:
    """Bare forwards of all ``(K + 1) * B`` images of the run, over several chunkings, as the
    engine ran the model (its result ``config``: device, dtype or autocast, memory format).

    Returns ``{chunking: fn}``, each ``fn`` running every batch's forwards once.
    """
    from equifast.bench import batch_sizes, floor_forwards, floor_plan, forward_blocks
    from equifast.models import input_channels

    count = len(config["elements"])
    # The engine's own plan: at most `chunk` elements and `blocks` blocks per forward, the
    # identity block with the first, the blocks spread evenly (the identity features are kept,
    # not recomputed).
    blocks, batches = forward_blocks(config), batch_sizes(config)
    plans = {
        f"engine ({' + '.join(map(str, blocks))} blocks)": floor_plan(config),
        "1 block/forward": [[b] * (count + 1) for b in batches],
    }
    if all(n == 1 for n in blocks):  # the engine's plan is one block per forward
        del plans["1 block/forward"]
    if len(blocks) > 1:
        plans[f"{count + 1} blocks/forward (all at once)"] = [[(count + 1) * b] for b in batches]
    channels = input_channels(model)
    return {k: floor_forwards(model, config, channels, plan) for k, plan in plans.items()}


# --------------------------------------------------------------------------------------------------
# Driver


def agree_and_time(row, model, sources, case, device, args, sync):
    """The agreement run of both loops (also their warm-up), then the timed rounds of the two
    loops and the floors. Fills ``row`` with the check and the plan; returns ``(timed, phases,
    floors)``, or ``(None, None, None)`` when the loops disagree (nothing is timed then)."""
    fast = run_variant("equifast", model, sources, case, device)
    slow = run_variant("naive", model, sources, case, device)
    check = compare(fast, slow)
    row["check"] = check
    count = len(make_group(case["group"]).elements)
    chunk = int(fast.config["elements_per_chunk"])
    blocks = int(fast.config["blocks_per_forward"])
    row.update(elements=count, elements_per_chunk=chunk, blocks_per_forward=blocks,
               layers_measured=int(fast.frame["layer"].nunique()))
    print(f"   check: {'ok' if check['passed'] else 'FAIL'} "
          f"(max |diff| corr {check['max_abs_diff_corr']:.2e}, {check['rows']} rows)", flush=True)
    if not check["passed"]:
        return None, None, None

    phases: list[dict[str, float]] = []  # equifast's own split of each timed call

    def run_equifast():
        phases.append(run_variant("equifast", model, sources, case, device).config["timings"])

    # The agreement check above ran both loops once: it is the warm-up (plus `warmup` more). The
    # floors run in the same rounds (equifast, naive, each floor, then again): the machine's
    # speed drifts by more than the overheads measured here, so every ratio compares runs made
    # side by side.
    floors = floor_plans(model, fast.config)
    if args.warmup <= 0:  # the floors' own warm-up (allocator, one-time kernel choices)
        for fn in floors.values():
            fn()
    if row["heap"] == "reused":
        # The agreement runs were the loops' warm-up (their second calls take a few dozen page
        # faults where the first took 25 000, convnext_atto); the floors' forwards run until
        # their buffers land on pages kept from the calls before (common.settle_heap).
        row["heap_settle"] = common.settle_heap(floors, max_rounds=8, sync=sync)
    timed = common.time_interleaved(
        {
            "equifast": run_equifast,
            "naive": lambda: run_variant("naive", model, sources, case, device),
            **{f"floor: {k}": fn for k, fn in floors.items()},
        },
        warmup=args.warmup, repeats=args.repeats, sync=sync,
        # "fresh": the free chunks the last call left go back to the kernel as well
        before_each=common.release_free_memory if row["heap"] == "fresh" else None,
    )
    return timed, phases, floors


def run_case(case, device, args, sync) -> dict[str, Any]:
    row: dict[str, Any] = dict(case)
    label = f"{case['model']} {case['group']} layers={case['layers'] or 'default'}"
    print(f"-- {label}: {case['images']} images {case['size']}px, batch {case['batch']}",
          flush=True)
    t0 = time.perf_counter()
    model, sources = build(case, args.seed)
    model = model.to(device)
    # The agreement runs and the timed rounds share one pinned heap (CPU): the agreement runs
    # are then also the heap's warm-up.
    heap = None if args.heap == "default" else args.heap  # "default" on a GPU (main)
    with common.cpu_heap(heap) as pinned:
        row["heap"] = heap if pinned else "default"
        timed, phases, floors = agree_and_time(row, model, sources, case, device, args, sync)
    if timed is None:
        return row
    row["equifast_time"], row["naive_time"] = timed["equifast"], timed["naive"]
    timed_phases = phases[-args.repeats:]
    row["equifast_phases"] = {
        key: statistics.median(p[key] for p in timed_phases) for key in timed_phases[0]
    }
    # Fixed per call (model setup, layout / alignment probe, the frame) versus the loop over the
    # batches, which grows with the images.
    row["fixed_seconds"] = row["equifast_phases"]["setup"] + row["equifast_phases"]["frame"]
    row["batches_seconds"] = row["equifast_phases"]["batches"]
    n = case["images"]
    row["equifast_images_per_s"] = n / timed["equifast"]["median"]
    row["naive_images_per_s"] = n / timed["naive"]["median"]
    row["speedup"] = paired_median(timed["naive"]["times"], timed["equifast"]["times"])

    # The loops above ran the model on the shapes of the engine's and the naive chunkings.
    row["floor_times"] = {k: timed[f"floor: {k}"] for k in floors}
    best = min(floors, key=lambda k: row["floor_times"][k]["median"])
    floor = row["floor_times"][best]
    row["floor_chunking"] = best
    row["floor_time"] = floor["median"]
    row["overhead_pct"] = 100 * (paired_median(timed["equifast"]["times"], floor["times"]) - 1)
    # Steady state: the per-image loop (transform, forward, statistics, scores) over the floor.
    row["overhead_steady_pct"] = 100 * (
        paired_median([p["batches"] for p in timed_phases], floor["times"]) - 1)
    engine_floor = next(v for k, v in row["floor_times"].items() if k.startswith("engine"))
    row["overhead_vs_engine_chunking_pct"] = 100 * (
        paired_median(timed["equifast"]["times"], engine_floor["times"]) - 1)

    if not args.no_memory:
        memory = measure_memory(case, device, args.seed, torch.get_num_threads())
        key = "cuda_peak_mib" if device.type == "cuda" else "rss_peak_growth_mib"
        row["memory"] = memory
        row["memory_kind"] = key
        row["equifast_peak_mib"] = memory.get("equifast", {}).get(key)
        row["naive_peak_mib"] = memory.get("naive", {}).get(key)
    e, nv = row.get("equifast_peak_mib"), row.get("naive_peak_mib")
    row["targets"] = {
        "overhead_ok": row["overhead_steady_pct"] <= TARGETS["overhead_pct_max"],
        "overhead_total_ok": row["overhead_pct"] <= TARGETS["overhead_pct_max"],
        "speedup_ok": row["speedup"] >= TARGETS["speedup_min"],
        "memory_ok": None if e is None or nv is None else e < nv,
    }
    print(f"   equifast {row['equifast_images_per_s']:.2f} img/s, naive "
          f"{row['naive_images_per_s']:.2f} img/s ({row['speedup']:.2f}x); floor "
          f"{common.format_seconds(row['floor_time'])} [{best}], overhead "
          f"{row['overhead_pct']:.1f}% (steady {row['overhead_steady_pct']:.1f}%, fixed "
          f"{common.format_seconds(row['fixed_seconds'])}); peak MiB equifast "
          f"{e if e is None else round(e)} "
          f"naive {nv if nv is None else round(nv)}  ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    return row


render_rows = common.render_end_to_end_rows


def paired_median(numerators: list[float], denominators: list[float]) -> float:
    """Median of the ratios of times measured in the same round (``time_interleaved``)."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = common.build_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated timm names")
    parser.add_argument("--groups", default=",".join(GROUPS), help="translation,rotation")
    parser.add_argument("--images", type=int, default=None,
                        help="images per case (default 64 on the CPU, 4 with --quick, 512 CUDA)")
    parser.add_argument("--leaves-images", type=int, default=None,
                        help="images of the layers='leaves' case (default: --images; 24 on the "
                             "CPU, where its naive loop takes about 5 s per 8 images; 128 CUDA)")
    parser.add_argument("--size", type=int, default=None,
                        help="input size in px (default 112 on the CPU, 64 with --quick, 224 CUDA)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size of both loops (default 8 on the CPU, 4 quick, 128 CUDA)")
    parser.add_argument("--no-leaves", action="store_true", help="skip resnet18 layers='leaves'")
    parser.add_argument("--heap", choices=(*common.HEAP_MODES, "default"), default="reused",
                        help="how glibc's malloc serves large buffers while the CPU cases run "
                             "(common.cpu_heap): 'reused' (default) keeps freed pages for the "
                             "next call, 'fresh' maps them anew each time, 'default' leaves "
                             "glibc's moving threshold, which lets the heap state left by one "
                             "variant change the next one's time")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory runs (a subprocess per variant on the CPU)")
    args = parser.parse_args(argv)
    device = common.setup_run(args)
    cuda = device.type == "cuda"
    if args.quick:
        defaults = dict(images=4, size=64, batch=4, warmup=0, repeats=1)
    elif cuda:
        # Batches of 128 (the engine stacks (K + 1) * 128 images per forward); 512 images keep
        # the fixed per-call cost a small part; the leaves case's naive loop runs about 25 img/s.
        defaults = dict(images=512, size=224, batch=128, warmup=1, repeats=3, leaves_images=128)
    else:
        defaults = dict(images=64, size=112, batch=8, warmup=0, repeats=3, leaves_images=24)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    sync = common.synchronizer(device)
    if device.type != "cpu":
        args.heap = "default"  # glibc's heap holds no activations on a GPU: nothing to pin

    cases = []
    for model in [m for m in args.models.split(",") if m]:
        for group in [g for g in args.groups.split(",") if g]:
            base = dict(model=model, group=group, images=args.images, size=args.size,
                        batch=args.batch)
            cases.append(dict(base, layers=None))
            if model == "resnet18" and group == "translation" and not args.no_leaves:
                cases.append(dict(base, layers="leaves",
                                  images=args.leaves_images or args.images))

    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for case in cases:
        rows.append(run_case(case, device, args, sync))
        # Written after every case: a run stopped by a time limit keeps the cases it finished.
        path = common.write_result(args.out, "end_to_end",
                                   payload_of(rows, args, device, start, len(cases)))
    payload = payload_of(rows, args, device, start, len(cases))
    path = common.write_result(args.out, "end_to_end", payload)
    print()
    print(render_rows(rows))
    print(f"\nwrote {path} ({payload['total_seconds']:.0f} s)")
    if common.is_under_results(args.out) and not args.no_readme:
        common.update_readme_table()
    return 0 if all(r["check"]["passed"] for r in rows) else 1


def payload_of(rows, args, device, start: float, planned: int) -> dict[str, Any]:
    return {
        "benchmark": "end_to_end",
        "schema_version": common.SCHEMA_VERSION,
        "quick": args.quick,
        "complete": len(rows) == planned,
        "cases_planned": planned,
        "settings": {k: getattr(args, k) for k in ("images", "leaves_images", "size", "batch",
                                                    "warmup", "repeats", "seed", "heap")},
        "targets": TARGETS,
        "method": ("same arguments for both loops (bootstrap=0, progress=False, same batch, the "
                   "device's default dtype / memory format); naive: one forward per element, "
                   "batched over the images, inference_mode, float64 stats; times: median of "
                   "interleaved repeats after the agreement run (and `warmup` runs); fixed: "
                   "equifast's own split of its calls (config['timings']: setup + frame), steady "
                   "overhead: its loop over the batches over the floor; memory: peak RSS growth "
                   "(VmHWM - VmRSS before) of a fresh spawn process per variant (CPU) or "
                   "max_memory_allocated (CUDA); floor: fastest bare forward of the (K+1)*B "
                   "stacked images over the chunkings tried; CPU: agreement run and timed rounds "
                   "under a pinned glibc heap (settings.heap, each row's `heap`; the memory "
                   "runs keep glibc's defaults)"),
        "rows": rows,
        "total_seconds": time.perf_counter() - start,
        "meta": common.collect_metadata(device),
    }


if __name__ == "__main__":
    sys.exit(main())
