"""DiskIndex under random sequences of adds, touches, removals, pins, unpins and writes.

A model kept beside it says which files must be there; after every step the index must agree
with its own byte count, stay within the cap, and never have dropped a file of a pinned
version (the cap may evict one, but only when no file of an unpinned version is left).
"""

from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from modelfs.cache.disk_index import DiskIndex, split_rel

OBJECTS = ["a", "b", "c"]
VERSIONS = ["1", "2", "3"]
CAPACITY = 40


class IndexMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.index = DiskIndex(CAPACITY)
        self.sizes: dict[str, int] = {}  # what the index should hold, as far as the model knows
        self.pins: Counter[tuple[str, str]] = Counter()
        self.current: dict[str, str] = {}

    def _forget(self, gone: list[str]) -> None:
        for rel in gone:
            assert rel in self.sizes or rel not in self.index, rel
            self.sizes.pop(rel, None)

    def _check_evictions(self, gone: list[str], added: str | None = None) -> None:
        """Files the cap took: a pinned one only if no unpinned file was left to take."""
        for rel in gone:
            if rel == added:
                continue
            if self.pins[split_rel(rel)] > 0:
                unpinned_left = [r for r in self.index if self.pins[split_rel(r)] == 0]
                assert unpinned_left == [], (rel, unpinned_left)

    @rule(
        obj=st.sampled_from(OBJECTS),
        version=st.sampled_from(VERSIONS),
        block=st.integers(0, 5),
        size=st.integers(1, 12),
    )
    def write(self, obj: str, version: str, block: int, size: int) -> None:
        rel = f"{obj}/{version}-{block}"
        stale = self.index.written(obj, version)
        if self.pins[(obj, version)] == 0:
            self.current[obj] = version
            for r in stale:
                o, v = split_rel(r)
                assert o == obj and v != version and self.pins[(o, v)] == 0
        else:
            assert stale == []
        self._forget(stale)
        known = rel in self.index
        evicted = self.index.add(rel, size)
        if not known:
            self.sizes[rel] = size
        self._check_evictions(evicted, rel)
        self._forget(evicted)

    @precondition(lambda self: bool(self.sizes))
    @rule(data=st.data())
    def touch_or_remove(self, data: st.DataObject) -> None:
        rel = data.draw(st.sampled_from(sorted(self.sizes)))
        if data.draw(st.booleans()):
            self.index.touch(rel)
        else:
            assert self.index.remove(rel)
            del self.sizes[rel]

    @rule(obj=st.sampled_from(OBJECTS), version=st.sampled_from(VERSIONS))
    def pin(self, obj: str, version: str) -> None:
        stale = self.index.pin(obj, version)
        self.pins[(obj, version)] += 1
        self.current[obj] = version
        for rel in stale:
            o, v = split_rel(rel)
            assert o == obj and v != version and self.pins[(o, v)] == 0
        self._forget(stale)

    @precondition(lambda self: any(n > 0 for n in self.pins.values()))
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        obj, version = data.draw(st.sampled_from(sorted(k for k, n in self.pins.items() if n > 0)))
        gone = self.index.unpin(obj, version)
        self.pins[(obj, version)] -= 1
        if self.pins[(obj, version)] > 0 or self.current.get(obj) == version:
            assert gone == []
        else:
            assert all(split_rel(r) == (obj, version) for r in gone)
        self._forget(gone)

    @invariant()
    def agrees_with_the_model(self) -> None:
        assert set(self.index) == set(self.sizes)
        assert self.index.used == sum(self.sizes.values()) <= CAPACITY
        assert len(self.index) == len(self.sizes)
        for rel in self.index:
            assert self.index.is_pinned(rel) == (self.pins[split_rel(rel)] > 0)

    @invariant()
    def one_version_per_object_unless_pinned(self) -> None:
        for obj in OBJECTS:
            versions = {split_rel(r)[1] for r in self.index if split_rel(r)[0] == obj}
            unpinned_others = {v for v in versions if v != self.current.get(obj) and self.pins[(obj, v)] == 0}
            assert not unpinned_others, (obj, versions, self.current.get(obj))


IndexMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)
TestDiskIndex = IndexMachine.TestCase
