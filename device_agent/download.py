"""A resumable chunked download into a pre-sized file, with progress persisted on disk.

Chunks are written in place; after each window the file is fsynced and only then the bitmap of
received chunks is rewritten atomically, so a restart never trusts a chunk that did not reach disk.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .storage import atomic_write_json, read_json


class Download:
    def __init__(self, root: Path, job_id: str, length: int, chunk_size: int, chunks: int) -> None:
        self.dir = root / job_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "data.part"
        self.length, self.chunk_size, self.chunks = length, chunk_size, chunks
        saved = read_json(self.dir / "have.json", {})
        # the bitmap only counts while the file it describes is there (a crash may have moved it on)
        ok = saved.get("length") == length and self.path.is_file()
        self.have: set[int] = set(saved.get("have", [])) if ok else set()
        #: chunks asked for and not yet received when the file was last written (the broker may hold them)
        self.requested: set[int] = set(saved.get("requested", [])) - self.have if ok else set()
        self._unsynced = 0
        mode = "r+b" if self.path.exists() else "w+b"
        self._file = open(self.path, mode)
        self._file.truncate(length)

    @property
    def resumed(self) -> int:
        return len(self.have)

    def missing(self, limit: int | None = None) -> list[int]:
        out = []
        for i in range(self.chunks):
            if i not in self.have:
                out.append(i)
                if limit is not None and len(out) >= limit:
                    break
        return out

    def expected_size(self, index: int) -> int:
        return min(self.chunk_size, self.length - index * self.chunk_size)

    def write(self, index: int, data: bytes) -> bool:
        """Store a chunk; False when it was a duplicate (QoS 1 is at-least-once)."""
        if index in self.have:
            return False
        os.pwrite(self._file.fileno(), data, index * self.chunk_size)
        self.have.add(index)
        self._unsynced += 1
        return True

    def checkpoint(self, force: bool = False) -> None:
        if self._unsynced or force:
            self._file.flush()
            os.fsync(self._file.fileno())
            atomic_write_json(self.dir / "have.json", {"length": self.length, "have": sorted(self.have),
                                                       "requested": sorted(self.requested - self.have)})
            self._unsynced = 0

    def note_requested(self, chunks: list[int]) -> None:
        self.requested = set(chunks)
        self.checkpoint(force=True)

    @property
    def complete(self) -> bool:
        return len(self.have) == self.chunks

    def close(self) -> None:
        self.checkpoint()
        self._file.close()

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        shutil.rmtree(self.dir, ignore_errors=True)
