"""ReadAhead: window growth, seeks, reordering, interleaved readers, bounds, unschedule."""

from __future__ import annotations

from modelfs.prefetch import PrefetchConfig, ReadAhead

BS = 1 << 20  # 1 MiB blocks: the default 4 MiB backward tolerance is 4 blocks


def read_blocks(ra: ReadAhead, first: int, count: int, chunk: int = BS // 4) -> list[list[int]]:
    """Read blocks [first, first+count) sequentially in ``chunk`` pieces; prefetch lists per block."""
    out: list[list[int]] = []
    for b in range(first, first + count):
        got: list[int] = []
        for off in range(b * BS, (b + 1) * BS, chunk):
            got += list(ra.on_read(off, chunk))
        out.append(got)
    return out


def test_window_starts_at_one_and_doubles_to_max() -> None:
    """From offset 0: window 1, then 2, 4, 8 as each new block is entered, capped at max_window."""
    ra = ReadAhead(100 * BS, BS, 8 * BS)
    per_block = read_blocks(ra, 0, 6)
    assert per_block[0] == [1]  # window 1 right away
    assert per_block[1] == [2, 3]  # window 2: blocks 2..3
    assert per_block[2] == [4, 5, 6]  # window 4: up to block 6
    assert per_block[3] == [7, 8, 9, 10, 11]  # window 8: up to block 11
    assert per_block[4] == [12]  # at the cap: one more block per block read
    assert per_block[5] == [13]
    (cursor,) = ra.cursors
    assert cursor.window == 8
    assert ra.resets == 0


def test_reads_inside_a_block_do_not_grow_the_window() -> None:
    """Many small reads in the same block hand out each index once and keep the window."""
    ra = ReadAhead(100 * BS, BS, 8 * BS)
    got = [list(ra.on_read(off, 4096)) for off in range(0, BS, 4096)]
    assert got[0] == [1]
    assert all(g == [] for g in got[1:])
    assert ra.cursors[0].window == 1


def test_random_seek_starts_new_cursor_without_window() -> None:
    """A read far from every cursor is a new run: no prefetch, resets counted; it then earns a window."""
    ra = ReadAhead(100 * BS, BS, 8 * BS)
    read_blocks(ra, 0, 3)
    assert list(ra.on_read(50 * BS, 4096)) == []
    assert ra.resets == 1
    assert len(ra.cursors) == 2
    seek = max(ra.cursors, key=lambda c: c.seq)
    assert seek.window == 0
    assert list(ra.on_read(51 * BS, 4096)) == [52]  # sequential again: window 1
    assert list(ra.on_read(52 * BS, 4096)) == [53, 54]
    assert ra.resets == 1


def test_first_read_not_at_zero_has_no_window() -> None:
    """A file's first read elsewhere than offset 0 is a seek: no read-ahead until it continues."""
    ra = ReadAhead(100 * BS, BS, 8 * BS)
    assert list(ra.on_read(10 * BS, BS)) == []
    assert ra.resets == 0  # no earlier run to reset
    assert list(ra.on_read(11 * BS, BS)) == [12]


def test_small_reordering_keeps_the_window() -> None:
    """Reads arriving out of order (a little backwards, within tolerance) stay in the same run."""
    ra = ReadAhead(100 * BS, BS, 8 * BS)
    read_blocks(ra, 0, 3)  # window 4
    window = ra.cursors[0].window
    # The kernel's read-ahead lands block 4 before block 3.
    assert list(ra.on_read(4 * BS, BS // 2)) != []
    assert list(ra.on_read(3 * BS, BS)) == []  # behind the cursor: nothing new
    assert list(ra.on_read(3 * BS - 4096, 4096)) == []
    assert len(ra.cursors) == 1 and ra.resets == 0
    assert ra.cursors[0].window == 8 > window
    assert ra.cursors[0].block == 4


def test_backwards_beyond_tolerance_is_a_new_run() -> None:
    """A read further behind than backward_tolerance starts a new cursor."""
    ra = ReadAhead(100 * BS, BS, 8 * BS, PrefetchConfig(backward_tolerance=BS))
    read_blocks(ra, 0, 6)
    ra.on_read(2 * BS, 4096)
    assert ra.resets == 1 and len(ra.cursors) == 2


def test_two_interleaved_sequential_readers_both_grow() -> None:
    """Two readers alternating on one file each keep their own growing window."""
    ra = ReadAhead(200 * BS, BS, 16 * BS)
    a_got: list[list[int]] = []
    b_got: list[list[int]] = []
    for i in range(5):
        a_got.append(list(ra.on_read(i * BS, BS)))
        b_got.append(list(ra.on_read((100 + i) * BS, BS)))
    assert len(ra.cursors) == 2 and ra.resets == 1  # only B's first read was a "seek"
    a, b = sorted(ra.cursors, key=lambda c: c.end)
    assert a.window == 16 and a.block == 4
    assert b.window == 8 and b.block == 104  # B began without a window, one doubling behind
    assert a_got[:4] == [[1], [2, 3], [4, 5, 6], [7, 8, 9, 10, 11]]
    assert b_got[0] == [] and b_got[1] == [102] and b_got[2] == [103, 104]
    assert not set(sum(a_got, [])) & set(sum(b_got, []))


def test_never_beyond_last_block() -> None:
    """Prefetch indices stop at the last block, whatever the window."""
    size = 5 * BS + 10  # blocks 0..5
    ra = ReadAhead(size, BS, 64 * BS)
    handed: list[int] = []
    for off in range(0, size, BS // 2):
        handed += list(ra.on_read(off, BS // 2))
    assert handed == [1, 2, 3, 4, 5]
    assert max(handed) == 5
    assert list(ra.on_read(size, 10)) == []  # at EOF
    assert list(ra.on_read(size - 1, 100)) == []


def test_max_window_below_one_block_disables_prefetch() -> None:
    """max_window smaller than a block means no read-ahead at all."""
    ra = ReadAhead(10 * BS, BS, BS // 2)
    got = []
    for off in range(0, 10 * BS, BS):
        got += list(ra.on_read(off, BS))
    assert got == []


def test_unschedule_lets_a_refused_index_be_asked_again() -> None:
    """After unschedule(i), the next read hands out i (and what follows) again."""
    ra = ReadAhead(100 * BS, BS, 8 * BS)
    read_blocks(ra, 0, 2)  # handed out 1, 2, 3
    assert list(ra.on_read(2 * BS, 4096)) == [4, 5, 6]
    ra.unschedule(5)  # the store had no room for 5
    assert list(ra.on_read(2 * BS + 4096, 4096)) == [5, 6]
    assert list(ra.on_read(2 * BS + 8192, 4096)) == []  # not handed out twice


def test_unschedule_ignores_indices_not_scheduled() -> None:
    """unschedule of an index outside the scheduled range changes nothing."""
    ra = ReadAhead(100 * BS, BS, 8 * BS)
    ra.on_read(0, BS)  # scheduled: 1
    ra.unschedule(50)
    assert list(ra.on_read(4096, 4096)) == []


def test_cursor_count_is_bounded() -> None:
    """Many random reads keep at most max_cursors cursors."""
    ra = ReadAhead(1000 * BS, BS, 8 * BS, PrefetchConfig(max_cursors=3))
    for i in range(10):
        ra.on_read(i * 50 * BS, 4096)
    assert len(ra.cursors) == 3
    assert ra.resets == 9


def test_empty_and_out_of_range_reads() -> None:
    """Zero-size reads and reads at or past EOF schedule nothing and create no cursor."""
    ra = ReadAhead(4 * BS, BS, 8 * BS)
    assert list(ra.on_read(0, 0)) == []
    assert list(ra.on_read(4 * BS, 100)) == []
    assert ra.cursors == []


def _walk_down(top: int, step: int) -> list[tuple[int, int]]:
    """The reads of an mmap'd copy running from ``top`` down to 0 in ``step`` pieces."""
    return [(max(0, end - step), end - max(0, end - step)) for end in range(top, 0, -step)]


def test_backward_walk_is_recognised_after_three_steps() -> None:
    """Reads each ending where the last began: a walk from the third step on, asking for the
    next block down as it enters each block, and never counted as seeks."""
    ra = ReadAhead(100 * BS, BS, 8 * BS)
    ra.on_read(60 * BS, 100)  # a run elsewhere first, so later new runs would count as seeks
    seen, asked = [], []
    for offset, size in _walk_down(10 * BS, BS // 4):
        asked += list(ra.on_read(offset, size))
        seen.append(ra.last_backward)
        if ra.last_backward:
            assert not ra.last_random
    assert seen[:4] == [False, False, False, True] and all(seen[3:])
    assert asked == list(range(8, -1, -1))  # each block below, once, as the walk entered the one above
    assert ra.resets <= 3  # only the steps before the walk was recognised


def test_forward_reordering_and_scattered_seeks_are_no_walk() -> None:
    ra = ReadAhead(100 * BS, BS, 8 * BS)
    step = BS // 4
    for offset in (0, step, 3 * step, 2 * step, 4 * step, 6 * step, 5 * step, 7 * step):  # out of order
        ra.on_read(offset, step)
        assert not ra.last_backward, offset
    for offset in (90 * BS, 70 * BS, 50 * BS, 30 * BS, 10 * BS):  # downwards, but not contiguous
        ra.on_read(offset, step)
        assert not ra.last_backward, offset


def test_no_block_below_without_read_ahead() -> None:
    ra = ReadAhead(100 * BS, BS, 0)
    asked = [i for offset, size in _walk_down(10 * BS, BS // 4) for i in ra.on_read(offset, size)]
    assert asked == [] and ra.last_backward
