"""Broadcast delivery: one publish per chunk for a whole wave, on the job's artifact topic.

The job names ``<prefix>/v1/_artifacts/<job_id>`` (``device_agent.protocol.artifact_topic``); each device subscribes
to it (QoS 1) before it reports ``downloading``. Once the wave's devices have said so (or a short wait has passed:
the others join late), the host publishes every chunk there once, paced by the broker's acknowledgements, the last one retained while the
delivery lasts (a device that subscribes late gets it at once, so it knows the broadcast has passed); what a
device still lacks (it joined late, restarted, or the broker dropped something) it asks for on its own
``stream/get``, which the :class:`~pipeline.ota.delivery.ChunkServer` answers as for a unicast delivery. An agent
that does not know the field asks for everything itself: unicast is the fallback without anything to negotiate.
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
#: how long the host waits for a wave's devices to subscribe before it broadcasts anyway (the rest repair)
SUBSCRIBE_WAIT_S = 15.0
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


def broadcast_chunks(link, name: str, artifact: Artifact, job_id: str, result: BroadcastResult,
                     window: int = PACE_WINDOW, ack_timeout_s: float = 30.0) -> BroadcastResult:
    """Publish every chunk of ``artifact`` once on ``name`` (QoS 1, the frames of ``stream/data``), keeping at most
    ``window`` unacknowledged by the broker. A chunk the broker does not acknowledge in time is left to the devices'
    repairs."""
    m = artifact.manifest
    started = time.monotonic()
    inflight: deque = deque()
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
    result.seconds = round(time.monotonic() - started, 3)
    return result


def clear_retained(link, name: str) -> None:
    """Drop the retained last chunk: the broker keeps nothing of a finished delivery."""
    link.publish(name, b"", qos=1, retain=True)


def _wait(info, timeout: float) -> None:
    try:
        info.wait_for_publish(timeout)
    except (RuntimeError, ValueError) as exc:  # not queued (the link dropped): the devices repair it
        log.warning("broadcast chunk not acknowledged by the broker: %s", exc)
