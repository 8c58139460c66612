"""Whole-store checks: every entry verified (damaged, stale, foreign), stale entries removed, and
a cheap sample of entry headers that says whose entries a store holds.

    bad = verify_store(store, delete=True)        # [(key, reason)]; reasons of stale ones start "stale:"
    removed = remove_stale(store)                 # keys of entries of another format version
    infos = sample_key_infos(store, 16)           # key inputs of up to 16 entries, headers only
"""

from __future__ import annotations

from chunkcache.errors import CorruptEntryError, StaleEntryError
from chunkcache.format import PREFIX_BYTES, header_span, read_header, verify_entry
from chunkcache.keys import diff_key_info

from .base import Store

__all__ = ["foreign_store", "read_stored_header", "remove_stale", "sample_key_infos", "verify_store"]


def verify_store(store: Store, delete: bool = False) -> list[tuple[str, str]]:
    """Check every entry: header, section table, codec part shapes, checksums, and that its key
    inputs and tokens hash to the key it is stored under; the (key, reason) of each entry that
    fails. A stale entry (another format version) is reported with a reason starting ``"stale:"``.
    Reads do not count as hits. With ``delete`` the reported entries are removed."""
    bad = []
    for key in list(store.keys()):
        raw = store.get(key, touch=False)
        reason = (
            "missing value (or damaged framing, dropped by the store)"
            if raw is None
            else verify_entry(raw, key)
        )
        if reason is not None:
            bad.append((key, reason))
            if delete:
                store.delete(key)
    return bad


def remove_stale(store: Store) -> list[str]:
    """Delete every entry of another format version (reading only headers); the removed keys."""
    gone = []
    for key in list(store.keys()):
        prefix = store.read_prefix(key, PREFIX_BYTES)
        if prefix is None:
            continue
        try:
            header_span(prefix)
        except StaleEntryError:
            store.delete(key)
            gone.append(key)
        except CorruptEntryError:  # damaged, not stale: verify reports it
            pass
    return gone


def read_stored_header(store: Store, key: str) -> dict | None:
    """The checked header of the entry under ``key``, moving only the prefix and header bytes
    (``Store.read_prefix``); None on a miss. Raises like ``format.read_header(whole=False)``."""
    prefix = store.read_prefix(key, 4096)
    if prefix is None:
        return None
    need = header_span(prefix)
    if need > len(prefix):
        prefix = store.read_prefix(key, need)
        if prefix is None:
            return None
    return read_header(prefix, whole=False)


def sample_key_infos(store: Store, n: int = 16) -> list[dict]:
    """The key inputs (``header["key"]``) of up to ``n`` readable entries, reading headers only
    and only ``n`` keys (``Store.sample_keys``); damaged and stale entries are skipped."""
    out = []
    for key in store.sample_keys(n):
        try:
            header = read_stored_header(store, key)
        except CorruptEntryError:
            continue
        if header is not None:
            out.append(header["key"])
    return out


def foreign_store(store: Store, key_info: dict, sample: int = 16) -> str | None:
    """None if the store is empty or one of ``sample`` sampled entries (headers only) was made
    with ``key_info``; else what differs, e.g. ``"codec (int4 vs raw)"``: an engine with these
    key inputs can never hit such a store's entries (keys hash them) and would build a second
    copy of the corpus beside them. The one check of whose entries a store holds (the engine
    warns with it, LangChain's ``check_store`` raises)."""
    infos = sample_key_infos(store, sample)
    if not infos or any(not diff_key_info(i, key_info) for i in infos):
        return None
    fields = sorted({f for i in infos for f in diff_key_info(i, key_info)})
    first = next(i for i in infos if diff_key_info(i, key_info))
    shown = []
    for f in fields:
        a, b = (str(x.get(f, "(missing)") if isinstance(x, dict) else x)[:24] for x in (first, key_info))
        shown.append(f"{f} ({a} vs {b})" if a != b else f)
    return f"{', '.join(shown)} in all {len(infos)} sampled entries"
