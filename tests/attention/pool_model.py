"""The pruned cache's rules (attention/pruned_cache.py) in plain Python, for tests to compare the cache with: per
(sequence, KV head) pair a ring of the last `ring` tokens and a store whose keys sit in pages of a pool that the
batch's pairs share. Pairs act in (sequence, head) order within a step."""
from __future__ import annotations

import math


class PoolModel:
    """A batch of B sequences x H KV heads, the pool sized as the cache sizes it: each pair's share of
    `capacity` keys rounded up to whole pages of `page` (never more than the `older` keys that can leave a
    ring), a pair never holding more pages than those keys fill."""

    def __init__(self, B: int, H: int, *, ring: int, capacity: int, older: int, page: int):
        self.ring, self.page = ring, page
        self.pairs = [(b, h) for b in range(B) for h in range(H)]
        self.n_pages = B * H * math.ceil(min(capacity, older) / page)
        self.width = min(math.ceil(older / page), self.n_pages)
        self.used = 0
        self.pages = {p: 0 for p in self.pairs}
        self.store = {p: [] for p in self.pairs}
        self.evicted = {p: 0 for p in self.pairs}

    def step(self, t: int, admit, score) -> None:
        """Token t arrives: the token leaving each pair's ring goes to its store if admit(pair, position); a pair
        whose pages are full takes a free page; with none left the lowest score(pair, position) among its store
        and the newcomer (which loses ties; among stored keys the earliest slot goes) is dropped and counted."""
        leaving = t - self.ring
        if leaving < 0:
            return
        for pair in self.pairs:
            if not admit(pair, leaving):
                continue
            store = self.store[pair]
            if len(store) == self.pages[pair] * self.page and self.pages[pair] < self.width and \
                    self.used < self.n_pages:
                self.pages[pair] += 1
                self.used += 1
            if len(store) < self.pages[pair] * self.page:
                store.append(leaving)
                continue
            self.evicted[pair] += 1
            if store:
                weakest = min(range(len(store)), key=lambda i: (score(pair, store[i]), i))
                if score(pair, leaving) > score(pair, store[weakest]):
                    store[weakest] = leaving

    def held(self, pair, t: int) -> set[int]:
        """The positions the pair holds after token t: its store and its ring."""
        return set(self.store[pair]) | set(range(max(0, t - self.ring + 1), t + 1))

    def waste(self, pair) -> int:
        """Slots of the pair's pages its store does not use."""
        return self.pages[pair] * self.page - len(self.store[pair])
