"""deploy.yaml's ``fleet:`` section: the broker, the device inventory and how devices are provisioned, how a
rollout proceeds, payloads over HTTP, telemetry retention and the dashboard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..errors import ConfigError
from .sections import Strict


class BrokerAddress(Strict):
    host: str
    port: int = Field(1883, gt=0, lt=65536)
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    ca_file: Path | None = Field(None, description="TLS: the fleet CA (from `pipeline broker config`)")
    cert_file: Path | None = Field(None, description="TLS: the host's client certificate")
    key_file: Path | None = None


class ShadowConfig(Strict):
    """``rollout.shadow:``, stage 0 of a rollout: the candidate is installed beside the active model, which keeps
    serving, and runs off the request path on a share of the live requests; it is promoted (canaries, then the
    rest) only when every shadowing device agrees with its active model often enough, over enough requests, without
    being too slow. See docs/rollouts.md."""

    sample: float = Field(0.1, gt=0, le=1, description="share of the live requests the candidate also runs on")
    max_cpu: float = Field(0.25, gt=0, le=1, description="share of one core the candidate's runs may take at most")
    min_agreement: float = Field(0.9, ge=0, le=1, description="per device, the share of compared requests with the "
                                 "active model's top-1 class (an error in a shadow run does not agree)")
    max_distance: float | None = Field(None, ge=0, lt=1e300, description="the mean absolute output distance allowed "
                                       "(the judge for outputs that are not class scores; none: such outputs abort)")
    min_samples: int = Field(200, ge=1, le=10_000_000, description="requests compared on each device before it is "
                             "judged")
    max_latency_ratio: float | None = Field(1.5, gt=0, lt=1e6, description="the candidate's p95 over the active "
                                            "model's, on the same requests; none: not judged (the target's p95 "
                                            "budget still is, unless abort_on_latency is off)")
    timeout_s: float = Field(600, gt=0, description="for the samples to come in, once the devices are shadowing")
    devices: Literal["canary", "all"] = Field("canary", description="which devices shadow: the rollout's canaries, "
                                              "or every device of the class")
    report_every_s: float = Field(5.0, gt=0, le=3600, description="how often the host asks a shadowing device for "
                                  "its counters (each ask runs the agent's short benchmark)")

    def leaf(self):
        """What the shadow job's signed manifest carries (device_agent.quality.Shadow)."""
        from device_agent.quality import Shadow

        return Shadow(self.sample, self.max_cpu)


class RolloutConfig(Strict):
    canary_fraction: float = Field(0.2, gt=0, le=1, description="share of the devices updated first")
    canary_min: int = Field(1, ge=1)
    max_failure_fraction: float = Field(0.0, ge=0, le=1, description="canary failures tolerated before aborting")
    abort_on_latency: bool = Field(True, description="abort when a canary's measured p95 exceeds the latency budget")
    shadow: ShadowConfig | None = Field(None, description="a shadow stage before the canaries; none: no shadow stage")


class HttpConfig(Strict):
    """Payloads over HTTP(S) with Range requests instead of MQTT chunks (large models)."""

    serve: bool = Field(False, description="serve WORKDIR/artifacts from this host while delivering")
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, lt=65536, description="0: a free port")
    base_url: str | None = Field(None, description="where you publish WORKDIR/artifacts yourself (a CDN, S3)")


class RetentionConfig(Strict):
    """Telemetry kept raw for ``raw``, then one row per device and ``bucket``; rollups and events go after
    ``keep``. Durations: 30s, 5m, 12h, 7d."""

    raw: str = "7d"
    bucket: str = "5m"
    keep: str = "90d"

    @model_validator(mode="after")
    def _check(self) -> "RetentionConfig":
        try:
            self.policy()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def policy(self):
        from ..fleet.retention import RetentionPolicy, parse_duration

        return RetentionPolicy(parse_duration(self.raw, "fleet.retention.raw"),
                               parse_duration(self.bucket, "fleet.retention.bucket"),
                               parse_duration(self.keep, "fleet.retention.keep"))


class DashboardConfig(Strict):
    host: str = Field("127.0.0.1", description="bind address; beyond loopback a token is required")
    port: int = Field(8600, ge=0, lt=65536)


def _topic_id(value: str, what: str) -> str:
    """A name that becomes an MQTT topic level (the protocol's rule), as a pydantic validation error."""
    from device_agent.protocol import ProtocolError, check_id

    try:
        return check_id(value, what)
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None


