"""``pipeline fleet ingest`` exactly as the CLI runs it, plus a file of its counters (for bench/soak.py).

    SOAK_STATS=stats.json .venv/bin/python bench/ingest_tap.py fleet ingest --db fleet.db --broker HOST:PORT ...

The arguments are the CLI's (``pipeline.cli.main``). The one difference is the ingester's class: the same
``Ingester`` that, right after each batch it committed (before acknowledging it), writes ``received``, ``stored``
(rows written) and ``committed_metrics`` (metrics messages in committed batches) to ``$SOAK_STATS`` (atomically).
A store ignores a metrics message it already holds, so over every life of every ingester of one store,
sum(committed_metrics) - metrics rows = the duplicates the ingesters were handed: redeliveries. A process killed
with SIGKILL loses only what it committed after its last write, a window of microseconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import json  # noqa: E402
import os  # noqa: E402

from pipeline.fleet import ingest  # noqa: E402


class CountingIngester(ingest.Ingester):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.committed_metrics = 0
        self.stats = Path(os.environ["SOAK_STATS"])

    def _store(self, store, messages) -> None:
        super()._store(store, messages)
        self.committed_metrics += sum(1 for _, leaf, _ in messages if leaf == "metrics")
        tmp = self.stats.with_name(self.stats.name + ".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "received": self.received, "stored": self.stored,
                                   "committed_metrics": self.committed_metrics, "dropped": self.dropped}))
        tmp.replace(self.stats)


if __name__ == "__main__":
    ingest.Ingester = CountingIngester  # the CLI imports the class when it runs: it takes this one
    from pipeline.cli import main

    sys.exit(main(sys.argv[1:]))
