"""A calibration job on its own thread: the agent keeps serving messages while a suite is timed.

The agent hands a verified suite (``PAYLOAD`` in the job's work directory) to a ``CalibrationJob``; the job's thread
runs ``device_agent.suite_runner.run_suite`` and publishes what it measures through ``publish`` (the agent turns each
batch into a ``Calibration`` message). It never touches the agent's state: what the agent must record is posted
back through ``post`` (``{"job_id", "kind": "progress" | "done" | "failed" | "superseded", ...}``) and handled on
the agent's own worker, the one writer of ``state.json``.

One job runs at a time: a job started while another is alive waits on its thread, which the agent has cancelled
(a superseded job publishes a last message, finished with the reason, and ends at its next run). A job cancelled
without a reason (the agent stopping) keeps its progress and is resumed on the next start.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .suite_runner import Batch, Summary, run_suite
from .errors import ProtocolError, VerificationError
from .protocol import ResultCode, short

log = logging.getLogger(__name__)

#: the verified payload (a zip) inside a job's work directory
PAYLOAD = "suite.zip"


class CalibrationJob:
    def __init__(self, job_id: str, version: int, work_dir: Path, threads: int | None,
                 publish: Callable[[Batch], None], post: Callable[[dict[str, Any]], None],
                 previous: "CalibrationJob | None" = None) -> None:
        self.job_id, self.version, self.dir, self.threads = job_id, version, work_dir, threads
        self._publish, self._post, self._previous = publish, post, previous
        self._cancel = threading.Event()
        self.reason: str | None = None  # why it was cancelled, when it was superseded
        self._thread = threading.Thread(target=self._run, name=f"calibration-{job_id}", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> "CalibrationJob":
        self._thread.start()
        return self

    def cancel(self, reason: str | None = None) -> None:
        """``reason``: superseded (a last message says so, the run is not resumed); None: the agent stops (resumed
        on the next start). A job once superseded stays so."""
        if reason is not None:
            self.reason = reason
        self._cancel.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        if self._previous is not None:
            self._previous.join()
            self._previous = None
        try:
            for other in self.dir.parent.iterdir():  # one suite on disk at a time: earlier jobs' leftovers go
                if other != self.dir and other.is_dir():
                    shutil.rmtree(other, ignore_errors=True)
            summary = run_suite(self.dir / PAYLOAD, self.dir, self.threads, self._report, cancel=self._cancel)
        except (ProtocolError, VerificationError) as exc:
            code = exc.result_code if isinstance(exc, VerificationError) else ResultCode.UNSUPPORTED_PACKAGE
            return self._failed(str(exc), int(code))
        except Exception as exc:  # noqa: BLE001 - nothing escapes the thread: the failure is reported, bounded
            log.exception("calibration %s failed", self.job_id)
            return self._failed(f"{type(exc).__name__}: {short(str(exc), 300)}", int(ResultCode.UPDATE_FAILED))
        if summary.cancelled:
            if self.reason is not None:  # superseded: a last message says so, a last post lets the agent go on
                self._safe_publish(Batch([], summary.done, summary.total, True, self.reason))
                self._post({"job_id": self.job_id, "kind": "superseded"})
            return
        self._post({"job_id": self.job_id, "kind": "done", **_counts(summary)})

    def _report(self, batch: Batch) -> None:
        self._publish(batch)
        if not batch.finished:
            self._post({"job_id": self.job_id, "kind": "progress", "done": batch.done, "total": batch.total})

    def _failed(self, reason: str, code: int) -> None:
        """No calibration message: the agent's failed status (with the reason) and event say it; results already
        sent stand."""
        self._post({"job_id": self.job_id, "kind": "failed", "reason": reason, "result_code": code})

    def _safe_publish(self, batch: Batch) -> None:
        try:
            self._publish(batch)
        except Exception:  # noqa: BLE001 - the report of a failure may not fail the thread
            log.exception("could not publish calibration %s", self.job_id)


def _counts(s: Summary) -> dict[str, Any]:
    return {"done": s.done, "total": s.total, "failed": len(s.failed), "timed": len(s.timed), "error": s.error,
            "elapsed_s": s.elapsed_s}