class DeviceSpec(Strict):
    """One device of the inventory: what `pipeline provision` reaches over SSH and `deploy` delivers to."""

    id: str
    target: str | None = Field(None, description="its device class (targets/*.yaml); deploy --target picks by it")
    host: str | None = Field(None, description="[user@]address for SSH; none: provisioned by other means")
    port: int = Field(22, gt=0, lt=65536)
    user: str | None = Field(None, description="SSH user (default: the one in host, else yours)")
    key: Path | None = Field(None, description="SSH private key (default: your agent and ~/.ssh keys)")
    groups: list[str] = Field(default_factory=list)
    install_dir: str | None = Field(None, description="on the device (default: /opt/edgefleet as root, "
                                                      "else ~/.edgefleet-agent)")
    python: str = Field("python3", description="the device's Python interpreter")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return _topic_id(v, "device id")


class ProvisionConfig(Strict):
    broker_host: str | None = Field(None, description="the broker's address as devices reach it "
                                                      "(default: fleet.broker.host)")
    metrics_interval_s: float = Field(30.0, ge=0, description="how often provisioned agents report metrics")
    parallel: int = Field(8, ge=1, le=64, description="hosts provisioned at once")
    online_timeout_s: float = Field(60.0, gt=0, description="wait this long for a new agent to report online")
    min_free_mb: float = Field(300.0, ge=0, description="free disk space a device needs for an install")
    strict_host_keys: bool = Field(False, description="only hosts already in ~/.ssh/known_hosts (default: accept "
                                                     "unknown host keys, refuse changed ones)")


class FleetConfig(Strict):
    broker: BrokerAddress | None = None
    local_broker: Literal["auto", "mosquitto", "amqtt"] = "auto"
    topic_prefix: str = "edgefleet"
    local_agents: int = Field(1, ge=0, le=64)
    devices: list[DeviceSpec] = Field(default_factory=list,
                                      description="the inventory: device ids, or {id, target, host, ...} each")
    provision: ProvisionConfig = ProvisionConfig()
    timeout_s: float = Field(120, gt=0)
    broadcast: Literal["auto", "always", "never"] = Field(
        "auto", description="publish each chunk once for a whole wave on its artifact topic (auto: waves of more "
                            "than one device), or serve every device on its own (never)")
    deltas: bool = Field(True, description="send a device a delta against the version it runs when this host has "
                                            "that version's artifact and the delta is smaller (pipeline.bundle.delta)")
    rollout: RolloutConfig = RolloutConfig()
    http: HttpConfig = HttpConfig()
    retention: RetentionConfig = RetentionConfig()
    dashboard: DashboardConfig = DashboardConfig()
    store: str | None = Field(
        None, description="the fleet store: a postgresql:// URL (several ingesters, one server), or a SQLite file "
                          "(relative: to the work directory); default: WORKDIR/fleet.db")

    @field_validator("store")
    @classmethod
    def _store(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.strip():
            raise ValueError("expected a postgresql:// URL or a SQLite file's path, got an empty string")
        scheme = v.split("://", 1)[0].lower() if "://" in v else None
        if scheme is not None and scheme not in ("postgresql", "postgres"):
            raise ValueError(f"the fleet store is SQLite (a file's path) or PostgreSQL (a postgresql:// URL); "
                             f"{scheme}:// is neither")
        return v

    def store_at(self, workdir: Path) -> Path | str:
        """Where the fleet store is: ``store``'s URL, its path (relative: under ``workdir``), or WORKDIR/fleet.db."""
        if self.store is None:
            return workdir / "fleet.db"
        if "://" in self.store:
            return self.store
        path = Path(self.store).expanduser()
        return path if path.is_absolute() else workdir / path

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, v: Any) -> Any:
        """A bare string is a device id (the short form); ids are unique."""
        if isinstance(v, list):
            v = [{"id": d} if isinstance(d, str) else d for d in v]
            ids = [d.get("id") for d in v if isinstance(d, dict)]
            dupes = sorted({i for i in ids if ids.count(i) > 1 and i is not None})
            if dupes:
                raise ValueError(f"device ids must be unique; repeated: {dupes}")
        return v

    def device_ids(self, target: str | None = None) -> list[str]:
        """The inventory's ids; with ``target``, those of that class (and those whose class is not given)."""
        return [d.id for d in self.devices if target is None or d.target in (None, target)]

    def device(self, device_id: str) -> DeviceSpec:
        for d in self.devices:
            if d.id == device_id:
                return d
        raise ConfigError(f"fleet.devices has no device {device_id!r}; it has: "
                          f"{', '.join(d.id for d in self.devices) or '(none)'}")

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return _topic_id(v, "topic_prefix")
