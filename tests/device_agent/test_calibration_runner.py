"""The calibration runner on real suites of tiny ONNX models, timed with onnxruntime: interleaved rounds, figures
that fit the message schema, resumption after an interruption, the budget, and payloads that are no suite."""

from __future__ import annotations

import io
import json
import threading
import zipfile

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from calibration_suites import four_models, suite_zip, write_zip
from device_agent.calibration import SUITE_FILE, Case, Suite
from device_agent.suite_runner import MAX_GROUP_ATTEMPTS, MAX_UNPACKED_BYTES, PROGRESS_FILE, run_suite, unpack
from device_agent.errors import ProtocolError, VerificationError
from device_agent.protocol import MAX_CALIBRATION_RESULTS, Calibration, encode

GROUPS = {"first": 0, "dw": 0, "gemm": 1, "relu": 1}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return four_models(tmp_path_factory.mktemp("models"))


class Recorder:
    """The report callback and the timing hook: what the runner said, in order. ``stop_after``: raise from the
    callback once that many results were reported (an agent killed mid-suite)."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.batches, self.order, self.stop_after = [], [], stop_after

    def report(self, batch) -> None:
        self.batches.append(batch)
        if self.stop_after is not None and sum(len(b.results) for b in self.batches) >= self.stop_after:
            raise KeyboardInterrupt("killed")

    def timed(self, case_id: str, r: int) -> None:
        self.order.append((case_id, r))

    @property
    def results(self) -> dict[str, dict]:
        return {r["id"]: r for b in self.batches for r in b.results}


def run(payload, work, rec, **kw):
    return run_suite(payload, work, 1, rec.report, on_timed=rec.timed, report_every_s=0, **kw)


def test_every_case_is_timed_interleaved_and_reported_as_the_schema_says(models, tmp_path):
    payload, suite = suite_zip(tmp_path / "s.zip", models, GROUPS, rounds=3, runs=5, warmup=1)
    rec = Recorder()
    summary = run(payload, tmp_path / "work", rec)
    # round r runs every case of the group once before round r + 1; groups in order
    assert rec.order == [(c, r) for g in (["first", "dw"], ["gemm", "relu"]) for r in range(3) for c in g]
    assert summary.finished and not summary.cancelled and summary.error is None and summary.failed == {}
    assert set(rec.results) == set(models) and summary.done == summary.total == 4
    for r in rec.results.values():
        assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] and r["runs"] == 5 and r["rounds"] == 3
    assert [b.finished for b in rec.batches] == [False] * (len(rec.batches) - 1) + [True]
    assert [b.done for b in rec.batches] == sorted(b.done for b in rec.batches) and rec.batches[-1].done == 4
    env = rec.batches[0].env
    assert env["runtime"] == "onnxruntime" and env["runtime_version"] and env["threads"] == 1 and env["machine"]
    assert env["agent_version"] and "cpu" in env
    for b in rec.batches:  # every batch makes a message the host parses
        msg = Calibration("d1", "cal-1", 7, b.done, b.total, b.results, b.finished, b.error, b.env)
        assert Calibration.parse(encode(msg)) == msg
    assert not (tmp_path / "work" / "cases").exists()  # the unpacked files go once timed


def test_the_suite_threads_win_over_the_agents(models, tmp_path):
    payload, _ = suite_zip(tmp_path / "s.zip", {"gemm": models["gemm"]}, {}, threads=2, rounds=1, runs=2, warmup=0)
    rec = Recorder()
    run_suite(payload, tmp_path / "work", 1, rec.report, report_every_s=0)
    assert rec.batches[-1].env["threads"] == 2


def test_results_go_in_batches_no_larger_than_a_message_takes(models, tmp_path):
    f, shape = models["relu"]
    cases = tuple(Case(f"c{i}", f.name, shape, 0) for i in range(MAX_CALIBRATION_RESULTS + 6))
    payload = write_zip(tmp_path / "s.zip", Suite("many", cases, rounds=1, runs=1, warmup=0), {f.name: f})
    rec = Recorder()
    run_suite(payload, tmp_path / "work", 1, rec.report, report_every_s=0)
    assert [len(b.results) for b in rec.batches] == [MAX_CALIBRATION_RESULTS, 6]
    assert rec.batches[-1].finished and len(rec.results) == len(cases)


def test_an_interrupted_run_resumes_with_the_cases_not_yet_timed(models, tmp_path):
    payload, _ = suite_zip(tmp_path / "s.zip", models, GROUPS, rounds=2, runs=3, warmup=1)
    first = Recorder(stop_after=2)  # dies as it reports group 0
    with pytest.raises(KeyboardInterrupt):
        run(payload, tmp_path / "work", first)
    assert {c for c, _ in first.order} == {"first", "dw"}
    progress = json.loads((tmp_path / "work" / PROGRESS_FILE).read_text())
    assert [r["id"] for r in progress["results"]] == ["first", "dw"] and progress["elapsed_s"] > 0

    again = Recorder()
    summary = run(payload, tmp_path / "work", again)
    assert {c for c, _ in again.order} == {"gemm", "relu"} and summary.timed == ("gemm", "relu")
    # what was timed before is reported again first (the host keys by case id), and done goes on counting
    assert again.batches[0].done == 2 and {r["id"] for r in again.batches[0].results} == {"first", "dw"}
    assert again.batches[-1].finished and again.batches[-1].done == 4 and set(again.results) == set(models)


def test_a_run_cancelled_mid_group_resumes_at_the_next_round(models, tmp_path):
    payload, _ = suite_zip(tmp_path / "s.zip", models, GROUPS, rounds=3, runs=2, warmup=0)
    cancel = threading.Event()
    rec = Recorder()

    def timed(case_id, r):
        rec.timed(case_id, r)
        if (case_id, r) == ("relu", 0):  # group 1 has finished its first round
            cancel.set()

    summary = run_suite(payload, tmp_path / "work", 1, rec.report, cancel=cancel, on_timed=timed, report_every_s=0)
    assert summary.cancelled and not summary.finished and not rec.batches[-1].finished
    again = Recorder()
    summary = run(payload, tmp_path / "work", again)
    assert again.order == [("gemm", 1), ("relu", 1), ("gemm", 2), ("relu", 2)]
    assert summary.finished and again.results["gemm"]["rounds"] == 3 and again.batches[-1].done == 4


def test_the_budget_stops_a_run_and_counts_across_restarts(models, tmp_path):
    payload, suite = suite_zip(tmp_path / "s.zip", models, GROUPS, rounds=5, runs=10_000, warmup=0, budget_s=0.05)
    rec = Recorder()
    summary = run(payload, tmp_path / "work", rec)
    last = rec.batches[-1]
    assert summary.finished and last.finished and "budget of 0.05 s spent" in last.error
    assert last.done < last.total == 4 and summary.elapsed_s >= 0.05

    # time spent before a restart counts: a run that had used nearly all of its budget stops within a step
    payload, _ = suite_zip(tmp_path / "t.zip", models, GROUPS, rounds=2, runs=3, warmup=0, budget_s=30)
    cancel = threading.Event()
    first = Recorder()
    run_suite(payload, tmp_path / "w2", 1, first.report, cancel=cancel,
              on_timed=lambda c, r: cancel.set() if c == "dw" and r == 1 else None, report_every_s=0)
    path = tmp_path / "w2" / PROGRESS_FILE
    progress = json.loads(path.read_text())
    assert 0 < progress["elapsed_s"] < 30
    path.write_text(json.dumps({**progress, "elapsed_s": 29.999}))
    again = Recorder()
    summary = run(payload, tmp_path / "w2", again)
    assert again.order == [] and again.batches[-1].finished and "budget of 30 s spent" in again.batches[-1].error
    assert summary.elapsed_s >= 30 and summary.done < 4


def test_a_case_that_fails_is_left_out_and_named(models, tmp_path):
    f, shape = models["gemm"]
    suite = Suite("s", (Case("ok", f.name, shape), Case("garbage", "garbage.onnx", shape),
                        Case("wrong-shape", f.name, (1, 7))), rounds=2, runs=2, warmup=1)
    payload = write_zip(tmp_path / "s.zip", suite, {f.name: f, "garbage.onnx": b"not an onnx model"})
    rec = Recorder()
    summary = run(payload, tmp_path / "work", rec)
    assert set(rec.results) == {"ok"} and set(summary.failed) == {"garbage", "wrong-shape"}
    error = rec.batches[-1].error
    assert rec.batches[-1].finished and "2 case(s) failed" in error and "garbage" in error and "[1, 7]" in error
    assert rec.batches[-1].done == 1 and rec.batches[-1].total == 3
    again = Recorder()  # failures are final: not retried on a resume
    assert run(payload, tmp_path / "work", again).failed == summary.failed and again.order == []


def test_a_group_the_agent_keeps_dying_in_is_given_up(models, tmp_path):
    payload, _ = suite_zip(tmp_path / "s.zip", models, GROUPS, rounds=1, runs=2, warmup=0)

    def dies_in_gemm(case_id, r):
        if case_id == "gemm":
            raise KeyboardInterrupt("the runtime took the process down")

    for _ in range(MAX_GROUP_ATTEMPTS):
        with pytest.raises(KeyboardInterrupt):
            run_suite(payload, tmp_path / "work", 1, Recorder().report, on_timed=dies_in_gemm, report_every_s=0)
    rec = Recorder()
    summary = run(payload, tmp_path / "work", rec)
    assert rec.order == [] and set(summary.failed) == {"gemm", "relu"} and summary.finished
    assert f"died {MAX_GROUP_ATTEMPTS} times" in summary.failed["gemm"] and set(rec.results) == {"first", "dw"}


# --------------------------------------------------------------------------- payloads that are no suite

def _suite_of(models, **kw) -> Suite:
    return Suite("s", tuple(Case(cid, f.name, shape) for cid, (f, shape) in models.items()), **kw)


def _bomb(path, suite: Suite, name: str, size: int):
    """A real zip bomb: ``size`` bytes of zeros deflated to a few hundred KB, streamed (never held in memory)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr(SUITE_FILE, suite.to_json())
        with zf.open(name, "w", force_zip64=True) as f:
            block = bytes(1 << 20)
            for _ in range(size >> 20):
                f.write(block)
    return path


