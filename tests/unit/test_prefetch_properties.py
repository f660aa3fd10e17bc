"""Property tests of the read-ahead detectors (hypothesis): windows, cursors, seeks, walks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from modelfs.prefetch import PrefetchConfig, ReadAhead
from modelfs.units import ceil_div

BS = 4096
# Tolerances scaled to these small files, as the unit tests do.
CONFIG = PrefetchConfig(backward_tolerance=2 * BS, forward_tolerance=BS, max_cursors=4, seek_memory=16)
FAST = settings(max_examples=150, deadline=None)

sizes = st.integers(min_value=1, max_value=64 * BS)
windows = st.sampled_from([0, BS, 2 * BS, 8 * BS, 32 * BS])
chunks = st.integers(min_value=1, max_value=3 * BS)
reads = st.lists(st.tuples(st.integers(min_value=0, max_value=70 * BS), chunks), max_size=80)


@FAST
@given(size=sizes, max_window=windows, reads=reads)
def test_any_reads_stay_within_the_file_the_window_and_the_cursor_bound(
    size: int, max_window: int, reads: list[tuple[int, int]]
) -> None:
    """Whatever the reads: every index handed out is a block of the file above the read (or the
    one below a walk's step), no window grows past max_window, and cursors stay bounded."""
    ra = ReadAhead(size, BS, max_window, CONFIG)
    blocks = ceil_div(size, BS)
    for offset, length in reads:
        got = list(ra.on_read(offset, length))
        assert len(got) <= ra.max_window_blocks
        assert all(0 <= i < blocks for i in got)
        if got and offset < size:
            first_read, last_read = offset // BS, (min(offset + length, size) - 1) // BS
            if ra.last_backward:
                assert got == [first_read - 1]
            else:
                assert all(i > last_read for i in got)
        assert len(ra.cursors) <= CONFIG.max_cursors
        assert all(0 <= c.window <= ra.max_window_blocks for c in ra.cursors)
        assert not (ra.last_backward and ra.last_random)


@FAST
@given(size=sizes, max_window=windows.filter(bool), pieces=st.lists(chunks, min_size=1, max_size=200))
def test_a_sequential_reader_finds_every_block_asked_for_ahead(size: int, max_window: int, pieces: list[int]) -> None:
    """Reading from 0 to the end in any piece sizes: each read that enters a new block finds it
    handed out before, each block is handed out once, and nothing counts as a seek."""
    ra = ReadAhead(size, BS, max_window, CONFIG)
    handed: list[int] = []
    offset = reached = 0
    for piece in pieces * (size // max(1, sum(pieces)) + 1):
        if offset >= size:
            break
        first, last = offset // BS, (min(offset + piece, size) - 1) // BS
        assert first == 0 or first in handed or first <= reached, (offset, piece, handed)
        handed += ra.on_read(offset, piece)
        reached = last
        offset += piece
    assert len(handed) == len(set(handed))
    assert ra.resets == 0 and not ra.random_mode


@FAST
@given(
    size=st.integers(min_value=40 * BS, max_value=200 * BS),
    pieces=st.lists(st.integers(min_value=1, max_value=BS), min_size=4, max_size=60),
)
def test_a_backward_walk_asks_for_each_block_below_once(size: int, pieces: list[int]) -> None:
    """Reads that each end where the one before began: from the third step a walk, never a seek
    or random; while walking, each read asks for the block below it (once), so a step into a
    lower block finds it asked for already."""
    ra = ReadAhead(size, BS, 8 * BS, CONFIG)
    end = size
    handed: list[int] = []
    step = 0
    walking = False
    for piece in pieces:
        offset = end - piece
        if offset < 0:
            break
        first = offset // BS
        if walking and first < end // BS:
            assert first in handed, (offset, handed)
        got = list(ra.on_read(offset, piece))
        assert got in ([], [first - 1])
        handed += got
        walking = ra.last_backward
        if step >= CONFIG.walk_steps:
            assert walking
        assert not ra.last_random and ra.resets == 0
        end = offset
        step += 1
    assert handed == sorted(set(handed), reverse=True)


@FAST
@given(offsets=st.lists(st.integers(min_value=0, max_value=999), min_size=3, max_size=40, unique=True))
def test_scattered_reads_turn_random_and_fetch_nothing_ahead(offsets: list[int]) -> None:
    """Reads far apart from each other: each after the first is a seek; from the second seek the
    reads are random, and a read that starts a run (not at 0) never gets read-ahead."""
    ra = ReadAhead(1000 * 16 * BS, BS, 8 * BS, CONFIG)
    for n, slot in enumerate(sorted(offsets, key=lambda o: (o * 7919) % 1000)):
        offset = slot * 16 * BS + 1  # 16 blocks apart: beyond every tolerance and window
        got = list(ra.on_read(offset, 100))
        assert got == []
        assert ra.resets == n
        assert ra.random_mode == (min(n, CONFIG.seek_memory) >= CONFIG.random_after_seeks)


@FAST
@given(
    order=st.lists(st.booleans(), min_size=20, max_size=200),
    piece=st.integers(min_value=BS // 4, max_value=BS),
)
def test_two_interleaved_sequential_readers_each_keep_their_read_ahead(order: list[bool], piece: int) -> None:
    """Two readers streaming different parts of one file, interleaved in any order: neither is
    a seek after its first read, and each finds its blocks handed out ahead of it."""
    size = 400 * BS
    ra = ReadAhead(size, BS, 8 * BS, CONFIG)
    pos = [0, 200 * BS]
    handed: set[int] = set()
    for n, second in enumerate(order):
        reader = int(second)
        offset = pos[reader]
        first, last = offset // BS, (offset + piece - 1) // BS
        if offset >= 4 * BS + (200 * BS if reader else 0):  # past its run's first few blocks
            assert set(range(first, last + 1)) <= handed, (n, reader, offset)
        handed |= set(ra.on_read(offset, piece))
        pos[reader] += piece
    assert ra.resets <= 1  # the second reader's start, at most
