"""Timing a calibration suite on this device (the schema it reads is ``device_agent.calibration``).

``run_suite`` times a suite on this device. Its unit of work is one round of one group: every case of the group
timed ``runs`` times once, the round's figure the :data:`ROUND_QUANTILE` th percentile of those runs
(:func:`round_figure_ms`); a case's result is the median, 10th and 90th percentile of its round figures.
Progress (the round figures of the group in flight, the figures of the cases already done, the cases that
failed, the time spent) is written atomically after each round, so a restarted agent picks up at the next round
of the group it was in and never times a finished case again. The time spent counts across restarts against
``budget_s``.

A case that fails to load, warm up or run is left out of the results (the message schema has no error items:
``Calibration.parse`` wants figures for every item); it is recorded, never retried, and named in the final
message's ``error``. A group during which the agent died MAX_GROUP_ATTEMPTS times (a model that crashes the
runtime) is given up the same way, so a poisonous case cannot keep a device in a crash loop.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .calibration import MAX_CASES, MAX_SUITE_BYTES, SUITE_FILE, Case, Suite, _int_in
from .errors import AgentError, ProtocolError, RuntimeBackendError, VerificationError
from .protocol import MAX_CALIBRATION_RESULTS, ResultCode, short
from .storage import atomic_write_json, read_json

log = logging.getLogger(__name__)

#: a round's figure is this percentile of its runs' times. Interference on a shared machine (another process on a
#: core, a thread descheduled mid-run) only ever adds time, so a low quantile of a round is what repeats where its
#: median carries whatever else ran then: on a busy 2-vCPU host, MobileNetV2 in 20 rounds of 10 runs gave round
#: medians of 7.1 ms and 10th percentiles of 5.0 ms (the quickest run 4.9) in one trial, 16.8 / 12.9 in the next.
#: On a quiet device it is within a few percent of the median. The host's comparisons (``pipeline.profile.compare``)
#: take the same figure, so what a class is calibrated on and what its predictions are checked against agree.
ROUND_QUANTILE = 10


def round_figure_ms(times_ms: Any) -> float:
    """One round's figure from its runs' times (ms): their :data:`ROUND_QUANTILE` th percentile."""
    return float(np.percentile(np.asarray(times_ms, dtype=np.float64), ROUND_QUANTILE))


#: the only runtime a suite's cases run on (they are ONNX files)
RUNTIME = "onnxruntime"
#: what the case files of one suite may unpack to, together
MAX_UNPACKED_BYTES = 256 * 2**20
#: starts of one group (the first, plus restarts after the agent died in it) before its cases are given up
MAX_GROUP_ATTEMPTS = 3
#: results are reported at least this often (seconds), and whenever MAX_CALIBRATION_RESULTS are waiting
REPORT_EVERY_S = 1.0
#: characters of the final message's error text
MAX_ERROR_TEXT = 2000
PROGRESS_FILE = "progress.json"
_PROGRESS_FORMAT = 1


@dataclass(frozen=True)
class Batch:
    """What the runner reports: the cases timed since the last batch, counts, and on the last one ``finished``."""

    results: list[dict[str, Any]]
    done: int
    total: int
    finished: bool = False
    error: str | None = None
    env: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Summary:
    """How a call of ``run_suite`` ended. ``timed``: the ids of the cases this call timed (not those a previous
    run had); ``cancelled``: stopped by ``cancel`` before the end, to be resumed."""

    total: int
    done: int
    failed: dict[str, str]
    timed: tuple[str, ...]
    finished: bool
    cancelled: bool
    error: str | None
    elapsed_s: float


def unpack(payload: Path, dest: Path, max_bytes: int = MAX_UNPACKED_BYTES) -> tuple[Suite, str]:
    """Open a calibration payload (a zip of suite.json and the files it names) and write the case files into
    ``dest`` (emptied first). Returns the suite and the sha256 of its suite.json.

    Refused, each as one ProtocolError naming what (VerificationError when the disk is full): not a zip; more
    entries than a suite can name; a name twice; no suite.json or one that does not parse; any entry that is not
    suite.json or a file the suite names (path traversal, directories, links: a suite names plain files only);
    a file the suite names that the zip lacks; encrypted entries or compression other than stored/deflated;
    more than ``max_bytes`` unpacked in all (checked on the sizes the zip declares, then on the bytes written)."""
    try:
        zf = zipfile.ZipFile(payload)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        # NotImplementedError: a mangled header claiming a zip version the module does not read (found by the
        # payload property test)
        raise ProtocolError(f"calibration payload: not a zip file ({short(str(exc), 80)})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_CASES + 1:
            raise ProtocolError(f"calibration payload: {len(infos)} entries, a suite names at most {MAX_CASES} files")
        by_name: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if info.filename in by_name:
                raise ProtocolError(f"calibration payload: entry {short(info.filename, 60)} appears twice")
            by_name[info.filename] = info
        head = by_name.get(SUITE_FILE)
        if head is None:
            raise ProtocolError(f"calibration payload: the zip holds no {SUITE_FILE}")
        raw = _read_bounded(zf, head, MAX_SUITE_BYTES)
        suite = Suite.from_json(raw)
        files = {c.file for c in suite.cases}
        unexpected = [n for n in by_name if n != SUITE_FILE and n not in files]
        if unexpected:
            raise ProtocolError(f"calibration payload: {len(unexpected)} entr{'y' if len(unexpected) == 1 else 'ies'}"
                                f" the suite does not name, e.g. {short(unexpected[0], 60)}; a calibration zip holds "
                                f"{SUITE_FILE} and the plain files its cases name, nothing else")
        missing = sorted(files - set(by_name))
        if missing:
            raise ProtocolError(f"calibration payload: the suite names {len(missing)} file(s) the zip does not hold, "
                                f"e.g. {short(missing[0], 60)}")
        for info in by_name.values():
            if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ProtocolError(f"calibration payload: {short(info.filename, 60)} is encrypted or compressed "
                                    "other than stored/deflated")
        declared = sum(by_name[f].file_size for f in files)
        if declared > max_bytes:
            raise ProtocolError(f"calibration payload: its files unpack to {declared:,} bytes, more than the "
                                f"{max_bytes:,} a suite may take")
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        written = 0
        try:
            for name in sorted(files):
                info = by_name[name]
                with zf.open(info) as src, open(dest / name, "wb") as out:
                    for block in iter(lambda: src.read(1 << 16), b""):
                        written += len(block)
                        if written > max_bytes:
                            raise ProtocolError(f"calibration payload: unpacks to more than {max_bytes:,} bytes")
                        out.write(block)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
            raise ProtocolError(f"calibration payload: {short(name, 60)} is damaged ({short(str(exc), 80)})") from None
        except OSError as exc:
            raise VerificationError(f"calibration payload: cannot unpack into {dest} ({exc.strerror or exc})",
                                    ResultCode.NOT_ENOUGH_STORAGE) from None
    return suite, hashlib.sha256(raw).hexdigest()


def _read_bounded(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    if info.file_size > limit:
        raise ProtocolError(f"calibration payload: {info.filename} is {info.file_size:,} bytes, at most {limit:,}")
    try:
        with zf.open(info) as f:
            data = f.read(limit + 1)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        raise ProtocolError(f"calibration payload: {info.filename} is damaged ({short(str(exc), 80)})") from None
    if len(data) > limit:
        raise ProtocolError(f"calibration payload: {info.filename} is more than {limit:,} bytes")
    return data


def environment(threads: int | None) -> dict[str, Any]:
    """What measured: sent with every calibration message."""
    import onnxruntime

    from . import __version__
    from .cpu import read_cpu_features

    return {"agent_version": __version__, "runtime": RUNTIME, "runtime_version": onnxruntime.__version__,
            "machine": platform.machine(), "cpu": read_cpu_features().model_name, "cpu_count": os.cpu_count(),
            "threads": threads}


def run_suite(payload: Path, work_dir: Path, threads: int | None, report: Callable[[Batch], None], *,
              cancel: Any = None, on_timed: Callable[[str, int], None] | None = None,
              max_unpacked: int = MAX_UNPACKED_BYTES, report_every_s: float = REPORT_EVERY_S) -> Summary:
    """Time the suite in ``payload`` (a zip, see ``unpack``), resuming from ``work_dir``'s progress.

    ``threads``: the agent's own setting, used when the suite sets none. ``report`` gets the results in batches of at
    most MAX_CALIBRATION_RESULTS (every ``report_every_s`` seconds and at the end; 0: after every group), and a last
    batch with ``finished``; a resumed run first reports again what earlier runs timed (the host keys results by
    case id). ``cancel`` (a threading.Event): checked between runs; when set the run stops at once, keeps the
    progress of its completed rounds and returns ``cancelled`` without a final batch. ``on_timed(case_id, round)``
    is called after each case's round. Raises ProtocolError/VerificationError for a payload that is not a suite."""
    return _Run(payload, work_dir, threads, report, cancel, on_timed, max_unpacked, report_every_s).run()


