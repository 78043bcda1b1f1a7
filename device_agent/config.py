"""agent.yaml: the device agent's configuration, loaded into a frozen dataclass.

Deliberately free of pydantic so the agent installs small; unknown keys and bad values
are still refused with the file, the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .protocol import DEFAULT_PREFIX, ProtocolError, check_id

PROTOCOLS = ("auto", "5", "3.1.1")


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "auto"  # "auto" tries MQTT 5 and falls back to 3.1.1
    keepalive: int = 30
    ca_file: Path | None = None  # TLS: the fleet CA; with cert_file and key_file, this client's identity
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class ServeSettings:
    """The local inference API (device_agent.serving): on by default, on ``<state_dir>/infer.sock``."""

    enabled: bool = True
    socket: Path | None = None  # default: <state_dir>/infer.sock
    socket_mode: int = 0o660  # read and write for the owner and the device's app group
    port: int | None = None  # a loopback TCP port as well (0: any free one); None: the socket only
    workers: int = 2
    queue: int = 32
    deadline_ms: float = 10_000.0
    max_connections: int = 64
    max_body_mb: float = 32.0


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    target: str
    state_dir: Path
    trusted_keys: tuple[Path, ...]
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    topic_prefix: str = DEFAULT_PREFIX
    runtime: str = "onnxruntime"
    threads: int | None = None
    benchmark_runs: int = 50
    metrics_interval_s: float = 0.0  # 0: report metrics only after activation and on command
    emulated: bool = False  # a stand-in for the target class on the host: figures are labelled so
    serve: ServeSettings = field(default_factory=ServeSettings)

    @property
    def socket_path(self) -> Path | None:
        if not self.serve.enabled:
            return None
        return self.serve.socket or self.state_dir / "infer.sock"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["state_dir"] = str(self.state_dir)
        d["serve"] = {k: str(v) if isinstance(v, Path) else v for k, v in d["serve"].items() if v is not None}
        d["trusted_keys"] = [str(p) for p in self.trusted_keys]
        d["broker"] = {k: str(v) if isinstance(v, Path) else v for k, v in d["broker"].items() if v is not None}
        return d


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _check_keys(data: dict[str, Any], cls: type, where: str) -> None:
    allowed = _fields(cls)
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = [n for n, f in allowed.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")


def _typed(where: str, key: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"{where}: '{key}' must be {kind.__name__}, got {value!r}")
    return value


def parse_config(data: Any, where: str, base_dir: Path | None = None) -> AgentConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    _check_keys(data, AgentConfig, where)
    base_dir = base_dir or Path.cwd()
    broker_data = data.get("broker", {}) or {}
    if not isinstance(broker_data, dict):
        raise ConfigError(f"{where}: 'broker' must be a mapping with {sorted(_fields(BrokerConfig))}")
    _check_keys(broker_data, BrokerConfig, f"{where}: broker")
    tls = {}
    for key in ("ca_file", "cert_file", "key_file"):
        if broker_data.get(key) is not None:
            path = (base_dir / _typed(where, f"broker.{key}", broker_data[key], str)).resolve()
            if not path.is_file():
                raise ConfigError(f"{where}: broker.{key} {path} does not exist")
            tls[key] = path
    if tls and ("ca_file" not in tls or ("cert_file" in tls) != ("key_file" in tls)):
        raise ConfigError(f"{where}: TLS needs broker.ca_file, and broker.cert_file with broker.key_file for a "
                          "client certificate")
    broker = BrokerConfig(
        host=_typed(where, "broker.host", broker_data.get("host", "127.0.0.1"), str),
        port=_typed(where, "broker.port", broker_data.get("port", 1883), int),
        protocol=str(broker_data.get("protocol", "auto")),
        keepalive=_typed(where, "broker.keepalive", broker_data.get("keepalive", 30), int),
        **tls,
    )
    if broker.protocol not in PROTOCOLS:
        raise ConfigError(f"{where}: broker.protocol {broker.protocol!r} is not one of {list(PROTOCOLS)}")
    if not 0 < broker.port < 65536:
        raise ConfigError(f"{where}: broker.port {broker.port} is outside 1-65535")
    keys = data["trusted_keys"]
    if isinstance(keys, str):
        keys = [keys]
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
        raise ConfigError(f"{where}: 'trusted_keys' must be a non-empty list of public key file paths")
    threads = data.get("threads")
    if threads is not None and (_typed(where, "threads", threads, int) < 1):
        raise ConfigError(f"{where}: 'threads' must be >= 1 or null, got {threads}")
    try:
        device_id = check_id(_typed(where, "device_id", data["device_id"], str), "device_id")
        prefix = check_id(_typed(where, "topic_prefix", data.get("topic_prefix", DEFAULT_PREFIX), str),
                          "topic_prefix")
    except ProtocolError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    runs = _typed(where, "benchmark_runs", data.get("benchmark_runs", 50), int)
    if runs < 1:
        raise ConfigError(f"{where}: 'benchmark_runs' must be >= 1, got {runs}")
    interval = _typed(where, "metrics_interval_s", data.get("metrics_interval_s", 0.0), float)
    if interval < 0:
        raise ConfigError(f"{where}: 'metrics_interval_s' must be >= 0, got {interval}")
    serve = _serve(data.get("serve", {}), where, base_dir)
    return AgentConfig(
        serve=serve,
        device_id=device_id,
        target=_typed(where, "target", data["target"], str),
        state_dir=(base_dir / _typed(where, "state_dir", data["state_dir"], str)).resolve(),
        trusted_keys=tuple((base_dir / k).resolve() for k in keys),
        broker=broker,
        topic_prefix=prefix,
        runtime=_typed(where, "runtime", data.get("runtime", "onnxruntime"), str),
        threads=threads,
        benchmark_runs=runs,
        metrics_interval_s=interval,
        emulated=_typed(where, "emulated", data.get("emulated", False), bool),
    )


def _serve(data: Any, where: str, base_dir: Path) -> ServeSettings:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: 'serve' must be a mapping with {sorted(_fields(ServeSettings))}")
    _check_keys(data, ServeSettings, f"{where}: serve")
    d = ServeSettings()
    out: dict[str, Any] = {}
    for key, kind, low, high in (("workers", int, 1, 64), ("queue", int, 0, 10_000), ("max_connections", int, 1, 4096),
                                 ("deadline_ms", float, 1, 3_600_000), ("max_body_mb", float, 0.001, 1024),
                                 ("socket_mode", int, 0, 0o777)):
        value = _typed(where, f"serve.{key}", data.get(key, getattr(d, key)), kind)
        if not low <= value <= high:
            raise ConfigError(f"{where}: serve.{key} {value} is outside [{low}, {high}]")
        out[key] = value
    port = data.get("port")
    if port is not None and not 0 <= _typed(where, "serve.port", port, int) < 65536:
        raise ConfigError(f"{where}: serve.port {port} is outside 0-65535")
    socket_path = data.get("socket")
    return ServeSettings(enabled=_typed(where, "serve.enabled", data.get("enabled", True), bool),
                         socket=(base_dir / _typed(where, "serve.socket", socket_path, str)).resolve()
                         if socket_path is not None else None, port=port, **out)


def load_config(path: str | Path) -> AgentConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read agent config ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    return parse_config(data, str(path), path.parent)
