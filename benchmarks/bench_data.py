"""Benchmark of the data loaders: DALI (``equifast.data.dali``) against the Pillow fallback.

A generated folder of JPEGs (200 of 500x375, quality 90, made from the embedded sample photographs,
in 4 class folders) is read into crop-protocol sources for a 224 px model with a 32 px margin
(uint8 ``(B, 3, 288, 288)``, batch 32): one timed call is one full pass over the folder. Both
loaders use the same number of threads / worker processes (``--workers``, default 2). The check
first compares the two loaders' sources (same files, same order, mean absolute difference < 1 on
0..255). DALI decodes on the CPU unless ``--device cuda`` (then ``mixed``).

Usage::

    python benchmarks/bench_data.py --device cpu        # -> benchmarks/results/cpu/data.json
    python benchmarks/bench_data.py --quick --out /tmp/x

Without DALI installed only the fallback is timed (``"dali": null``).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (also puts the repository on sys.path)

from equifast.data.dali import DaliFolderSource, dali_available  # noqa: E402
from equifast.data.folder import ImageFolderSource  # noqa: E402
from equifast.data.geometry import Preprocess  # noqa: E402
from equifast.data.samples import load_sample_image, sample_names  # noqa: E402


def make_folder(root: Path, count: int, size=(500, 375), classes: int = 4) -> None:
    names = sample_names()
    photos = [load_sample_image(n).convert("RGB").resize(size) for n in names]
    for k in range(count):
        folder = root / f"class_{k % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        photos[k % len(photos)].save(folder / f"img_{k:04d}.jpg", quality=90)


def _pass(source) -> int:
    return sum(int(sources.shape[0]) for sources, _, _ in source)


def main(argv=None) -> int:
    parser = common.build_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="JPEGs in the folder (200)")
    parser.add_argument("--workers", type=int, default=2, help="threads / workers (default 2)")
    args = parser.parse_args(argv)
    device = common.setup_run(args)
    count = args.images or (24 if args.quick else 200)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    pre = Preprocess((224, 224))
    margin, batch = 32, 32
    sync = common.synchronizer(device)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_folder(root, count)
        pil = ImageFolderSource(root, pre, margin, batch, num_workers=args.workers)
        loaders = {"folder": pil}
        check = {"passed": None}
        if dali_available():
            dali = DaliFolderSource(root, pre, margin, batch, num_workers=args.workers,
                                    device=device)
            loaders["dali"] = dali
            want = {p: s[i] for s, _, ps in pil for i, p in enumerate(ps)}
            diffs, order = [], []
            for sources, _, paths in dali:
                for i, path in enumerate(paths):
                    order.append(path)
                    diffs.append((sources[i].cpu().float() - want[path].float()).abs().mean())
            mean = float(sum(diffs) / len(diffs))
            check = {"passed": order == list(want) and mean < 1.0, "mean_abs_diff": mean,
                     "images": len(order)}
            if not check["passed"]:
                print(f"check FAILED: {check}", file=sys.stderr)
        results = {}
        for name, source in loaders.items():
            timing = common.time_function(lambda s=source: _pass(s), warmup=warmup,
                                          repeats=repeats, sync=sync)
            results[name] = {
                "time": timing,
                "images": count,
                "images_per_s": count / timing["median"],
            }
            print(f"{name:7s} {count / timing['median']:8.1f} images/s "
                  f"(median {timing['median']:.3f} s per pass of {count})")

    payload = {
        "benchmark": "data",
        "quick": args.quick,
        "setup": {"images": count, "image_size": [500, 375], "input_size": [224, 224],
                  "margin": margin, "batch_size": batch, "workers": args.workers,
                  "dali_device": "mixed" if device.type == "cuda" else "cpu"},
        "check": check,
        "loaders": results,
        "dali": results.get("dali"),
        "speedup": (results["dali"]["images_per_s"] / results["folder"]["images_per_s"]
                    if "dali" in results else None),
        "meta": common.collect_metadata(device),
    }
    path = common.write_result(args.out, "data", payload)
    print(f"wrote {path}")
    return 0 if check["passed"] in (True, None) else 1


if __name__ == "__main__":
    sys.exit(main())
