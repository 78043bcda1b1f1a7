"""The agent's side of a shadow stage (a manifest with ``shadow``, device_agent.quality): the candidate kept in
the inactive slot and run beside the active model (device_agent.shadow), promoted by the job for its version,
dropped on the host's command, resumed after a restart; and the live-traffic figures the metrics carry.

A mixin of :class:`device_agent.agent.Agent`: it uses the agent's state (``state``, ``_save_state``), slots
(``store``), API (``api``, ``serving``), messages (``_publish_status``, ``_event``, ``_pending_events``) and
activation (``_test_and_activate``).
"""

from __future__ import annotations

from typing import Any

from .errors import AgentError
from .health import Benchmark, benchmark, check_golden
from .manifest import Manifest, file_sha256
from .errors import ProtocolError
from .protocol import Job, ResultCode, State, short
from .runtimes import Session, get_runtime
from .shadow import ShadowRunner
from .storage import read_json


class ShadowControl:
    _shadow: ShadowRunner | None = None

    def _quality(self) -> dict[str, Any]:
        """The model on live traffic (device_agent.quality): drift of the version serving, live accuracy, the
        shadowed candidate."""
        served, out = self.serving.current, {}
        if served is not None and served.monitor is not None:
            out["drift"] = {"version": served.version, **served.monitor.scores().to_dict()}
        if self.api is not None:
            out["accuracy"] = self.api.accuracy.snapshot()
        if self._shadow is not None:
            out["shadow"] = self._shadow.snapshot()
        return out

    def _begin_shadow(self, job_id: str, slot: str, m: Manifest, bench: Benchmark) -> None:
        """The candidate stays in ``slot`` (marked ``shadow``: never a rollback target) and runs on sampled
        requests; the active model keeps serving; ``highest_version`` stays, so the promoting job is taken.
        ``bench``: the candidate's health-check benchmark, set beside the active model's timed the same way
        now (same threads, same priority, golden inputs), the like-for-like latency the host judges."""
        timed = self._timed_beside(m, bench)
        try:
            session = get_runtime(m.runtime).load(self.store.slot_dir(slot) / m.filename, 1)
        except AgentError as exc:  # loaded a moment ago with more threads: a device out of memory, say
            self.store.mark(slot, "bad", m.version, str(exc))
            self._save_state(state=State.ROLLED_BACK.value, reason=str(exc))
            self._publish_status(State.ROLLED_BACK, job_id=job_id, version=m.version, reason=str(exc),
                                 result_code=int(ResultCode.UPDATE_FAILED))
            return self._event("rolled_back", f"v{m.version} could not be loaded to shadow: {exc}", job_id=job_id,
                               version=m.version, result_code=int(ResultCode.UPDATE_FAILED))
        self.store.mark(slot, "shadow", m.version)
        self._save_state(state=State.SHADOWING.value, reason=None,
                         shadow={"job_id": job_id, "version": m.version, "slot": slot, "bench": timed})
        self._start_shadow(session, m, timed)
        active = self.store.active()
        self._publish_status(State.SHADOWING, job_id=job_id, version=m.version, result_code=int(ResultCode.SUCCESS))
        self._event("shadowing", f"v{m.version} in slot {slot} shadows {m.shadow.sample:.0%} of the requests "
                                 f"(at most {m.shadow.max_cpu:.0%} of a core); "
                                 f"v{active.version if active else '-'} keeps serving", job_id=job_id,
                    version=m.version)

    def _timed_beside(self, m: Manifest, bench: Benchmark) -> dict[str, Any] | None:
        active, manifest = self.session, self.store.active_manifest()
        if active is None or manifest is None:
            return None
        try:
            theirs = benchmark(active, manifest.golden_pairs()[0][0], self.cfg.benchmark_runs)
        except (AgentError, ProtocolError, IndexError):
            return None
        return {"candidate_p50_ms": bench.latency_ms_p50, "candidate_p95_ms": bench.latency_ms_p95,
                "active_p50_ms": theirs.latency_ms_p50, "active_p95_ms": theirs.latency_ms_p95,
                "runs": bench.runs, "threads": self.cfg.threads}

    def _start_shadow(self, session: Session, m: Manifest, timed: dict[str, Any] | None) -> None:
        self._end_shadow()
        active = self.store.active()
        self._shadow = ShadowRunner(session, m.version, active.version if active else None, m.shadow,
                                    self.api.accuracy if self.api is not None else None, bench=timed)
        if self.api is not None:
            self.api.shadow = self._shadow

    def _end_shadow(self) -> None:
        runner, self._shadow = self._shadow, None
        if self.api is not None:
            self.api.shadow = None
        if runner is not None:
            runner.stop()

    def _resume_shadow(self) -> None:
        """After a restart: the candidate the host has not decided on yet is shadowed again."""
        sh = self.state.get("shadow")
        if self.state.get("state") != State.SHADOWING.value or not isinstance(sh, dict):
            return
        slot = sh.get("slot")
        try:
            if slot not in ("a", "b") or self.store.slot_status(slot).get("status") != "shadow":
                raise ValueError(f"slot {short(slot)} holds no candidate")
            envelope = read_json(self.store.slot_dir(slot) / "manifest.json")
            m = Manifest.from_signed(envelope.get("signed") if isinstance(envelope, dict) else None)
            if m.shadow is None or m.version != sh.get("version"):
                raise ValueError("the slot's manifest is not the candidate's")
            path = self.store.slot_dir(slot) / m.filename
            if file_sha256(path) != m.raw_sha256:
                raise ValueError(f"{m.filename} in slot {slot} is not the bytes its manifest signs")
            session = get_runtime(m.runtime).load(path, 1)
            check_golden(session, m)
        except (AgentError, OSError, ValueError) as exc:
            self._save_state(state=State.ACTIVATED.value if self.store.active() else State.IDLE.value, shadow=None)
            self._pending_events.append(("shadow_dropped", f"the shadowed candidate could not be resumed: "
                                                           f"{short(str(exc), 200)}", sh.get("job_id")))
            return
        self._start_shadow(session, m, sh.get("bench") if isinstance(sh.get("bench"), dict) else None)

    def _promote(self, job: Job, m: Manifest) -> bool:
        """The job for the version being shadowed, without ``shadow``: the candidate already in its slot (same
        bytes) is activated without a second download. False when the slot does not hold those bytes. The shadow
        record stays until the activation: a power cut on the way leaves the slot a candidate, and the retained
        job promotes it again on the next start."""
        sh = self.state.get("shadow")
        if not isinstance(sh, dict) or sh.get("version") != m.version or m.shadow is not None:
            return False
        slot = sh.get("slot")
        path = self.store.slot_dir(slot) / m.filename if slot in ("a", "b") else None
        if path is None or self.store.slot_status(slot).get("status") != "shadow" or not path.is_file() \
                or file_sha256(path) != m.raw_sha256:
            return False
        self._end_shadow()
        self._cancel_calibration(f"superseded by job {job.job_id}")
        if self._transfer is not None:
            self._transfer.download.discard()
            self._event("superseded", f"job {self._transfer.job_id} replaced by {job.job_id}")
            self._transfer = None
        self._save_state(state=State.INSTALLING.value, job_id=job.job_id, version=m.version, slot=slot, reason=None)
        self._event("promoting", f"v{m.version}: the candidate shadowed in slot {slot} is activated", job_id=job.job_id,
                    version=m.version)
        self._test_and_activate(job.job_id, slot, path, m, envelope=job.manifest)
        return True

    def _supersede_shadow(self, job_id: str) -> None:
        """Another job was accepted while a candidate was shadowed: the candidate is dropped, said so."""
        sh = self.state.get("shadow")
        stats = self._shadow.snapshot() if self._shadow is not None else None
        self._end_shadow()
        version = sh.get("version") if isinstance(sh, dict) else None
        if isinstance(sh, dict) and sh.get("slot") in ("a", "b") and isinstance(version, int):
            self.store.mark(sh["slot"], "dropped", version, f"superseded by job {job_id}")
        self._save_state(shadow=None)
        compared = f" after {stats['compared']} comparisons" if stats else ""
        self._event("shadow_dropped", f"v{version} dropped{compared}: superseded by job {job_id}",
                    job_id=sh.get("job_id") if isinstance(sh, dict) else None, version=version)

    def _drop_shadow(self, cmd_id: str | None) -> None:
        sh = self.state.get("shadow")
        if self._shadow is None and not isinstance(sh, dict):
            return self._event("shadow_dropped", "no candidate was shadowed", job_id=cmd_id)
        version = sh.get("version") if isinstance(sh, dict) else None
        stats = self._shadow.snapshot() if self._shadow is not None else None
        self._end_shadow()
        if isinstance(sh, dict) and sh.get("slot") in ("a", "b") and isinstance(version, int):
            self.store.mark(sh["slot"], "dropped", version, "dropped by the host after shadowing")
        active = self.store.active()
        self._save_state(state=State.ACTIVATED.value if active else State.IDLE.value, shadow=None)
        self._publish_status(State.ACTIVATED if active else State.IDLE, version=active.version if active else None,
                             reason=f"v{version} dropped after shadowing")
        compared = f" after {stats['compared']} comparisons" if stats else ""
        self._event("shadow_dropped", f"v{version} dropped{compared}; v{active.version if active else '-'} serves",
                    job_id=cmd_id, version=version, active_version=active.version if active else None)

