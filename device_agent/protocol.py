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
    <prefix>/v1/<device>/calibration    device -> host: timings of a calibration suite, as they are measured
    <prefix>/v1/<device>/cmd            host -> device: report, rollback, benchmark, drop_shadow
    <prefix>/v1/_artifacts/<job>        host -> a wave's devices: every chunk of a job once (broadcast)

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
    CALIBRATION = "calibration"


class State(str, enum.Enum):
    """Where a device stands in an update; persisted by the agent before each side effect."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    TESTING = "testing"
    #: timing a calibration suite (a job of kind ``calibration``: never installed, ends idle or failed)
    CALIBRATING = "calibrating"
    #: a candidate (a manifest with ``shadow``) installed and health-checked beside the active model, which
    #: keeps serving; the candidate runs on sampled requests until the host promotes it (a job for the same
    #: version without ``shadow``) or drops it (the ``drop_shadow`` command)
    SHADOWING = "shadowing"
    ACTIVATED = "activated"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


#: where a job ends: activated, rolled back or failed; a shadow job (a manifest with ``shadow``) ends shadowing
TERMINAL_STATES = frozenset({State.ACTIVATED, State.ROLLED_BACK, State.FAILED, State.SHADOWING})


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
            f"{what} {short(value)} is not valid: expected 1-64 characters of letters, digits, '_', '-', '.', "
            "starting with a letter or digit (it becomes an MQTT topic level)"
        )
    return value


def topic(prefix: str, device_id: str, leaf: Leaf) -> str:
    return f"{prefix}/v{PROTOCOL_VERSION}/{device_id}/{leaf.value}"


#: the topic level under ``<prefix>/v1/`` of broadcast artifacts: never a device id (those start with a letter or
#: digit), as ``_sync`` (the host's watch markers) is not
ARTIFACTS_LEVEL = "_artifacts"
#: the longest artifact topic a job may name (a prefix is a 1-64 character id, a job id too)
MAX_TOPIC_CHARS = 160


def artifact_topic(prefix: str, job_id: str) -> str:
    """Where a broadcast wave's chunks go, once each: ``<prefix>/v1/_artifacts/<job_id>`` (host -> devices)."""
    return f"{prefix}/v{PROTOCOL_VERSION}/{ARTIFACTS_LEVEL}/{job_id}"


def parse_topic(prefix: str, name: str) -> tuple[str, Leaf]:
    """Split ``<prefix>/v1/<device>/<leaf>`` into (device, leaf)."""
    head = f"{prefix}/v{PROTOCOL_VERSION}/"
    if not name.startswith(head):
        raise ProtocolError(f"topic {short(name)} is outside {head}#")
    device_id, _, leaf = name[len(head):].partition("/")
    try:
        return device_id, Leaf(leaf)
    except ValueError:
        raise ProtocolError(f"topic {short(name)}: unknown leaf {short(leaf)}") from None


def now() -> float:
    return round(time.time(), 3)


# --------------------------------------------------------------------------- JSON messages

