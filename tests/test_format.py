"""Entry format: round trips, header contents, alignment, zero-copy views, every kind of damage."""

from __future__ import annotations

import struct

import pytest
import torch
from store_worker import KEY_INPUTS, random_chunk

from chunkcache.errors import ChunkCacheError, CorruptEntryError
from chunkcache.format import (
    ALIGN,
    FORMAT_VERSION,
    MAGIC,
    pack_chunk,
    read_header,
    unpack_chunk,
    unpack_parts,
    verify_entry,
)


@pytest.mark.parametrize("codec", ["raw", "int8", "int4"])
@pytest.mark.parametrize("tokens", [1, 129])
def test_round_trip(codec, tokens):
    c = random_chunk(tokens=tokens, heads=3)
    c.base_pos = 7
    c.meta = {"sink": "bos", "n": [1, 2]}
    buf = pack_chunk(c, codec, KEY_INPUTS.to_dict())
    out = unpack_chunk(buf)
    assert torch.equal(out.token_ids, c.token_ids) and out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_scores, c.token_scores)
    assert out.base_pos == 7 and out.meta == c.meta
    assert out.kv.dtype == torch.bfloat16 and out.kv.shape == c.kv.shape
    if codec == "raw":
        assert torch.equal(out.kv, c.kv)
    else:
        assert (out.kv.float() - c.kv.float()).abs().max() < (0.1 if codec == "int8" else 0.6)
    assert unpack_chunk(buf, dtype=torch.float32).kv.dtype == torch.float32


def test_header_says_what_is_inside():
    c = random_chunk(tokens=10, layers=3, heads=2)
    buf = pack_chunk(c, "int4", KEY_INPUTS.to_dict())
    h = read_header(buf)
    assert buf[:8] == MAGIC and h["format_version"] == FORMAT_VERSION
    assert h["codec"] == "int4" and h["dtype"] == "bfloat16"
    assert h["kv_shape"] == [3, 2, 2, 10, 64] and h["num_tokens"] == 10 and h["base_pos"] == 1
    assert h["has_token_scores"] is True and h["meta"] == {"seed": 0}
    assert h["key"] == KEY_INPUTS.to_dict()
    assert h["checksum"].startswith("crc32:")
    assert list(h["sections"]) == [
        "token_ids",
        "token_scores",
        "k_q",
        "k_scale",
        "k_min",
        "v_q",
        "v_scale",
        "v_min",
        "layer_sums",
    ]
    # per-layer sums of each codec part, for loaders that check layer by layer
    from chunkcache.format import has_layer_sums, unpack_parts
    from chunkcache.kernels.reference import sum64

    assert has_layer_sums(h) and sorted(h["layer_sums_parts"]) == sorted(
        ["k_q", "v_q", "k_scale", "k_min", "v_scale", "v_min"]
    )
    _, parts = unpack_parts(buf)
    assert parts["layer_sums"].shape == (6, 3, 2)
    for i, name in enumerate(h["layer_sums_parts"]):
        for layer in range(3):
            raw = parts[name][layer].contiguous().view(-1).view(torch.uint8)
            assert list(sum64(raw)) == parts["layer_sums"][i, layer].tolist()
    assert h["sections"]["k_q"] == {
        "dtype": "uint8",
        "shape": [3, 2, 10, 32],
        "offset": h["sections"]["k_q"]["offset"],
        "nbytes": 3 * 2 * 10 * 32,
    }
    assert h["payload_offset"] % ALIGN == 0
    assert all(s["offset"] % ALIGN == 0 for s in h["sections"].values())
    assert len(buf) == h["payload_offset"] + h["payload_nbytes"]


def test_no_token_scores():
    c = random_chunk()
    c.token_scores = None
    out = unpack_chunk(pack_chunk(c, "raw"))
    assert out.token_scores is None and read_header(pack_chunk(c, "raw"))["key"] == {}


