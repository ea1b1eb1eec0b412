"""Command line: ``equifast measure``, ``lie``, ``bench``, ``survey``, ``export``, ``report``
and ``info``.

Examples:
    equifast measure --model resnet18 --samples --group translate:8,16,32 --out results/run
    equifast measure --model vit_tiny_patch16_224 --data /imagenet/val --limit 1000 \\
        --group rotate:90,180,270 --out results/vit.parquet
    equifast bench --model resnet18 --samples --input-size 112 --repeats 3
    equifast survey --models resnet18 'convnext_*' --data /imagenet/val --store survey.sqlite
    equifast export survey.sqlite --format csv -o survey/
    equifast info
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import warnings
from pathlib import Path

from equifast.lie import DEFAULT_GENERATORS, GENERATORS, LIE_METRICS
from equifast.paths import check_folder as _check_folder
from equifast.paths import is_dir as _is_dir
from equifast.paths import os_reason as _os_reason
from equifast.paths import shown_path as _shown_path

# (the channel maps of equifast.ops, spelled out so that --help needs no torch)
CHANNEL_MAPS = ("identity", "match", "linear")
# model dtypes of --dtype (names of torch dtypes)
DTYPES = ("float32", "float64", "float16", "bfloat16")


def _parse_size(text: str) -> tuple[int, int]:
    """An argparse type: ``N`` (a square input) or ``HxW`` (``H,W`` too, as the help said
    before), positive integers; anything else (``3x``, ``x3``, ``3x4x5``, ``0``) is refused by
    name instead of read as something else (``3x`` was 3x3)."""
    match = re.fullmatch(r"\s*([0-9]+)\s*(?:[xX,]\s*([0-9]+)\s*)?", text)
    if match is None or int(match[1]) < 1 or (match[2] is not None and int(match[2]) < 1):
        raise argparse.ArgumentTypeError(
            f"expected N (a square input) or HxW, positive integers such as 224 or 192x256; "
            f"found {text!r}")
    height = int(match[1])
    return height, int(match[2]) if match[2] is not None else height


def _count(minimum: int):
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, found {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, found {value}")
        return value

    return parse


def _resamples(text: str) -> int:
    """An argparse type: 0 (no intervals) or at least 2 bootstrap resamples."""
    value = _count(0)(text)
    if value == 1:
        raise argparse.ArgumentTypeError("expected 0 (no intervals) or at least 2 resamples, "
                                         "found 1")
    return value


def _ridge(text: str) -> float:
    """An argparse type: a positive finite number (the ridge penalty of --channel-map linear)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number such as 0.001, found "
                                         f"{text!r}")
    return value


def _channel_map_words(config: dict) -> str:
    """What the line above the table says of the channel map: ``", channels matched"``, ``", a
    linear map of the channels (ridge R, fitted on one half ...)"``, nothing for the identity."""
    if config.get("channel_map") == "match":
        return ", channels matched"
    if config.get("channel_map") == "linear":
        return (f", a linear map of the channels (ridge {config.get('ridge')}, fitted on one "
                "half of the images, scored on the other)")
    return ""