def _malicious(kind: str, tmp_path, models):
    f, shape = models["gemm"]
    suite = _suite_of({"gemm": models["gemm"]})
    if kind == "traversal":
        return write_zip(tmp_path / "p.zip", suite, {f.name: f, "../escaped.onnx": b"x"}), "does not name"
    if kind == "absolute":
        return write_zip(tmp_path / "p.zip", suite, {f.name: f, "/tmp/escaped.onnx": b"x"}), "does not name"
    if kind == "nested":
        return write_zip(tmp_path / "p.zip", suite, {f.name: f, f"sub/{f.name}": f}), "does not name"
    if kind == "bomb":
        return _bomb(tmp_path / "p.zip", suite, f.name, MAX_UNPACKED_BYTES + (1 << 20)), "more than the"
    if kind == "missing":
        return write_zip(tmp_path / "p.zip", suite, {}), "does not hold"
    if kind == "no-suite":
        return write_zip(tmp_path / "p.zip", None, {f.name: f}), "holds no suite.json"
    if kind == "bad-suite":
        return write_zip(tmp_path / "p.zip", b'{"suite_version": 1, "name": ""}', {f.name: f}), "name must be"
    if kind == "not-json":
        return write_zip(tmp_path / "p.zip", b"\xff\xfe", {f.name: f}), "not JSON"
    if kind == "not-a-zip":
        (tmp_path / "p.zip").write_bytes(b"PK\x03\x04 this is not a zip at all" * 10)
        return tmp_path / "p.zip", "not a zip"
    if kind == "twice":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf, pytest.warns(UserWarning):
            zf.writestr(SUITE_FILE, suite.to_json())
            zf.writestr(f.name, f.read_bytes())
            zf.writestr(f.name, b"the other one")
        (tmp_path / "p.zip").write_bytes(buf.getvalue())
        return tmp_path / "p.zip", "appears twice"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["traversal", "absolute", "nested", "bomb", "missing", "no-suite", "bad-suite",
                                  "not-json", "not-a-zip", "twice"])
