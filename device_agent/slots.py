"""Two model slots and an atomic pointer to the active one (A/B, as RAUC and Mender do it).

Layout under the agent's state directory::

    slots/a/{model file, manifest.json, slot.json}   slot.json: {"status": installing|good|bad, "version"}
    slots/b/...
    active.json                                      {"slot", "version", "name", "sha256", "filename"}

A new model only ever goes into the inactive slot, which is marked ``installing`` first and
``good`` after its health check; the switch is one atomic rename of ``active.json``. A crash at
any moment leaves the previous ``active.json`` and its slot untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .faults import crash_point
from .manifest import Manifest, file_sha256
from .storage import atomic_write_json, fsync_dir, read_json

SLOTS = ("a", "b")


@dataclass(frozen=True)
class ActiveModel:
    slot: str
    version: int
    name: str
    sha256: str
    filename: str
    path: Path


class SlotStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        for s in SLOTS:
            (root / "slots" / s).mkdir(parents=True, exist_ok=True)

    def slot_dir(self, slot: str) -> Path:
        return self.root / "slots" / slot

    def active(self) -> ActiveModel | None:
        rec = read_json(self.root / "active.json")
        if not rec:
            return None
        path = self.slot_dir(rec["slot"]) / rec["filename"]
        return ActiveModel(rec["slot"], int(rec["version"]), rec["name"], rec["sha256"], rec["filename"], path)

    def inactive_slot(self) -> str:
        active = self.active()
        return "b" if active is not None and active.slot == "a" else "a"

    def slot_status(self, slot: str) -> dict[str, Any]:
        return read_json(self.slot_dir(slot) / "slot.json", {"status": "empty"})

    def install(self, slot: str, source: Path, manifest: Manifest, envelope: dict[str, Any]) -> Path:
        """Move a verified download into ``slot``; the slot is marked ``installing`` until marked good."""
        active = self.active()
        if active is not None and active.slot == slot:
            raise ValueError(f"refusing to overwrite the active slot {slot}")
        d = self.slot_dir(slot)
        atomic_write_json(d / "slot.json", {"status": "installing", "version": manifest.version})
        crash_point("slot-marked")
        for child in d.iterdir():
            if child.name != "slot.json":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        target = d / manifest.filename
        source.replace(target)
        with open(target, "rb+") as f:
            os.fsync(f.fileno())
        atomic_write_json(d / "manifest.json", envelope)
        fsync_dir(d)
        return target

    def mark(self, slot: str, status: str, version: int, reason: str | None = None) -> None:
        atomic_write_json(self.slot_dir(slot) / "slot.json", {"status": status, "version": version, "reason": reason})

    def activate(self, slot: str, manifest: Manifest) -> ActiveModel:
        self.mark(slot, "good", manifest.version)
        rec = {"slot": slot, "version": manifest.version, "name": manifest.name, "sha256": manifest.raw_sha256,
               "filename": manifest.filename}
        atomic_write_json(self.root / "active.json", rec)
        return self.active()  # type: ignore[return-value]

    def verify_active(self) -> ActiveModel | None:
        """The active model, checked against its recorded hash; None when there is none or it is damaged."""
        active = self.active()
        if active is None or not active.path.is_file() or file_sha256(active.path) != active.sha256:
            return None
        return active

    def active_manifest(self) -> Manifest | None:
        active = self.active()
        if active is None:
            return None
        envelope = json.loads((self.slot_dir(active.slot) / "manifest.json").read_text())
        return Manifest.from_signed(envelope["signed"])