def _parse_align(text: str):
    from equifast.align import check_align

    try:
        value: float | str = float(text)
    except ValueError:
        value = text
    try:
        return check_align(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that shows each option's default (``--batch-size`` is 16 for measure, 32 for survey):
    appended as ``(default: X)`` unless the help already names it; none for a flag, nor for an
    option whose default is None (its help says what happens without it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default == [] or not action.option_strings
                or default is argparse.SUPPRESS or "default" in text):
            return text
        return f"{text} (default: {default})" if text else f"default: {default}"


class _SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser: its ``--help`` shows the defaults (:class:`_DefaultsFormatter`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)


def _add_model_and_data(command: argparse.ArgumentParser) -> None:
    """``--model`` and the images (``--data DIR`` or ``--samples``) of one model's command."""
    command.add_argument("--model", required=True,
                         help="timm name (resnet18) or torchvision name (tv:resnet50)")
    source = command.add_mutually_exclusive_group()
    source.add_argument("--data", help="image folder (ImageNet layout or flat)")
    source.add_argument("--samples", action="store_true",
                        help="the embedded sample photographs (the default)")


def _add_measurement_options(command: argparse.ArgumentParser) -> None:
    """What is measured, the options ``measure`` and ``bench`` share: group, layers, scores,
    batches, device, input size, alignment, channel map, mask."""
    command.add_argument("--group", default="translate:8,16,32",
                         help="group spec: translate:8,16,32 | translate[circular]:4 | "
                              "rotate:90,180,270 | flip; join with + (union) or * (product)")
    command.add_argument("--layers", nargs="+", default=None,
                         help="module names, globs ('layer*': * within one dotted part, ** "
                         "across) or class names such as Conv2d (default: stage outputs); "
                         "'leaves' for all")
    command.add_argument("--metrics", nargs="+", default=None, help="scores to report")
    command.add_argument("--batch-size", type=_count(1), default=16, help="images per batch")
    command.add_argument("--limit", type=_count(1), default=None,
                         help="use at most this many images")
    command.add_argument("--device", default=None,
                         help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    command.add_argument("--input-size", type=_parse_size, default=None,
                         help="N or HxW: the input size (default: the model's own)")
    command.add_argument("--align", type=_parse_align, default="auto",
                         help="grid offsets: auto | center | corner | a number")
    command.add_argument("--subpixel", choices=("bilinear", "skip"), default="bilinear",
                         help="a shift that is not a multiple of a layer's stride: bilinear "
                              "interpolation of the features, or skip (NaN)")
    command.add_argument("--channel-map", choices=CHANNEL_MAPS, default="identity",
                         help="match: each channel against its best-correlated channel of the "
                              "other map (equivariance up to a permutation of channels); "
                              "linear: against a linear map of all its channels, fitted on the "
                              "other half of the images (reads the data twice)")
    command.add_argument("--ridge", type=_ridge, default=None,
                         help="the ridge penalty of --channel-map linear, relative to the "
                              "features' scale (default 0.001)")
    command.add_argument("--mask", choices=("disc",), default=None,
                         help="disc: compare only positions inside the disc inscribed in the "
                              "input (every rotation then compares the same positions)")
    command.add_argument("--pooled", action="store_true", help="score pooled statistics")


def _add_run_options(command: argparse.ArgumentParser, loader: bool) -> None:
    """How the model runs, shared by ``measure`` and ``bench``: seed, loader workers (and the
    loader where the command has one), dtype and memory format."""
    command.add_argument("--seed", type=int, default=0,
                         help="seeds random init, the bootstrap and --baseline where given")
    command.add_argument("--workers", type=_count(0), default=None, help="loader workers")
    if loader:
        command.add_argument("--loader", choices=("auto", "dali", "folder"), default="auto",
                             help="image folder loader (--data): NVIDIA DALI, Pillow, or auto: "
                                  "DALI on a CUDA device when installed, Pillow on the CPU")
    command.add_argument("--dtype", choices=DTYPES, default=None,
                         help="model dtype (default: the model's own when it is not float32, "
                              "else float32 on the CPU and bfloat16 autocast on CUDA)")
    command.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                         help="input memory format channels-last (default: on CUDA only; on the "
                              "CPU often faster for convolutional networks)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="equifast",
        description="Measure the learned equivariance of image models, layer by layer.",
    )
    # every subcommand's --help shows the defaults
    commands = parser.add_subparsers(dest="command", required=True,
                                     parser_class=_SubcommandParser)

    measure = commands.add_parser("measure", help="measure one model",
                                  description="Measure one model on images for a group.")
    _add_model_and_data(measure)
    _add_measurement_options(measure)
    measure.add_argument("--baseline", choices=("init",), default=None,
                         help="also measure a freshly initialized copy (seeded with --seed) on "
                              "the same images: 'init' and 'learned' columns")
    measure.add_argument("--bootstrap", type=_resamples, default=1000,
                         help="bootstrap resamples for the 95%% CIs (0: no intervals)")
    _add_run_options(measure, loader=True)
    measure.add_argument("--reference", action="store_true",
                         help="use the pure-PyTorch reference ops (slow; for checking)")
    measure.add_argument("--out", default="results/run",
                         help="output: a .parquet/.csv file, or a folder (gets result.parquet "
                              "and depth.png)")
    measure.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    measure.add_argument("--quiet", action="store_true", help="no progress bar")
    measure.add_argument("--import", dest="imports", nargs="+", default=[], metavar="MODULE",
                         help="modules to import first that register models with timm")

    commands.add_parser("info", help="versions, compiled kernels, devices")
    _add_bench_command(commands)
    _add_survey_commands(commands)
    _add_report_command(commands)
    return parser


def _add_bench_command(commands) -> None:
    bench = commands.add_parser(
        "bench", help="time equifast against the naive PyTorch loop on one model (same numbers)",
        description="Run equifast and the naive PyTorch loop (equifast.naive: one forward per "
                    "element, batched over the images, statistics by torch ops) on the same "
                    "measurement, check that their scores agree row by row, then time both in "
                    "alternating rounds beside bare forwards of the same stacked images "
                    "(equifast.bench.compare). Exit status 1 when the numbers differ.")
    _add_model_and_data(bench)
    _add_measurement_options(bench)
    bench.add_argument("--bootstrap", type=_resamples, default=0,
                       help="bootstrap resamples (0: none; both loops would spend the same time "
                            "on them)")
    _add_run_options(bench, loader=False)
    bench.add_argument("--repeats", type=_count(1), default=3,
                       help="timed rounds after the check (each: equifast, naive, floor)")
    bench.add_argument("--no-floor", action="store_true",
                       help="do not time the bare forwards (no overhead over them reported)")
    bench.add_argument("--memory", action="store_true",
                       help="on the CPU, also the peak resident memory of one call of each loop, "
                            "each in a fresh process (on a GPU the peak is always shown)")
    bench.add_argument("--tolerance", type=_ridge, default=None,
                       help="largest |difference| of corr taken as the same number (default: "
                            "1e-6 float64, 1e-4 float32 on the CPU, 1e-3 on a GPU or in 16 bits)")
    bench.add_argument("--json", default=None, metavar="FILE",
                       help="also write the numbers (every round's times) to this .json file")
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    bench.add_argument("--import", dest="imports", nargs="+", default=[], metavar="MODULE",
                       help="modules to import first that register models with timm")


def _add_report_command(commands) -> None:
    report = commands.add_parser(
        "report", help="HTML report of a survey store (figures, sortable table)",
        description="Write DIR/index.html with figures (PNG and SVG) of a survey store: accuracy "
                    "against mean equivariance, scores against depth per model, a sortable "
                    "table of models, failed models and skipped files.",
    )
    report.add_argument("store", help="the SQLite store of a survey")
    report.add_argument("-o", "--out", default="report", help="report folder (default: report)")
    report.add_argument("--metric", default="corr",
                        help="score shown (default corr; e.g. corr_vs_chance, cosine)")


def _run_report(args: argparse.Namespace) -> int:
    from equifast.report import _EXPECTED_FOLDER as _EXPECTED_REPORT_FOLDER
    from equifast.report import build_report

    # (not created here: a report that fails on its store leaves no empty folder behind)
    _check_folder(Path(args.out), "-o/--out", args.out, _EXPECTED_REPORT_FOLDER, create=False)
    index = build_report(args.store, args.out, metric=args.metric)
    print(f"wrote {index}")
    return 0


def _add_survey_commands(commands) -> None:
    lie = commands.add_parser(
        "lie", help="Lie derivatives of one model's layers (local equivariance)",
        description="Local equivariance of one model: the Lie derivatives of its layers' "
                    "features under infinitesimal translations, rotation or scaling "
                    "(equifast.lie_derivative).")
    _add_model_and_data(lie)
    lie.add_argument("--generators", nargs="+", choices=GENERATORS, default=None,
                     help="translate_x, translate_y (per pixel), rotate (per radian), scale "
                          "(default: translate_x translate_y rotate)")
    lie.add_argument("--layers", nargs="+", default=None, help="as for measure")
    lie.add_argument("--batch-size", type=_count(1), default=16, help="images per forward")
    lie.add_argument("--limit", type=_count(1), default=None, help="use at most this many images")
    lie.add_argument("--device", default=None,
                     help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    lie.add_argument("--input-size", type=_parse_size, default=None,
                     help="N or HxW: the input size (default: the model's own)")
    lie.add_argument("--align", type=_parse_align, default="auto", help="as for measure")
    lie.add_argument("--bootstrap", type=_resamples, default=1000,
                     help="bootstrap resamples for the 95%% CIs (0: no intervals)")
    lie.add_argument("--seed", type=int, default=0, help="as for measure")
    lie.add_argument("--workers", type=_count(0), default=None, help="loader workers")
    lie.add_argument("--loader", choices=("auto", "dali", "folder"), default="auto",
                     help="as for measure")
    lie.add_argument("--metric", choices=LIE_METRICS, default="lee_rel",
                     help="the score of the printed table")
    lie.add_argument("--out", default="results/lie/lie.parquet",
                     help="a .parquet or .csv file for the frame (its config beside, as .json, "
                          "and a plot of the Lie derivatives against depth, as .png)")
    lie.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    lie.add_argument("--baseline", choices=("init",), default=None,
                     help="also differentiate a freshly initialized copy (seeded with --seed) on "
                          "the same images: 'init' and 'learned' columns")
    lie.add_argument("--quiet", action="store_true", help="no progress bar")
    lie.add_argument("--import", dest="imports", nargs="+", default=[], metavar="MODULE",
                     help="modules to import first that register models with timm")

    survey = commands.add_parser(
        "survey", help="measure many models into a SQLite store (resumable)",
        description="Measure many models with one configuration; each finished model is "
                    "committed to the store, and a survey started again skips finished models.",
    )
    survey.add_argument("--models", nargs="+", default=[],
                        help="names and timm wildcards: resnet18 'convnext_*' tv:resnet50")
    survey.add_argument("--model-list", default=None, help="file with one model name per line")
    survey.add_argument("--pretrained-only", action="store_true",
                        help="only models with pretrained weights in timm (wildcards list tags)")
    source = survey.add_mutually_exclusive_group()
    source.add_argument("--data", help="image folder (ImageNet layout or flat)")
    source.add_argument("--samples", action="store_true",
                        help="the embedded sample photographs (the default)")
    survey.add_argument("--group", default="translate:8,16,32", help="group spec (see measure)")
    survey.add_argument("--store", default="survey.sqlite", help="the SQLite store")
    survey.add_argument("--retry-failed", action="store_true",
                        help="measure again models that failed with this configuration")
    survey.add_argument("--layers", nargs="+", default=None,
                        help="as for measure: names, globs or class names (default: stages)")
    survey.add_argument("--metrics", nargs="+", default=None, help="as for measure")
    survey.add_argument("--batch-size", type=_count(1), default=32, help="images per batch")
    survey.add_argument("--min-batch-size", type=_count(1), default=1,
                        help="out of memory halves the batch down to this size, then gives up")
    survey.add_argument("--limit", type=_count(1), default=None,
                        help="use at most this many images")
    survey.add_argument("--device", default=None,
                        help="cpu, cuda ... (default: cuda when available; a Ray task's GPU)")
    survey.add_argument("--input-size", type=_parse_size, default=None,
                        help="N or HxW: the input size (default: each model's own)")
    survey.add_argument("--align", type=_parse_align, default="auto", help="as for measure")
    survey.add_argument("--subpixel", choices=("bilinear", "skip"), default=None,
                        help="as for measure: bilinear (default) or skip")
    survey.add_argument("--channel-map", choices=CHANNEL_MAPS, default=None,
                        help="identity (default), match or linear")
    survey.add_argument("--ridge", type=_ridge, default=None,
                        help="as for measure (--channel-map linear)")
    survey.add_argument("--mask", choices=("disc",), default=None, help="as for measure")
    survey.add_argument("--pooled", action="store_true", help="score pooled statistics")
    survey.add_argument("--baseline", choices=("init",), default=None,
                        help="also measure each model's freshly initialized copy (stored as the "
                             "init / learned columns of the scores)")
    survey.add_argument("--bootstrap", type=_resamples, default=1000,
                        help="bootstrap resamples for the 95%% CIs (0: no intervals)")
    survey.add_argument("--seed", type=int, default=0, help="as for measure")
    survey.add_argument("--dtype", choices=DTYPES, default=None, help="as for measure")
    survey.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="as for measure")
    survey.add_argument("--workers", type=_count(0), default=None, help="loader workers")
    survey.add_argument("--loader", choices=("auto", "dali", "folder"), default="auto",
                        help="as for measure")
    survey.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                        help="one Ray task per model; no ADDRESS: a local Ray, or 'auto', "
                             "'ray://head:10001'")
    survey.add_argument("--import", dest="imports", nargs="+", default=[], metavar="MODULE",
                        help="modules to import first (here and in Ray workers) that register "
                             "models with timm")
    survey.add_argument("--quiet", action="store_true", help="no progress bars")

    export = commands.add_parser("export", help="write a survey store's tables to files",
                                 description="Write every table of a store to DIR/<table>.<fmt>.")
    export.add_argument("store", help="the SQLite store")
    export.add_argument("--format", choices=("parquet", "csv"), default="parquet",
                        help="file format of the tables")
    export.add_argument("-o", "--out", default=None, help="folder (default: STORE without suffix)")


