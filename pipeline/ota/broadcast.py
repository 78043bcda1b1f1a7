"""Broadcast delivery: one publish per chunk for a whole wave, on the job's artifact topic.

The job names ``<prefix>/v1/_artifacts/<job_id>`` (``device_agent.protocol.artifact_topic``); each device subscribes
to it (QoS 1) before it reports ``downloading``. Once the wave's devices have said so (or a short wait has passed:
the others join late), the host publishes every chunk there once, paced by the broker's acknowledgements, the last one retained while the
delivery lasts (a device that subscribes late gets it at once, so it knows the broadcast has passed); what a
device still lacks (it joined late, restarted, or the broker dropped something) it asks for on its own
``stream/get``, which the :class:`~pipeline.ota.delivery.ChunkServer` answers as for a unicast delivery. An agent
that does not know the field asks for everything itself: unicast is the fallback without anything to negotiate.

Repairs stay repairs at any scale. A device listening to the broadcast asks for what it lacks before it has seen
the broadcast's last chunk only after a silence, and the chunk server leaves such a request to the broadcast (counted
as deferred): what the device lacks is still on its way, in the broker's queue for it, however slow the device is.
What a device asks for once it has seen the last chunk go by (``passed``: live, queued by its session, or retained
for a late subscriber) it missed, and is served; a chunk several such devices ask for at once goes once on the
artifact topic (:func:`republish_chunk`), and a device's re-ask for a chunk still unacknowledged by the broker is not
served again.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from device_agent.protocol import DEFAULT_WINDOW, encode_chunk

from ..bundle import Artifact

log = logging.getLogger(__name__)


class BroadcastMode(str, enum.Enum):
    """``fleet.broadcast``: ``auto`` broadcasts to waves of more than one device, ``always`` to every wave,
    ``never`` serves each device on its own (unicast)."""

    AUTO = "auto"
    ALWAYS = "always"
    NEVER = "never"


#: the mode :func:`pipeline.ota.delivery.deliver` uses when its caller names none (a rollout's waves):
#: ``pipeline deploy`` sets it from deploy.yaml's ``fleet.broadcast`` around the rollout (:func:`broadcasting`)
_MODE: contextvars.ContextVar[BroadcastMode] = contextvars.ContextVar("broadcast_mode", default=BroadcastMode.AUTO)
#: how long the host waits for another of a wave's devices to subscribe before it broadcasts anyway (the rest
#: repair), and how long it waits in all however many keep coming
SUBSCRIBE_WAIT_S = 15.0
SUBSCRIBE_MAX_S = 120.0
#: seconds after the broadcast's end from which a listening device that still has not seen it pass is served what
#: it asks for (its last chunk never reached it, nor the retained copy)
PASS_GRACE_S = 30.0
#: publishes the host may have unacknowledged by the broker while broadcasting
PACE_WINDOW = DEFAULT_WINDOW


@contextlib.contextmanager
def broadcasting(mode: BroadcastMode | str) -> Iterator[None]:
    """Deliveries in this block (on this thread) that name no mode use ``mode``."""
    token = _MODE.set(BroadcastMode(mode))
    try:
        yield
    finally:
        _MODE.reset(token)


def use_broadcast(mode: BroadcastMode | str | None, devices: int) -> bool:
    """Whether a wave of ``devices`` is broadcast: ``auto`` for more than one device."""
    mode = _MODE.get() if mode is None else BroadcastMode(mode)
    return mode is BroadcastMode.ALWAYS or (mode is BroadcastMode.AUTO and devices > 1)


@dataclass
class BroadcastResult:
    chunks: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0
    #: devices that had reported ``downloading`` (subscribed) when the broadcast began
    subscribed: int = 0
    #: from the job's publication to the broadcast's first chunk: the wait for the wave to subscribe
    waited_s: float = 0.0
    #: when (time.monotonic()) the broadcast was over: every chunk acknowledged by the broker, or given up on
    finished_at: float | None = None
    #: chunks asked for by listening devices that had not seen the broadcast pass: left to the broadcast, not served
    chunks_deferred: int = 0
    #: repairs several devices asked for at once, published once on the artifact topic instead of once each
    repair_chunks: int = 0
    repair_bytes: int = 0

    def leaves_to_broadcast(self, now: float) -> bool:
        """Whether a listening device that has not seen the broadcast pass is left to it: until PASS_GRACE_S after its
        end."""
        return self.finished_at is None or now - self.finished_at < PASS_GRACE_S


def broadcast_chunks(link, name: str, artifact: Artifact, job_id: str, result: BroadcastResult,
                     window: int = PACE_WINDOW, ack_timeout_s: float = 30.0) -> BroadcastResult:
    """Publish every chunk of ``artifact`` once on ``name`` (QoS 1, the frames of ``stream/data``), keeping at most
    ``window`` unacknowledged by the broker. A chunk the broker does not acknowledge in time is left to the devices'
    repairs."""
    m = artifact.manifest
    started = time.monotonic()
    inflight: deque = deque()
    try:
        with open(artifact.model_path, "rb") as f:
            for index in range(m.chunks):
                if len(inflight) >= window:
                    _wait(inflight.popleft(), ack_timeout_s)
                frame = encode_chunk(job_id, index, f.read(m.chunk_size))
                inflight.append(link.publish(name, frame, qos=1, retain=index == m.chunks - 1))
                result.chunks += 1
                result.bytes_sent += len(frame)
        while inflight:
            _wait(inflight.popleft(), ack_timeout_s)
    finally:
        result.finished_at = time.monotonic()  # whatever did not go, the devices repair
    result.seconds = round(time.monotonic() - started, 3)
    return result


def republish_chunk(link, name: str, frame: bytes, result: BroadcastResult):
    """A repair several devices want, once on the artifact topic (not retained): every listening device gets it,
    those that have it drop the duplicate. Returns the publish's info."""
    info = link.publish(name, frame, qos=1)
    result.repair_chunks += 1
    result.repair_bytes += len(frame)
    return info


def clear_retained(link, name: str) -> None:
    """Drop the retained last chunk: the broker keeps nothing of a finished delivery."""
    link.publish(name, b"", qos=1, retain=True)


def _wait(info, timeout: float) -> None:
    try:
        info.wait_for_publish(timeout)
    except (RuntimeError, ValueError) as exc:  # not queued (the link dropped): the devices repair it
        log.warning("broadcast chunk not acknowledged by the broker: %s", exc)
