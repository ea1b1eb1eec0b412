"""Command line: ``equifast measure`` and ``equifast info``.

Examples:
    equifast measure --model resnet18 --samples --group translate:8,16,32 --out results/run
    equifast measure --model vit_tiny_patch16_224 --data /imagenet/val --limit 1000 \\
        --group rotate:90,180,270 --out results/vit.parquet
    equifast info
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path


def _parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts if p]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected H,W or HxW or one number, found {text!r}"
        ) from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected H,W or HxW or one number, found {text!r}")
    return values[0], values[1]


def _parse_align(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="equifast",
        description="Measure the learned equivariance of image models, layer by layer.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    measure = commands.add_parser("measure", help="measure one model",
                                  description="Measure one model on images for a group.")
    measure.add_argument("--model", required=True,
                         help="timm name (resnet18) or torchvision name (tv:resnet50)")
    source = measure.add_mutually_exclusive_group()
    source.add_argument("--data", help="image folder (ImageNet layout or flat)")
    source.add_argument("--samples", action="store_true",
                        help="the embedded sample photographs (the default)")
    measure.add_argument("--group", default="translate:8,16,32",
                         help="group spec: translate:8,16,32 | translate[circular]:4 | "
                              "rotate:90,180,270 | flip; join with + (union) or * (product)")
    measure.add_argument("--layers", nargs="+", default=None,
                         help="module names or globs (default: stage outputs); 'leaves' for all")
    measure.add_argument("--metrics", nargs="+", default=None, help="scores to report")
    measure.add_argument("--batch-size", type=int, default=16)
    measure.add_argument("--limit", type=int, default=None, help="use at most this many images")
    measure.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
    measure.add_argument("--input-size", type=_parse_size, default=None, help="H,W of the input")
    measure.add_argument("--align", type=_parse_align, default="auto",
                         help="grid offsets: auto | center | corner | a number")
    measure.add_argument("--subpixel", choices=("bilinear", "skip"), default="bilinear")
    measure.add_argument("--pooled", action="store_true", help="score pooled statistics")
    measure.add_argument("--bootstrap", type=int, default=1000)
    measure.add_argument("--seed", type=int, default=0)
    measure.add_argument("--workers", type=int, default=None, help="loader workers")
    measure.add_argument("--loader", choices=("auto", "dali", "folder"), default="auto",
                         help="image folder loader: NVIDIA DALI, Pillow, or DALI when installed")
    measure.add_argument("--reference", action="store_true",
                         help="use the pure-PyTorch reference ops (slow; for checking)")
    measure.add_argument("--out", default="results/run",
                         help="output: a .parquet/.csv file, or a folder (gets result.parquet "
                              "and depth.png)")
    measure.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    measure.add_argument("--quiet", action="store_true", help="no progress bar")

    commands.add_parser("info", help="versions, compiled kernels, devices")
    return parser


def _run_measure(args: argparse.Namespace) -> int:
    import equifast
    from equifast.models import load_model

    import torch

    # Random init (no cached weights) is seeded too, so that a run can be repeated.
    torch.manual_seed(args.seed)
    loaded = load_model(args.model)
    print(f"model: {loaded.name} ({loaded.source}); "
          f"{'pretrained weights' if loaded.pretrained else loaded.note}")
    data = args.data if args.data else "samples"
    result = equifast.measure(
        loaded.model, data, group=args.group, layers=args.layers, metrics=args.metrics,
        batch_size=args.batch_size, device=args.device, input_size=args.input_size,
        align=args.align, subpixel=args.subpixel, pooled=args.pooled, bootstrap=args.bootstrap,
        seed=args.seed, limit=args.limit, num_workers=args.workers, loader=args.loader,
        progress=not args.quiet,
        model_name=loaded.name, force_reference=args.reference,
    )
    result.config.update(pretrained=loaded.pretrained, note=loaded.note)
    print(f"{result.config['images']} images, group {result.config['group']} "
          f"({len(result.config['elements'])} elements), input {result.config['input_size']}, "
          f"{result.config['seconds']:.1f} s ({result.config['backend']} ops)")
    print(result.format_summary())
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable files:")
        for path, reason in result.skipped[:20]:
            print(f"  {path}: {reason}")
    out = Path(args.out)
    if out.suffix in (".parquet", ".csv"):
        table_path, plot_path = out, out.with_suffix(".png")
    else:
        table_path, plot_path = out / "result.parquet", out / "depth.png"
    result.save(table_path)
    print(f"wrote {table_path}")
    if not args.no_plot:
        from equifast.plots import plot_depth

        plot_path.parent.mkdir(parents=True, exist_ok=True)
        plot_depth(result).savefig(plot_path, dpi=120)
        print(f"wrote {plot_path}")
    return 0


def _run_info() -> int:
    import torch

    import equifast
    from equifast import _ext

    info = {
        "equifast": equifast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "extension": _ext.build_info(),
        "kernels": {
            op: {device: _ext.has_kernel(op, device) for device in ("cpu", "cuda")}
            for op in ("transform_images", "equivariance_stats")
        },
    }
    for name in ("timm", "torchvision", "nvidia.dali", "numpy", "pandas"):
        try:
            module = __import__(name, fromlist=["__version__"])
            info[name] = getattr(module, "__version__", "installed")
        except Exception:  # noqa: BLE001 - optional dependency missing or broken
            info[name] = None
    print(json.dumps(info, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "measure":
            return _run_measure(args)
        if args.command == "info":
            return _run_info()
    except (ValueError, FileNotFoundError, KeyError, TypeError) as error:
        print(f"equifast: error: {error}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
