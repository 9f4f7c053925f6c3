"""The ``hf-vl`` command line: ``convert``, ``export``, ``export-onnx`` and ``quickstart``."""

from __future__ import annotations

import argparse
import logging
import sys


def _convert(args: argparse.Namespace) -> int:
    from .conversion.api import convert_checkpoint

    convert_checkpoint(
        arch=args.arch,
        source=args.source,
        checkpoint=args.checkpoint,
        variant=args.variant,
        output=args.output,
        progress=not args.no_progress,
    )
    variant = args.variant or "config read from the checkpoint"
    print(f"converted {args.arch} ({args.source}, {variant}) -> {args.output}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_bundle

    path = export_bundle(args.model_dir, args.output)
    print(f"Hub bundle written to {path}")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from .onnx_export import export_sam_onnx

    path = export_sam_onnx(
        args.model_dir,
        args.output,
        opset=args.opset,
        return_single_mask=args.return_single_mask,
        use_stability_score=args.use_stability_score,
        return_extra_metrics=args.return_extra_metrics,
        gelu_approximate=args.gelu_approximate,
        dynamo=args.dynamo,
    )
    print(f"{args.arch} prompt encoder + mask decoder written to {path}")
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart

    run_quickstart(output_dir=args.output, fast=args.fast, sam_checkpoint=args.sam_checkpoint)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-vl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="convert an original checkpoint into hf_vl layout")
    convert.add_argument("arch", help="architecture, e.g. vit")
    convert.add_argument("--source", required=True, help="checkpoint format, e.g. timm, google, transformers")
    convert.add_argument("--checkpoint", required=True, help="path to the original file or directory")
    convert.add_argument("--variant", default=None, help="released variant name (see the architecture's table)")
    convert.add_argument("--output", required=True, help="output directory (save_pretrained layout)")
    convert.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    convert.set_defaults(func=_convert)

    export = sub.add_parser("export", help="write a package-free Hub bundle (remote code) of a saved model")
    export.add_argument("model_dir", help="a directory written by save_pretrained")
    export.add_argument("--output", required=True, help="bundle directory to create")
    export.set_defaults(func=_export)

    onnx = sub.add_parser("export-onnx", help="export SAM's prompt encoder + mask decoder to ONNX (browser demo)")
    onnx.add_argument("arch", choices=["sam"], help="architecture (only sam so far)")
    onnx.add_argument("model_dir", help="a directory written by save_pretrained")
    onnx.add_argument("--output", required=True, help="the .onnx file to write")
    onnx.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 14; >= 18 with --dynamo)")
    onnx.add_argument("--return-single-mask", action="store_true", help="output only the selected mask")
    onnx.add_argument("--use-stability-score", action="store_true", help="stability score instead of predicted IoU")
    onnx.add_argument("--return-extra-metrics", action="store_true", help="also output stability scores and areas")
    onnx.add_argument("--gelu-approximate", action="store_true", help="tanh GELU (runtimes without a fast Erf)")
    onnx.add_argument("--dynamo", action="store_true", help="torch.export-based exporter (needs onnxscript)")
    onnx.set_defaults(func=_export_onnx)

    quick = sub.add_parser("quickstart", help="train, export and reload small models on the embedded data")
    quick.add_argument("--output", default="hf_vl_quickstart", help="where models and bundles go")
    quick.add_argument("--fast", action="store_true", help="a smaller, quicker run (used by the tests)")
    quick.add_argument(
        "--sam-checkpoint", default=None, help="segment-anything sam_vit_*.pth: segment the bundled photo with it"
    )
    quick.set_defaults(func=_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"hf-vl {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