def test_a_payload_that_is_no_suite_is_one_clean_error(kind, models, tmp_path):
    payload, expected = _malicious(kind, tmp_path, models)
    rec = Recorder()
    with pytest.raises(ProtocolError, match=expected):
        run(payload, tmp_path / "work", rec)
    assert rec.batches == [] and rec.order == []  # refused before anything ran or was reported
    assert not (tmp_path / "escaped.onnx").exists() and not (tmp_path / "work" / "escaped.onnx").exists()
    assert not any(p.stat().st_size > MAX_UNPACKED_BYTES for p in tmp_path.rglob("*") if p.is_file()
                   and p.name != "p.zip")


def test_the_unpacked_size_is_bounded_by_the_bytes_as_well_as_the_declared_sizes(models, tmp_path):
    payload, _ = suite_zip(tmp_path / "s.zip", models, GROUPS)
    total = sum(f.stat().st_size for f, _ in models.values())
    with pytest.raises(ProtocolError, match="more than the"):
        unpack(payload, tmp_path / "cases", max_bytes=total - 1)
    suite, digest = unpack(payload, tmp_path / "cases", max_bytes=total)
    assert len(suite.cases) == 4 and len(digest) == 64
    assert sorted(p.name for p in (tmp_path / "cases").iterdir()) == sorted(f.name for f, _ in models.values())


_NAMES = st.sampled_from([SUITE_FILE, "a.onnx", "../a.onnx", "/a.onnx", "b/", "b/a.onnx", ".a", "a.onnx\x00"])


@pytest.mark.filterwarnings("ignore:Duplicate name")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(st.tuples(_NAMES, st.binary(max_size=64) | st.just(b"SUITE")), max_size=5),
       garbage=st.binary(max_size=64), mangle=st.integers(0, 200))
@example(entries=[("b/", b""), ("b/", b"SUITE")], garbage=b"", mangle=68)  # a zip version zipfile cannot read
def test_any_payload_gives_a_suite_or_one_error(entries, garbage, mangle, tmp_path):
    suite = Suite("s", (Case("a", "a.onnx", (1, 4)),)).to_json()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries:
            zf.writestr(name, suite if data == b"SUITE" else data)
    raw = bytearray(buf.getvalue() or garbage)
    if raw and mangle < 100:  # flip a byte somewhere: a damaged zip
        raw[mangle * len(raw) // 100] ^= 0xFF
    (tmp_path / "p.zip").write_bytes(bytes(raw))
    try:
        unpack(tmp_path / "p.zip", tmp_path / "out")
    except (ProtocolError, VerificationError):
        pass
    assert not (tmp_path.parent / "a.onnx").exists()