def _check_loader(args: argparse.Namespace) -> None:
    """``--loader dali`` or ``folder`` picks how an image folder (``--data``) is read, and
    ``--workers`` how many processes read it; the embedded photographs (``--samples``, the
    default) are no folder and were measured without either, silently. Refused before any work.

    Raises:
        ValueError: ``--loader`` other than ``auto``, or ``--workers``, without ``--data``.
    """
    if args.data:
        return
    given = ("--samples" if args.samples
             else "no --data (the embedded photographs, --samples, are the default)")
    loader = getattr(args, "loader", "auto")  # (bench has none: the naive loop reads with Pillow)
    for option, value in (("--loader", loader if loader != "auto" else None),
                          ("--workers", args.workers)):
        if value is not None:
            raise ValueError(f"{option} {value}: expected --data DIR, an image folder for the "
                             f"loader to read; found {given}: the embedded photographs are "
                             "decoded in memory and read by no loader (give --data DIR, or "
                             f"leave {option} out)")


def _check_ridge(args: argparse.Namespace) -> None:
    """``--ridge`` is the penalty of the linear channel map: refused, before any work, with
    another ``--channel-map``, where it would be ignored."""
    if args.ridge is not None and args.channel_map != "linear":
        raise ValueError(f"--ridge {args.ridge}: applies to --channel-map linear only; found "
                         f"--channel-map {args.channel_map or 'identity'} (add --channel-map "
                         "linear, or leave --ridge out)")


