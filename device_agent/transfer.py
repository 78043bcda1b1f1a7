"""The agent's download of an artifact: chunks on its own ``stream/data`` (asked for in windows on ``stream/get``), a
broadcast wave's chunks on the job's artifact topic (unasked, once each), or HTTP Range requests; the silences that
make it ask again, with backoff; the end of a transfer (``_finish``, in device_agent.agent).

With a broadcast the device asks on evidence, not on a timer: the broadcast's last chunk (live, queued by its
session, or retained for a late subscriber) says it has passed, and what is missing then it missed. A long silence
alone makes it subscribe again (which brings the retained last chunk if the broadcast has passed) and ask with
``listening``, which the host leaves to the broadcast while it lasts (pipeline.ota.broadcast). Every frame is checked
before anything is written: one that does not parse, is corrupt or does not fit the job is refused with an event
(rate-limited on the artifact topic, which every device of a wave reads) and counted (``broadcast_refused``).

A mixin of :class:`device_agent.agent.Agent`: it uses the agent's link and topics (``link``, ``_t``), its transfer
(``_transfer``), messages (``_publish_status``, ``_event``, ``_refuse``, ``_save_state``, ``state``), its worker's
inbox (``_inbox``), its config (``cfg``), its state directory (``root``), trusted keys (``trusted``), events to send
once connected (``_pending_events``) and ``_finish``.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from .download import Download
from .errors import ProtocolError, VerificationError
from .faults import crash_point
from .manifest import Manifest, file_sha256, verify_envelope
from .protocol import (DEFAULT_WINDOW, CorruptChunk, Job, Leaf, ResultCode, State, artifact_topic, decode_chunk, encode,
                       short)
from .storage import atomic_write_json, read_json

log = logging.getLogger(__name__)

#: Seconds without a chunk before the device asks again: the first silence; each unanswered ask doubles it up to
#: RETRY_MAX_S, spread by up to half again (:func:`_backoff`), and MAX_RETRIES unanswered asks abort.
RETRY_S = 5.0
RETRY_MAX_S = 30.0
MAX_RETRIES = 8
#: Seconds of silence a device listening to a broadcast waits before it asks on its own (then as RETRY_S). It asks
#: on evidence, not on a timer: the broadcast's last chunk (live, queued by its session, or retained for a late
#: subscriber) says the broadcast has passed, and what is missing then it missed. This silence is only for a
#: broadcast that seems never to come: it subscribes again (bringing the retained last chunk if the broadcast has
#: passed) and asks, which the host leaves to the broadcast while it lasts (pipeline.ota.broadcast).
BROADCAST_WAIT_S = 20.0

@dataclass
class _Transfer:
    job_id: str
    manifest: Manifest
    envelope: dict[str, Any]
    download: Download
    outstanding: set[int]
    last_progress: float
    retries: int = 0
    http: Any = None  # an HttpFetch when the manifest names a URL
    #: a broadcast wave's topic (the job's ``artifact_topic``): its chunks arrive there unasked, once each
    artifact_topic: str | None = None
    #: asked for chunks on stream/get (always, without a broadcast; with one, once it has passed or stalled)
    repairing: bool = False
    #: the broadcast's last chunk has come: whatever is still missing, the broadcast went by without it
    passed: bool = False
    #: seconds of silence before the next ask (:func:`_backoff`)
    quiet_s: float = RETRY_S


def _backoff(base: float, retries: int) -> float:
    """The silence before the next ask after ``retries`` unanswered ones: doubling from ``base`` up to RETRY_MAX_S,
    spread by up to half again, so devices that stalled together do not ask together."""
    return min(base * 2 ** retries, max(base, RETRY_MAX_S)) * random.uniform(1.0, 1.5)


class TransferControl:
    def _leave_broadcast(self, tr: _Transfer) -> None:
        if tr.artifact_topic is not None:
            self.link.unsubscribe(tr.artifact_topic)

    def _begin_transfer(self, job: Job, manifest: Manifest) -> None:
        """Download the artifact of ``job`` (verified and accepted: ``manifest``), resuming what is on disk; a job in
        flight is superseded. Asks on its own stream, fetches over HTTP, or (a broadcast) listens."""
        if self._transfer is not None:  # a newer job supersedes the one in flight
            self._transfer.download.discard()
            self._leave_broadcast(self._transfer)
            self._event("superseded", f"job {self._transfer.job_id} replaced by {job.job_id}")
        dl = Download(self.root / "downloads", job.job_id, manifest.length, manifest.chunk_size, manifest.chunks)
        broadcast = job.artifact_topic if not manifest.url else None
        atomic_write_json(dl.dir / "job.json", {"job_id": job.job_id, "manifest": job.manifest,
                                                **({"artifact_topic": broadcast} if broadcast else {})})
        self._transfer = _Transfer(job.job_id, manifest, job.manifest, dl, set(), time.monotonic(),
                                   artifact_topic=broadcast,
                                   quiet_s=_backoff(BROADCAST_WAIT_S if broadcast else RETRY_S, 0))
        self._save_state(state=State.DOWNLOADING.value, job_id=job.job_id, version=manifest.version, reason=None)
        if broadcast:  # subscribed before `downloading` goes out: the host broadcasts once it has seen that status
            self.link.subscribe(broadcast, 1)
        self._publish_status(State.DOWNLOADING, job_id=job.job_id, version=manifest.version,
                             progress=round(dl.resumed / manifest.chunks, 4))
        if dl.resumed:
            self._event("resumed", f"download resumes at {dl.resumed}/{manifest.chunks} chunks", job_id=job.job_id)
        if dl.complete:
            self._finish(self._transfer)
        elif manifest.url:
            self._start_http(self._transfer)
        elif self.link.session_present and dl.requested:
            # the broker kept our session: what we had asked for is still on its way; wait for it (the retry
            # timer asks again if it never comes) instead of making the host send it twice
            self._transfer.outstanding = set(dl.requested)
        elif not broadcast:
            self._request_more(self._transfer)
        # with a broadcast: nothing asked for until it has passed (its last chunk) or is silent (_tick asks)

    def _reopen_transfer(self) -> None:
        """After a restart, before connecting: pick the interrupted download (the persisted state says downloading)
        back up from disk, so chunks the broker kept for us and delivers first have a transfer to go into."""
        job_id = self.state.get("job_id")
        if self.state.get("state") != State.DOWNLOADING.value or not job_id:
            return
        try:
            saved = read_json(self.root / "downloads" / job_id / "job.json")
            if not saved:
                return
            manifest = Manifest.from_signed(verify_envelope(saved["manifest"], self.trusted))
        except (VerificationError, ProtocolError, ValueError, KeyError, TypeError) as exc:
            log.warning("cannot resume job %s: %s", job_id, exc)
            return
        dl = Download(self.root / "downloads", job_id, manifest.length, manifest.chunk_size, manifest.chunks)
        self._transfer = _Transfer(job_id, manifest, saved["manifest"], dl, set(dl.requested), time.monotonic())
        if saved.get("artifact_topic") == artifact_topic(self.cfg.topic_prefix, job_id) and not manifest.url:
            self._transfer.artifact_topic = saved["artifact_topic"]
            self._transfer.quiet_s = _backoff(BROADCAST_WAIT_S, 0)
            self.link.subscribe(saved["artifact_topic"], 1)  # subscribed as the link connects
        self._pending_events.append(("resumed", f"download resumes at {dl.resumed}/{manifest.chunks} chunks after a "
                                                f"restart", job_id))

    def _resume_transfer(self) -> None:
        """The link is up again: carry the transfer in flight on."""
        tr = self._transfer
        if tr is None:
            return
        if tr.manifest.url:
            if tr.http is None:
                self._start_http(tr)
        elif self.link.session_present:  # what we asked for is still queued for us: give it time
            tr.last_progress = time.monotonic()
        else:
            self._request_more(tr, again=True)

    def _verify_download(self, tr: _Transfer) -> bool:
        """The transfer is over: ``verifying``, then the whole file against the manifest's size and SHA-256. False
        (the download discarded, the job refused) when it does not match."""
        self._transfer = None
        self._leave_broadcast(tr)
        m = tr.manifest
        tr.download.close()
        self._save_state(state=State.VERIFYING.value)
        crash_point("verifying")
        self._publish_status(State.VERIFYING, job_id=tr.job_id, version=m.version, progress=1.0)
        size, digest = tr.download.path.stat().st_size, file_sha256(tr.download.path)
        if size == m.length and digest == m.sha256:
            return True
        tr.download.discard()
        self._refuse(tr.job_id, m.version, f"artifact sha256 {digest[:16]}… ({size} bytes) does not match the "
                     f"manifest's {m.sha256[:16]}… ({m.length} bytes)", ResultCode.INTEGRITY_FAILURE)
        return False

    def _request_more(self, tr: _Transfer, again: bool = False) -> None:
        if again:
            tr.outstanding.clear()
        if tr.outstanding:
            return
        tr.repairing = True
        want = tr.download.missing(DEFAULT_WINDOW)
        tr.outstanding = set(want)
        tr.download.note_requested(want)
        tr.last_progress = time.monotonic()
        body: dict[str, Any] = {"job_id": tr.job_id, "chunks": want}
        if tr.artifact_topic is not None:  # a chunk several devices want may come on the artifact topic
            body["listening"] = True
            if tr.passed:  # what we ask for, the broadcast went by without: the host serves it now
                body["passed"] = True
        self.link.publish(self._t(Leaf.STREAM_GET), encode(body), qos=1)

    def _start_http(self, tr: _Transfer) -> None:
        from .http_fetch import HttpFetch

        def done(error: str | None) -> None:
            self._inbox.put(("", b"http-done:" + (error or "").encode(), None))

        tr.http = HttpFetch(tr.manifest.url, tr.download, done, ca_file=self.cfg.broker.ca_file)
        tr.http.start()

    def _on_http_done(self, error: str) -> None:
        tr = self._transfer
        if tr is None:
            return
        if error:
            self._transfer = None
            tr.download.close()
            self._refuse(tr.job_id, tr.manifest.version, f"{error}; download kept for resumption",
                         ResultCode.CONNECTION_LOST)
            self.state["job_id"] = None  # the same retained job resumes later
            self._save_state()
        elif tr.download.complete:
            self._finish(tr)

    def _request_resend(self, tr: _Transfer, index: int) -> None:
        self.link.publish(self._t(Leaf.STREAM_GET), encode({"job_id": tr.job_id, "chunks": [index], "resend": True}),
                          qos=1)

    def _on_chunk(self, frame: bytes, via_broadcast: bool = False) -> None:
        """A chunk on our ``stream/data`` or (``via_broadcast``) on the job's artifact topic. Total: a frame that
        does not parse, is corrupt, or does not fit the job is refused with an event (rate-limited when it came
        on the artifact topic, which every device of a wave reads) and, on the artifact topic, counted
        (``broadcast_refused``)."""
        tr = self._transfer
        try:
            job_id, index, data = decode_chunk(frame)
        except CorruptChunk as exc:
            self.broadcast_refused += via_broadcast
            if tr is not None and exc.job_id == tr.job_id:  # damaged in transit: ask for exactly that one again
                self._event("chunk_corrupt", str(exc), job_id=tr.job_id, limited=via_broadcast)
                if 0 <= exc.index < tr.manifest.chunks:
                    self._request_resend(tr, exc.index)
            return
        except ProtocolError as exc:
            self.broadcast_refused += via_broadcast
            if tr is not None:
                self._event("chunk_corrupt", str(exc), job_id=tr.job_id, limited=via_broadcast)
            return
        if tr is None or job_id != tr.job_id:  # another job's (a retained last chunk of one superseded)
            return
        if not 0 <= index < tr.manifest.chunks or len(data) != tr.download.expected_size(index):
            self.broadcast_refused += via_broadcast
            self._event("chunk_corrupt", f"chunk {index}: {len(data)} bytes, not one of the job's "
                                         f"{tr.manifest.chunks} chunks", job_id=job_id, limited=via_broadcast)
            return
        if tr.download.write(index, data):
            tr.download.checkpoint()  # on disk before the broker is told we have it
        tr.outstanding.discard(index)
        tr.last_progress, tr.retries = time.monotonic(), 0
        if tr.download.complete:
            return self._finish(tr)
        if tr.artifact_topic is not None and not tr.passed:
            if via_broadcast and index == tr.manifest.chunks - 1:  # the broadcast has passed: ask for what it
                tr.passed = True                                    # went by without, now
                tr.quiet_s = _backoff(RETRY_S, 0)
                return self._request_more(tr, again=True)
            if via_broadcast and tr.repairing:  # we asked after a silence, but the broadcast is going by after all:
                tr.repairing = False            # listen again (the host leaves such asks to the broadcast)
                tr.outstanding.clear()
            if not tr.repairing:
                tr.quiet_s = _backoff(BROADCAST_WAIT_S, 0)
                if len(tr.download.have) % DEFAULT_WINDOW == 0:
                    self._publish_status(State.DOWNLOADING, job_id=tr.job_id, version=tr.manifest.version,
                                         progress=round(len(tr.download.have) / tr.manifest.chunks, 4))
                return
        tr.quiet_s = _backoff(RETRY_S, 0)
        if not tr.outstanding:
            self._publish_status(State.DOWNLOADING, job_id=tr.job_id, version=tr.manifest.version,
                                 progress=round(len(tr.download.have) / tr.manifest.chunks, 4))
            self._request_more(tr)

    def _on_rejected(self, body: dict[str, Any]) -> None:
        tr = self._transfer
        if tr is not None and body.get("job_id") == tr.job_id:
            tr.download.discard()
            self._leave_broadcast(tr)
            self._transfer = None
            self._refuse(tr.job_id, tr.manifest.version, f"host cannot serve the artifact: {short(body.get('reason'))}",
                         ResultCode.CONNECTION_LOST)

    def _tick(self) -> None:
        tr = self._transfer
        if tr is None or tr.manifest.url or time.monotonic() - tr.last_progress < tr.quiet_s:
            return
        tr.retries += 1
        if tr.retries > MAX_RETRIES:
            tr.download.close()
            self._leave_broadcast(tr)
            self._transfer = None
            self._refuse(tr.job_id, tr.manifest.version, f"no chunk after {MAX_RETRIES} asks; "
                         "download kept for resumption", ResultCode.CONNECTION_LOST)
            self.state["job_id"] = None  # let the same retained job resume later
            self._save_state()
            return
        if tr.artifact_topic is not None and not tr.passed:  # subscribing again brings the broadcast's retained
            self.link.subscribe(tr.artifact_topic, 1)        # last chunk, if it has passed: the evidence to repair on
        self._request_more(tr, again=True)
        tr.quiet_s = _backoff(RETRY_S, tr.retries)