#: Bounds checked before a byte of a message is parsed. A job carries the signed manifest with its golden
#: vectors (base64 tensors), so it may be large; every other message is small.
MAX_JOB_BYTES = 16 * 1024 * 1024
MAX_MESSAGE_BYTES = 256 * 1024
#: Deepest nesting of arrays and objects a message may have (the manifest needs 6).
MAX_DEPTH = 32
#: Untrusted text quoted in an error or event is cut to this many characters.
MAX_QUOTE = 160

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def short(value: Any, limit: int = MAX_QUOTE) -> str:
    """``repr(value)`` cut to ``limit`` characters: untrusted input is quoted, never echoed in full."""
    try:
        text = repr(value) if not isinstance(value, str) else repr(value[:limit + 1])
    except RecursionError:
        text = f"<{type(value).__name__} nested too deep>"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def json_depth(payload: bytes) -> int:
    """The deepest nesting of ``[`` and ``{`` outside strings, without parsing (linear time, bounded memory)."""
    import numpy as np

    bare = _JSON_STRING.sub(b'""', payload)
    if not bare:
        return 0
    codes = np.frombuffer(bare, dtype=np.uint8)
    step = np.zeros(256, dtype=np.int8)
    step[ord("[")] = step[ord("{")] = 1
    step[ord("]")] = step[ord("}")] = -1
    steps = step[codes]
    steps = steps[steps != 0]
    return int(np.cumsum(steps, dtype=np.int64).max()) if steps.size else 0


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def loads(payload: bytes, what: str, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    """Total JSON parsing of untrusted bytes: any input either parses into plain, finite, encodable values
    or raises ProtocolError. Size and nesting are bounded before parsing; NaN, infinities, numbers out of
    range and lone surrogates are refused."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{what}: payload must be bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) > max_bytes:
        raise ProtocolError(f"{what}: {len(payload)} bytes, more than the {max_bytes} a {what} may have")
    depth = json_depth(payload) if payload.count(b"[") + payload.count(b"{") > MAX_DEPTH else 0
    if depth > MAX_DEPTH:
        raise ProtocolError(f"{what}: nested {depth} levels deep, more than {MAX_DEPTH}")
    try:
        body = json.loads(payload, parse_constant=_reject_constant, parse_float=_finite_float)
        # a lone surrogate parses (from a "\ud800" escape, or raw: json reads bytes with surrogatepass) but
        # cannot be encoded, so nothing downstream could sign or store it
        if b"\\u" in payload or b"\xed" in payload:
            json.dumps(body, ensure_ascii=False).encode()
    except UnicodeError as exc:
        raise ProtocolError(f"{what}: payload is not JSON: text is not valid UTF-8 ({short(str(exc))})") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; so are too-long integers
        raise ProtocolError(f"{what}: payload is not JSON ({short(str(exc))})") from None
    return body


def encode(message: Any) -> bytes:
    body = asdict(message) if hasattr(message, "__dataclass_fields__") else dict(message)
    body["v"] = PROTOCOL_VERSION
    return json.dumps(body, separators=(",", ":")).encode()


def decode(payload: bytes, what: str, max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Parse a JSON message and check its protocol version; errors name the message kind. Total: any bytes
    give a dict or ProtocolError."""
    body = loads(payload, what, max_bytes)
    if not isinstance(body, dict):
        raise ProtocolError(f"{what}: expected a JSON object, got {type(body).__name__}")
    if body.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"{what}: protocol version {short(body.get('v'))}, this agent speaks {PROTOCOL_VERSION}")
    return body