def _run_survey(args: argparse.Namespace) -> int:
    from equifast.survey import run_survey

    if not args.models and not args.model_list:
        raise ValueError("survey: give --models NAME|GLOB ... or --model-list FILE")
    _check_loader(args)
    _check_ridge(args)
    if args.metrics is not None:  # checked before any model runs (each would fail on it)
        from equifast.scores import check_metrics

        check_metrics(args.metrics)
    measure_kwargs = {
        "layers": args.layers, "metrics": args.metrics, "limit": args.limit,
        "device": args.device, "input_size": args.input_size, "align": args.align,
        "pooled": args.pooled, "bootstrap": args.bootstrap, "num_workers": args.workers,
        "loader": args.loader, "baseline": args.baseline, "subpixel": args.subpixel,
        "channel_map": args.channel_map, "mask": args.mask, "ridge": args.ridge,
        "channels_last": args.channels_last,
    }
    if args.dtype is not None:
        import torch

        measure_kwargs["dtype"] = getattr(torch, args.dtype)
    summary = run_survey(
        args.models, args.data or "samples", args.store, args.group,
        model_list=args.model_list, pretrained_only=args.pretrained_only,
        retry_failed=args.retry_failed, batch_size=args.batch_size,
        min_batch_size=args.min_batch_size, seed=args.seed, ray=args.ray, imports=args.imports,
        progress=not args.quiet,
        **{k: v for k, v in measure_kwargs.items() if v is not None},
    )
    # 1 while a model of the survey is recorded as failed for this configuration: failed now,
    # or before and skipped by this run (not retried), as the printed summary says
    return 1 if summary.failed or summary.failures_left else 0


