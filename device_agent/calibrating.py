"""The agent's side of a calibration job (a manifest of kind ``calibration``, device_agent.calibration): the suite
kept in a work directory of its own (never a slot), accepted (``highest_calibration``), timed on a thread of its
own (device_agent.calibrator), its results published as they come, resumed after a restart, cancelled by any
newer job.

A mixin of :class:`device_agent.agent.Agent`: it uses the agent's state (``state``, ``_save_state``), its link and
topics (``link``, ``_t``, ``_seq``, ``boot``), messages (``_publish_status``, ``_event``, ``_pending_events``) and
its worker's inbox (``_inbox``, ``_stop``).
"""

from __future__ import annotations

import json
import queue
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .calibrator import PAYLOAD, CalibrationJob
from .protocol import Calibration, Leaf, ResultCode, State, encode
from .suite_runner import Batch

if TYPE_CHECKING:
    from .transfer import _Transfer


class CalibrationControl:
    def _calibration_dir(self, job_id: str) -> Path:
        return self.root / "calibration" / job_id

    def _start_calibration(self, tr: _Transfer, decoded: Path) -> None:
        """A verified suite: kept in its own work directory (never a slot), accepted (``highest_calibration``), timed
        on its own thread."""
        m = tr.manifest
        work = self._calibration_dir(tr.job_id)
        work.mkdir(parents=True, exist_ok=True)
        decoded.replace(work / PAYLOAD)
        record = {"job_id": tr.job_id, "version": m.version, "finished": False}
        self._save_state(state=State.CALIBRATING.value, reason=None, calibration=record,
                         highest_calibration=max(m.version, int(self.state.get("highest_calibration", 0))))
        tr.download.discard()
        self._publish_status(State.CALIBRATING, job_id=tr.job_id, version=m.version, progress=0.0)
        self._event("calibration_started", f"calibration v{m.version} ({m.name}) accepted; timing it",
                    job_id=tr.job_id, version=m.version)
        self._launch_calibration(record)

    def _resume_calibration(self, record: dict[str, Any]) -> None:
        self._calibration_resume = None
        self._save_state(state=State.CALIBRATING.value, job_id=record["job_id"], version=record.get("version"))
        self._pending_events.append(("resumed", "calibration resumes from its progress after a restart",
                                     record["job_id"]))
        self._launch_calibration(record)

    def _launch_calibration(self, record: dict[str, Any]) -> None:
        job_id, version = str(record["job_id"]), int(record["version"])

        def publish(batch: Batch) -> None:
            msg = Calibration(self.cfg.device_id, job_id, version, batch.done, batch.total, batch.results,
                              batch.finished, batch.error, batch.env, boot=self.boot, seq=next(self._seq))
            self.link.publish(self._t(Leaf.CALIBRATION), encode(msg), qos=1)

        previous, self._calibration = self._calibration, CalibrationJob(
            job_id, version, self._calibration_dir(job_id), self.cfg.threads, publish, self._post_calibration,
            previous=self._calibration)
        if previous is not None:
            previous.cancel(previous.reason or f"superseded by job {job_id}")
        self._calibration.start()

    def _post_calibration(self, body: dict[str, Any]) -> None:
        """From the calibration thread: into this worker's inbox, waiting while it is full, never past a stop."""
        item = ("", b"calibration:" + json.dumps(body).encode(), None)
        while not self._stop.is_set():
            try:
                return self._inbox.put(item, timeout=0.5)
            except queue.Full:
                continue

    def _cancel_calibration(self, reason: str) -> None:
        """A newer job was accepted: the running calibration ends with a last message saying so, and is not
        resumed."""
        job = self._calibration
        if job is None or job.reason is not None:
            return
        cal = self.state.get("calibration")
        if isinstance(cal, dict) and cal.get("job_id") == job.job_id:
            self._save_state(calibration={**cal, "finished": True, "error": reason})
        if not job.alive:  # it ended; what it posted last is now ignored (see _on_calibration)
            job.reason, self._calibration = reason, None
            return
        job.cancel(reason)  # kept as the running job until its last post, so a next one waits on its thread
        self._event("calibration_failed", f"calibration stopped: {reason}", job_id=job.job_id, version=job.version)

    def _on_calibration(self, body: dict[str, Any]) -> None:
        """What the calibration thread posted: progress, or its end (done, failed, superseded)."""
        job = self._calibration
        if job is None or body.get("job_id") != job.job_id:
            return
        if job.reason is not None:  # superseded: only its last post matters, and only to let it go
            if body["kind"] != "progress":
                self._calibration = None
            return
        if body["kind"] == "progress":
            self._publish_status(State.CALIBRATING, job_id=job.job_id, version=job.version,
                                 progress=round(body["done"] / max(1, body["total"]), 4))
            return
        self._calibration = None
        cal = {**(self.state.get("calibration") or {}), "finished": True}
        (job.dir / PAYLOAD).unlink(missing_ok=True)
        if body["kind"] == "failed":
            cal["error"] = body["reason"]
            self._save_state(state=State.FAILED.value, reason=body["reason"], calibration=cal)
            self._publish_status(State.FAILED, job_id=job.job_id, version=job.version, reason=body["reason"],
                                 result_code=body["result_code"])
            self._event("calibration_failed", body["reason"], job_id=job.job_id, version=job.version,
                        result_code=body["result_code"])
            return
        error = body.get("error")
        code = int(ResultCode.SUCCESS if error is None else ResultCode.UPDATE_FAILED)
        cal.update(done=body["done"], total=body["total"], failed=body["failed"], error=error)
        self._save_state(state=State.IDLE.value, reason=error, calibration=cal)
        self._publish_status(State.IDLE, job_id=job.job_id, version=job.version, reason=error, result_code=code,
                             progress=1.0)
        summary = (f"timed {body['done']} of {body['total']} cases ({body['timed']} in this run, {body['failed']} "
                   f"failed) in {body['elapsed_s']:.1f} s")
        self._event("calibrated", summary + (f": {error}" if error else ""), job_id=job.job_id, version=job.version,
                    result_code=code)

