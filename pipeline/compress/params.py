"""Every compression method's parameters, and the registry of methods, without torch.

A method is a parameter model here plus an implementation (a ``Method`` subclass) named by
``"module:Class"`` and imported only when a recipe runs, so reading and validating deploy.yaml, and
`pipeline config schema`, never import torch (torchao's config + handler split).

Adding a method: its ``Params`` model and one ``METHODS.register`` line below, and its module with the
``Method`` subclass.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from ..registry import Registry

if TYPE_CHECKING:
    from .base import Method


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FinetuneParams(Params):
    """Fine-tuning after a step; shared by the methods that prune a trained model."""

    finetune_epochs: int = Field(1, ge=0, le=200, description="fine-tuning epochs after each step")
    lr: float | None = Field(None, gt=0, description="fine-tuning learning rate (default: finetune.lr)")


#: the names of ``pipeline.compress.importance.CRITERIA`` (that registry holds torch code; a test keeps both equal)
CRITERION_NAMES = ("bn-scale", "hessian", "l1", "l2", "random", "taylor")


def known_criterion(name: str) -> str:
    """For parameter validators: an unknown name becomes a validation error listing the known ones."""
    if name not in CRITERION_NAMES:
        raise ValueError(f"unknown importance criterion {name!r}; known: {', '.join(CRITERION_NAMES)}")
    return name


#: a parameter type for recipes: ``criterion: CriterionName = "l1"``
CriterionName = Annotated[str, AfterValidator(known_criterion)]


class GuardParams(Params):
    """What no unstructured mask does unless asked: take a layer past a cap, or empty an output channel or a
    classifier row (a class the model could then never predict). The overall sparsity is still reached."""

    max_layer_sparsity: float = Field(0.98, gt=0, le=1, description="no layer loses more than this share of "
                                      "its weights (1: no cap)")
    min_row_weights: int = Field(1, ge=0, description="every output channel / classifier row keeps at least "
                                 "this many weights (0: rows may empty)")

    @model_validator(mode="after")
    def _reachable(self) -> "GuardParams":
        target = getattr(self, "sparsity", None)
        if target is not None and target > self.max_layer_sparsity:
            raise ValueError(f"sparsity {target} is above max_layer_sparsity {self.max_layer_sparsity}: no layer "
                             "may go that far; raise max_layer_sparsity or lower the sparsity")
        return self


class UnstructuredParams(FinetuneParams, GuardParams):
    scope: Literal["global", "layer"] = "global"
    normalise: Literal["lamp", "none"] = Field("lamp", description="global scope: put layers on one scale "
                                               "first (LAMP, Lee et al. 2021) or rank raw scores")
    bn_fold: bool = Field(True, description="magnitude criteria: weigh each output channel by the following "
                          "BatchNorm's |gamma|/sigma")
    sparsity: float = Field(gt=0, lt=1, description="fraction of weights set to zero at the end")
    steps: int = Field(1, ge=1, le=100, description="1 = one-shot; more = iterative")
    schedule: Literal["polynomial", "linear"] = "polynomial"
    criterion: CriterionName = "l1"
    score_samples: int = Field(256, ge=1, description="training samples for gradient-based criteria")


class StructuredParams(FinetuneParams):
    criterion: CriterionName = "l2"
    ratio: float | None = Field(None, gt=0, lt=1, description="share of channels removed per layer")
    macs_reduction: float | None = Field(None, gt=1, description="target: dense MACs / pruned MACs")
    global_pruning: bool = Field(False, description="rank channel groups across layers, not within each")
    max_layer_ratio: float = Field(0.9, gt=0, lt=1, description="never remove more than this share of a layer")
    steps: int = Field(1, ge=1, le=50)
    round_to: int | None = Field(None, ge=1, description="keep channel counts multiples of this (vector width)")
    ignore: list[str] = Field(default_factory=list, description="module names never pruned (the classifier always is)")
    score_samples: int = Field(64, ge=1, description="training samples for gradient-based criteria")

    @model_validator(mode="after")
    def _one_target(self) -> "StructuredParams":
        if (self.ratio is None) == (self.macs_reduction is None):
            raise ValueError("give exactly one of 'ratio' (channels removed per layer) or 'macs_reduction'")
        return self


class LowRankParams(FinetuneParams):
    energy: float | None = Field(None, gt=0, le=1, description="share of squared singular values kept")
    rank_ratio: float | None = Field(None, gt=0, lt=1, description="share of the full rank kept")
    layers: Literal["all", "linear", "conv"] = "all"
    skip_classifier: bool = True

    @model_validator(mode="after")
    def _one(self) -> "LowRankParams":
        if (self.energy is None) == (self.rank_ratio is None):
            raise ValueError("give exactly one of 'energy' or 'rank_ratio'")
        return self


class LotteryParams(GuardParams):
    rounds: int = Field(8, ge=1, le=40)
    prune_per_round: float = Field(0.2, gt=0, lt=1, description="share of the remaining weights removed per round")
    epochs: int = Field(8, ge=1, description="training epochs of the dense run and of every round")
    rewind_steps: int = Field(100, ge=0, description="optimizer steps into dense training the survivors rewind to")
    tolerance: float = Field(0.003, ge=0, le=1, description="a winning ticket loses at most this accuracy")
    scope: Literal["global", "layer"] = "global"
    normalise: Literal["lamp", "none"] = Field("lamp", description="global scope: LAMP scores or raw magnitudes")
    bn_fold: bool = Field(True, description="weigh each output channel by the following BatchNorm's |gamma|/sigma")
    lr: float | None = Field(None, gt=0, description="default: model.train.lr")
    reinit: bool = Field(True, description="start from a fresh seeded initialisation (the hypothesis' setting)")


class SensitivityParams(FinetuneParams, GuardParams):
    sparsity: float = Field(gt=0, lt=1, description="global target: fraction of prunable weights removed")
    ratios: list[float] = Field(default_factory=lambda: [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98])
    criterion: CriterionName = "l1"
    steps: int = Field(1, ge=1, le=100)
    schedule: Literal["polynomial", "linear"] = "polynomial"
    score_samples: int = Field(256, ge=1)
    val_samples: int = Field(500, ge=50, description="held-out training samples the scan evaluates on")
    bn_fold: bool = Field(True, description="magnitude criteria: weigh each output channel by the following "
                          "BatchNorm's |gamma|/sigma")

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < r < 1 for r in v):
            raise ValueError(f"ratios must be in (0, 1), got {v}")
        return sorted(set(v))


class SparseTrainingParams(GuardParams):
    algorithm: Literal["rigl", "set"] = "rigl"
    sparsity: float = Field(gt=0, lt=1, description="fixed share of prunable weights that are zero throughout")
    epochs: int = Field(10, ge=1)
    distribution: Literal["erk", "uniform"] = "erk"
    update_interval: int = Field(50, ge=1, description="optimizer steps between mask updates")
    drop_fraction: float = Field(0.3, gt=0, lt=1)
    end_fraction: float = Field(0.75, gt=0, le=1, description="share of training after which masks freeze")
    from_scratch: bool = Field(True, description="re-initialise; false starts from the trained weights")
    lr: float | None = Field(None, gt=0, description="default: model.train.lr")


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: the name deploy.yaml uses, its parameters, and where its code lives."""

    name: str
    params: type[Params]
    #: ``"module:Class"``, relative to this package when it starts with a dot; imported by ``load``
    implementation: str

    def load(self) -> type[Method]:
        module, _, attr = self.implementation.partition(":")
        cls = getattr(importlib.import_module(module, __package__), attr)
        if cls.Params is not self.params:
            raise TypeError(f"{self.implementation}.Params is {cls.Params.__name__}, "
                            f"registered as {self.params.__name__}")
        return cls


METHODS: Registry[MethodSpec] = Registry("compression method")


def register_method(name: str, params: type[Params], implementation: str) -> MethodSpec:
    spec = MethodSpec(name, params, implementation)
    METHODS.register(name)(spec)
    return spec


register_method("magnitude", UnstructuredParams, ".unstructured:Magnitude")
register_method("unstructured", UnstructuredParams, ".unstructured:Unstructured")
register_method("structured", StructuredParams, ".structured:Structured")
register_method("lowrank", LowRankParams, ".lowrank:LowRank")
register_method("lottery", LotteryParams, ".lottery:Lottery")
register_method("sensitivity", SensitivityParams, ".sensitivity:Sensitivity")
register_method("sparse-training", SparseTrainingParams, ".sparse_training:SparseTraining")
