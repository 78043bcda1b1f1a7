"""Commands to devices, and what each device answers: a rollback is recorded only when the device says so.

The agent's contract (``docs/protocol.md``): the host publishes ``{"command": "rollback", "id": ...}`` on
``<device>/cmd``; the agent answers with an event on ``<device>/events`` whose ``job_id`` echoes the id and
whose ``kind`` is ``rolled_back`` (it switched slots; its status then says ``activated`` with the version it
went back to) or ``rollback_refused`` (nothing to go back to; it keeps the model it runs). A device that says
nothing within the timeout is recorded as ``no_answer``, never as rolled back. ``drop_shadow`` follows the same
contract (answered by ``shadow_dropped``: the device dropped the candidate it shadowed and kept its active model;
``pipeline.ota.shadow``): :func:`command` sends any of them.
"""

from __future__ import annotations

import enum
import logging
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from device_agent.config import BrokerConfig
from device_agent.errors import ProtocolError
from device_agent.protocol import Event, Leaf, Status, encode, parse_topic, topic

from .status import DeviceStatus
from .watch import Watch

log = logging.getLogger(__name__)

#: event kind -> the outcome it confirms
ROLLBACK_ANSWERS = {"rolled_back": DeviceStatus.ROLLED_BACK, "rollback_refused": DeviceStatus.ROLLBACK_REFUSED}


@dataclass
class Answer:
    device_id: str
    #: what the answer confirms (ROLLBACK_ANSWERS; a drop_shadow's, pipeline.ota.shadow.DROP_ANSWERS), or no_answer
    status: enum.Enum = DeviceStatus.NO_ANSWER
    #: the version the device runs after the command, as it said (None: it did not say)
    active_version: int | None = None
    message: str | None = None
    #: the state of the last status the device published after the command
    state: str | None = None
    #: the answering event, as delivery results keep events (kind, message, ts)
    event: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "status": self.status.value, "active_version": self.active_version,
                "reason": self.message, "state": self.state}


def command_id(command: str) -> str:
    return f"{command}-{uuid.uuid4().hex[:12]}"


def roll_back(broker: BrokerConfig, prefix: str, devices: list[str], timeout_s: float) -> list[Answer]:
    """Ask each device to switch back to its previous model and collect what it answers, until every device
    has answered or ``timeout_s`` has passed."""
    return command(broker, prefix, devices, "rollback", ROLLBACK_ANSWERS, timeout_s,
                   switched={DeviceStatus.ROLLED_BACK})


def command(broker: BrokerConfig, prefix: str, devices: list[str], name: str, kinds: Mapping[str, enum.Enum],
            timeout_s: float, switched: Collection[enum.Enum] = ()) -> list[Answer]:
    """Publish ``{"command": name, "id": ...}`` on each device's cmd topic and collect its answer: the first event
    whose kind is in ``kinds`` (kind -> the status it confirms) and whose ``job_id`` echoes the id, until every
    device has answered or ``timeout_s`` has passed. A device that said nothing is ``no_answer``. ``switched``: the
    statuses whose event's ``version`` is the one the device runs now, when the event names no active version."""
    cmd_id = command_id(name)
    answers = {d: Answer(d) for d in devices}
    heard: set[str] = set()

    def handle(topic_name: str, payload: bytes) -> None:
        try:
            device, leaf = parse_topic(prefix, topic_name)
            a = answers.get(device)
            if a is None or not payload:
                return
            message = Status.parse(payload) if leaf is Leaf.STATUS else Event.parse(payload)
        except ProtocolError:
            return
        if isinstance(message, Status):
            # what the device runs now: the agent publishes its status just before its answering event
            a.state = message.state
            if message.active_version is not None:
                a.active_version = message.active_version
        elif message.kind in kinds and device not in heard:
            # an agent that predates the id echo answers without one; a health-check rollback carries its
            # job's id, never this command's
            if message.job_id != cmd_id and message.job_id is not None:
                return
            heard.add(device)
            a.status, a.message = kinds[message.kind], _text(message.message)
            a.event = {"kind": message.kind, "message": a.message, "ts": message.ts}
            if message.active_version is not None:
                a.active_version = message.active_version
            elif a.status in switched and message.version is not None:
                a.active_version = message.version

    # live messages only: a retained status is an answer to something earlier
    subs = [(f"{prefix}/v1/+/{Leaf.STATUS.value}", 1), (f"{prefix}/v1/+/{Leaf.EVENTS.value}", 1)]
    with Watch(broker, prefix, subs, handle, name=f"host-{name.replace('_', '-')}", fresh_only=True) as watch:
        for d in devices:
            watch.publish(topic(prefix, d, Leaf.CMD), encode({"command": name, "id": cmd_id}), qos=1)
        if not watch.until(lambda: heard >= set(devices), timeout_s):
            log.warning("%s: no answer within %g s from %s", name, timeout_s,
                        ", ".join(d for d in devices if d not in heard))
    for a in answers.values():
        if a.status is DeviceStatus.NO_ANSWER:
            a.message = f"no answer to the {name} command within {timeout_s:g} s: what it runs is unknown"
    return [answers[d] for d in devices]


def _text(value: Any, limit: int = 500) -> str | None:
    """A device's message, bounded: it is shown and stored."""
    return value[:limit] if isinstance(value, str) else None
