"""Wire protocol v1: topics, message schemas and the binary chunk frame.

Topics are scoped per device so broker ACLs stay simple::

    <prefix>/v1/<device>/job            host -> device, QoS 1, retained: the signed manifest
    <prefix>/v1/<device>/stream/get     device -> host: which chunks it still needs
    <prefix>/v1/<device>/stream/data    host -> device: one chunk, binary frame
    <prefix>/v1/<device>/stream/rejected host -> device: a request the host cannot serve
    <prefix>/v1/<device>/status         device -> host, retained: state machine position
    <prefix>/v1/<device>/online         device -> host, retained, Last Will "offline"
    <prefix>/v1/<device>/metrics        device -> host: latency, memory
    <prefix>/v1/<device>/events         device -> host: refusals, rollbacks, activations
    <prefix>/v1/<device>/cmd            host -> device: report, rollback, benchmark

Everything but ``stream/data`` is UTF-8 JSON carrying ``"v": PROTOCOL_VERSION``.
Only MQTT 3.1.1 features are required; MQTT 5 is used where the broker offers it.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ProtocolError

PROTOCOL_VERSION = 1
DEFAULT_PREFIX = "edgefleet"
DEFAULT_CHUNK_SIZE = 32 * 1024
#: Chunks a device asks for at once: enough to fill the pipe, few enough to resume cheaply.
DEFAULT_WINDOW = 16

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Leaf(str, enum.Enum):
    JOB = "job"
    STREAM_GET = "stream/get"
    STREAM_DATA = "stream/data"
    STREAM_REJECTED = "stream/rejected"
    STATUS = "status"
    ONLINE = "online"
    METRICS = "metrics"
    EVENTS = "events"
    CMD = "cmd"


class State(str, enum.Enum):
    """Where a device stands in an update; persisted by the agent before each side effect."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    TESTING = "testing"
    ACTIVATED = "activated"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


TERMINAL_STATES = frozenset({State.ACTIVATED, State.ROLLED_BACK, State.FAILED})


class ResultCode(enum.IntEnum):
    """Update results, numbered as the LwM2M Firmware Update object (5) numbers them."""

    INITIAL = 0
    SUCCESS = 1
    NOT_ENOUGH_STORAGE = 2
    OUT_OF_MEMORY = 3
    CONNECTION_LOST = 4
    INTEGRITY_FAILURE = 5
    UNSUPPORTED_PACKAGE = 6
    INVALID_URI = 7
    UPDATE_FAILED = 8
    UNSUPPORTED_PROTOCOL = 9


