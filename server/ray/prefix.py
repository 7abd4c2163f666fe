"""Which replica has which prompt prefix cached: the prefix-aware router's table, pure Python
(no Ray), so that its rule is unit-tested on plain data.

A prompt's text is cut into blocks of `block_chars` characters; each full block is named by a
hash chained over the blocks before it (as the engine names KV blocks by token hashes), so one
name stands for the whole prefix up to that block. The table maps a name to the replicas that
served a prompt with that prefix: they hold its KV blocks in their prefix caches, unless evicted
there since (the table forgets its oldest names first, as the engine's cache does)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Mapping


class PrefixTable:
    def __init__(self, block_chars: int = 64, max_entries: int = 100_000) -> None:
        if block_chars < 1 or max_entries < 1:
            raise ValueError("block_chars and max_entries must be at least 1")
        self.block_chars, self.max_entries = block_chars, max_entries
        self._owners: OrderedDict[int, set[str]] = OrderedDict()  # oldest first
        self._owned: dict[str, int] = {}  # replica -> names it is among the owners of

    def __len__(self) -> int:
        return len(self._owners)

    def block_names(self, text: str) -> list[int]:
        names, previous = [], 0
        for start in range(0, len(text) - self.block_chars + 1, self.block_chars):
            previous = hash((previous, text[start:start + self.block_chars]))
            names.append(previous)
        return names

    def matched_blocks(self, text: str, replicas: Iterable[str]) -> dict[str, int]:
        """For each replica: how many of the prompt's leading blocks it has served."""
        matched = {r: 0 for r in replicas}
        still = set(matched)
        for i, name in enumerate(self.block_names(text)):
            still &= self._owners.get(name, set())
            if not still:
                break
            for r in still:
                matched[r] = i + 1
        return matched

    def rank(self, text: str, loads: Mapping[str, int], max_imbalance: int) -> list[str]:
        """Replicas in order of preference for `text`. The rule: among the replicas whose load (requests
        in flight) is at most `max_imbalance` above the least loaded one, the longest matching prefix
        first, then the lighter load, then the fewer prefixes held (a new prefix goes where fewest are);
        the replicas over that margin last, lightest first."""
        if not loads:
            return []
        lightest = min(loads.values())
        near = [r for r in loads if loads[r] - lightest <= max_imbalance]
        far = sorted((r for r in loads if loads[r] - lightest > max_imbalance), key=lambda r: (loads[r], r))
        matched = self.matched_blocks(text, near)
        near.sort(key=lambda r: (-matched[r], loads[r], self._owned.get(r, 0), r))
        return near + far

    def insert(self, text: str, replica: str) -> None:
        """`replica` has served `text`: it holds every full block of it."""
        for name in self.block_names(text):
            owners = self._owners.get(name)
            if owners is None:
                owners = self._owners[name] = set()
            else:
                self._owners.move_to_end(name)
            if replica not in owners:
                owners.add(replica)
                self._owned[replica] = self._owned.get(replica, 0) + 1
        while len(self._owners) > self.max_entries:
            _, owners = self._owners.popitem(last=False)
            for r in owners:
                self._owned[r] -= 1

    def forget(self, replica: str) -> None:
        """`replica` is gone (died, scaled down): nothing routes to it for its prefixes any more."""
        if self._owned.pop(replica, None) is None:
            return
        for name in [n for n, owners in self._owners.items() if replica in owners]:
            owners = self._owners[name]
            owners.discard(replica)
            if not owners:
                del self._owners[name]