def _run_export(args: argparse.Namespace) -> int:
    from equifast.survey import export_store

    out = args.out or str(Path(args.store).with_suffix(""))
    _check_folder(Path(out), "-o/--out" if args.out else "the default -o/--out (STORE without "
                  "its suffix)", out, f"expected a folder (for <table>.{args.format} files)")
    for path in export_store(args.store, out, args.format):
        print(f"wrote {path}")
    return 0


def _run_measure(args: argparse.Namespace) -> int:
    import contextlib
    import io

    from equifast import distributed

    # torchrun --nproc_per_node=N -m equifast measure: every process measures a shard of the
    # images and gets the combined result; rank 0 alone prints and writes the files.
    with distributed.launch(args.device) as rank:
        if rank == 0:
            return _measure(args, main=True)
        with contextlib.redirect_stdout(io.StringIO()):
            return _measure(args, main=False)



def _check_before_the_model(args: argparse.Namespace) -> None:
    """Imports the plugin modules (``--import``), then checks ``--group`` and ``--metrics``
    where the command has them: a bad one fails before the model is built (a large one takes a
    while)."""
    if args.imports:
        from equifast.survey.runner import import_plugins

        import_plugins(args.imports)
    if getattr(args, "group", None) is not None:
        from equifast.groups import parse_group

        parse_group(args.group)
    if getattr(args, "metrics", None) is not None:
        from equifast.scores import check_metrics

        check_metrics(args.metrics)


