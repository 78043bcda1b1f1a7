"""The update itself: a job accepted (signature, target, version, expiry, runtime, room), its artifact verified
once downloaded (size and SHA-256, then a delta rebuilt against the active model), installed in the inactive slot,
health-checked, and activated, shadowed or rolled back; refusals persisted and reported, or (a job never accepted)
rate-limited events only.

A mixin of :class:`device_agent.agent.Agent`: it uses the agent's config and stores (``cfg``, ``root``, ``store``,
``trusted``, ``state``), its messages (``_publish_status``, ``_event``, ``_save_state``, ``_publish_metrics``,
``_report_metrics``), serving (``_serve``, ``last_bench``), the transfer (``_transfer``, ``_begin_transfer``,
``_leave_broadcast``), calibrations (``_start_calibration``, ``_cancel_calibration``) and shadows (``_promote``,
``_supersede_shadow``, ``_begin_shadow``).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from .errors import HealthCheckError, ProtocolError, RuntimeBackendError, VerificationError
from .faults import crash_point
from .health import health_check
from .manifest import Manifest, decode_payload, verify_envelope
from .protocol import Job, ResultCode, State, artifact_topic, short
from .runtimes import available_runtimes, get_runtime
from .storage import atomic_write_json
from .suite_runner import RUNTIME as CALIBRATION_RUNTIME
from .transfer import _Transfer

log = logging.getLogger(__name__)


class UpdateControl:
    def _refuse_unaccepted(self, job_id: str, version: int | None, reason: str, code: int) -> None:
        """A job the device never accepted (unsigned, forged, stale, for another device): an event, nothing
        persisted, no retained status. Rate-limited: anyone who can publish can send these."""
        log.warning("refused job %s: %s", job_id, reason)
        active = self.store.active()
        self._event("refused", reason, limited=True, job_id=job_id, version=version, result_code=int(code),
                    active_version=active.version if active else None)

    def _refuse(self, job_id: str, version: int | None, reason: str, code: int) -> None:
        """A job the device had accepted (verified, signed) failed: that is persisted and reported."""
        log.warning("refused job %s: %s", job_id, reason)
        self._save_state(state=State.FAILED.value, job_id=job_id, version=version, reason=reason)
        self._publish_status(State.FAILED, job_id=job_id, version=version, reason=reason, result_code=int(code))
        self._event("refused", reason, job_id=job_id, version=version, result_code=int(code))

    def _on_job(self, job: Job) -> None:
        if job.job_id == self.state.get("job_id") and self.state.get("state") in {s.value for s in
                                                                                  (State.ACTIVATED, State.ROLLED_BACK,
                                                                                   State.FAILED, State.SHADOWING)}:
            return  # a retained job we already finished (or shadow)
        sh = self.state.get("shadow")
        if isinstance(sh, dict) and sh.get("job_id") == job.job_id:
            return  # the retained shadow job: its candidate is shadowed, or was dropped
        if self._transfer is not None and self._transfer.job_id == job.job_id:
            return
        cal = self.state.get("calibration")
        if isinstance(cal, dict) and cal.get("job_id") == job.job_id:
            return  # the retained calibration job we are timing, or timed
        if job.artifact_topic is not None and job.artifact_topic != artifact_topic(self.cfg.topic_prefix, job.job_id):
            raise ProtocolError(f"job: artifact_topic {short(job.artifact_topic)} is not this device's "
                                f"{artifact_topic(self.cfg.topic_prefix, job.job_id)!r}")
        try:
            signed = verify_envelope(job.manifest, self.trusted)
            manifest = Manifest.from_signed(signed)
            if manifest.kind == "model" and self._already_active(job, manifest):
                return
            self._check_manifest(manifest)
        except VerificationError as exc:
            return self._refuse_unaccepted(job.job_id, None, str(exc), exc.result_code)
        except ProtocolError as exc:
            return self._refuse_unaccepted(job.job_id, None, str(exc), ResultCode.UNSUPPORTED_PACKAGE)
        if manifest.kind == "model" and self._promote(job, manifest):
            return
        if self.state.get("shadow") is not None:  # one job at a time: any other supersedes the candidate
            self._supersede_shadow(job.job_id)
        self._cancel_calibration(f"superseded by job {job.job_id}")  # one job at a time, of either kind
        self._begin_transfer(job, manifest)

    def _already_active(self, job: Job, m: Manifest) -> bool:
        """A crash between the switch and its bookkeeping: the new model is active; finish the record."""
        active = self.store.verify_active()
        if active is None or active.version != m.version or active.sha256 != m.raw_sha256 \
                or int(self.state.get("highest_version", 0)) >= m.version:  # that is a replay, not a recovery
            return False
        self._save_state(state=State.ACTIVATED.value, job_id=job.job_id, version=m.version,
                         highest_version=max(m.version, int(self.state.get("highest_version", 0))), reason=None)
        self._publish_status(State.ACTIVATED, job_id=job.job_id, version=m.version, result_code=int(ResultCode.SUCCESS))
        self._event("activated", f"v{m.version} was already active (recovered after a restart)", job_id=job.job_id,
                    version=m.version)
        self._report_metrics()
        return True

    def _check_manifest(self, m: Manifest) -> None:
        if m.target != self.cfg.target:
            raise VerificationError(f"manifest is for target {m.target!r}, this device is {self.cfg.target!r}",
                                    ResultCode.UNSUPPORTED_PACKAGE)
        # models and calibrations count their versions apart: a calibration never raises the model's floor
        key = "highest_calibration" if m.kind == "calibration" else "highest_version"
        highest = int(self.state.get(key, 0))
        if m.version <= highest:
            raise VerificationError(f"version {m.version} is not newer than {highest} already accepted "
                                    f"{'for a calibration ' if m.kind == 'calibration' else ''}(replayed or stale "
                                    "manifest)", ResultCode.UPDATE_FAILED)
        m.check_expiry()
        if m.kind == "calibration" and m.runtime != CALIBRATION_RUNTIME:
            raise VerificationError(f"a calibration suite runs on {CALIBRATION_RUNTIME}, this one names "
                                    f"{m.runtime!r}", ResultCode.UNSUPPORTED_PACKAGE)
        if m.runtime not in available_runtimes():
            raise VerificationError(f"runtime {m.runtime!r} is not on this device (has {available_runtimes()})",
                                    ResultCode.UNSUPPORTED_PACKAGE)
        free = shutil.disk_usage(self.root).free
        if free < 2 * m.length:
            raise VerificationError(f"{m.length} bytes to store, {free} free in {self.root}",
                                    ResultCode.NOT_ENOUGH_STORAGE)

    def _finish(self, tr: _Transfer) -> None:
        if not self._verify_download(tr):
            return
        m = tr.manifest
        decoded = tr.download.dir / "model.decoded"
        active = self.store.active()  # what a delta is applied against (device_agent.delta)
        try:
            decode_payload(tr.download.path, decoded, m, base=active.path if active is not None else None)
        except VerificationError as exc:
            tr.download.discard()
            return self._refuse(tr.job_id, m.version, str(exc), exc.result_code)
        if m.kind == "calibration":
            return self._start_calibration(tr, decoded)
        slot = self.store.inactive_slot()
        self._save_state(state=State.INSTALLING.value, slot=slot)
        self._publish_status(State.INSTALLING, job_id=tr.job_id, version=m.version)
        crash_point("installing")
        path = self.store.install(slot, decoded, m, tr.envelope)
        crash_point("installed")
        tr.download.discard()
        self._test_and_activate(tr.job_id, slot, path, m)

    def _test_and_activate(self, job_id: str, slot: str, path: Path, m: Manifest,
                           envelope: dict[str, Any] | None = None) -> None:
        """Load and health-check the model installed in ``slot``; activate it, or shadow it when its manifest
        says so (health-checked and timed as the active model is, then loaded on one thread to run beside it)."""
        self._save_state(state=State.TESTING.value)
        crash_point("testing")
        self._publish_status(State.TESTING, job_id=job_id, version=m.version)
        try:
            session = get_runtime(m.runtime).load(path, self.cfg.threads)
            bench = health_check(session, m, self.cfg.benchmark_runs)
        except (HealthCheckError, RuntimeBackendError, ProtocolError) as exc:
            self.store.mark(slot, "bad", m.version, str(exc))
            self._save_state(state=State.ROLLED_BACK.value, reason=str(exc), shadow=None)
            self._publish_status(State.ROLLED_BACK, job_id=job_id, version=m.version, reason=str(exc),
                                 result_code=int(ResultCode.UPDATE_FAILED))
            self._event("rolled_back", f"v{m.version} failed its health check, kept the previous model: {exc}",
                        job_id=job_id, version=m.version, result_code=int(ResultCode.UPDATE_FAILED))
            return
        if m.shadow is not None:
            del session  # the shadow loads its own, on one thread: two copies of the candidate at most, not three
            return self._begin_shadow(job_id, slot, m, bench)
        if envelope is not None:  # a promoted candidate: the slot's manifest becomes the promoting one
            atomic_write_json(self.store.slot_dir(slot) / "manifest.json", envelope)
        self.store.activate(slot, m)
        crash_point("activated")
        self.last_bench = bench
        self._serve(session, m)  # loaded and health-checked above: warm before the first request reaches it
        self._save_state(state=State.ACTIVATED.value, highest_version=m.version, reason=None, shadow=None)
        self._publish_status(State.ACTIVATED, job_id=job_id, version=m.version,
                             result_code=int(ResultCode.SUCCESS))
        self._event("activated", f"v{m.version} active in slot {slot}", job_id=job_id, version=m.version)
        self._publish_metrics(bench)