def check_id(value: str, what: str) -> str:
    """Device ids, prefixes and job ids become topic levels: no wildcards, no slashes."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ProtocolError(
            f"{what} {value!r} is not valid: expected 1-64 characters of letters, digits, '_', '-', '.', "
            "starting with a letter or digit (it becomes an MQTT topic level)"
        )
    return value


def topic(prefix: str, device_id: str, leaf: Leaf) -> str:
    return f"{prefix}/v{PROTOCOL_VERSION}/{device_id}/{leaf.value}"


def parse_topic(prefix: str, name: str) -> tuple[str, Leaf]:
    """Split ``<prefix>/v1/<device>/<leaf>`` into (device, leaf)."""
    head = f"{prefix}/v{PROTOCOL_VERSION}/"
    if not name.startswith(head):
        raise ProtocolError(f"topic {name!r} is outside {head}#")
    device_id, _, leaf = name[len(head):].partition("/")
    try:
        return device_id, Leaf(leaf)
    except ValueError:
        raise ProtocolError(f"topic {name!r}: unknown leaf {leaf!r}") from None


def now() -> float:
    return round(time.time(), 3)


# --------------------------------------------------------------------------- JSON messages

def encode(message: Any) -> bytes:
    body = asdict(message) if hasattr(message, "__dataclass_fields__") else dict(message)
    body["v"] = PROTOCOL_VERSION
    return json.dumps(body, separators=(",", ":")).encode()


def decode(payload: bytes, what: str) -> dict[str, Any]:
    """Parse a JSON message and check its protocol version; errors name the message kind."""
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{what}: payload is not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"{what}: expected a JSON object, got {type(body).__name__}")
    if body.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"{what}: protocol version {body.get('v')!r}, this agent speaks {PROTOCOL_VERSION}")
    return body


def require(body: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ProtocolError(f"{what}: field {key!r} must be {names}, got {value!r}")
    return value


@dataclass(frozen=True)
class Job:
    job_id: str
    manifest: dict[str, Any]  # a signed envelope, see device_agent.manifest

    @classmethod
    def parse(cls, payload: bytes) -> "Job":
        body = decode(payload, "job")
        return cls(check_id(require(body, "job_id", str, "job"), "job_id"), require(body, "manifest", dict, "job"))


@dataclass(frozen=True)
class StreamGet:
    """Chunks a device still needs. The host skips chunks it sent moments ago (they may still be queued
    for the device) unless ``resend`` is set: the device saw those arrive corrupt."""

    job_id: str
    chunks: list[int]
    resend: bool = False

    @classmethod
    def parse(cls, payload: bytes) -> "StreamGet":
        body = decode(payload, "stream/get")
        chunks = require(body, "chunks", list, "stream/get")
        if not all(isinstance(i, int) and i >= 0 for i in chunks):
            raise ProtocolError("stream/get: 'chunks' must be a list of non-negative integers")
        return cls(require(body, "job_id", str, "stream/get"), chunks, bool(body.get("resend", False)))


@dataclass(frozen=True)
class Status:
    device_id: str
    state: str
    target: str
    active_version: int | None = None
    active_slot: str | None = None
    job_id: str | None = None
    version: int | None = None
    progress: float | None = None
    reason: str | None = None
    result_code: int = int(ResultCode.INITIAL)
    agent_version: str | None = None
    ts: float = field(default_factory=now)
    #: the device's own order of what it said: ``boot`` counts agent starts (persisted), ``seq`` counts messages
    #: within one start. The host orders a device's messages by (boot, seq), never by comparing clocks.
    boot: int | None = None
    seq: int | None = None


@dataclass(frozen=True)
class Metrics:
    device_id: str
    version: int | None
    latency_ms_p50: float
    latency_ms_p95: float
    rss_mb: float
    runs: int
    emulated: bool
    latency_ms_p99: float = 0.0
    throughput_ips: float = 0.0
    errors: int = 0  # inference errors since the agent started
    cpu_percent: float | None = None
    temperature_c: float | None = None  # hottest thermal zone, where the device has one
    energy_mj: float | None = None  # per inference
    energy_source: str | None = None  # "measured:<counter>" or "predicted"
    slot: str | None = None
    uptime_s: float = 0.0
    state: str | None = None
    ts: float = field(default_factory=now)
    boot: int | None = None
    seq: int | None = None


@dataclass(frozen=True)
class Event:
    device_id: str
    kind: str
    message: str
    job_id: str | None = None
    version: int | None = None
    result_code: int | None = None
    ts: float = field(default_factory=now)
    boot: int | None = None
    seq: int | None = None


# --------------------------------------------------------------------------- binary chunk frame

_MAGIC = b"EFC1"
_HEAD = struct.Struct(">4sI")


def encode_chunk(job_id: str, index: int, data: bytes) -> bytes:
    """``EFC1`` | u32 header length | JSON header {job_id, index, sha256} | raw bytes."""
    header = json.dumps(
        {"job_id": job_id, "index": index, "sha256": hashlib.sha256(data).hexdigest()}, separators=(",", ":")
    ).encode()
    return _HEAD.pack(_MAGIC, len(header)) + header + data


class CorruptChunk(ProtocolError):
    """A chunk whose header parsed but whose bytes do not match their hash: ask for it again."""

    def __init__(self, message: str, job_id: str, index: int) -> None:
        super().__init__(message)
        self.job_id, self.index = job_id, index


def decode_chunk(frame: bytes) -> tuple[str, int, bytes]:
    """Return (job_id, index, data); raise ProtocolError when the frame or its hash is wrong."""
    if len(frame) < _HEAD.size:
        raise ProtocolError(f"stream/data: frame of {len(frame)} bytes is shorter than its header")
    magic, hlen = _HEAD.unpack_from(frame)
    if magic != _MAGIC:
        raise ProtocolError(f"stream/data: bad magic {magic!r}, expected {_MAGIC!r}")
    try:
        header = json.loads(frame[_HEAD.size:_HEAD.size + hlen])
        job_id, index, digest = header["job_id"], int(header["index"]), header["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"stream/data: unreadable header ({exc})") from None
    data = frame[_HEAD.size + hlen:]
    if hashlib.sha256(data).hexdigest() != digest:
        raise CorruptChunk(f"stream/data: chunk {index} of job {job_id} is corrupt (sha256 mismatch)", job_id, index)
    return job_id, index, data