def _load_model(args: argparse.Namespace):
    """The model of ``--model``, built for ``--input-size`` (a model that fixes its input size
    when built, a ViT), its random init seeded by ``--seed`` so that a run can be repeated; says
    which weights it has (after :func:`_check_before_the_model`)."""
    import torch

    from equifast.models import load_model_sized

    torch.manual_seed(args.seed)
    loaded = load_model_sized(args.model, args.input_size)
    print(f"model: {loaded.name} ({loaded.source}); "
          f"{'pretrained weights' if loaded.pretrained else loaded.note}")
    return loaded


def _backend_words(backend: str) -> str:
    """``compiled`` -> ``compiled ops``; a mixed backend as it is written."""
    return f"{backend} ops" if backend in ("compiled", "reference") else backend


def _measure(args: argparse.Namespace, main: bool) -> int:
    import torch

    import equifast
    from equifast.data.folder import SkippedFilesWarning

    # Checked before the measurement, so that a bad --out cannot lose a finished run.
    table_path, plot_path = _output_paths(args.out)
    _check_loader(args)
    _check_ridge(args)
    _check_before_the_model(args)
    loaded = _load_model(args)
    data = args.data if args.data else "samples"
    baseline = None
    if args.baseline == "init":
        from equifast.baseline import init_copy_by_name

        baseline = init_copy_by_name(args.model, args.seed, args.input_size)
    with warnings.catch_warnings():
        # the skipped files are listed below, with the table
        warnings.simplefilter("ignore", SkippedFilesWarning)
        result = equifast.measure(
            loaded.model, data, group=args.group, layers=args.layers, metrics=args.metrics,
            batch_size=args.batch_size, input_size=args.input_size,
            # the model is built on the CPU: without --device, measure on the GPU when there is one
            device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
            align=args.align, subpixel=args.subpixel, channel_map=args.channel_map,
            **({} if args.ridge is None else {"ridge": args.ridge}),
            mask=args.mask, pooled=args.pooled, bootstrap=args.bootstrap,
            seed=args.seed, limit=args.limit, num_workers=args.workers, loader=args.loader,
            progress=not args.quiet and main,
            model_name=loaded.name, force_reference=args.reference, baseline=baseline,
            dtype=None if args.dtype is None else getattr(torch, args.dtype),
            channels_last=args.channels_last,
        )
    result.config.update(pretrained=loaded.pretrained, note=loaded.note)
    processes = result.config.get("world_size", 1)
    print(f"{result.config['images']} images, group {result.config['group']} "
          f"({len(result.config['elements'])} elements)"
          f"{', disc mask' if result.config.get('mask') == 'disc' else ''}"
          f"{_channel_map_words(result.config)}, "
          f"input {'x'.join(map(str, result.config['input_size']))}, "
          f"{result.config['seconds']:.1f} s "
          f"({_backend_words(result.config['backend'])}"
          f"{f', {processes} processes' if processes > 1 else ''})")
    # The table shows the first score asked for (--metrics), else corr.
    shown = next((m for m in args.metrics or [] if m not in ("corr_vs_chance", "flat_frac")),
                 "corr")
    print(result.format_summary(shown))
    # What a survey records of NaN / infinite features (a failure there, a run's warning), said
    # here too: a layer's "-" or a low n alone does not tell that the features are not finite.
    from equifast.survey.runner import NonFiniteFeatures, _check_finite, _partial_warning

    try:
        _check_finite(result, loaded.model)
    except NonFiniteFeatures as error:
        print(f"warning: {error}", file=sys.stderr)
    partial = _partial_warning(result)
    if partial:
        print(f"warning: {partial}", file=sys.stderr)
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable files:")
        for path, reason in result.skipped[:20]:
            print(f"  {path}: {reason}")
    if not main:
        return 0
    result.save(table_path)
    print(f"wrote {table_path} (with {table_path.name}.json beside: config and model scores)")
    if not args.no_plot:
        from equifast.plots import plot_depth

        plot_path.parent.mkdir(parents=True, exist_ok=True)
        plot_depth(result).savefig(plot_path, dpi=120)
        print(f"wrote {plot_path}")
    return 0


