"""Eviction policies: each only returns a sort key (SGLang style); the smallest goes first.

``lru``: oldest last access. ``cost`` (Cache-Craft): reuse frequency x recompute time saved per
stored byte, with recompute time taken as proportional to the chunk's tokens. Knows nothing about
where entries live; stores call ``pick_victims`` with their ``EntryStats``.

    victims = pick_victims(store.entries(), free_bytes=10**9, policy=get_policy("cost"))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from .base import EntryStats

__all__ = ["EVICTION_POLICIES", "Cost", "EvictionPolicy", "LRU", "get_policy", "pick_victims"]


class EvictionPolicy(Protocol):
    def sort_key(self, e: EntryStats) -> tuple: ...


class LRU:
    """Least recently used first."""

    def sort_key(self, e: EntryStats) -> tuple:
        return (e.last_access,)


class Cost:
    """Cache-Craft style: keep what is reused often and expensive to recompute per byte it costs.

    value = (hits + 1) * tokens / nbytes  (recompute time ~ tokens); lowest value goes first,
    ties broken by age of last access.
    """

    def sort_key(self, e: EntryStats) -> tuple:
        return ((e.hits + 1) * e.tokens / max(e.nbytes, 1), e.last_access)


EVICTION_POLICIES: dict[str, EvictionPolicy] = {"lru": LRU(), "cost": Cost()}


def get_policy(name: str) -> EvictionPolicy:
    """The policy called ``name``, or a ValueError listing the known ones."""
    try:
        return EVICTION_POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; known: {', '.join(EVICTION_POLICIES)}") from None


def pick_victims(
    entries: Iterable[tuple[str, EntryStats]], free_bytes: int, policy: EvictionPolicy
) -> list[str]:
    """Keys to remove, in order, until at least ``free_bytes`` are freed (all keys if that is not enough)."""
    if free_bytes <= 0:
        return []
    victims, freed = [], 0
    for key, e in sorted(entries, key=lambda ke: (policy.sort_key(ke[1]), ke[0])):
        victims.append(key)
        freed += e.nbytes
        if freed >= free_bytes:
            break
    return victims
