"""The byte format of one stored chunk entry: a checked header followed by aligned raw tensors.

It turns a ``ChunkKV`` plus a codec into one ``bytes`` value and back, and knows nothing about
where the bytes live (see ``store``). No pickle: the header is JSON, the tensors are raw
little-endian bytes that ``torch.frombuffer`` can view without copying.

    raw = pack_chunk(chunk, "int4", key_info={"model_fingerprint": "m@1", ...})
    chunk2 = unpack_chunk(raw)                     # decoded ChunkKV, checksum verified
    header, parts = unpack_parts(raw)              # zero-copy views, decode later (e.g. on GPU)

Entry layout (all integers little-endian)::

    0      8      12       16        20        24               P = align64(24 + hlen)
    | magic | ver | hlen   | hdr crc | reserved | header JSON ... | pad | payload ........ |
                                                                        | token_ids int64 | pad
                                                                        | token_scores f32| pad
                                                                        | codec parts ... | pad

Every payload section starts at a 64-byte aligned offset (relative to P, and P itself is a
multiple of 64). ``hdr crc`` is zlib.crc32 of the header JSON; the header carries the crc32 of
the whole payload, and also the crc32 of the token sections (``section_crc32``) and two 64-bit
sums of each codec part's every layer (section ``layer_sums``, ``kernels.reference.sum64``), so a
layer-by-layer loader checks each layer where it lands (on the GPU, at device bandwidth) instead
of the whole payload on the host up front. crc32 rather than blake2b because it is measured at ~5.4 GB/s here against
~1.1 GB/s for blake2b-128, and it only has to catch damage, not tampering.
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
import sys
import warnings
import zlib
from collections.abc import Callable

import torch

from .codec import get_codec
from .errors import CorruptEntryError, ForeignEntryError, StaleEntryError, StoreError
from .kernels.reference import sum64
from .keys import KeyInputs, diff_key_info
from .layout import ChunkKV

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "PREFIX_BYTES",
    "check_header",
    "check_identity",
    "drop_damaged",
    "head_spans",
    "header_bytes",
    "header_span",
    "layer_spans",
    "part_layer_spans",
    "pack_chunk",
    "section_views",
    "unpack_entry",
    "read_header",
    "unpack_chunk",
    "unpack_parts",
    "verify_entry",
    "verify_payload",
    "verify_small_sections",
    "has_layer_sums",
    "load_chunk",
    "dtype_name",
    "dtype_from_name",
]

MAGIC = b"CHUNKKV\x00"
FORMAT_VERSION = 1
"""The entry format and what its bytes mean (layout, sink handling, ...). The one definition: chunk
keys hash it (``keys``), so a bump gives every chunk a new key, and entries of another version
read as stale (``StaleEntryError``), never as damaged."""
ALIGN = 64
_PREFIX = struct.Struct("<8sIIII")  # magic, version, header length, header crc32, reserved
PREFIX_BYTES = _PREFIX.size
_SMALL_SECTIONS = ("token_ids", "token_scores", "layer_sums")  # checked whole by their own crc32
_MAX_DIM = 1 << 31  # no tensor dimension of a real chunk comes near it
_CHECKSUM = re.compile(r"crc32:[0-9a-f]{8}")
_HEADER_FIELDS = {
    "format_version": int, "codec": str, "dtype": str, "kv_shape": list, "num_tokens": int,
    "base_pos": int, "has_token_scores": bool, "payload_nbytes": int, "checksum": str,
    "sections": dict, "meta": dict, "key": dict,
}  # fmt: skip

_DTYPES = {
    name: getattr(torch, name)
    for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8")
}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise CorruptEntryError(f"entry names an unknown dtype {name!r}") from None


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _as_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, without copying."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("chunkcache entries are little-endian; big-endian hosts are not supported")


def pack_chunk(
    chunk: ChunkKV, codec: str, key_info: dict | None = None, parts: dict[str, torch.Tensor] | None = None
) -> bytes:
    """Encode ``chunk`` with ``codec`` and serialise it into one entry (see the module docstring).

    ``key_info`` is the dict of key inputs (``KeyInputs.to_dict()``) stored in the header under
    ``"key"``; ``chunk.meta`` is stored under ``"meta"``. Both must be JSON-serialisable.
    ``parts``: the codec's parts of ``chunk.kv`` already encoded (``Codec.encode_here``, on any
    device): serialised as they are instead of encoding again.
    """
    _check_little_endian()
    chunk.check()
    c = get_codec(codec)
    encoded = c.encode(chunk.kv) if parts is None else {n: t.to("cpu").contiguous() for n, t in parts.items()}
    sections = _sections(chunk, c, encoded)
    # Per codec part and layer, kernels.reference.sum64 of its bytes: [parts, layers, 2] int64, in
    # the order of header["layer_sums_parts"]. A loader checks each layer where it lands.
    sums = []
    for t in encoded.values():
        flat = t.contiguous().reshape(int(t.shape[0]), -1).view(torch.uint8)
        sums.append([sum64(flat[i]) for i in range(int(t.shape[0]))])
    sections["layer_sums"] = torch.tensor(sums, dtype=torch.int64).view(len(encoded), -1, 2)
    pieces: list[bytes | memoryview] = []
    crc = 0
    for t in sections.values():
        view = _as_bytes(t)
        pad = bytes(_align(len(view)) - len(view))
        crc = zlib.crc32(pad, zlib.crc32(view, crc))
        pieces += [view, pad]
    fields = entry_header(chunk, c.name, sections, key_info, checksum=f"crc32:{crc:08x}")
    try:
        header = json.dumps(fields, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"chunk.meta and key_info must be JSON-serialisable: {e}") from None
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header), zlib.crc32(header), 0)
    head = prefix + header
    head += bytes(_align(len(head)) - len(head))
    return b"".join([head, *pieces])


def _sections(chunk: ChunkKV, c, encoded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An entry's sections in their order, but for ``layer_sums`` (last): token ids, token scores,
    the codec's parts (any device)."""
    sections: dict[str, torch.Tensor] = {"token_ids": chunk.token_ids.detach().to("cpu", torch.int64)}
    if chunk.token_scores is not None:
        sections["token_scores"] = chunk.token_scores.detach().to("cpu", torch.float32)
    for name, t in encoded.items():
        if name in sections or name == "layer_sums":
            raise ValueError(f"codec {c.name!r} part name {name!r} collides with a reserved section")
        sections[name] = t
    return sections


