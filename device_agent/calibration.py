"""Calibration suites: what a ``calibration`` artifact holds, one schema for the host that builds it and the
agent that times it.

A calibration artifact's payload is a zip file holding ``suite.json`` and the ONNX files it names::

    {"suite_version": 1, "name": "rpi4-calibration", "threads": 4, "rounds": 5, "runs": 20, "warmup": 3,
     "budget_s": 900, "cases": [{"id": "k0", "file": "k0.onnx", "shape": [1, 16, 28, 28], "group": 0}, ...]}

- ``cases``: each an ONNX model with one float32 input of ``shape`` (batch included). Ids are unique; files
  are plain names inside the zip. The host decides what a case means (a kernel in context, its prefix, a
  whole model, the speed probe); the agent only times them.
- ``group``: cases of one group are timed interleaved (round r runs every case of the group once, ``runs``
  times each, before round r + 1), so a drift of the device's speed lands on all of them alike; groups run in
  order, each loaded, timed and released before the next (a device holds one group's sessions at a time).
- ``threads``: the device class's thread count (None: the agent's own setting); ``warmup`` runs per case
  before its first round; a case's figures are the median, 10th and 90th percentile of its per-round medians.
- ``budget_s``: the whole suite's time on the device at most; past it the run stops and reports what it has
  (``finished`` with ``error``), so a suite can never occupy a device for longer than its author allowed.

Bounds (checked before anything is loaded): MAX_CASES cases, ids of 1-128 characters, shapes of 1-6 positive
dimensions of at most MAX_ELEMENTS elements, rounds/runs/warmup within their ranges.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ProtocolError
from .protocol import short


SUITE_VERSION = 1
SUITE_FILE = "suite.json"
MAX_CASES = 4096
MAX_ELEMENTS = 16 * 2**20  # of one case's input
MAX_SUITE_BYTES = 4 * 2**20  # of suite.json


@dataclass(frozen=True)
class Case:
    id: str
    file: str
    shape: tuple[int, ...]
    group: int = 0


@dataclass(frozen=True)
class Suite:
    name: str
    cases: tuple[Case, ...]
    threads: int | None = None
    rounds: int = 5
    runs: int = 20
    warmup: int = 3
    budget_s: float = 900.0
    suite_version: int = SUITE_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # what the host keeps with the suite; the agent ignores it

    def groups(self) -> list[list[Case]]:
        """The cases by group, groups in ascending order, cases in suite order within a group."""
        out: dict[int, list[Case]] = {}
        for c in self.cases:
            out.setdefault(c.group, []).append(c)
        return [out[g] for g in sorted(out)]

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["cases"] = [{**asdict(c), "shape": list(c.shape)} for c in self.cases]
        return body

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "Suite":
        """Total: any bytes give a Suite or ProtocolError naming what does not fit."""
        if len(raw) > MAX_SUITE_BYTES:
            raise ProtocolError(f"{SUITE_FILE}: {len(raw)} bytes, at most {MAX_SUITE_BYTES}")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ProtocolError(f"{SUITE_FILE}: not JSON ({str(exc)[:80]})") from None
        return cls.from_dict(body)

    @classmethod
    def from_dict(cls, body: Any) -> "Suite":
        if not isinstance(body, dict):
            raise ProtocolError(f"{SUITE_FILE}: expected an object, got {type(body).__name__}")
        if body.get("suite_version") != SUITE_VERSION:
            raise ProtocolError(f"{SUITE_FILE}: suite_version {short(body.get('suite_version'))}, this agent reads "
                                f"{SUITE_VERSION}")
        name = body.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= 128:
            raise ProtocolError(f"{SUITE_FILE}: name must be 1-128 characters, got {short(name, 40)}")
        threads = body.get("threads")
        if threads is not None and not _int_in(threads, 1, 256):
            raise ProtocolError(f"{SUITE_FILE}: threads must be null or 1-256, got {short(threads, 40)}")
        counts = {}
        for key, low, high, default in (("rounds", 1, 100, 5), ("runs", 1, 10_000, 20), ("warmup", 0, 1000, 3)):
            v = body.get(key, default)
            if not _int_in(v, low, high):
                raise ProtocolError(f"{SUITE_FILE}: {key} must be an integer in [{low}, {high}], got {short(v, 40)}")
            counts[key] = v
        budget = body.get("budget_s", 900.0)
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 86_400:
            raise ProtocolError(f"{SUITE_FILE}: budget_s must be a number of seconds in (0, 86400], got "
                                f"{short(budget, 40)}")
        cases = body.get("cases")
        if not isinstance(cases, list) or not 0 < len(cases) <= MAX_CASES:
            raise ProtocolError(f"{SUITE_FILE}: cases must be a list of 1 to {MAX_CASES}, got {short(cases, 40)}")
        parsed, seen = [], set()
        for i, c in enumerate(cases):
            parsed.append(_case(c, f"{SUITE_FILE}: cases[{i}]"))
            if parsed[-1].id in seen:
                raise ProtocolError(f"{SUITE_FILE}: cases[{i}]: id {parsed[-1].id!r} appears twice")
            seen.add(parsed[-1].id)
        extra = body.get("extra") if isinstance(body.get("extra"), dict) else {}
        return cls(name=name, cases=tuple(parsed), threads=threads, budget_s=float(budget), extra=extra, **counts)


def _int_in(v: Any, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _case(c: Any, where: str) -> Case:
    if not isinstance(c, dict):
        raise ProtocolError(f"{where}: expected an object, got {type(c).__name__}")
    cid, file, shape, group = c.get("id"), c.get("file"), c.get("shape"), c.get("group", 0)
    if not isinstance(cid, str) or not 0 < len(cid) <= 128:
        raise ProtocolError(f"{where}: id must be 1-128 characters, got {short(cid, 40)}")
    if (not isinstance(file, str) or not 0 < len(file) <= 128 or "/" in file or "\\" in file
            or file.startswith(".") or file == SUITE_FILE):
        raise ProtocolError(f"{where} ({cid}): file must be a plain file name in the zip, got {short(file, 40)}")
    if not isinstance(shape, list) or not 0 < len(shape) <= 6 or not all(_int_in(d, 1, MAX_ELEMENTS) for d in shape):
        raise ProtocolError(f"{where} ({cid}): shape must be 1-6 positive integers, got {short(shape, 40)}")
    elements = 1
    for d in shape:
        elements *= d
    if elements > MAX_ELEMENTS:
        raise ProtocolError(f"{where} ({cid}): an input of {elements:,} elements, at most {MAX_ELEMENTS:,}")
    if not _int_in(group, 0, MAX_CASES):
        raise ProtocolError(f"{where} ({cid}): group must be an integer in [0, {MAX_CASES}], got {short(group, 40)}")
    return Case(id=cid, file=file, shape=tuple(shape), group=group)
