"""What serving through the agent costs: in-process onnxruntime against the same model served by a real agent
process over its Unix socket, side by side in one run.

    .venv/bin/python bench/serve.py [--quick] [--json] [--out bench/results/serve.json]

For a small model (tens of microseconds) and MobileNetV2-224 (milliseconds), delivered to a local agent over a
local Mosquitto exactly as `pipeline deploy` delivers (one intra-op thread for both sides, so concurrency is the
clients'):
- latency p50/p95: in-process ``session.run`` and a served request alternate, one each in turn, so a drift of
  this VM's speed lands on both; the ratio and the absolute overhead;
- throughput over a fixed time with 1 and 4 concurrent clients (4 threads sharing the in-process session, or 4
  client connections), the served share of in-process;
- the agent's RSS with the model loaded against a bare process that imports onnxruntime and loads the model;
- failed requests while a new version is delivered and then rolled back under 4 clients of traffic;
- this machine's floor for serving from another process at all: a bare Unix-socket echo of the same bytes around
  the same busy time (no HTTP, no model), so the agent's own share of the overhead can be told from the OS's.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

PREFIX = "edgefleet"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


BARE = """
import sys, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
i = s.get_inputs()[0]
s.run(None, {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)})
for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
        print(int(line.split()[1]) / 1024)
"""


def models(tmp: Path, quick: bool) -> list[tuple[str, Path, tuple[int, ...]]]:
    from pipeline.export import export_model
    from pipeline.models import MODELS
    from pipeline.models import zoo  # noqa: F401

    torch.manual_seed(0)
    small = export_model("onnx", nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                               nn.Linear(8 * 8 * 8, 10)).eval(), (1, 8, 8), tmp / "small.onnx", 17)
    out = [("small-cnn-8x8", small, (1, 8, 8))]
    if not quick:
        big = MODELS.get("mobilenetv2")((3, 224, 224), 1000).eval()
        out.append(("mobilenetv2-224", export_model("onnx", big, (3, 224, 224), tmp / "mnv2.onnx", 17),
                    (3, 224, 224)))
    return out


ECHO = """
import socket, sys, time
path, size, work = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) / 1e3
srv = socket.socket(socket.AF_UNIX); srv.bind(path); srv.listen(1); print("ready", flush=True)
conn, _ = srv.accept()
buf, answer = bytearray(size), bytes(4096)
view = memoryview(buf)
while True:
    got = 0
    while got < size:
        k = conn.recv_into(view[got:])
        if not k:
            sys.exit(0)
        got += k
    end = time.perf_counter() + work
    while time.perf_counter() < end:  # the model's run: this process keeps its core busy meanwhile
        pass
    conn.sendall(answer)