def entry_header(
    chunk: ChunkKV, codec: str, sections: dict[str, torch.Tensor], key_info: dict | None, checksum: str | None
) -> dict:
    """The header ``pack_chunk`` writes for ``sections`` (``_sections``' and, last, ``layer_sums``
    of the codec's parts; absent: its shape is taken, nothing is summed). ``checksum`` None: the
    payload's crc32 is left out, for an entry that is never serialised as it stands (one encoded
    on the device and kept there, ``resident_entry``)."""
    c = get_codec(codec)
    parts = [n for n in sections if n not in _SMALL_SECTIONS and n != "layer_sums"]
    shapes = {n: (dtype_name(t.dtype), list(t.shape), t.numel() * t.element_size()) for n, t in sections.items()}
    if "layer_sums" not in shapes:
        layers = int(chunk.kv.shape[0])
        shapes["layer_sums"] = ("int64", [len(parts), layers, 2], len(parts) * layers * 2 * 8)
    table, offset = {}, 0
    for name, (dtype, shape, nbytes) in shapes.items():
        table[name] = {"dtype": dtype, "shape": shape, "offset": offset, "nbytes": nbytes}
        offset = _align(offset + nbytes)
    fields = {
        "format_version": FORMAT_VERSION,
        "codec": c.name,
        "dtype": dtype_name(chunk.kv.dtype),
        "kv_shape": list(chunk.kv.shape),
        "num_tokens": chunk.num_tokens,
        "base_pos": int(chunk.base_pos),
        "has_token_scores": chunk.token_scores is not None,
        "payload_nbytes": offset,
        "checksum": checksum,
        "section_crc32": {n: zlib.crc32(_as_bytes(sections[n])) for n in sections if n in _SMALL_SECTIONS},
        "layer_sums_parts": parts,
        "sections": table,
        "meta": chunk.meta,
        "key": key_info or {},
    }
    if checksum is None:
        del fields["checksum"]
    return fields


