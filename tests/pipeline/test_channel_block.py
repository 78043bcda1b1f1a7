"""The channel block a class computes in (pipeline.profile.calibrate.block) and work counted in it
(pipeline.profile.kernels): recovered from synthetic timings of the suite's own kernels, stored with the class's
kernels file, and used so that a pruned width costs what its whole blocks cost and a kernel larger than any the
suite timed is priced by its work. Nothing is timed here."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.profile.calibrate.block import choose_block
from pipeline.profile.calibrate.suite import kernel_configs
from pipeline.profile.kernels import KINDS, Kernel, KernelPredictor, padded

#: work per microsecond of the made-up device, per kind
RATE = {"conv": 60e3, "dwconv": 15e3, "gemm": 8e3, "pool": 3e3, "gpool": 3e3, "add": 3e3, "eltwise": 3e3}


def device_us(k: Kernel, block: int) -> float:
    """A device that computes in ``block``-channel blocks: its work in whole blocks at its rate, plus 2 us."""
    return k.work(block) / RATE[k.kind] + 2.0


def timed(block: int, kinds=("conv", "dwconv"), noise: float = 0.05, seed: int = 0) -> list[dict]:
    """The suite's kernels as such a device times them: 5% noise, and one in twenty slowed 3x by interference."""
    rng = np.random.default_rng(seed)
    out = []
    for k in kernel_configs(0, 1.0):
        if k.kind in kinds:
            slow = 3.0 if rng.random() < 0.05 else 1.0
            out.append({"kernel": k.to_dict(), "us": device_us(k, block) * np.exp(rng.normal(0, noise)) * slow})
    return out


@pytest.mark.parametrize("block", [8, 16])
def test_the_block_is_recovered_from_the_suite_s_timings(block):
    chosen, evidence = choose_block(timed(block))
    assert chosen["fp32"] == block
    scores = {int(b): v for b, v in evidence["fp32"]["scores"].items()}
    assert scores[block] == min(scores.values()) and evidence["fp32"]["samples"] > 200
    assert chosen["int8"] == block and evidence["int8"]["scores"] is None  # no int8 timed: the fp32 block


def test_a_device_without_blocks_gets_none():
    assert choose_block(timed(1))[0] == {"fp32": 1, "int8": 1}


def test_too_few_odd_widths_to_tell_give_no_block():
    few = [s for s in timed(16) if s["kernel"]["cin"] % 16 == 0 and s["kernel"]["cout"] % 16 == 0][:20]
    assert choose_block(few)[0] == {"fp32": 1, "int8": 1}


def test_work_counts_channels_in_whole_blocks():
    k56, k64 = Kernel("conv", False, 56, 56, 3, 1, 56, 56), Kernel("conv", False, 64, 64, 3, 1, 56, 56)
    assert k56.work(16) == k64.work(16) and k56.work(8) == k56.work(1) < k64.work(1)
    first = Kernel("conv", False, 3, 24, 3, 2, 224, 224)  # fewer input channels than a block: not padded
    assert first.work(16) == 112 * 112 * (32 * 3 * 9 + 16 * 32)
    dw = Kernel("dwconv", False, 40, 40, 3, 1, 28, 28)
    assert dw.work(16) == Kernel("dwconv", False, 48, 48, 3, 1, 28, 28).work(16)
    grouped = Kernel("conv", False, 16, 48, 1, 1, 80, 80, groups=4)  # one small GEMM per group, MACs per group
    assert grouped.macs == 48 * 80 * 80 * 4 and grouped.work(16) == grouped.work(1)
    assert padded(56, 16) == 64 and padded(64, 16) == 64 and padded(5, 4) == 8


def test_a_pruned_width_is_priced_as_its_whole_blocks():
    """Fitted with the block it was chosen with, the predictor prices 56 and 40 channels as 64 and 48: what the
    device does (a cut from 64 to 56 channels saves nothing on it)."""
    samples = timed(16)
    block, _ = choose_block(samples)
    p = KernelPredictor(samples, block=block)
    us = p.kernel_us([Kernel("conv", False, c, c, 3, 1, 28, 28) for c in (56, 64, 40, 48)])
    assert us[0] == pytest.approx(us[1], rel=0.08) and us[2] == pytest.approx(us[3], rel=0.08)  # raw: 0.77, 0.69
    truth = [device_us(Kernel("conv", False, c, c, 3, 1, 28, 28), 16) for c in (56, 64, 40, 48)]
    assert np.allclose(us, truth, rtol=0.15)


def test_a_conv_larger_than_any_timed_is_priced_by_its_work():
    """ResNet-18's 3x3 convolutions at 224 pixels (64 channels at 56x56) and a VGG layer at 112x112 with 128
    channels: the suite's largest kernels are smaller, and each is priced within 15% of what the device takes."""
    samples = timed(16, kinds=tuple(RATE))
    p = KernelPredictor(samples, block=choose_block(samples)[0])
    largest = max(Kernel(**s["kernel"]).work(16) for s in samples if s["kernel"]["kind"] == "conv")
    wide = [Kernel("conv", False, 64, 64, 3, 1, 56, 56), Kernel("conv", False, 128, 128, 3, 1, 112, 112),
            Kernel("conv", False, 512, 512, 3, 1, 14, 14)]
    assert max(k.work(16) for k in wide) > 2 * largest
    for k, us in zip(wide, p.kernel_us(wide)):
        assert us == pytest.approx(device_us(k, 16), rel=0.15), k


def test_the_block_travels_with_the_kernels_file(tmp_path):
    samples = timed(8)[:60]
    p = KernelPredictor(samples, block={"fp32": 8, "int8": 16})
    p.save(tmp_path / "k.json", {"date": "2026-12-01"})
    back = KernelPredictor.load(tmp_path / "k.json")
    assert back.block == {"fp32": 8, "int8": 16}
    ks = [Kernel(**s["kernel"]) for s in samples[:10]]
    assert np.allclose(back.kernel_us(ks), p.kernel_us(ks))


def test_a_kernels_file_from_before_blocks_and_new_kinds_reads_as_it_was(tmp_path):
    """No ``block`` (work in raw channels, as it was fitted) and a correction of the six kinds it had: the kinds
    added since count their kernels as measured."""
    old = {"meta": {}, "reference_ms": None, "samples": timed(8)[:40],
           "correction": {"fp32": [3.0, 1.1, 1.2, 1.0, 0.9, 0.3, 0.0, 0.5], "int8": [2.0] + [1.0] * 6 + [0.1]}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    p = KernelPredictor.load(tmp_path / "old.json")
    assert p.block == {"fp32": 1, "int8": 1}
    assert len(KINDS) == 7 and p.correction["fp32"] == [3.0, 1.1, 1.2, 1.0, 0.9, 0.3, 0.0, 1.0, 0.5]
