import pytest

from device_agent.errors import ProtocolError
from device_agent.protocol import (
    Job, Leaf, StreamGet, check_id, decode, decode_chunk, encode, encode_chunk, parse_topic, topic,
)


def test_chunk_frame_round_trip():
    data = bytes(range(256)) * 10
    job, index, got = decode_chunk(encode_chunk("j1", 7, data))
    assert (job, index, got) == ("j1", 7, data)


def test_corrupt_chunk_is_detected():
    frame = bytearray(encode_chunk("j1", 0, b"x" * 100))
    frame[-1] ^= 0xFF
    with pytest.raises(ProtocolError, match="corrupt"):
        decode_chunk(bytes(frame))


@pytest.mark.parametrize("frame", [b"", b"XXXX\x00\x00\x00\x02{}", b"EFC1\x00\x00\x00\x05{bad}"])
def test_malformed_frames_are_refused(frame):
    with pytest.raises(ProtocolError):
        decode_chunk(frame)


def test_topics_round_trip():
    name = topic("fleet", "rpi4-1", Leaf.STREAM_GET)
    assert name == "fleet/v1/rpi4-1/stream/get"
    assert parse_topic("fleet", name) == ("rpi4-1", Leaf.STREAM_GET)
    with pytest.raises(ProtocolError, match="unknown leaf"):
        parse_topic("fleet", "fleet/v1/rpi4-1/nope")


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "x" * 65, "-start"])
def test_ids_that_would_break_topics_are_refused(bad):
    with pytest.raises(ProtocolError, match="device_id"):
        check_id(bad, "device_id")


def test_messages_carry_and_check_the_protocol_version():
    payload = encode({"job_id": "j1", "chunks": [0, 1]})
    assert StreamGet.parse(payload).chunks == [0, 1]
    with pytest.raises(ProtocolError, match="protocol version"):
        decode(b'{"v": 99}', "status")
    with pytest.raises(ProtocolError, match="not JSON"):
        decode(b"\xff\xfe", "job")
    with pytest.raises(ProtocolError, match="'manifest' must be dict"):
        Job.parse(encode({"job_id": "j1", "manifest": "nope"}))
    with pytest.raises(ProtocolError, match="non-negative"):
        StreamGet.parse(encode({"job_id": "j1", "chunks": [-1]}))
