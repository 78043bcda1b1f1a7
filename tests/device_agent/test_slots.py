from device_agent.manifest import Manifest, file_sha256
from device_agent.slots import SlotStore


def manifest(version, data: bytes, path):
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    return Manifest("m", version, "rpi4", "now", None, "onnxruntime", "model.onnx", len(data), digest, 32,
                    -(-len(data) // 32), {}, {}, {}, {}, {}, raw_length=len(data), raw_sha256=digest)


def test_install_goes_to_the_inactive_slot_and_switch_is_atomic(tmp_path):
    store = SlotStore(tmp_path)
    assert store.active() is None and store.inactive_slot() == "a"
    for version, payload in ((1, b"first model"), (2, b"second model")):
        src = tmp_path / f"dl{version}"
        src.write_bytes(payload)
        m = manifest(version, payload, src)
        slot = store.inactive_slot()
        path = store.install(slot, src, m, {"signed": {}})
        assert store.slot_status(slot)["status"] == "installing"
        assert store.active() is None or store.active().version == version - 1  # not switched yet
        store.activate(slot, m)
        assert store.active().version == version and store.active().slot == slot
        assert file_sha256(path) == m.sha256
    # v2 went to b, v1 is still intact in a for a rollback
    assert (tmp_path / "slots" / "a" / "model.onnx").read_bytes() == b"first model"
    assert store.verify_active().version == 2


def store_with_active_model(tmp_path):
    store = SlotStore(tmp_path)
    src = tmp_path / "dl"
    src.write_bytes(b"model")
    m = manifest(1, b"model", src)
    store.install("a", src, m, {"signed": {}})
    store.activate("a", m)
    return store, src, m


def test_damaged_active_model_is_detected(tmp_path):
    store, _, _ = store_with_active_model(tmp_path)
    (tmp_path / "slots" / "a" / "model.onnx").write_bytes(b"modeL")
    assert store.verify_active() is None


def test_install_refuses_the_active_slot(tmp_path):
    import pytest

    store, src, m = store_with_active_model(tmp_path)
    src.write_bytes(b"again")
    with pytest.raises(ValueError, match="active slot"):
        store.install("a", src, m, {"signed": {}})
