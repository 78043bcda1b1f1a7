"""The export stage for a model file the user already has: no PyTorch, the user's file is the reference.

The file is copied as it is (``model-original.<suffix>``), then, for ONNX, simplified and quantized as
deploy.yaml's ``export`` section (or ``--quantize``) asks; every transform is checked against the original on the
user's test data: parity of every output by name for the simplified file, accuracy and SQNR against it for the
quantized one. The result is the same :class:`~pipeline.export.stage.ExportResult` the PyTorch path produces, so
profiling, signing and delivery do not know where the model came from.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .backend import get_backend
from .model_file import ModelFile
from .stage import ExportResult

if TYPE_CHECKING:
    from ..config import ExportConfig
    from ..ui import UI

#: what a user's file of each format can be turned into here (a TFLite file is quantized when it is converted)
FILE_QUANTIZATIONS = {"onnx": ("none", "int8-static", "int8-dynamic", "fp16"), "tflite": ("none",)}


def file_stage(model: ModelFile, export: ExportConfig, data, out: Path, ui: UI, quantize: str) -> ExportResult:
    """``model`` prepared for shipping: simplified and quantized where asked, every step checked against it.

    ``data`` gives the test set (parity, accuracy) and the calibration samples; its samples already fit the
    file's input (:func:`~pipeline.export.model_file.check_inputs`)."""
    from .parity import check_parity
    from .quantize import quantization_report

    fmt = model.format
    allowed = FILE_QUANTIZATIONS.get(fmt.name, ("none",))
    if quantize not in allowed:
        raise ConfigError(f"export.quantize: {quantize!r} is not available for a {fmt.name} file you bring "
                          f"(allowed: {', '.join(allowed)})" + ("; quantize a TFLite model when you convert it"
                                                                if fmt.name == "tflite" else ""))
    backend = get_backend(fmt.name)
    out.mkdir(parents=True, exist_ok=True)
    original = Path(shutil.copyfile(model.path, out / f"model-original{fmt.suffix}"))
    baseline = check_parity(original, original, data.x_test, data.y_test, export.parity_atol)
    acc = baseline["accuracy_original"]
    ui.info(f"{model.path.name}: {fmt.name}, input {model.input_name!r} "
            f"{tuple('?' if d is None else d for d in model.input_shape)}, {len(model.outputs)} output(s), "
            f"{original.stat().st_size:,} bytes" + (f", accuracy {acc:.2%} on {len(data.x_test)} samples"
                                                     if acc is not None else ""))
    parity = {**baseline, "max_abs_diff": 0.0}
    fp32 = original
    if export.simplify:
        slim_path = backend.simplify(original, out / f"model-slim{fmt.suffix}")
        if slim_path is not None:
            slim = check_parity(original, slim_path, data.x_test, data.y_test, export.parity_atol)
            parity = {**slim, "simplified": slim}
            fp32 = slim_path
            ui.info(f"simplified: parity vs the original max abs diff {slim['max_abs_diff']:.2e} (tolerance "
                    f"{slim['atol']:g}, {len(slim['outputs'])} output(s)), {fp32.stat().st_size:,} bytes")
    final = backend.quantize(quantize, None, fp32, out / f"model{fmt.suffix}",
                             data.x_train[: export.calibration_samples], data.input_shape)
    qreport = {}
    if quantize != "none":
        qreport = quantization_report(backend.quantization_label(quantize), original, final, data.x_test,
                                      data.y_test, export.max_accuracy_drop)
        ui.info(f"{quantize} vs the original: accuracy {qreport['accuracy_fp32']:.2%} -> "
                f"{qreport['accuracy_quantized']:.2%}, SQNR {qreport['sqnr_db']} dB, "
                f"{qreport['size_fp32_bytes']:,} -> {qreport['size_quantized_bytes']:,} bytes")
    return ExportResult(final, fmt.name, quantize, final.stat().st_size, parity, qreport, analysis_path=final)


__all__ = ["FILE_QUANTIZATIONS", "file_stage"]
