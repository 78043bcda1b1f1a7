"""The agent's state machine: verify a manifest, download, verify, install, test, activate or roll back.

All MQTT callbacks only enqueue; one worker thread does the work, so the network thread never
blocks on disk or inference. State is persisted before every side effect (``state.json``).

Handling a message is total (``handle``): decoders raise only ProtocolError, anything else that escapes is
caught at the boundary, logged and reported as one bounded event, and the message is acknowledged; a
message that was being handled when the process died is recognised after the restart (device_agent.guard).
Only a verified, signed manifest that the device accepts changes ``state.json`` or the retained status;
refusals of anything else are rate-limited events.

A job whose manifest is of kind ``calibration`` goes through the same checks and download, is never installed and
never touches the active model or ``highest_version``: its suite is timed on a thread of its own
(device_agent.calibrator) while this worker goes on serving messages; its own ``highest_calibration`` refuses
replays. States: downloading, verifying, calibrating, then idle (done, ``reason`` says what stopped it early) or
failed (the payload was no suite); events calibration_started, calibrated, calibration_failed; the timings go out on
the ``calibration`` leaf (device_agent.calibrating).

A model whose manifest carries ``shadow`` is installed and health-checked but not activated: it is shadowed beside
the active model until the host promotes it (the same version's job without ``shadow``) or drops it
(device_agent.shadowing).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from . import __version__
from .calibrator import PAYLOAD, CalibrationJob
from .config import AgentConfig
from .drift import DriftMonitor
from .errors import AgentError, ProtocolError, RuntimeBackendError
from .heap import release_free_memory
from .guard import PoisonGuard, RateLimit, StartBackoff
from .health import Benchmark, benchmark, check_golden
from .manifest import Manifest, keyid, load_public_key
from .mqtt import ConnectError, MqttLink, Will
from .serving import InferenceServer, ModelHolder, ServeConfig, Served, TrafficStats
from .protocol import (
    ARTIFACTS_LEVEL,
    MAX_JOB_BYTES,
    PROTOCOL_VERSION,
    Event,
    Job,
    Leaf,
    State,
    Status,
    check_id,
    decode,
    encode,
    parse_topic,
    short,
    topic,
)
from .runtimes import Session, get_runtime
from .calibrating import CalibrationControl
from .shadowing import ShadowControl
from .slots import SlotStore
from .storage import atomic_write_json, read_json
from .telemetry import Telemetry
from .transfer import TransferControl, _Transfer
from .updating import UpdateControl

log = logging.getLogger(__name__)

#: Messages waiting for the worker; past this the network thread waits (the broker holds the rest).
INBOX_SIZE = 1000
#: Characters of an event's message; untrusted text in it is already quoted short.
MAX_EVENT_TEXT = 512
#: requests a drift monitor scores over when the model's reference does not say (deploy.yaml drift.window)
DRIFT_WINDOW = 1000


class Agent(UpdateControl, CalibrationControl, ShadowControl, TransferControl):
    def __init__(self, config: AgentConfig) -> None:
        self.cfg = config
        self.root = config.state_dir
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = SlotStore(self.root)
        self.trusted = {keyid(k): k for k in (load_public_key(p) for p in config.trusted_keys)}
        self._state_path = self.root / "state.json"
        self.state: dict[str, Any] = read_json(self._state_path, {"highest_version": 0, "state": State.IDLE.value})
        # the device's own order of what it says (never a clock): agent starts, then messages within one start
        self.boot = int(self.state.get("boot", 0)) + 1
        self._save_state(boot=self.boot)
        self._seq = itertools.count(1)
        self.guard = PoisonGuard(self.root)
        self.limit = RateLimit()
        self.dropped = 0  # messages refused before the worker saw them (oversized)
        self.broadcast_refused = 0  # frames on a broadcast's artifact topic refused (malformed, corrupt, wrong size)
        self.session: Session | None = None
        self.last_bench: Benchmark | None = None
        # the local inference API (device_agent.serving): the model applications call, swapped without a failed
        # request; started before the broker connects, so the device's applications never wait for the network
        self.serving = ModelHolder()
        self.traffic = TrafficStats()
        self.api: InferenceServer | None = None
        self._inbox: queue.Queue[tuple[str, bytes, Callable[[], Any] | None]] = queue.Queue(INBOX_SIZE)
        self._stop = threading.Event()
        self._transfer: _Transfer | None = None
        self._pending_events: list[tuple[str, str, str | None]] = []  # to publish once connected
        self._calibration: CalibrationJob | None = None  # the suite being timed, on its own thread
        self._calibration_resume: dict[str, Any] | None = None  # one to restart once connected
        self._shadow = None  # a candidate run beside the active model (device_agent.shadowing)
        self.telemetry = Telemetry(config.device_id, config.emulated)
        self.link = MqttLink(
            config.broker,
            client_id=f"agent-{config.device_id}",
            on_message=self._receive,
            subscriptions=[(self._t(Leaf.JOB), 1), (self._t(Leaf.STREAM_DATA), 1),
                           (self._t(Leaf.STREAM_REJECTED), 1), (self._t(Leaf.CMD), 1)],
            will=Will(self._t(Leaf.ONLINE), b"offline"),
            on_connect=lambda: self._inbox.put(("", b"connected", None)),
            # the broker keeps our chunks while we are away, and redelivers any we had not yet written
            # to disk: a message is acknowledged only after it was durably handled
            persistent=True, manual_ack=True,
        )

    # ------------------------------------------------------------------------------ plumbing
    def _receive(self, name: str, payload: bytes, ack: Callable[[], Any]) -> None:
        """On the network thread: only bound and enqueue."""
        if len(payload) > MAX_JOB_BYTES:  # no message of the protocol is this large: never queued, never parsed
            self.dropped += 1
            ack()
            self._inbox.put(("", b"dropped:" + f"{len(payload)} bytes on {short(name)}".encode(), None))
            return
        self._inbox.put((name, payload, ack))

    def _t(self, leaf: Leaf) -> str:
        return topic(self.cfg.topic_prefix, self.cfg.device_id, leaf)

    def _save_state(self, **changes: Any) -> None:
        self.state.update(changes)
        atomic_write_json(self._state_path, self.state)

    def _publish_status(self, state: State, **fields: Any) -> None:
        active = self.store.active()
        status = Status(
            device_id=self.cfg.device_id, state=state.value, target=self.cfg.target,
            active_version=active.version if active else None, active_slot=active.slot if active else None,
            agent_version=__version__, boot=self.boot, seq=next(self._seq), **fields,
        )
        self.link.publish(self._t(Leaf.STATUS), encode(status), qos=1, retain=True)

    def _event(self, kind: str, message: str, limited: bool = False, **fields: Any) -> None:
        """``limited``: an answer to unauthenticated input, subject to the rate limit."""
        if limited and not self.limit.allow():
            log.debug("%s (suppressed): %s", kind, message[:MAX_EVENT_TEXT])
            return
        if limited and self.limit.suppressed:
            message = f"{message[:MAX_EVENT_TEXT - 60]} (+{self.limit.suppressed} similar events suppressed)"
            self.limit.suppressed = 0
        message = message if len(message) <= MAX_EVENT_TEXT else message[:MAX_EVENT_TEXT - 3] + "..."
        log.info("%s: %s", kind, message)
        event = Event(self.cfg.device_id, kind, message, boot=self.boot, seq=next(self._seq), **fields)
        self.link.publish(self._t(Leaf.EVENTS), encode(event), qos=1, until_routed=True)  # see device_agent.mqtt

    def _publish_metrics(self, bench: Benchmark) -> None:
        m = self.telemetry.metrics(bench, self.store.active(), self.session, self.store.active_manifest(),
                                   self.state.get("state"))
        m = dataclasses.replace(m, boot=self.boot, seq=next(self._seq), traffic=self.traffic.snapshot(),
                                **self._quality())
        self.link.publish(self._t(Leaf.METRICS), encode(m), qos=1, until_routed=True)

    # ------------------------------------------------------------------------------ lifecycle
    def load_active(self) -> None:
        active = self.store.verify_active()
        if active is None:
            if self.store.active() is not None:
                log.error("active model in slot %s is missing or damaged", self.store.active().slot)
            return
        self._serve(get_runtime(self.cfg.runtime).load(active.path, self.cfg.threads), self.store.active_manifest())

    def _serve(self, session: Session, manifest: Manifest | None) -> None:
        """``session`` answers from now on: the agent's benchmark and every new API request; requests already
        running on the previous model finish there."""
        self.session = session
        describe: dict[str, Any] = {}
        if manifest is not None and manifest.preprocess is not None:
            describe["preprocess"] = manifest.preprocess.to_dict()
        if manifest is not None and manifest.labels is not None:
            describe["labels"] = list(manifest.labels)
        reference = manifest.reference if manifest is not None else None
        monitor = DriftMonitor(reference, reference.window or DRIFT_WINDOW) if reference is not None else None
        self.serving.swap(Served(session, manifest.name if manifest else "model",
                                 manifest.version if manifest else None, describe, monitor=monitor))
        release_free_memory()  # what loading the session allocated and freed again (device_agent.heap)

    def start_api(self) -> None:
        """Listen for the device's applications (``serve:`` in agent.yaml). A socket that cannot be opened (a
        path too long, a directory without rights, another agent on it) is an event; the agent goes on without
        the API rather than not at all."""
        path = self.cfg.socket_path
        s = self.cfg.serve
        if path is None and s.port is None:
            return
        cfg = ServeConfig(socket_path=path, tcp_port=s.port, workers=s.workers, queue=s.queue,
                          deadline_ms=s.deadline_ms, max_connections=s.max_connections,
                          max_body_bytes=int(s.max_body_mb * 2**20), socket_mode=s.socket_mode)
        try:
            self.api = InferenceServer(self.serving, cfg, self.traffic).start()
        except OSError as exc:
            self.api = None
            log.error("inference API not started: %s", exc)
            self._pending_events.append(("serve_failed", f"inference API not started on {path}: "
                                                         f"{short(str(exc), 300)}", None))
            return
        log.info("inference API on %s%s", path, f" and 127.0.0.1:{self.api.tcp_address[1]}" if self.api.tcp_address
                 else "")

    def resume_from_disk(self) -> None:
        """Pick an interrupted download back up before connecting, so chunks the broker kept for us and
        delivers first are not dropped for want of a transfer to put them in; note an unfinished calibration,
        restarted from its progress once connected."""
        cal = self.state.get("calibration")
        if isinstance(cal, dict) and cal.get("finished") is False:
            try:
                usable = isinstance(cal.get("version"), int) and bool(check_id(cal.get("job_id"), "job_id")) \
                    and (self._calibration_dir(cal["job_id"]) / PAYLOAD).is_file()
            except ProtocolError:
                usable = False
            if usable:
                self._calibration_resume = cal
            else:  # a crash between accepting it and keeping its payload (or a record edited by hand): nothing to time
                self._save_state(state=State.FAILED.value, reason="calibration payload missing after a restart",
                                 calibration={**cal, "finished": True})
        self._reopen_transfer()

    def run(self, connect_timeout: float = 10.0) -> None:
        backoff = StartBackoff(self.root)
        delay = backoff.record_start()
        if delay:
            log.warning("the agent restarted %d times in %.0f min without a clean stop; waiting %.0f s before "
                        "connecting", len(backoff._starts()) - 1, backoff.WINDOW_S / 60, delay)
            if self._stop.wait(delay):
                return
        self.load_active()
        self.start_api()
        self._resume_shadow()
        self.resume_from_disk()
        if not self._connect(connect_timeout):  # stopped before the broker was ever reached
            if self.api is not None:
                self.api.stop()
            backoff.record_clean_stop()
            return
        if self._calibration_resume is not None:
            self._resume_calibration(self._calibration_resume)
        last_metrics = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    name, payload, ack = self._inbox.get(timeout=0.5)
                except queue.Empty:
                    pass
                else:
                    self.handle(name, payload)
                    if ack is not None:
                        ack()
                try:
                    self._tick()
                    if self.cfg.metrics_interval_s and time.monotonic() - last_metrics >= self.cfg.metrics_interval_s:
                        last_metrics = time.monotonic()
                        if self._calibration is None:  # a benchmark beside a calibration would skew both
                            self._report_metrics()
                except Exception as exc:  # noqa: BLE001 - the loop outlives any one failure
                    log.exception("periodic work failed")
                    self._event("agent_error", f"periodic work: {type(exc).__name__}: {short(str(exc))}", limited=True)
            backoff.record_clean_stop()
        finally:
            if self.api is not None:
                self.api.stop()
            if self._calibration is not None:  # kept on disk: it resumes on the next start
                self._calibration.cancel()
                self._calibration.join(10)
            self.guard.close()
            if self._transfer is not None:
                self._transfer.download.close()
            try:
                self.link.publish(self._t(Leaf.ONLINE), b"offline", qos=1, retain=True).wait_for_publish(2)
            except (RuntimeError, ValueError, ConnectError) as exc:  # not connected: the broker has our will
                log.info("stopping without saying offline (%s): the broker publishes the will", exc)
            finally:
                self.link.stop()

    def _connect(self, timeout: float) -> bool:
        """Connect to the broker. While it cannot be reached the inference API keeps serving the device's
        applications, and the agent tries again, backing off to a minute; its traffic counters keep counting and
        go out with the first metrics after it connects. Without the API, an unreachable broker fails the start
        as before (the service manager restarts the agent). False: stopped while waiting."""
        delay = 1.0
        while True:
            try:
                self.link.start(timeout=timeout)
                return True
            except ConnectError as exc:
                if self.api is None:
                    raise
                log.warning("%s; serving the local API meanwhile, trying again in %.0f s", exc, delay)
            if self._stop.wait(delay):  # the back-off between attempts; a stop ends it at once
                return False
            delay = min(delay * 2, 60.0)

    def stop(self) -> None:
        self._stop.set()

    def handle(self, name: str, payload: bytes) -> bool:
        """The boundary every message passes: nothing raised while handling it escapes, and a message that was
        in flight when the agent died ``guard.DROP_AFTER`` times is dropped. Returns whether it was handled."""
        from_network = name != ""
        if from_network and not self.guard.before(name, payload):  # one digest per message: marks it, or refuses
            self._event("poison_dropped", f"dropped a message on {short(name, 100)} ({len(payload)} bytes): the agent "
                        f"died {self.guard.deaths(name, payload)} times handling it", limited=True)
            return False
        try:
            self._dispatch(name, payload)
        except Exception as exc:  # noqa: BLE001 - the one place that catches everything, by design
            log.exception("handling a message on %s failed", short(name, 100))
            try:
                self._event("handler_error", f"{short(name, 100)}: {type(exc).__name__}: {short(str(exc))}",
                            limited=True)
            except Exception:  # noqa: BLE001 - not even the report of a failure may escape
                log.exception("could not report a handler error")
        finally:
            if from_network:
                self.guard.after()
        return True

    def _dispatch(self, name: str, payload: bytes) -> None:
        if name == "" and payload.startswith(b"dropped:"):
            return self._event("dropped", f"refused an oversized message: {payload[8:].decode()}", limited=True)
        if name == "" and payload.startswith(b"http-done:"):
            return self._on_http_done(payload[len(b"http-done:"):].decode())
        if name == "" and payload.startswith(b"calibration:"):
            return self._on_calibration(json.loads(payload[len(b"calibration:"):]))
        if name == "":  # (re)connected: announce ourselves
            self.link.publish(self._t(Leaf.ONLINE), b"online", qos=1, retain=True)
            while self._pending_events:
                kind, message, job_id = self._pending_events.pop(0)
                self._event(kind, message, job_id=job_id)
            state = State(self.state.get("state", State.IDLE.value))
            kept = (State.ACTIVATED, State.ROLLED_BACK, State.FAILED, State.CALIBRATING, State.SHADOWING)
            self._publish_status(state if state in kept else State.IDLE, job_id=self.state.get("job_id"),
                                 version=self.state.get("version"))
            self._resume_transfer()
            return
        if name.startswith(f"{self.cfg.topic_prefix}/v{PROTOCOL_VERSION}/{ARTIFACTS_LEVEL}/"):
            if payload:  # an empty one clears the retained last chunk
                self._on_chunk(payload, via_broadcast=True)  # the frame names its job, checked there
            return
        try:
            _, leaf = parse_topic(self.cfg.topic_prefix, name)
            if leaf is Leaf.JOB:
                if payload:
                    self._on_job(Job.parse(payload))
            elif leaf is Leaf.STREAM_DATA:
                self._on_chunk(payload)
            elif leaf is Leaf.STREAM_REJECTED:
                self._on_rejected(decode(payload, "stream/rejected"))
            elif leaf is Leaf.CMD:
                self._on_command(decode(payload, "cmd"))
        except ProtocolError as exc:
            self._event("protocol_error", f"{short(name, 100)}: {exc}", limited=True)

    # ------------------------------------------------------------------------------ commands
    def _report_metrics(self) -> None:
        manifest = self.store.active_manifest()
        if self.session is None or manifest is None:
            return
        feeds = manifest.golden_pairs()[0][0]
        try:
            self.last_bench = benchmark(self.session, feeds, self.cfg.benchmark_runs)
        except RuntimeBackendError as exc:
            self.telemetry.errors += 1
            self._event("inference_error", str(exc))
            return
        self._publish_metrics(self.last_bench)

    def _on_command(self, body: dict[str, Any]) -> None:
        """``{"command": ..., "id": ...}``; with an id, the answer is an event whose ``job_id`` echoes it:
        ``reported`` (after the status and metrics), ``rolled_back`` or ``rollback_refused``."""
        command = body.get("command")
        cmd_id = body.get("id")
        if cmd_id is not None:
            check_id(cmd_id, "cmd: id")
        if command in ("report", "benchmark"):
            state = self.state.get("state", "idle")
            self._publish_status(State(state) if state in State._value2member_map_ else State.IDLE,
                                 job_id=self.state.get("job_id"), version=self.state.get("version"))
            if command == "report" and body.get("fresh") is False and self.last_bench is not None:
                self._publish_metrics(self.last_bench)  # the counters now, the last benchmark's latency figures
            else:
                self._report_metrics()
            if cmd_id is not None:
                self._event("reported", f"{command} done", job_id=cmd_id)
        elif command == "rollback":
            self._rollback(cmd_id)
        elif command == "drop_shadow":
            self._drop_shadow(cmd_id)
        else:
            raise ProtocolError(f"cmd: unknown command {short(command, 60)}; known: report, benchmark, rollback, "
                                "drop_shadow")

    def _rollback(self, cmd_id: str | None = None) -> None:
        active = self.store.active()
        other = "b" if active is not None and active.slot == "a" else "a"
        status = self.store.slot_status(other)
        if status.get("status") != "good":
            return self._event("rollback_refused", f"slot {other} holds no good model ({short(status.get('status'))})",
                               job_id=cmd_id, active_version=active.version if active else None)
        try:
            envelope = json.loads((self.store.slot_dir(other) / "manifest.json").read_text())
            manifest = Manifest.from_signed(envelope.get("signed") if isinstance(envelope, dict) else None)
            session = get_runtime(manifest.runtime).load(self.store.slot_dir(other) / manifest.filename,
                                                         self.cfg.threads)
            check_golden(session, manifest)  # warm, and still right, before a request reaches it
        except (AgentError, OSError, ValueError) as exc:
            return self._event("rollback_refused", f"slot {other}: {short(str(exc), 300)}", job_id=cmd_id,
                               active_version=active.version if active else None)
        self.store.activate(other, manifest)
        self._serve(session, manifest)
        self._save_state(state=State.ACTIVATED.value)
        self._publish_status(State.ACTIVATED, version=manifest.version, reason="rolled back on command")
        self._event("rolled_back", f"back to v{manifest.version} in slot {other} on command", version=manifest.version,
                    job_id=cmd_id, active_version=manifest.version)
