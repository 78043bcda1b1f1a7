"""``pipeline quantize``: a model file the user has (ONNX), quantized with their calibration data and checked against
the original, without PyTorch and without a deployment."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import output

#: the kinds a user's file can be quantized to here (``pipeline.export.file_stage.FILE_QUANTIZATIONS["onnx"]``)
KINDS = ("int8-static", "int8-dynamic", "fp16")


def _data_config(args: argparse.Namespace):
    """deploy.yaml's data section (``--config``), or the one ``--data`` names: a .npz file, or a built-in set."""
    from ..config import load_deploy, parse_deploy

    if args.data is None:
        cfg = load_deploy(args.config)
        return cfg.model_copy(update={"model": cfg.model.model_copy(update={"zoo": None, "factory": None,
                                                                          "file": Path(args.model)})})
    path = Path(args.data)
    data = {"name": "npz", "path": str(path.resolve())} if path.suffix == ".npz" or path.is_file() \
        else {"name": args.data}
    return parse_deploy({"version": 1, "name": Path(args.model).stem, "model": {"file": str(Path(args.model))},
                         "data": data}, "--data", Path.cwd())


def cmd_quantize(args: argparse.Namespace, ui) -> int:
    from ..export.file_stage import file_stage
    from ..export.model_file import check_inputs, inspect_model_file
    from ..inputs import load_data
    from ..ui.tables import print_quantized

    model = inspect_model_file(Path(args.model))
    cfg = _data_config(args)
    data = load_data(cfg)
    check_inputs(model, data.input_shape, f"--data {args.data}" if args.data else f"{cfg.source}: data")
    export = cfg.export.model_copy(update={"calibration_samples": args.calibration_samples or
                                           cfg.export.calibration_samples})
    with ui.stage(f"Quantize {model.path.name} ({args.kind}) and check it against the original"):
        result = file_stage(model, export, data, Path(args.out), ui, args.kind)
    report = {"model": model.to_dict(), "path": str(result.path), "size_bytes": result.size_bytes,
              "parity": result.parity, "quantization": result.quantization_report}
    output.write_report(args, report)
    if not output.emit(args, report):
        print_quantized(ui, report)
    return output.OK


def add_quantize(sub) -> None:
    q = sub.add_parser("quantize", help="quantize an .onnx file you have with your calibration data (no PyTorch)")
    q.add_argument("model", help="an .onnx file")
    q.add_argument("--kind", choices=KINDS, default="int8-static")
    q.add_argument("--data", help="calibration and test data: a .npz (x_train, y_train, x_test, y_test) or a "
                   "built-in set (default: deploy.yaml's data section)")
    q.add_argument("--config", default="deploy.yaml", help="where the data section comes from without --data")
    q.add_argument("--calibration-samples", type=int, default=None, help="default: export.calibration_samples")
    q.add_argument("--out", required=True, help="output directory (model.onnx and the original beside it)")
    q.add_argument("--report", metavar="FILE.json")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_quantize)


COMMANDS = {"quantize": add_quantize}
