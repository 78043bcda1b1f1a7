"""What the host records about a delivery: per device, only what that device said, or that it said nothing.

The values are those the fleet store, ``pipeline history``, the deploy table and the dashboard show. Where a
device status means the same as the agent's state machine (``device_agent.protocol.State``), it has the same
value; a test holds them together.
"""

from __future__ import annotations

import enum

from device_agent.protocol import State


class DeviceStatus(enum.StrEnum):
    """One device's outcome in a deployment or rollback."""

    #: recorded as a rollout starts, before the device has said anything (``FleetStore.start``)
    PENDING = "pending"
    #: the device reported the new model active
    ACTIVATED = State.ACTIVATED.value
    #: the device said it went back to its previous model: its health check refused the new one, or it
    #: switched slots on a ``rollback`` command and confirmed it
    ROLLED_BACK = State.ROLLED_BACK.value
    #: the device refused the update (signature, version, target, integrity...) and kept its model
    FAILED = State.FAILED.value
    #: asked to roll back, the device said it cannot (nothing to go back to, e.g. a first deployment) and kept
    #: the model it runs
    ROLLBACK_REFUSED = "rollback_refused"
    #: a shadow job's outcome: the candidate is installed and shadowed, the device's model unchanged
    SHADOWING = State.SHADOWING.value
    #: after a shadow stage that stopped the rollout: the device said it dropped the candidate (``drop_shadow``
    #: answered) and serves its active model
    SHADOW_DROPPED = "shadow_dropped"
    #: the device reached no verdict on the update within the timeout (it may have reported progress)
    TIMEOUT = "timeout"
    #: the device never answered a command within the timeout: what it runs is unknown
    NO_ANSWER = "no_answer"



#: a device with one of these has its outcome, or the host stopped waiting for one; a running deployment's
#: other rows hold the state the device last reported (``downloading``...) or ``pending``
SETTLED = frozenset(DeviceStatus) - {DeviceStatus.PENDING}


class DeploymentStatus(enum.StrEnum):
    """A deployment's (or a rollback's) outcome as a whole."""

    IN_PROGRESS = "in_progress"
    SUCCEEDED = "succeeded"
    #: the canaries said stop: the rest of the fleet was never touched
    ABORTED = "aborted"
    FAILED = "failed"