def require(body: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ProtocolError(f"{what}: field {short(key)} must be {names}, got {short(value)}")
    return value


def _conforms(value: Any, hint: Any) -> bool:
    """``value`` (parsed JSON) fits the annotation ``hint`` (str, int, float, bool, or X | None)."""
    import types
    import typing

    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_conforms(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e300
    origin = typing.get_origin(hint)  # list[...] / dict[...]: the container's type (the message checks the items)
    if origin in (list, dict):
        return isinstance(value, origin)
    return isinstance(value, hint) if isinstance(hint, type) else False


class Message:
    """A device -> host message: built by the agent (``encode``), parsed by the host (``parse``): one schema.

    ``parse`` is total: a message of this type, or ProtocolError naming the first field that does not fit.
    Fields this version does not know are ignored (a newer agent may add some); missing optional ones
    take their defaults."""

    KIND = "message"

    @classmethod
    def parse(cls, payload: bytes):
        import dataclasses
        import typing

        body = decode(payload, cls.KIND)
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in body or body[f.name] is None and f.default is None:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ProtocolError(f"{cls.KIND}: field {f.name!r} is missing")
                continue
            if not _conforms(body[f.name], hints[f.name]):
                kind = getattr(hints[f.name], "__name__", None) or str(hints[f.name])
                raise ProtocolError(f"{cls.KIND}: field {f.name!r} must be {kind}, got {short(body[f.name], 60)}")
            values[f.name] = body[f.name]
        return cls(**values)


@dataclass(frozen=True)
class Job:
    """``artifact_topic`` (optional, absent when unicast): the topic a broadcast wave's chunks arrive on, which the
    device subscribes to before it reports ``downloading``; always ``artifact_topic(prefix, job_id)``, which the
    agent checks against its own prefix (a job can never make a device subscribe elsewhere)."""

    job_id: str
    manifest: dict[str, Any]  # a signed envelope, see device_agent.manifest
    artifact_topic: str | None = None

    @classmethod
    def parse(cls, payload: bytes) -> "Job":
        body = decode(payload, "job", MAX_JOB_BYTES)
        job_id = check_id(require(body, "job_id", str, "job"), "job_id")
        name = body.get("artifact_topic")
        if name is not None and not (isinstance(name, str) and len(name) <= MAX_TOPIC_CHARS
                                     and name.endswith(f"/v{PROTOCOL_VERSION}/{ARTIFACTS_LEVEL}/{job_id}")
                                     and not any(c in name for c in "+#\0")):
            raise ProtocolError(f"job: artifact_topic {short(name)} is not .../v{PROTOCOL_VERSION}/{ARTIFACTS_LEVEL}/"
                                f"{job_id}")
        return cls(job_id, require(body, "manifest", dict, "job"), name)

    def to_bytes(self) -> bytes:
        body: dict[str, Any] = {"job_id": self.job_id, "manifest": self.manifest}
        if self.artifact_topic is not None:
            body["artifact_topic"] = self.artifact_topic
        return encode(body)


@dataclass(frozen=True)
class StreamGet:
    """Chunks a device still needs. The host skips chunks it sent moments ago (they may still be queued
    for the device) unless ``resend`` is set: the device saw those arrive corrupt. Of a broadcast job:
    ``listening``, the device is subscribed to the job's artifact topic (a chunk several devices ask for at
    once may be published there once for all of them); ``passed``, it has seen the broadcast's last chunk, so
    what it asks for it missed (without it, a listening device's ask is left to the broadcast while that lasts:
    what it lacks is on its way). Both absent from an agent that knows no broadcast: it is served alone at once."""

    job_id: str
    chunks: list[int]
    resend: bool = False
    listening: bool = False
    passed: bool = False

    @classmethod
    def parse(cls, payload: bytes) -> "StreamGet":
        body = decode(payload, "stream/get")
        chunks = require(body, "chunks", list, "stream/get")
        if len(chunks) > 4096 or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31
                                         for i in chunks):
            raise ProtocolError("stream/get: 'chunks' must be a list of non-negative integers")
        return cls(check_id(require(body, "job_id", str, "stream/get"), "job_id"), chunks,
                   body.get("resend") is True, body.get("listening") is True, body.get("passed") is True)


@dataclass(frozen=True)
class Status(Message):
    KIND = "status"

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
class Metrics(Message):
    KIND = "metrics"

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
    #: the latency figures above are the agent's benchmark on the manifest's golden vectors ("golden"); real
    #: traffic through the inference API is ``traffic``: device_agent.serving.TrafficStats.snapshot()
    source: str = "golden"
    traffic: dict[str, Any] | None = None
    #: the model's behaviour on live traffic (device_agent.quality): the active version's drift scores
    #: (``{"version", ...DriftScores}``), live accuracy from the application's feedback, a shadowed candidate
    drift: dict[str, Any] | None = None
    accuracy: dict[str, Any] | None = None
    shadow: dict[str, Any] | None = None


@dataclass(frozen=True)
class Event(Message):
    KIND = "event"

    device_id: str
    kind: str
    message: str
    job_id: str | None = None
    version: int | None = None
    result_code: int | None = None
    ts: float = field(default_factory=now)
    boot: int | None = None
    seq: int | None = None
    active_version: int | None = None  # what the device runs, on events that answer a job or command


#: timings one calibration message carries at most (a suite of 600 cases reports in 10 messages or more)
MAX_CALIBRATION_RESULTS = 64


@dataclass(frozen=True)
class Calibration(Message):
    """What a device measured of a calibration suite (a ``calibration`` artifact, see device_agent.calibration).

    Sent as cases finish, in batches of at most MAX_CALIBRATION_RESULTS: ``results`` holds the cases timed since
    the previous message (each ``{"id", "median_ms", "p10_ms", "p90_ms", "runs", "rounds"}``), ``done`` of
    ``total`` counts every case timed so far for this job (a resumed run goes on counting), ``finished`` is set
    on the last message, with ``error`` when the run stopped early. ``env`` says what measured: the agent's and
    the runtime's versions, the CPU, the machine, the threads. The host keys results by case id: a message seen
    twice, or a case timed again after a restart, replaces what it had."""

    KIND = "calibration"

    device_id: str
    job_id: str
    version: int
    done: int
    total: int
    results: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    error: str | None = None
    env: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=now)
    boot: int | None = None
    seq: int | None = None

    @classmethod
    def parse(cls, payload: bytes) -> "Calibration":
        msg = super().parse(payload)
        check_id(msg.job_id, "calibration: job_id")
        if len(msg.results) > MAX_CALIBRATION_RESULTS or not 0 <= msg.done <= msg.total < 2**31:
            raise ProtocolError(f"calibration: {len(msg.results)} results, done {msg.done} of {msg.total}")
        for i, r in enumerate(msg.results):
            if not isinstance(r, dict) or not isinstance(r.get("id"), str) or not 0 < len(r["id"]) <= 128:
                raise ProtocolError(f"calibration: results[{i}] needs a case id")
            for key in ("median_ms", "p10_ms", "p90_ms"):
                v = r.get(key)
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1e9:
                    raise ProtocolError(f"calibration: results[{i}].{key} must be a number of ms, got {short(v, 40)}")
        return msg


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