def test_unpack_parts_is_zero_copy_and_unpack_chunk_is_not():
    c = random_chunk(tokens=33)
    buf = bytearray(pack_chunk(c, "raw", {}))
    lo = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    header, parts = unpack_parts(buf)
    for name, t in parts.items():
        assert lo <= t.data_ptr() < lo + len(buf), name
    assert torch.equal(parts["kv"], c.kv)
    out = unpack_chunk(buf)
    buf[header["payload_offset"] :] = bytes(len(buf) - header["payload_offset"])  # wipe the payload
    assert torch.equal(out.kv, c.kv) and torch.equal(out.token_ids, c.token_ids)


def flip(buf: bytes, at: int) -> bytes:
    b = bytearray(buf)
    b[at] ^= 0x40
    return bytes(b)


@pytest.fixture(scope="module")
def good():
    return pack_chunk(random_chunk(tokens=40), "int8", KEY_INPUTS.to_dict())


def test_payload_damage_is_caught(good):
    h = read_header(good)
    for at in (h["payload_offset"], h["payload_offset"] + h["payload_nbytes"] // 2, len(good) - 1):
        bad = flip(good, at)
        with pytest.raises(CorruptEntryError, match="checksum"):
            unpack_chunk(bad)
        assert "checksum" in verify_entry(bad)
        unpack_chunk(bad, verify=False)  # the caller may opt out; then it decodes whatever is there


def test_header_damage_is_caught(good):
    with pytest.raises(CorruptEntryError, match="header checksum"):
        unpack_chunk(flip(good, 40))
    with pytest.raises(CorruptEntryError, match="magic"):
        unpack_chunk(flip(good, 0))
    bumped = bytearray(good)
    struct.pack_into("<I", bumped, 8, FORMAT_VERSION + 1)
    with pytest.raises(CorruptEntryError, match="version"):
        unpack_chunk(bytes(bumped))


@pytest.mark.parametrize("keep", [0, 7, 23, 100, -1, -4096])
def test_truncation_is_caught(good, keep):
    with pytest.raises(CorruptEntryError, match="truncated|checksum"):
        unpack_chunk(good[:keep])
    assert issubclass(CorruptEntryError, ChunkCacheError)


def test_meta_must_be_json():
    c = random_chunk()
    c.meta = {"t": torch.zeros(1)}
    with pytest.raises(ValueError, match="JSON"):
        pack_chunk(c, "raw")
    with pytest.raises(ValueError, match="kv holds"):
        pack_chunk(
            random_chunk().__class__(torch.zeros(3, dtype=torch.long), torch.zeros(1, 2, 1, 4, 8)), "raw"
        )


@pytest.mark.parametrize("codec", ["raw", "int8", "int4", "int2m"])
def test_an_entry_from_parts_encoded_on_the_device_is_the_same_entry(codec):
    """``resident_entry`` (codec parts where the KV lives, for the device cache) gives what
    ``unpack_parts`` of the packed entry gives, but the payload's crc32, and ``pack_chunk`` of those
    parts gives the very bytes ``pack_chunk`` gives (a miss written behind stores what ``_save``
    stores)."""
    from chunkcache.codec import get_codec
    from chunkcache.format import resident_entry

    chunk = random_chunk(tokens=23, seed=3)
    raw = pack_chunk(chunk, codec, KEY_INPUTS.to_dict())
    assert pack_chunk(chunk, codec, KEY_INPUTS.to_dict(), parts=get_codec(codec).encode_here(chunk.kv)) == raw
    header, parts = resident_entry(chunk, codec, KEY_INPUTS.to_dict())
    want_header, want_parts = unpack_parts(raw)
    want_header = dict(want_header, section_crc32=dict(want_header["section_crc32"]))
    for gone in ("checksum", "payload_offset"):
        want_header.pop(gone)
    want_header["section_crc32"].pop("layer_sums")
    assert header == want_header
    assert set(want_parts) - set(parts) == {"layer_sums"}
    for name, t in parts.items():
        assert torch.equal(t, want_parts[name]), name