class _Stop(Exception):
    """The budget is spent or the run was cancelled."""


class _Run:
    def __init__(self, payload, work_dir, threads, report, cancel, on_timed, max_unpacked, report_every_s) -> None:
        self.payload, self.dir = Path(payload), Path(work_dir)
        self.agent_threads, self.report, self.cancel, self.on_timed = threads, report, cancel, on_timed
        self.max_unpacked, self.report_every_s = max_unpacked, report_every_s
        self.progress_path = self.dir / PROGRESS_FILE
        self.started = time.monotonic()
        self.pending: list[dict[str, Any]] = []
        self.last_report = time.monotonic()
        self.timed: list[str] = []

    # -- progress ----------------------------------------------------------------------------------------
    def _fresh(self) -> dict[str, Any]:
        return {"format": _PROGRESS_FORMAT, "suite_sha256": self.digest, "elapsed_s": 0.0, "results": [],
                "failed": {}, "group": 0, "round": 0, "medians": {}, "attempts": {}, "finished": False,
                "error": None}

    def _load_progress(self) -> dict[str, Any]:
        """What an earlier run left, when it is for this suite and well formed; else a fresh start."""
        try:
            p = read_json(self.progress_path, None)
        except (OSError, ValueError) as exc:
            log.warning("calibration progress unreadable (%s); starting over", exc)
            return self._fresh()
        if p is None:
            return self._fresh()
        ids = {c.id for c in self.suite.cases}
        try:
            ok = (p["format"] == _PROGRESS_FORMAT and p["suite_sha256"] == self.digest
                  and isinstance(p["elapsed_s"], (int, float)) and p["elapsed_s"] >= 0
                  and isinstance(p["results"], list) and isinstance(p["failed"], dict)
                  and isinstance(p["medians"], dict) and isinstance(p["attempts"], dict)
                  and all(isinstance(r, dict) and r.get("id") in ids for r in p["results"])
                  and all(k in ids and isinstance(v, str) for k, v in p["failed"].items())
                  and _int_in(p["group"], 0, len(self.suite.cases)) and _int_in(p["round"], 0, self.suite.rounds)
                  and all(k in ids and isinstance(v, list) and len(v) == p["round"]
                          and all(isinstance(x, (int, float)) for x in v) for k, v in p["medians"].items())
                  and all(isinstance(v, int) for v in p["attempts"].values())
                  and isinstance(p["finished"], bool))
        except (KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            log.warning("calibration progress in %s is for another suite or malformed; starting over", self.dir)
            return self._fresh()
        return p

    def _elapsed(self) -> float:
        return self.base_elapsed + time.monotonic() - self.started

    def _checkpoint(self) -> None:
        self.p["elapsed_s"] = round(self._elapsed(), 3)
        atomic_write_json(self.progress_path, self.p)

    # -- reporting ---------------------------------------------------------------------------------------
    def _send(self, results: list[dict[str, Any]], finished: bool = False, error: str | None = None) -> None:
        self.report(Batch(results, len(self.p["results"]), len(self.suite.cases), finished, error, self.env))

    def _flush(self, force: bool = False) -> None:
        if not self.pending or not force and time.monotonic() - self.last_report < self.report_every_s \
                and len(self.pending) < MAX_CALIBRATION_RESULTS:
            return
        while self.pending:
            batch, self.pending = self.pending[:MAX_CALIBRATION_RESULTS], self.pending[MAX_CALIBRATION_RESULTS:]
            self._send(batch)
        self.last_report = time.monotonic()

    def _finish(self, error: str | None) -> Summary:
        failed = self.p["failed"]
        if failed:
            named = "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:10])
            error = (f"{error}; " if error else "") + f"{len(failed)} case(s) failed: {named}"
        if error and len(error) > MAX_ERROR_TEXT:
            error = error[:MAX_ERROR_TEXT - 3] + "..."
        self.p.update(finished=True, error=error, medians={}, round=0)
        self._checkpoint()
        while len(self.pending) > MAX_CALIBRATION_RESULTS:
            self._send(self.pending[:MAX_CALIBRATION_RESULTS])
            self.pending = self.pending[MAX_CALIBRATION_RESULTS:]
        tail, self.pending = self.pending, []
        self._send(tail, finished=True, error=error)  # the last results ride on the final message
        shutil.rmtree(self.dir / "cases", ignore_errors=True)
        return self._summary(finished=True, cancelled=False)

    def _summary(self, finished: bool, cancelled: bool) -> Summary:
        return Summary(len(self.suite.cases), len(self.p["results"]), dict(self.p["failed"]), tuple(self.timed),
                       finished, cancelled, self.p.get("error"), round(self._elapsed(), 3))

    # -- the run -----------------------------------------------------------------------------------------
    def run(self) -> Summary:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.suite, self.digest = unpack(self.payload, self.dir / "cases", self.max_unpacked)
        self.threads = self.suite.threads or self.agent_threads
        self.env = environment(self.threads)
        self.p = self._load_progress()
        self.base_elapsed = float(self.p["elapsed_s"])
        self.pending = list(self.p["results"])  # again: what reached the host before a restart is not known here
        if self.p["finished"]:
            self._flush(force=True)
            self._send([], finished=True, error=self.p["error"])
            return self._summary(finished=True, cancelled=False)
        self._flush(force=True)
        groups = self.suite.groups()
        try:
            for gi in range(int(self.p["group"]), len(groups)):
                self._flush(force=self.report_every_s <= 0)  # before the next group: the last rides on the final
                if gi != self.p["group"]:
                    self.p.update(group=gi, round=0, medians={})
                self._group(gi, groups[gi])
        except _Stop as stop:
            if self.cancel is not None and self.cancel.is_set():
                key = str(self.p["group"])
                self.p["attempts"][key] = max(0, self.p["attempts"].get(key, 1) - 1)  # a clean stop is no death
                self._checkpoint()
                return self._summary(finished=False, cancelled=True)
            return self._finish(str(stop))
        return self._finish(None)

    def _check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise _Stop("cancelled")
        if self._elapsed() > self.suite.budget_s:
            done = len(self.p["results"]) + len(self.p["failed"])
            raise _Stop(f"budget of {self.suite.budget_s:g} s spent after {done} of {len(self.suite.cases)} cases")

    def _fail(self, case: Case, message: str) -> None:
        log.warning("calibration case %s failed: %s", case.id, message)
        self.p["failed"][case.id] = short(message, 300)
        self.p["medians"].pop(case.id, None)

    def _group(self, gi: int, group: list[Case]) -> None:
        settled = {r["id"] for r in self.p["results"]} | set(self.p["failed"])
        cases = [c for c in group if c.id not in settled]
        if not cases:
            return
        key = str(gi)
        attempts = self.p["attempts"].get(key, 0) + 1
        if attempts > MAX_GROUP_ATTEMPTS:
            for c in cases:
                self._fail(c, f"the agent died {attempts - 1} times while timing its group; given up")
            self._checkpoint()
            return
        self.p["attempts"][key] = attempts
        self._checkpoint()  # before anything is loaded: a model that kills the process counts against its group
        self._check()
        live = self._load(cases)
        try:
            for r in range(int(self.p["round"]), self.suite.rounds):
                medians: dict[str, float] = {}
                for case in list(live):
                    try:
                        medians[case.id] = self._time(live[case])
                    except RuntimeBackendError as exc:
                        del live[case]
                        self._fail(case, str(exc))
                        continue
                    if self.on_timed is not None:
                        self.on_timed(case.id, r)
                for cid, m in medians.items():  # the round counts once every live case has it
                    self.p["medians"].setdefault(cid, []).append(m)
                self.p["round"] = r + 1
                self._checkpoint()
            for case in live:
                self.p["results"].append(_figures(case.id, self.p["medians"][case.id], self.suite.runs))
                self.timed.append(case.id)
                self.pending.append(self.p["results"][-1])
            self.p.update(group=gi + 1, round=0, medians={})
            self._checkpoint()
        finally:
            live.clear()  # the group's sessions are released before the next group loads

    def _load(self, cases: list[Case]) -> dict[Case, tuple[Any, dict[str, np.ndarray]]]:
        """Each case's session and input, warmed up; a case that fails is recorded and left out."""
        from .runtimes import get_runtime

        runtime = get_runtime(RUNTIME)
        live = {}
        for case in cases:
            self._check()
            try:
                session = runtime.load(self.dir / "cases" / case.file, self.threads)
                feeds = _feeds(session, case)
                for _ in range(self.suite.warmup):
                    session.run(feeds)
            except (AgentError, MemoryError) as exc:  # RuntimeBackendError, or a case the model does not fit
                self._fail(case, str(exc) if not isinstance(exc, MemoryError) else "out of memory")
                continue
            live[case] = (session, feeds)
        return live

    def _time(self, loaded: tuple[Any, dict[str, np.ndarray]]) -> float:
        session, feeds = loaded
        times = np.empty(self.suite.runs)
        for i in range(self.suite.runs):
            self._check()
            t0 = time.perf_counter()
            session.run(feeds)
            times[i] = (time.perf_counter() - t0) * 1e3
        return round_figure_ms(times)


def _feeds(session: Any, case: Case) -> dict[str, np.ndarray]:
    """A seeded float32 input of the case's shape under the model's one input name."""
    inputs = session.inputs
    if len(inputs) != 1 or inputs[0].dtype != "float32":
        raise RuntimeBackendError(f"{case.file}: a case has one float32 input; this model takes "
                                  f"{[(i.name, i.dtype) for i in inputs][:4]}")
    declared = inputs[0].shape
    if len(declared) != len(case.shape) or any(isinstance(d, int) and d > 0 and d != s
                                               for d, s in zip(declared, case.shape)):
        raise RuntimeBackendError(f"{case.file}: the model's input is {list(declared)}, the suite says "
                                  f"{list(case.shape)}")
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    return {inputs[0].name: rng.random(case.shape, dtype=np.float32)}


def _figures(case_id: str, medians: list[float], runs: int) -> dict[str, Any]:
    p10, p50, p90 = np.percentile(np.asarray(medians, dtype=np.float64), [10, 50, 90])
    return {"id": case_id, "median_ms": round(float(p50), 6), "p10_ms": round(float(p10), 6),
            "p90_ms": round(float(p90), 6), "runs": runs, "rounds": len(medians)}