#: A chunk header is {job_id, index, sha256}: small.
MAX_CHUNK_HEADER = 1024
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def decode_chunk(frame: bytes) -> tuple[str, int, bytes]:
    """Return (job_id, index, data); raise ProtocolError when the frame or its hash is wrong. Total: any bytes
    give a chunk or ProtocolError (CorruptChunk when only the bytes are damaged)."""
    if len(frame) < _HEAD.size:
        raise ProtocolError(f"stream/data: frame of {len(frame)} bytes is shorter than its header")
    magic, hlen = _HEAD.unpack_from(frame)
    if magic != _MAGIC:
        raise ProtocolError(f"stream/data: bad magic {short(magic)}, expected {_MAGIC!r}")
    if hlen > MAX_CHUNK_HEADER or _HEAD.size + hlen > len(frame):
        raise ProtocolError(f"stream/data: header length {hlen} does not fit a frame of {len(frame)} bytes")
    header = loads(frame[_HEAD.size:_HEAD.size + hlen], "stream/data header", MAX_CHUNK_HEADER)
    if not isinstance(header, dict):
        raise ProtocolError("stream/data: the header is not a JSON object")
    job_id, index, digest = header.get("job_id"), header.get("index"), header.get("sha256")
    if not isinstance(job_id, str) or not _ID_RE.match(job_id):
        raise ProtocolError(f"stream/data: header job_id {short(job_id)} is not a job id")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 2**31:
        raise ProtocolError(f"stream/data: header index {short(index)} is not a chunk index")
    if not isinstance(digest, str) or not _SHA256_RE.match(digest):
        raise ProtocolError(f"stream/data: header sha256 {short(digest)} is not a hex sha256")
    data = frame[_HEAD.size + hlen:]
    if hashlib.sha256(data).hexdigest() != digest:
        raise CorruptChunk(f"stream/data: chunk {index} of job {job_id} is corrupt (sha256 mismatch)", job_id, index)
    return job_id, index, data
