"""Messages an attacker who has read docs/protocol.md would send to a device, generated from a seed.

The attacker knows the topic layout, the job / chunk / command schemas, the manifest's fields and the
(public) keyid of a key the device trusts, but not the private key. ``Attacker`` starts from real, valid
messages and mutates them the ways parsers break: nesting, numbers out of range, lone surrogates, type
swaps, missing fields, wrong signatures next to a trusted keyid, bad timestamps, frames that lie about
their lengths, oversized text. Some messages are signed with the real key (``signer``) to exercise what
comes after the signature check: a host bug, or a stolen key, must not crash the agent either.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

LEAVES = ("job", "cmd", "stream/data", "stream/rejected")

# JSON values chosen to break parsers that trust types
_WEIRD_VALUES: list[Any] = [
    None, True, False, 0, -1, 2**63, -(2**63) - 1, 1.5, "", "x", [], {}, [[[]]], {"a": {}}, "\u00e9\u4e2d",
    "../../etc/passwd", "a/b/#", "+", "1e999", "NaN", "2026-13-45T99:99:99", "\x00", " " * 3, 10**30,
]
# raw JSON fragments that json.dumps cannot produce
_RAW_FRAGMENTS = ["1e999", "-1e999", "NaN", "Infinity", "-Infinity", "1" * 5000, '"\\ud800"', '"\\udfff x"',
                  "[" * 5000 + "]" * 5000, '{"a":' * 3000 + "1" + "}" * 3000, "1e-999", "-0", "123456789" * 40]


@dataclass(frozen=True)
class Valid:
    """Real messages to start from: a job signed by a trusted key, the chunks of its artifact."""

    job: dict[str, Any]  # {"v", "job_id", "manifest": envelope}
    chunks: list[bytes]  # encoded frames
    trusted_keyid: str


class Attacker:
    def __init__(self, seed: int, valid: Valid, signer: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 big: bool = True) -> None:
        """``signer``: signs a mutated manifest body with the trusted key (host bugs, a stolen key);
        ``big``: include megabyte-sized messages."""
        self.rng = random.Random(seed)
        self.valid, self.signer, self.big = valid, signer, big

    # ---------------------------------------------------------------------------------- plumbing
    def messages(self, n: int) -> Iterator[tuple[str, bytes]]:
        """``n`` (leaf, payload) pairs, leaves spread over every host -> device topic."""
        makers = [self.job, self.job, self.job, self.cmd, self.chunk, self.chunk, self.rejected, self.raw]
        for _ in range(n):
            leaf, payload = self.rng.choice(makers)()
            yield leaf, payload

    def _value(self) -> Any:
        r = self.rng.random()
        if r < 0.5:
            return copy.deepcopy(self.rng.choice(_WEIRD_VALUES))
        if r < 0.7:
            return self._nested(self.rng.randint(1, 60))
        if r < 0.85:
            return "".join(self.rng.choice("ab\u00e9\ud7ff\U0001f600\\\"/{}[]") for _ in range(self.rng.randint(0, 40)))
        return self.rng.uniform(-1e308, 1e308)

    def _nested(self, depth: int) -> Any:
        value: Any = self.rng.choice([1, "x", None])
        for _ in range(depth):
            value = [value] if self.rng.random() < 0.5 else {"k": value}
        return value

    def _dumps(self, body: Any) -> bytes:
        """JSON text, sometimes with one value replaced by a raw fragment json.dumps cannot write."""
        text = json.dumps(body, separators=(",", ":"))
        if self.rng.random() < 0.35:
            marker = '"__RAW__"'
            text = json.dumps(self._plant(copy.deepcopy(body), "__RAW__"), separators=(",", ":"))
            if marker in text:
                text = text.replace(marker, self.rng.choice(_RAW_FRAGMENTS), 1)
        return text.encode("utf-8", "surrogatepass")

    def _paths(self, obj: Any, prefix: tuple = ()) -> list[tuple]:
        out = [prefix]
        if isinstance(obj, dict):
            for k, v in obj.items():
                out += self._paths(v, prefix + (k,))
        elif isinstance(obj, list):
            for i, v in enumerate(obj[:8]):
                out += self._paths(v, prefix + (i,))
        return out

    def _plant(self, obj: Any, value: Any) -> Any:
        """Replace (or delete) the value at a random path of ``obj``."""
        paths = [p for p in self._paths(obj) if p]
        if not paths:
            return value
        path = self.rng.choice(paths)
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and self.rng.random() < 0.15 and value != "__RAW__":
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = value
        return obj

    def _mutate(self, obj: Any, times: int | None = None) -> Any:
        obj = copy.deepcopy(obj)
        for _ in range(times or self.rng.randint(1, 3)):
            obj = self._plant(obj, self._value())
        return obj

    # ---------------------------------------------------------------------------------- per topic
    def job(self) -> tuple[str, bytes]:
        job = copy.deepcopy(self.valid.job)
        env = job["manifest"]
        r = self.rng.random()
        if r < 0.2:  # the body changed after signing, the trusted keyid kept: the signature must fail
            env["signed"] = self._mutate(env["signed"])
        elif r < 0.35:  # a signature of the wrong type or shape next to the trusted keyid
            env["signatures"] = [{"keyid": self.valid.trusted_keyid,
                                  "sig": self.rng.choice([12, 1.5, [], {}, None, True, "!!!", "AAAA", "",
                                                          base64.b64encode(b"\0" * 64).decode(), "x" * 10000])}]
        elif r < 0.45:  # a lone surrogate in the signed body
            env["signed"]["name"] = "model\ud800"
        elif r < 0.55:  # expiry that is not a timestamp
            env["signed"]["expires"] = self.rng.choice(["tomorrow", "2026-13-45", 12, [], "2030-01-01", "", None,
                                                        "9999-12-31T23:59:59", "0001-01-01T00:00:00+00:00"])
            if self.signer is not None and self.rng.random() < 0.7:
                job["manifest"] = self.signer(env["signed"])
        elif r < 0.75 and self.signer is not None:  # correctly signed, fields of the wrong type or range
            job["manifest"] = self.signer(self._mutate(env["signed"]))
        elif r < 0.85:  # the job envelope itself
            job = self._mutate(job)
        elif r < 0.9 and self.big:  # an oversized job
            job["manifest"]["signed"]["name"] = "n" * (1 << 20) * self.rng.randint(1, 8)
        else:
            job["job_id"] = self.rng.choice(["j/../x", "#", "+", "a" * 70, "", "ok-id", 5, None])
        return "job", self._dumps(job)

    def cmd(self) -> tuple[str, bytes]:
        body: dict[str, Any] = {"v": 1, "command": self.rng.choice(["report", "benchmark", "rollback", "reboot"])}
        if self.rng.random() < 0.5:
            body["id"] = self.rng.choice(["c1", "x" * 65, "a b", "\ud800", 5, None, [], "ok.id-2"])
        r = self.rng.random()
        if r < 0.15 and self.big:
            body["command"] = "c" * (1 << 20)  # echoed back in full by an unbounded agent
        elif r < 0.6:
            body = self._mutate(body)
        return "cmd", self._dumps(body)

    def rejected(self) -> tuple[str, bytes]:
        body = {"v": 1, "job_id": self.valid.job["job_id"], "reason": "x" * self.rng.choice([1, 100, 100_000])}
        return "stream/rejected", self._dumps(self._mutate(body) if self.rng.random() < 0.7 else body)

    def chunk(self) -> tuple[str, bytes]:
        frame = self.rng.choice(self.valid.chunks)
        magic, hlen = struct.unpack_from(">4sI", frame)
        header = json.loads(frame[8:8 + hlen])
        data = frame[8 + hlen:]
        r = self.rng.random()
        if r < 0.3:  # a header with wrong types, absurd numbers, nesting
            head = self._dumps(self._mutate(header))
            return "stream/data", struct.pack(">4sI", magic, len(head)) + head + data
        if r < 0.45:  # an index out of every range, with a correct hash
            header["index"] = "__RAW__"
            head = json.dumps(header).replace('"__RAW__"', self.rng.choice(
                ["1e999", "-1", "4294967296", "1" * 5000, "NaN", "1.5", "true", '"0"', "null"])).encode()
            return "stream/data", struct.pack(">4sI", magic, len(head)) + head + data
        if r < 0.6:  # a header length that lies
            return "stream/data", struct.pack(">4sI", magic, self.rng.choice([0, 1, 2**32 - 1, len(frame),
                                                                              hlen + 5])) + frame[8:]
        if r < 0.7:  # right header, other bytes (the hash catches it)
            return "stream/data", frame[:8 + hlen] + bytes(self.rng.randrange(256) for _ in range(len(data)))
        if r < 0.8:  # truncated anywhere
            return "stream/data", frame[:self.rng.randrange(len(frame))]
        if r < 0.9:  # a hash that matches bytes of the wrong size
            junk = bytes(self.rng.randrange(256) for _ in range(self.rng.randint(0, 70_000 if self.big else 500)))
            header["sha256"] = hashlib.sha256(junk).hexdigest()
            head = json.dumps(header).encode()
            return "stream/data", struct.pack(">4sI", magic, len(head)) + head + junk
        return "stream/data", bytes(self.rng.randrange(256) for _ in range(self.rng.randint(0, 64)))

    def raw(self) -> tuple[str, bytes]:
        leaf = self.rng.choice(LEAVES)
        r = self.rng.random()
        if r < 0.3:
            return leaf, self.rng.choice(_RAW_FRAGMENTS).encode()
        if r < 0.5:
            return leaf, b"\xff\xfe" + bytes(self.rng.randrange(256) for _ in range(self.rng.randint(0, 100)))
        if r < 0.6 and self.big:
            return leaf, b"[" * 100_000
        if r < 0.7:
            return leaf, b""
        return leaf, self._dumps(self._value())
