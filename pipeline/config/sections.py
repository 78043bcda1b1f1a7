"""The sections of deploy.yaml that the stages read: model, data, training and fine-tuning, export, fit,
per-target budget overrides and the signing keys.

Every section forbids unknown keys and is frozen (``Strict``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..export.formats import format_names
from ..targets import Budgets

BUDGET_KEYS = ("latency_ms", "peak_memory_mb", "model_size_mb", "energy_mj")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainConfig(Strict):
    epochs: int = Field(8, ge=1, le=1000)
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    seed: int = 0


class ModelConfig(Strict):
    zoo: str | None = Field(None, description="name of a built-in model")
    factory: str | None = Field(None, description="'package.module:function' returning an nn.Module")
    file: Path | None = Field(None, description="a model file you already have (.onnx or .tflite): deployed as it "
                                                "is or quantized (export.quantize), no PyTorch involved")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the zoo model/factory")
    checkpoint: Path | None = None
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if sum(v is not None for v in (self.zoo, self.factory, self.file)) != 1:
            raise ValueError("give exactly one of 'zoo' (a built-in model), 'factory' ('package.module:function') "
                             "or 'file' (an .onnx or .tflite file you have)")
        if self.file is not None and self.checkpoint is not None:
            raise ValueError("'checkpoint' is for a PyTorch model; a model file carries its own weights")
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(f"factory {self.factory!r} must look like 'package.module:function'")
        return self


class DataConfig(Strict):
    name: str = "mnist-5k"
    path: Path | None = Field(None, description="for name: npz, a file with x_train, y_train, x_test, y_test; for "
                                                "name: folder, DIR/<class>/*.png|jpg or DIR/train/<class>/* and "
                                                "DIR/test/<class>/*")
    train_size: int | None = Field(None, ge=1)
    test_size: int | None = Field(None, ge=1)
    test_fraction: float | None = Field(None, gt=0, lt=1, description="share held out for testing when the data "
                                        "has no split of its own (default 0.2; test_size wins)")
    seed: int = 0
    channels: Literal[1, 3] | None = Field(None, description="1: grayscale (Pillow 'L'), 3: RGB; a folder's "
                                           "default is 3, other data keep their own (gray repeated for 3)")
    preprocess: dict[str, Any] | None = Field(None, description="resize, crop, scale, mean, std, channel_order, "
                                              "layout, dtype: applied to every split and the golden vectors, and "
                                              "signed into the manifest (docs/data.md)")

    @field_validator("preprocess", mode="before")
    @classmethod
    def _spec(cls, v: Any) -> dict[str, Any] | None:
        from pydantic_core import PydanticCustomError

        from device_agent.preprocess import Preprocess, PreprocessError

        try:
            return None if v is None else Preprocess.from_dict(v, "").to_dict()
        except PreprocessError as exc:
            raise PydanticCustomError("preprocess", str(exc).lstrip(".: ")) from None

    @model_validator(mode="after")
    def _channels_agree(self) -> "DataConfig":
        given = (self.preprocess or {}).get("channels")
        if self.channels is not None and given is not None and given != self.channels:
            raise ValueError(f"channels {self.channels} and preprocess.channels {given} disagree; give one")
        return self

    def spec(self):
        """The typed preprocess spec (device_agent.preprocess.Preprocess), or None."""
        from device_agent.preprocess import Preprocess

        return None if self.preprocess is None else Preprocess.from_dict(self.preprocess)


class FinetuneConfig(Strict):
    """How every compression step fine-tunes (each step sets its own epochs)."""

    lr: float | None = Field(None, gt=0, description="default: model.train.lr / 2")
    batch_size: int | None = Field(None, ge=1, description="default: model.train.batch_size")
    distill: bool = Field(False, description="distil from the dense model (Hinton et al. 2015)")
    kd_alpha: float = Field(0.5, ge=0, le=1)
    kd_temperature: float = Field(4.0, gt=0)
    val_fraction: float = Field(0.1, ge=0, lt=0.5, description="share of the training set held out for early stopping")
    patience: int | None = Field(None, ge=1, description="epochs without validation gain before stopping early")
    schedule: Literal["constant", "cosine"] = Field("constant", description="learning rate over each fine-tuning "
                                                    "run: constant, or a cosine decay to zero")


class ExportConfig(Strict):
    format: Literal[tuple(format_names())] = "onnx"  # type: ignore[valid-type]  (pipeline.export.formats)
    opset: int = Field(17, ge=17, le=21)
    simplify: bool = Field(True, description="run onnxslim, then check parity again")
    quantize: str = "none"
    calibration_samples: int = Field(256, ge=1)
    parity_atol: float = Field(1e-4, gt=0)
    max_accuracy_drop: float = Field(0.01, ge=0, le=1, description="int8 vs fp32, as a fraction")
    min_speedup_fraction: float = Field(0.5, ge=0, le=2, description="a recipe with macs_reduction must run at "
                                        "least this share of its MAC cut faster, measured; 0 turns the check off")


class FitConfig(Strict):
    """`pipeline fit` / `fit: {enabled: true}`: search compression x quantization for the most accurate
    model that meets every budget of the target."""

    enabled: bool = Field(False, description="deploy the best fitting candidate instead of 'compress:'")
    sparsities: list[float] = Field(default_factory=lambda: [0.5, 0.75, 0.9], description="unstructured, global")
    macs_reductions: list[float] = Field(default_factory=lambda: [1.5, 2.0, 3.0], description="structured")
    quantizations: list[str] = Field(default_factory=lambda: ["none", "int8-static"])
    steps: int = Field(2, ge=1, le=20)
    finetune_epochs: int = Field(1, ge=0, le=50)
    round_to: int | None = Field(8, ge=1)

    @field_validator("sparsities")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if any(not 0 < r < 1 for r in v):
            raise ValueError(f"sparsities must be in (0, 1), got {v}")
        return v

    @field_validator("macs_reductions")
    @classmethod
    def _reductions(cls, v: list[float]) -> list[float]:
        if any(r <= 1 for r in v):
            raise ValueError(f"macs_reductions must be > 1, got {v}")
        return v


class DriftConfig(Strict):
    """``drift:``: the reference statistics signed into every manifest, and the scores that raise drift events
    (device_agent.drift: PSI 0.1 is a moderate shift, 0.25 a significant one; a mean shift is in reference std)."""

    reference_samples: int = Field(2000, ge=0, le=100_000, description="samples the exported model is run on for "
                                   "the manifest's drift reference; 0: no reference")
    reference_split: Literal["test", "train"] = Field("test", description="the data split the reference summarises: "
                                                      "the held-out test split (a model is more confident on the data "
                                                      "it was fitted to), or the training split")
    window: int = Field(1000, ge=1, le=1_000_000, description="requests a device's drift scores cover")
    psi_outputs: float = Field(0.25, gt=0, lt=1e6, description="PSI of the predicted-class shares")
    psi_confidence: float = Field(0.25, gt=0, lt=1e6, description="PSI of the top-1 confidence histogram")
    mean_shift: float = Field(0.25, gt=0, lt=1e6, description="|live mean - reference mean| / reference std, "
                              "of any input channel")
    min_samples: int = Field(200, ge=1, le=1_000_000, description="samples in the window before any event")

    @model_validator(mode="after")
    def _window_holds_min_samples(self) -> "DriftConfig":
        # a device's window slides by one eighth (device_agent.drift.SLOTS): it holds 7/8 of it at the least
        from device_agent.drift import SLOTS

        if self.min_samples > self.window * (SLOTS - 1) // SLOTS:
            raise ValueError(f"min_samples {self.min_samples} can never be reached: a window of {self.window} "
                             f"requests holds {self.window * (SLOTS - 1) // SLOTS} at the least as it slides; "
                             f"make window at least {-(-self.min_samples * SLOTS // (SLOTS - 1))}")
        return self

    def thresholds(self):
        """The thresholds as both ends read them (device_agent.drift.Thresholds)."""
        from device_agent.drift import Thresholds

        return Thresholds(self.psi_outputs, self.psi_confidence, self.mean_shift, self.min_samples)


class TargetOverride(Strict):
    budgets: Budgets = Budgets()


class SigningConfig(Strict):
    key_dir: Path = Path(".edgefleet/keys")