def resident_entry(
    chunk: ChunkKV, codec: str, key_info: dict | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(header, parts)`` of ``chunk``'s entry as ``unpack_parts`` would give them, the codec's
    parts encoded where ``chunk.kv`` lives (``Codec.encode_here``: nothing crosses to the host but
    the token ids) and the header without the payload's crc32 (``entry_header``): for a device
    cache to hold a chunk this process has just encoded, whose entry is serialised later
    (``pack_chunk(..., parts=)`` gives the very bytes ``pack_chunk`` gives)."""
    _check_little_endian()
    chunk.check()
    c = get_codec(codec)
    sections = _sections(chunk, c, c.encode_here(chunk.kv))
    return entry_header(chunk, c.name, sections, key_info, checksum=None), sections


@functools.lru_cache(maxsize=4096)
def _checked(raw: bytes) -> bool:
    """``check_header`` of the header these bytes parse to, once per distinct bytes (the 4096 most
    recent kept; a failure raises and is not kept): a fusion reads the same popular entries again
    and again, and the check is most of a header's parse (about 60 of 90 us here). A header that
    differs in any byte is checked afresh; ``read_header`` still parses its own dict each time."""
    check_header(json.loads(raw))
    return True


def read_header(buf: bytes | bytearray | memoryview, whole: bool = True) -> dict:
    """Parse and check the header of an entry (not the payload checksum).

    Returns the header dict plus the derived ``"payload_offset"``. Every field is checked
    (``check_header``): types, ranges, the section table against the payload, the codec parts'
    shapes against ``kv_shape``, so a caller may use any field without further checks. Raises
    ``StaleEntryError`` for another format version and ``CorruptEntryError`` for anything else
    wrong: a bad magic, a damaged or malformed header, a buffer shorter than the header announces
    (``whole=False``: ``buf`` may hold only the prefix and header, as read by a partial fetch).
    """
    mv = memoryview(buf).cast("B")
    if mv.nbytes < _PREFIX.size:
        raise CorruptEntryError(
            f"entry truncated: {mv.nbytes} bytes, shorter than the {_PREFIX.size}-byte prefix"
        )
    magic, version, hlen, hcrc, _ = _PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise CorruptEntryError(f"not a chunkcache entry (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise StaleEntryError(
            f"entry format version {version}; this build reads version {FORMAT_VERSION} "
            "(a stale entry: `chunkcache verify --delete` or `chunkcache evict` removes it)",
            version,
        )
    raw = header_bytes(mv)
    end = _PREFIX.size + hlen
    if zlib.crc32(raw) != hcrc:
        raise CorruptEntryError("entry header checksum mismatch (header damaged)")
    raw = bytes(raw)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise CorruptEntryError(f"entry header is not valid JSON: {type(e).__name__}") from None
    _checked(raw)  # the same bytes always parse to the same header: checked once
    header["payload_offset"] = _align(end)
    need = header["payload_offset"] + header["payload_nbytes"]
    if whole and mv.nbytes < need:
        raise CorruptEntryError(f"entry truncated: {mv.nbytes} bytes, header says {need}")
    return header


def header_span(buf: bytes | bytearray | memoryview) -> int:
    """Bytes an entry's prefix says its prefix and header take (for partial reads); needs the
    first ``PREFIX_BYTES`` bytes. Raises like ``read_header`` on a bad magic or version."""
    mv = memoryview(buf).cast("B")
    if mv.nbytes < _PREFIX.size:
        raise CorruptEntryError(f"entry truncated: {mv.nbytes} bytes, shorter than the prefix")
    magic, version, hlen, _, _ = _PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise CorruptEntryError(f"not a chunkcache entry (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise StaleEntryError(f"entry format version {version}; this build reads {FORMAT_VERSION}", version)
    return _PREFIX.size + hlen


def header_bytes(buf: bytes | bytearray | memoryview) -> memoryview:
    """The raw header of an entry (the JSON bytes its prefix's crc32 covers), as a view of
    ``buf``; raises like ``header_span``. The bytes ``read_header`` parses, for callers that key
    on an entry's exact header."""
    mv = memoryview(buf).cast("B")
    end = header_span(mv)
    if mv.nbytes < end:
        raise CorruptEntryError(f"entry truncated inside its header ({mv.nbytes} of at least {end} bytes)")
    return mv[_PREFIX.size : end]


def _bad(what: str) -> CorruptEntryError:
    return CorruptEntryError(f"entry header is malformed: {what}")


def _int(x, what: str, lo: int = 0, hi: int = _MAX_DIM) -> int:
    if type(x) is not int or not lo <= x <= hi:
        raise _bad(f"{what} must be an integer in [{lo}, {hi}], got {str(x)[:40]!r}")
    return x


def _shape(x, what: str, ndim: int | None = None) -> list[int]:
    if not isinstance(x, list) or (ndim is not None and len(x) != ndim) or len(x) > 8:
        raise _bad(f"{what} must be a list of {ndim or 'at most 8'} sizes, got {str(x)[:60]!r}")
    return [_int(d, what) for d in x]


def check_header(h) -> None:
    """Raise ``CorruptEntryError`` unless ``h`` (a parsed header) is well formed: every field of
    the right type and range, ``num_tokens`` equal to the kv's and the token sections' length, a
    section table whose sections lie inside the payload without overlapping, and the codec parts
    exactly the shapes and dtypes ``Codec.part_shapes`` gives for ``kv_shape``. Decoding a
    header that passes allocates at most a small multiple of the entry's own size."""
    if not isinstance(h, dict):
        raise _bad("not a JSON object")
    for name, kind in _HEADER_FIELDS.items():
        if not isinstance(h.get(name), kind) or (kind is int and type(h[name]) is bool):
            raise _bad(f"field {name!r} missing or not {kind.__name__ if isinstance(kind, type) else kind}")
    try:
        codec = get_codec(h["codec"])
    except ValueError as e:
        raise CorruptEntryError(f"entry names {e}") from None
    dtype = dtype_from_name(h["dtype"])
    if not dtype.is_floating_point:
        raise _bad(f"kv dtype {h['dtype']!r} is not a floating type")
    L, two, H, T, D = _shape(h["kv_shape"], "kv_shape", 5)
    if two != 2 or min(L, H, T, D) < 1:
        raise _bad(f"kv_shape {h['kv_shape']} is not [layers >= 1, 2, heads >= 1, tokens >= 1, dim >= 1]")
    if _int(h["num_tokens"], "num_tokens") != T:
        raise _bad(f"num_tokens {h['num_tokens']} differs from kv_shape's {T} tokens")
    _int(h["base_pos"], "base_pos")
    payload = _int(h["payload_nbytes"], "payload_nbytes", 0, 1 << 48)
    if not _CHECKSUM.fullmatch(h["checksum"]):
        raise _bad(f"checksum {h['checksum'][:40]!r} is not crc32:<8 hex digits>")
    try:
        want = {n: (list(t.shape), t.dtype) for n, t in codec.part_shapes(h["kv_shape"], dtype).items()}
    except (RuntimeError, ValueError) as e:  # e.g. int4 with an odd head_dim
        raise _bad(f"codec {codec.name!r} cannot hold kv_shape {h['kv_shape']}: {e}") from None
    want["token_ids"] = ([T], torch.int64)
    if h["has_token_scores"]:
        want["token_scores"] = ([T], torch.float32)
    sums_parts = h.get("layer_sums_parts")
    if "layer_sums" in h["sections"]:
        if not isinstance(sums_parts, list) or sorted(map(str, sums_parts)) != sorted(codec.parts):
            raise _bad(f"layer_sums_parts {str(sums_parts)[:60]!r} are not the codec's parts")
        want["layer_sums"] = ([len(codec.parts), L, 2], torch.int64)
    if set(h["sections"]) != set(want):
        raise _bad(f"sections {sorted(h['sections'])} are not the expected {sorted(want)}")
    spans = []
    for name, s in h["sections"].items():
        if not isinstance(s, dict) or not isinstance(s.get("dtype"), str):
            raise _bad(f"section {name!r} is not an object with a dtype")
        shape = _shape(s.get("shape"), f"section {name!r} shape")
        if (shape, dtype_from_name(s["dtype"])) != want[name]:
            raise _bad(f"section {name!r} is {s['dtype']} {shape}, expected {dtype_name(want[name][1])} "
                       f"{want[name][0]} for kv_shape {h['kv_shape']}")  # fmt: skip
        off, nb = (
            _int(s.get("offset"), f"{name} offset", 0, payload),
            _int(s.get("nbytes"), f"{name} nbytes", 0, payload),
        )
        if nb != math.prod(shape) * want[name][1].itemsize or off + nb > payload:
            raise _bad(f"section {name!r} ({off}+{nb} bytes) does not fit its shape or the payload")
        spans.append((off, off + nb, name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise _bad(f"sections {a!r} and {b!r} overlap")
    crcs = h.get("section_crc32")
    if crcs is not None:
        if not isinstance(crcs, dict) or not set(crcs) <= set(_SMALL_SECTIONS) & set(h["sections"]):
            raise _bad(f"section_crc32 {str(crcs)[:60]!r} names unknown sections")
        for name, c in crcs.items():
            _int(c, f"section_crc32[{name!r}]", 0, 0xFFFFFFFF)


def _payload_crc(mv: memoryview, header: dict) -> int:
    start = header["payload_offset"]
    return zlib.crc32(mv[start : start + int(header["payload_nbytes"])])


def unpack_parts(
    buf: bytes | bytearray | memoryview, verify: bool = True, copy: bool = False
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Header and every payload section as CPU tensors that view ``buf`` without copying.

    The dict holds ``token_ids`` [T] int64, ``token_scores`` [T] fp32 when present, and the codec's
    parts (``CODECS[header["codec"]].parts``), each of exactly the shape the codec writes for the
    header's ``kv_shape`` (``read_header`` checked that). The tensors alias ``buf``: treat them as
    read-only and keep ``buf`` alive while they are used. ``verify`` checks the payload crc32
    first. ``copy`` gives each tensor its own writable memory instead (a memcpy: ~10x faster here
    than ``Tensor.clone``).
    """
    _check_little_endian()
    mv = memoryview(buf).cast("B")
    header = read_header(mv)
    if verify:
        verify_payload(mv, header)
    return header, _views(mv, header, header["sections"], header["payload_offset"], copy)


def _views(mv: memoryview, header: dict, sections: dict, base: int, copy: bool) -> dict[str, torch.Tensor]:
    parts = {}
    with warnings.catch_warnings():
        # frombuffer warns that bytes are not writable; the views are documented as read-only.
        warnings.simplefilter("ignore", UserWarning)
        for name, s in sections.items():
            dtype, shape, off, nbytes = dtype_from_name(s["dtype"]), s["shape"], s["offset"], s["nbytes"]
            if nbytes == 0:
                parts[name] = torch.empty(shape, dtype=dtype)
            else:
                src = bytearray(mv[base + off : base + off + nbytes]) if copy else mv
                start = 0 if copy else base + off
                count = nbytes // dtype.itemsize
                parts[name] = torch.frombuffer(src, dtype=dtype, count=count, offset=start).view(shape)
    return parts


def layer_spans(header: dict, layers: range) -> dict[str, dict]:
    """The section table of ``layers`` only (a contiguous range): every codec part cut to
    ``[len(layers), ...]`` (all parts have layers first), the small sections whole. Offsets are
    relative to the payload; ``section_views`` turns fetched bytes of these spans into tensors.
    For partial reads of an entry (``RedisStore.get_layers``)."""
    if layers.step != 1:
        raise ValueError("layers must be a contiguous range")
    n = header["kv_shape"][0]
    if not 0 <= layers.start <= layers.stop <= n:
        raise ValueError(f"layers {layers} outside the entry's {n} layers")
    out = {}
    for name, s in header["sections"].items():
        s = dict(s)
        if name not in _SMALL_SECTIONS:
            per = s["nbytes"] // n
            s["offset"], s["nbytes"] = s["offset"] + layers.start * per, per * len(layers)
            s["shape"] = [len(layers), *s["shape"][1:]]
        out[name] = s
    return out


def head_spans(header: dict) -> list[tuple[int, int]]:
    """Absolute byte spans ``[start, stop)`` an entry must have before any of its layers is used:
    its small sections (token ids, scores, layer sums: checked whole by ``verify_small_sections``),
    or, for an entry without per-layer sums (``has_layer_sums``), its whole payload (checked whole
    by ``verify_payload``). For readers that stream an entry (``stream.LayerStream``)."""
    base = header["payload_offset"]
    if not has_layer_sums(header):
        return [(base, base + header["payload_nbytes"])]
    return [
        (base + s["offset"], base + s["offset"] + s["nbytes"])
        for name, s in header["sections"].items()
        if name in _SMALL_SECTIONS
    ]


def part_layer_spans(header: dict, layers: range) -> list[tuple[int, int]]:
    """Absolute byte spans ``[start, stop)`` of ``layers`` (contiguous) of every codec part, the
    bytes a layer-by-layer loader needs for them (``layer_spans`` cut to the parts)."""
    base = header["payload_offset"]
    return [
        (base + s["offset"], base + s["offset"] + s["nbytes"])
        for name, s in layer_spans(header, layers).items()
        if name not in _SMALL_SECTIONS
    ]


def section_views(header: dict, sections: dict[str, dict], bufs: list[bytes]) -> dict[str, torch.Tensor]:
    """Tensors over ``bufs`` (one per entry of ``sections``, in order, each exactly its span)."""
    out = {}
    for (name, s), b in zip(sections.items(), bufs, strict=True):
        if len(b) != s["nbytes"]:
            raise CorruptEntryError(f"section {name!r}: {len(b)} bytes fetched, {s['nbytes']} expected")
        out.update(_views(memoryview(bytearray(b)), header, {name: {**s, "offset": 0}}, 0, False))
    return out


def unpack_chunk(
    buf: bytes | bytearray | memoryview, dtype: torch.dtype | None = None, verify: bool = True
) -> ChunkKV:
    """Decode an entry into a ``ChunkKV`` that owns its memory (never aliases ``buf``).

    ``dtype`` is the dtype of the returned kv; None means the dtype the kv had when it was packed.
    Raises ``CorruptEntryError`` for any damage (with ``verify``, also a payload checksum mismatch),
    ``StaleEntryError`` (a subclass) for an entry of another format version.
    """
    return unpack_entry(buf, dtype, verify)[1]


def unpack_entry(
    buf: bytes | bytearray | memoryview, dtype: torch.dtype | None = None, verify: bool = True
) -> tuple[dict, ChunkKV]:
    """``unpack_chunk`` that also returns the checked header (key inputs, meta, ...)."""
    header = read_header(buf)
    codec = get_codec(header["codec"])  # known: read_header checked it
    out_dtype = dtype if dtype is not None else dtype_from_name(header["dtype"])
    # A lossless codec decoding to the stored dtype returns the section itself: copy it out of buf.
    header, parts = unpack_parts(
        buf, verify=verify, copy=codec.lossless and dtype_name(out_dtype) == header["dtype"]
    )
    kv = codec.decode(parts, out_dtype)  # [L, 2, H, T, D]: the part shapes were checked, no broadcast
    if list(kv.shape) != header["kv_shape"]:  # a codec bug, not damage; still never used
        raise CorruptEntryError(f"decoded kv shape {list(kv.shape)} differs from header {header['kv_shape']}")
    scores = parts.get("token_scores")
    chunk = ChunkKV(
        token_ids=parts["token_ids"].clone(),  # tiny; clone so nothing aliases buf
        kv=kv,
        base_pos=header["base_pos"],
        token_scores=None if scores is None else scores.clone(),
        meta=dict(header["meta"]),
    )
    return header, chunk


def check_identity(
    store_key: str, header: dict, token_ids: torch.Tensor, expected: dict | None = None
) -> None:
    """Raise ``ForeignEntryError`` unless the entry belongs under ``store_key``: its header's key
    inputs (``header["key"]``, the one copy of them) are complete, agree with the header's own
    codec, dtype and version, differ in no field from ``expected`` (an engine's ``key_info``)
    when given, and hash with ``token_ids`` (``keys.chunk_key``) to ``store_key`` itself. The
    one checker of an entry's identity: the engine (both paths) and ``verify_store`` call it.
    (The header's own key inputs are parsed and hashed every time, never taken as the engine's
    when merely equal: ``True == 1`` in Python, and a header with ``true`` for a version must
    fail here as it fails ``verify``: the fuzz tests craft such headers.)"""
    info = header["key"]
    try:
        inputs = KeyInputs.from_dict(info)
    except (KeyError, TypeError, ValueError) as e:
        raise ForeignEntryError(f"entry lacks complete key inputs ({type(e).__name__}: {e})") from None
    own = {"codec": header["codec"], "dtype": header["dtype"], "format_version": header["format_version"]}
    clash = [f for f, v in own.items() if info[f] != v]
    if clash:
        raise ForeignEntryError(f"entry's key inputs disagree with its own header on {', '.join(clash)}")
    if expected is not None:
        diff = diff_key_info(info, expected)
        if diff:
            raise ForeignEntryError(f"entry was made with other {', '.join(diff)} than this engine's")
    if inputs.key(token_ids) != store_key:
        raise ForeignEntryError("entry's key inputs and tokens do not hash to the key it is stored under")


def has_layer_sums(header: dict) -> bool:
    """Whether the entry carries per-layer checksums of its codec parts (the ``layer_sums``
    section, see ``kernels.reference.sum64``) and crc32s of every small section; entries written
    before they existed are checked whole with the payload crc32. (``read_header`` checked the
    shapes of all of them.)"""
    small = set(_SMALL_SECTIONS) & set(header["sections"])
    crcs = header.get("section_crc32")
    return "layer_sums" in header["sections"] and isinstance(crcs, dict) and set(crcs) == small


def verify_small_sections(buf: bytes | bytearray | memoryview, header: dict) -> None:
    """Check the crc32 of the token ids, scores and layer sums against ``header["section_crc32"]``:
    the part of the payload that per-layer checks (``has_layer_sums``) do not cover."""
    mv = memoryview(buf).cast("B")
    base = header["payload_offset"]
    for name, want in header["section_crc32"].items():
        s = header["sections"][name]
        got = zlib.crc32(mv[base + s["offset"] : base + s["offset"] + s["nbytes"]])
        if got != want:
            raise CorruptEntryError(f"entry section {name!r} checksum mismatch")


def verify_payload(buf: bytes | bytearray | memoryview, header: dict) -> None:
    """Check the whole payload's crc32 (``header`` from ``read_header`` of the same buffer)."""
    want = header["checksum"]
    got = f"crc32:{_payload_crc(memoryview(buf).cast('B'), header):08x}"
    if got != want:
        raise CorruptEntryError(f"entry payload checksum mismatch ({got}, header says {want})")


def verify_entry(buf: bytes | bytearray | memoryview, store_key: str | None = None) -> str | None:
    """None if the entry is whole and well formed, else the reason it is not: header, section
    table, codec part shapes, payload checksum, and with ``store_key`` its identity
    (``check_identity``). A stale entry's reason starts with ``"stale:"``."""
    try:
        header, parts = unpack_parts(buf, verify=True)
        if store_key is not None:
            check_identity(store_key, header, parts["token_ids"])
    except StaleEntryError as e:
        return f"stale: {e}"
    except CorruptEntryError as e:
        return str(e)
    return None


def load_chunk(
    store,
    key: str,
    dtype: torch.dtype | None = None,
    check: Callable[[dict, ChunkKV], None] | None = None,
    drop: Callable[[str, str], None] | None = None,
) -> ChunkKV | None:
    """The decoded chunk under ``key`` in ``store`` (a ``store.Store``), or None on a miss.

    A damaged entry (``CorruptEntryError``, from the format or from ``check(header, chunk)``, the
    caller's own test, e.g. ``check_identity``) is reported with a RuntimeWarning naming the key,
    deleted (unless the store is read-only or unreachable) and treated as a miss, so the caller
    recomputes it. A stale entry (another format version) is a plain miss: no warning, left for
    ``verify``/``evict`` to remove. The engine and the CLI read entries through here.
    ``drop(key, reason)`` replaces ``drop_damaged`` (the engine's takes its store write lock).
    """
    raw = store.get(key)
    if raw is None:
        return None
    try:
        header, chunk = unpack_entry(raw, dtype)
        if check is not None:
            check(header, chunk)
        return chunk
    except StaleEntryError:
        return None
    except CorruptEntryError as e:
        if drop is None:
            drop_damaged(store, key, str(e))
        else:
            drop(key, str(e))
        return None


def drop_damaged(store, key: str, reason: str) -> None:
    """Warn that the entry under ``key`` is damaged (or foreign) and delete it where the store
    can be written; the caller recomputes it."""
    warnings.warn(f"chunkcache: dropping damaged entry {key}: {reason}", RuntimeWarning, stacklevel=3)
    try:
        store.delete(key)
    except StoreError:  # read-only or unreachable: it stays, and is dropped again next time
        pass
