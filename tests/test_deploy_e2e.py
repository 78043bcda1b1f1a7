"""`pipeline deploy` as a user runs it: a real broker, a real agent process, a small but real model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import small_deploy_config

pytestmark = pytest.mark.slow


def config(tmp_path: Path, **fleet) -> Path:
    return small_deploy_config(tmp_path, **fleet)


def deploy(cfg: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    report = cfg.parent / "report.json"
    report.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "deploy", "--target", "rpi4", "--config", str(cfg),
                           "--report", str(report), *extra], capture_output=True, text=True, timeout=300,
                          cwd=cfg.parent)
    return proc, json.loads(report.read_text()) if report.exists() else None


def check_report(r: dict) -> None:
    assert r["target"] == "rpi4"
    m = r["model"]
    assert m["params"] > 0 and m["nonzero_params"] < 0.5 * m["params"]
    assert 0.7 < m["accuracy_before"] <= 1 and m["accuracy_after"] > m["accuracy_before"] - 0.1
    assert m["size_bytes"] > 0
    assert {b["name"] for b in r["budgets"]} == {"latency_ms", "peak_memory_mb", "model_size_mb", "energy_mj"}
    assert all(set(b) >= {"name", "limit", "value", "unit", "pass"} and b["pass"] for b in r["budgets"])
    a = r["artifact"]
    assert len(a["sha256"]) == 64 and a["model_bytes"] == m["size_bytes"] and a["version"] > 0
    assert a["encoding"] == "zlib" and a["size_bytes"] < 0.8 * m["size_bytes"]  # pruned weights deflate
    [d] = r["delivery"]
    assert d["status"] == "activated" and d["active_version"] == a["version"]
    assert d["metrics"]["latency_ms_p50"] > 0 and d["metrics"]["latency_ms_p95"] >= d["metrics"]["latency_ms_p50"]
    assert d["metrics"]["rss_mb"] > 0 and d["metrics"]["emulated"] is True
    assert r["export"]["parity"]["max_abs_diff"] < 1e-4 and r["export"]["quantization"]["sqnr_db"] > 15


def test_deploy_through_a_mosquitto_the_user_runs(mosquitto, tmp_path):
    cfg = config(tmp_path, broker={"host": "127.0.0.1", "port": mosquitto.port})
    proc, first = deploy(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_report(first)
    assert first["broker"]["kind"] == "external" and first["model"]["origin"]["source"] == "trained"
    assert "Budgets for rpi4" in proc.stderr and "emulated" in proc.stderr
    # what the device reported during the delivery is in the fleet store, even with no ingester running
    status = subprocess.run([sys.executable, "-m", "pipeline.cli", "fleet", "status", "--config", str(cfg), "--json"],
                            capture_output=True, text=True, check=True, cwd=cfg.parent)
    fleet = json.loads(status.stdout)
    [device] = fleet["devices"]
    # the emulated agent's measurements meet this host's prediction, recorded with the deployment; never rpi4's
    assert {(c["basis"], c["comparisons"]) for c in fleet["predictions"]["classes"]} == {("host", 1)}
    [d] = first["delivery"]
    assert device["device_id"] == d["device_id"] and device["active_version"] == first["artifact"]["version"]
    assert device["metrics"]["latency_ms_p95"] == d["metrics"]["latency_ms_p95"] and device["target"] == "rpi4"
    assert device["online"] is False and device["slot"] == d["metrics"]["slot"]  # the local agent stopped with it

    # a second deploy: the trained model comes from the cache, the same agent (its state kept) upgrades
    proc, second = deploy(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_report(second)
    assert second["model"]["origin"]["source"] == "cache"
    assert second["artifact"]["version"] > first["artifact"]["version"]
    assert second["delivery"][0]["active_version"] == second["artifact"]["version"]


def test_deploy_with_the_embedded_broker_and_a_budget_gate(tmp_path):
    cfg = config(tmp_path, local_broker="amqtt")
    data = yaml.safe_load(cfg.read_text())
    data["targets"]["rpi4"]["budgets"]["latency_ms"] = 0.0001
    cfg.write_text(yaml.safe_dump(data))
    proc, report = deploy(cfg)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "does not fit rpi4" in proc.stderr and "latency_ms" in proc.stderr and "--force" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "delivery" not in report and "error" in report
    assert not (tmp_path / ".edgefleet" / "artifacts").exists()  # nothing was signed or shipped

    proc, report = deploy(cfg, "--force")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["broker"]["kind"] == "amqtt"
    assert [b["pass"] for b in report["budgets"] if b["name"] == "latency_ms"] == [False]
    assert report["delivery"][0]["status"] == "activated"


def test_bad_config_is_one_clear_error(tmp_path):
    cfg = config(tmp_path)
    cfg.write_text(cfg.read_text().replace("sparsity: 0.6", "sparsity: 0.6\n  sparsty: 0.9"))
    proc, _ = deploy(cfg)
    assert proc.returncode == 2
    assert "sparsty: unknown key" in proc.stderr and str(cfg) in proc.stderr and "Traceback" not in proc.stderr


def test_one_deploy_fits_and_ships_one_artifact_per_device_class(mosquitto, tmp_path):
    cfg = config(tmp_path, broker={"host": "127.0.0.1", "port": mosquitto.port})
    data = yaml.safe_load(cfg.read_text())
    data["fit"] = {"enabled": True, "sparsities": [0.6], "macs_reductions": [2.0],
                   "quantizations": ["none", "int8-static"], "finetune_epochs": 1, "steps": 1}
    cfg.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "deploy", "--target", "rpi4,rpi5", "--config",
                           str(cfg), "--report", str(tmp_path / "r.json")], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["targets"] == ["rpi4", "rpi5"]
    by_target = {d["target"]: d for d in report["deployments"]}
    assert set(by_target) == {"rpi4", "rpi5"}
    for name, d in by_target.items():
        best = d["fit"]["best"]
        assert best["pass"] and best["accuracy"] == max(c["accuracy"] for c in d["fit"]["candidates"] if c["pass"])
        assert d["export"]["quantization"] is None if best["quantize"] == "none" else \
            d["export"]["quantization"]["kind"] == best["quantize"]
        [delivery] = d["delivery"]
        assert delivery["device_id"] == f"{name}-emu-0" and delivery["status"] == "activated"
        assert delivery["active_version"] == d["artifact"]["version"]
    assert by_target["rpi4"]["artifact"]["path"] != by_target["rpi5"]["artifact"]["path"]
    assert "Fit to rpi5" in proc.stderr


def test_deploy_a_full_integer_tflite_model(mosquitto, tmp_path, tflite):
    cfg = config(tmp_path, broker={"host": "127.0.0.1", "port": mosquitto.port})
    data = yaml.safe_load(cfg.read_text())
    data["export"]["format"] = "tflite"
    cfg.write_text(yaml.safe_dump(data))
    proc, report = deploy(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["export"]["format"] == "tflite"
    q = report["export"]["quantization"]
    assert q["kind"].startswith("int8 full-integer") and q["accuracy_quantized"] > q["accuracy_fp32"] - 0.05
    assert report["export"]["parity"]["max_abs_diff"] < 1e-4
    [d] = report["delivery"]
    assert d["status"] == "activated" and d["metrics"]["latency_ms_p50"] > 0  # the agent ran it with LiteRT
    assert "TFLite int8" in proc.stderr

    data["export"]["quantize"] = "fp16"
    cfg.write_text(yaml.safe_dump(data))
    proc, _ = deploy(cfg)
    assert proc.returncode == 2 and "with format tflite" in proc.stderr


def test_deploy_with_payload_over_http(mosquitto, tmp_path):
    cfg = config(tmp_path, broker={"host": "127.0.0.1", "port": mosquitto.port}, http={"serve": True})
    proc, report = deploy(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [d] = report["delivery"]
    assert d["status"] == "activated" and d["chunks_served"] == 0  # the payload came over HTTP, not MQTT
    assert "serving artifacts over HTTP" in proc.stderr
