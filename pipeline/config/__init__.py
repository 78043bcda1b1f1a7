"""deploy.yaml, loaded into validated, frozen pydantic models.

Every model forbids unknown keys; a validation failure becomes one ConfigError that names the
file, the field path and what is allowed, one line per problem.

- ``load``: the whole file (``DeployConfig``) and reading it: ``load_deploy``, ``parse_deploy``, ``dump_deploy``,
  ``json_schema``
- ``sections``: what the stages read (model, data, train, finetune, export, fit, target overrides, signing, drift)
- ``fleet``: the ``fleet:`` section (broker, devices, provisioning, rollout, http, retention, dashboard)
- ``steps``: ``compress:`` and ``recipes:`` steps, one typed model per registered compression method
- ``names``: the names a registry or targets/ must know (zoo model, data set, device classes, quantizations)
- ``views``: what one stage reads of a deployment (``CompressView``), paths resolved
- ``errors``: a pydantic ValidationError as our one message, a line per problem
"""

from __future__ import annotations

from ..targets import Budgets
from .errors import error_lines, format_validation_error
from .fleet import (BrokerAddress, DashboardConfig, DeviceSpec, FleetConfig, HttpConfig, ProvisionConfig,
                    RetentionConfig, RolloutConfig, ShadowConfig)
from .load import (CONFIG_VERSION, MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, MAX_CONFIG_NODES, DeployConfig, dump_deploy,
                   json_schema, load_deploy, parse_deploy)
from .names import ZOO_NAMES, check_names
from .sections import (BUDGET_KEYS, DataConfig, DriftConfig, ExportConfig, FinetuneConfig, FitConfig, ModelConfig,
                       SigningConfig, Strict, TargetOverride, TrainConfig)
from .steps import CompressStep, Step, TypedStep, parse_steps, step_union
from .views import CompressView

__all__ = ["BUDGET_KEYS", "CONFIG_VERSION", "MAX_CONFIG_BYTES", "MAX_CONFIG_DEPTH", "MAX_CONFIG_NODES", "ZOO_NAMES",
           "BrokerAddress", "Budgets", "CompressStep", "CompressView", "DashboardConfig", "DataConfig", "DeployConfig",
           "DeviceSpec", "DriftConfig", "ExportConfig", "FinetuneConfig", "FitConfig", "FleetConfig", "HttpConfig",
           "ModelConfig", "ProvisionConfig", "RetentionConfig", "RolloutConfig", "ShadowConfig", "SigningConfig",
           "Step", "Strict", "TargetOverride", "TrainConfig", "TypedStep", "check_names", "dump_deploy", "error_lines",
           "format_validation_error", "json_schema", "load_deploy", "parse_deploy", "parse_steps", "step_union"]