"""


def ipc_floor(tmp: Path, nbytes: int, work_ms: float, n: int) -> dict[str, Any]:
    """What any inference served by another process costs on this machine, whatever the server: a process that
    reads a request of ``nbytes`` over a Unix socket, keeps its core busy for ``work_ms`` (the model's run) and
    answers 4 KB, against the same busy wait in-process; no HTTP, no parsing, no model. On a VM the two
    wake-ups per request (each side's blocked read woken by the other's write) cost far more than on the
    device's bare metal."""
    import socket

    path = str(tmp / f"echo-{nbytes}-{time.monotonic_ns()}.sock")
    proc = subprocess.Popen([sys.executable, "-c", ECHO, path, str(nbytes), str(work_ms)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().startswith("ready")
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 2**20)
        body, answer = bytes(nbytes), bytearray(4096)
        local, remote = np.empty(n), np.empty(n)
        for k in range(-5, n):
            t0 = time.perf_counter()
            end = t0 + work_ms / 1e3
            while time.perf_counter() < end:
                pass
            t1 = time.perf_counter()
            sock.sendall(body)
            got = 0
            while got < len(answer):
                got += sock.recv_into(memoryview(answer)[got:])
            t2 = time.perf_counter()
            if k >= 0:
                local[k], remote[k] = t1 - t0, t2 - t1
        sock.close()
    finally:
        proc.wait(10)
    return {"ipc_floor_p50_us": round(float(np.median(remote) - np.median(local)) * 1e6, 1),
            "ipc_floor_ratio": round(float(np.median(remote) / np.median(local)), 3)}


def latency(session, client, x: np.ndarray, n: int) -> dict[str, Any]:
    """In-process and served, alternating one call each."""
    name = session.get_inputs()[0].name
    local, served, inside = np.empty(n), np.empty(n), np.empty(n)
    for _ in range(5):
        session.run(None, {name: x})
        client.infer(x)
    for k in range(n):
        t0 = time.perf_counter()
        session.run(None, {name: x})
        t1 = time.perf_counter()
        answer = client.infer(x)
        t2 = time.perf_counter()
        local[k], served[k], inside[k] = t1 - t0, t2 - t1, answer.latency_ms / 1e3
    p = lambda a, q: float(np.percentile(a, q) * 1e3)  # noqa: E731
    return {"inprocess_p50_ms": round(p(local, 50), 4), "inprocess_p95_ms": round(p(local, 95), 4),
            "served_p50_ms": round(p(served, 50), 4), "served_p95_ms": round(p(served, 95), 4),
            "p50_ratio": round(p(served, 50) / p(local, 50), 3), "p95_ratio": round(p(served, 95) / p(local, 95), 3),
            "overhead_p50_us": round((p(served, 50) - p(local, 50)) * 1e3, 1), "calls": n,
            "agent_run_p50_ms": round(p(inside, 50), 4)}


def throughput(call_factory, clients: int, seconds: float) -> float:
    """Calls per second over ``seconds`` with ``clients`` threads, each with its own caller."""
    stop = threading.Event()
    counts = [0] * clients
    callers = [call_factory() for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def work(i: int) -> None:
        start.wait()
        while not stop.is_set():
            callers[i]()
            counts[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    stop.wait(seconds)  # the measurement window, not a synchronisation
    stop.set()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the small model only, short windows")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    args = ap.parse_args()
    import onnxruntime as ort

    from device_agent.client import Client
    from pipeline.broker import LocalBroker
    from pipeline.bundle import build_artifact, load_or_create
    from pipeline.ota import LocalFleet, deliver
    from pipeline.ota.commands import roll_back

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    keys = tmp / "keys"
    load_or_create(keys)
    window = 2.0 if args.quick else 8.0
    rows = []
    with LocalBroker("mosquitto", tmp / "broker") as broker, \
            LocalFleet(tmp / "devices", broker.config, "host", 1, keys / "signing.pub", PREFIX, threads=1) as fleet:
        [device] = fleet.device_ids
        sock = str(fleet.socket_path(device))
        agent_pid = fleet.procs[device].pid
        version = 100
        for name, path, shape in models(tmp, args.quick):
            version += 10
            x = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
            art = build_artifact(path, tmp / "artifacts", name=name, version=version, target="host",
                                 runtime="onnxruntime", golden_inputs=x, budgets={}, predicted={},
                                 health={"runs": 5}, key_dir=keys)
            [r] = deliver(broker.config, PREFIX, art, [device], 120)
            assert r.status == "activated", r
            log(f"{name}: v{version} active on {device}; latency, alternating")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            iname = session.get_inputs()[0].name
            with Client(sock) as client:
                n = max(50, min(2000, int(window / max(session_latency(session, iname, x), 1e-5))))
                row = {"model": name, **latency(session, client, x, n)}
            row.update(ipc_floor(tmp, x.nbytes + 128, row["inprocess_p50_ms"], min(n, 500)))
            log(f"{name}: throughput, 1 and 4 clients, {window:g} s each")
            for clients in (1, 4):
                local = throughput(lambda: (lambda: session.run(None, {iname: x})), clients, window)
                served_clients: list[Client] = []

                def served_call():
                    c = Client(sock)
                    served_clients.append(c)
                    return lambda: c.infer(x)
                served = throughput(served_call, clients, window)
                for c in served_clients:
                    c.close()
                row[f"inprocess_ips_{clients}"] = round(local, 1)
                row[f"served_ips_{clients}"] = round(served, 1)
                row[f"served_share_{clients}"] = round(served / local, 3)
            bare = float(subprocess.run([sys.executable, "-c", BARE, str(path)], capture_output=True, text=True,
                                        check=True).stdout.strip())
            row.update(agent_rss_mb=round(rss_mb(agent_pid), 1), bare_ort_rss_mb=round(bare, 1))
            row["rss_over_bare_mb"] = round(row["agent_rss_mb"] - bare, 1)
            rows.append(row)
        # failed requests during a delivery and a rollback under 4 clients of traffic
        log("swap: a delivery and a rollback under 4 clients")
        name, path, shape = models(tmp, True)[0]
        x = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
        version += 10
        art = build_artifact(path, tmp / "artifacts", name=name, version=version, target="host",
                             runtime="onnxruntime", golden_inputs=x, budgets={}, predicted={}, health={"runs": 5},
                             key_dir=keys)
        [r] = deliver(broker.config, PREFIX, art, [device], 60)  # the model the traffic is for, before it starts
        assert r.status == "activated", r
        stop, failures, answered = threading.Event(), [], [0]

        def traffic():
            with Client(sock, timeout=30) as c:
                while not stop.is_set():
                    try:
                        c.infer(x)
                        answered[0] += 1
                    except Exception as exc:  # noqa: BLE001 - counted
                        failures.append(repr(exc))
        threads = [threading.Thread(target=traffic) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            for v in (version + 1, version + 2):
                art = build_artifact(path, tmp / "artifacts", name=name, version=v, target="host",
                                     runtime="onnxruntime", golden_inputs=x, budgets={}, predicted={},
                                     health={"runs": 5}, key_dir=keys)
                [r] = deliver(broker.config, PREFIX, art, [device], 60)
                assert r.status == "activated", r
            [back] = roll_back(broker.config, PREFIX, [device], 30)
        finally:
            stop.set()
            for t in threads:
                t.join()
        swap = {"deliveries": 2, "rollbacks": 1, "rollback": back.status.value, "requests": answered[0],
                "failed": len(failures), "failures": failures[:5]}
    result = {"rows": rows, "swap": swap, "quick": args.quick, "threads": 1}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'model':16s} {'p50 in/served ms':>18s} {'ratio':>6s} {'p95 in/served ms':>18s} {'ratio':>6s} "
          f"{'overhead':>9s} {'ips 1: in/served':>18s} {'ips 4: in/served':>18s} {'RSS agent/bare MB':>18s}")
    for r in rows:
        print(f"{r['model']:16s} {r['inprocess_p50_ms']:8.3f}/{r['served_p50_ms']:<8.3f} {r['p50_ratio']:6.3f} "
              f"{r['inprocess_p95_ms']:8.3f}/{r['served_p95_ms']:<8.3f} {r['p95_ratio']:6.3f} "
              f"{r['overhead_p50_us']:7.0f}us {r['inprocess_ips_1']:8.0f}/{r['served_ips_1']:<8.0f}  "
              f"{r['inprocess_ips_4']:8.0f}/{r['served_ips_4']:<8.0f}  {r['agent_rss_mb']:7.1f}/{r['bare_ort_rss_mb']:<7.1f}"
              f" (+{r['rss_over_bare_mb']:.1f})")
        print(f"{'':16s} served share of in-process throughput: {r['served_share_1']:.0%} (1 client), "
              f"{r['served_share_4']:.0%} (4 clients); the agent's own run p50 {r['agent_run_p50_ms']:.3f} ms")
        print(f"{'':16s} this machine's floor for any other-process server (a bare Unix-socket echo of the same "
              f"bytes around the same busy time): +{r['ipc_floor_p50_us']:.0f} us, ratio {r['ipc_floor_ratio']:.3f}")
    print(f"swap: {swap['requests']} requests during {swap['deliveries']} deliveries and a rollback "
          f"({swap['rollback']}): {swap['failed']} failed")
    print(f"wrote {args.out}")


def session_latency(session, name: str, x: np.ndarray) -> float:
    t0 = time.perf_counter()
    for _ in range(5):
        session.run(None, {name: x})
    return (time.perf_counter() - t0) / 5


if __name__ == "__main__":
    main()