def _output_paths(out: str) -> tuple[Path, Path]:
    """``(table, plot)`` paths of ``--out``: a .parquet / .csv file (any case), else a folder.
    The folder that will hold them is created now, so that a path that cannot be written fails
    before the measurement, not after it."""
    path = Path(out)
    expected = ("expected a .parquet or .csv file name, or a folder (for result.parquet and "
                "depth.png)")
    if path.suffix.lower() in (".parquet", ".csv"):
        if _is_dir(path, "--out", expected):
            raise ValueError(f"--out {_shown_path(out)}: is a folder; expected a .parquet or .csv "
                             "file name")
        _check_folder(path.parent, "--out", out, f"expected a folder to hold {path.name}")
        return path, path.with_suffix(".png")
    if path.suffix.lower() in (".json", ".png", ".pdf", ".svg", ".html", ".txt", ".pkl", ".pt",
                               ".xlsx", ".feather"):
        raise ValueError(f"--out {_shown_path(out)}: {expected}; found a {path.suffix} file name")
    _check_folder(path, "--out", out, expected)
    return path / "result.parquet", path / "depth.png"


def _run_lie(args: argparse.Namespace) -> int:
    import torch

    import equifast
    from equifast.data.folder import SkippedFilesWarning

    out = Path(args.out)
    if out.suffix.lower() not in (".parquet", ".csv"):
        raise ValueError(f"--out {_shown_path(args.out)}: expected a .parquet or .csv file name")
    if _is_dir(out, "--out", "expected a .parquet or .csv file name"):
        raise ValueError(f"--out {_shown_path(args.out)}: is a folder; expected a .parquet or "
                         ".csv file name")
    _check_folder(out.parent, "--out", args.out, f"expected a folder to hold {out.name}")
    _check_loader(args)
    _check_before_the_model(args)
    loaded = _load_model(args)
    baseline = None
    if args.baseline == "init":
        from equifast.baseline import init_copy_by_name

        baseline = init_copy_by_name(args.model, args.seed, args.input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedFilesWarning)  # listed below, with the table
        result = equifast.lie_derivative(
            loaded.model, args.data if args.data else "samples",
            generators=args.generators or DEFAULT_GENERATORS, layers=args.layers,
            batch_size=args.batch_size,
            device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
            input_size=args.input_size, align=args.align, limit=args.limit,
            bootstrap=args.bootstrap, seed=args.seed, num_workers=args.workers,
            loader=args.loader, progress=not args.quiet, model_name=loaded.name,
            baseline=baseline)
    config = result.config
    meaning = ("the mean squared Lie derivative over the features' variance"
               if args.metric == "lee_rel" else "the mean squared Lie derivative")
    print(f"{config['images']} images, input {'x'.join(map(str, config['input_size']))}, "
          f"{config['seconds']:.1f} s; {args.metric} ({meaning}) per layer and generator:")
    print(result.format_summary(args.metric))
    if baseline is not None:
        print(f"learned ({args.metric} of the model minus that of its initialized copy):")
        print(result.format_summary(args.metric, "learned"))
    if config["skipped"]:
        print(f"skipped {len(config['skipped'])} unreadable files:")
        for path, why in config["skipped"]:
            print(f"  {path}: {why}")
    result.config.update(pretrained=loaded.pretrained, note=loaded.note)
    result.save(out)
    print(f"wrote {out} (with {out.name}.json beside: the config)")
    if not args.no_plot:
        from equifast.plots import plot_lie_depth

        plot = out.with_suffix(".png")
        plot_lie_depth(result, args.metric).savefig(plot, dpi=120)
        print(f"wrote {plot}")
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    import torch

    from equifast.bench import compare
    from equifast.data.folder import SkippedFilesWarning

    json_path = None
    if args.json is not None:  # checked before the runs, so that a bad path loses none of them
        json_path = Path(args.json)
        if json_path.suffix.lower() != ".json":
            raise ValueError(f"--json {_shown_path(args.json)}: expected a .json file name")
        if _is_dir(json_path, "--json", "expected a .json file name"):
            raise ValueError(f"--json {_shown_path(args.json)}: is a folder; expected a .json "
                             "file name")
        _check_folder(json_path.parent, "--json", args.json,
                      f"expected a folder to hold {json_path.name}")
    _check_ridge(args)
    _check_loader(args)
    _check_before_the_model(args)
    loaded = _load_model(args)
    if args.data and args.limit is None:
        print(f"note: every image of {_shown_path(args.data)}, {args.repeats + 1} times through "
              "each loop (the check, then each round); --limit N compares on N of them")
    with warnings.catch_warnings():
        # both loops skip the same unreadable files: said once, below
        warnings.simplefilter("ignore", SkippedFilesWarning)
        report = compare(
            loaded.model, args.data if args.data else "samples", repeats=args.repeats,
            floor=not args.no_floor, memory=args.memory, tolerance=args.tolerance,
            progress=not args.quiet, log=None if args.quiet else print,
            group=args.group, layers=args.layers, metrics=args.metrics,
            batch_size=args.batch_size, limit=args.limit, input_size=args.input_size,
            device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
            align=args.align, subpixel=args.subpixel, channel_map=args.channel_map,
            **({} if args.ridge is None else {"ridge": args.ridge}),
            mask=args.mask, pooled=args.pooled, bootstrap=args.bootstrap, seed=args.seed,
            num_workers=args.workers, model_name=loaded.name,
            dtype=None if args.dtype is None else getattr(torch, args.dtype),
            channels_last=args.channels_last)
    print(report.format())
    if report.skipped:
        print(f"skipped {len(report.skipped)} unreadable files (in both loops):")
        for path, reason in report.skipped[:20]:
            print(f"  {path}: {reason}")
    if json_path is not None:
        data = {"model": loaded.name, "source": loaded.source, "pretrained": loaded.pretrained,
                "note": loaded.note, **report.as_dict()}
        json_path.write_text(json.dumps(_json_safe(data), indent=2, default=str) + "\n")
        print(f"wrote {json_path}")
    if not report.agreement.passed:
        print("equifast: error: equifast and the naive loop gave different numbers (above); "
              "nothing was timed", file=sys.stderr)
        return 1
    return 0


def _json_safe(value):
    """``value`` with NaN and infinite floats as None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


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
            for op in ("transform_images", "equivariance_stats", "score_stats")
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
        if args.command == "bench":
            return _run_bench(args)
        if args.command == "lie":
            return _run_lie(args)
        if args.command == "survey":
            return _run_survey(args)
        if args.command == "export":
            return _run_export(args)
        if args.command == "report":
            return _run_report(args)
    except (ValueError, FileNotFoundError, PermissionError, KeyError, TypeError,
            ImportError, RuntimeError) as error:
        # RuntimeError: a model that fails on its input, out of memory... (the message says
        # which); EQUIFAST_TRACEBACK=1 shows where, for a bug report
        if os.environ.get("EQUIFAST_TRACEBACK"):
            raise
        print(f"equifast: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a path that cannot be read or written (--data, --store ...)
        where = f"{_shown_path(str(error.filename))}: " if error.filename is not None else ""
        print(f"equifast: error: {where}{_os_reason(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = (" (the store keeps every finished model: run the same command to resume)"
                  if args.command == "survey" else "")
        print(f"equifast: interrupted{resume}", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
