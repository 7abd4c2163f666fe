"""BlockManager on plain data: allocation, reference counts, prefix caching, eviction order."""

from __future__ import annotations

import pytest

from quantserve.server.engine.block_manager import BlockManager, hash_block
from quantserve.server.engine.sequence import SamplingParams, Sequence


def seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), SamplingParams())


def admit(bm: BlockManager, s: Sequence, n: int | None = None) -> bool:
    cached = bm.find_cached_prefix(s)
    todo = s.num_tokens - len(cached) * bm.block_size if n is None else n
    return bm.allocate(s, todo, cached)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = seq(range(10)), seq(range(100, 105))
    assert admit(bm, a) and admit(bm, b)
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    assert bm.num_free_blocks == 3
    assert set(a.block_table).isdisjoint(b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    assert a.block_table == [] and a.num_computed_tokens == 0
    assert all(c == 0 for c in bm.ref_counts)


def test_allocation_that_does_not_fit_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = seq(range(9))  # needs 3 blocks
    b = seq(range(50, 55))
    assert admit(bm, b)
    before = (list(bm.ref_counts), bm.num_free_blocks)
    assert not admit(bm, a)
    assert (list(bm.ref_counts), bm.num_free_blocks) == before
    assert a.block_table == []


def test_growth_allocates_a_block_only_when_the_last_is_full():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(range(3))
    assert admit(bm, s)
    s.num_computed_tokens = 3
    s.token_ids.append(7)
    assert bm.allocate(s, 1) and len(s.block_table) == 1  # token 4 of 4 fits
    s.num_computed_tokens = 4
    s.token_ids.append(8)
    assert bm.allocate(s, 1) and len(s.block_table) == 2


def test_shared_prefix_is_found_and_reference_counted():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(list(range(10)))
    assert admit(bm, a)  # registers blocks [0..4) and [4..8) at scheduling time
    b = seq(list(range(8)) + [99, 98, 97])
    cached = bm.find_cached_prefix(b)
    assert cached == a.block_table[:2]
    assert bm.allocate(b, b.num_tokens - 8, cached)
    assert b.num_computed_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.ref_counts[x] for x in a.block_table] == [2, 2, 1]
    bm.free(a)
    assert [bm.ref_counts[x] for x in b.block_table] == [1, 1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 16
    assert bm.prefix_hits == 8


def test_the_last_token_is_always_computed():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(range(8))
    assert admit(bm, a)
    same = seq(range(8))
    assert len(bm.find_cached_prefix(same)) == 1  # 2 full blocks cached, only 1 reusable
    longer = seq(range(9))
    assert len(bm.find_cached_prefix(longer)) == 2


def test_the_hash_names_the_whole_prefix():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = seq([1, 2, 3, 4, 5])
    assert admit(bm, a)
    # Block [3, 4] is cached, but after a different first block it must not match.
    b = seq([9, 9, 3, 4, 5])
    assert bm.find_cached_prefix(b) == []
    assert hash_block(None, [1, 2]) != hash_block(hash_block(None, [0]), [1, 2])


def test_freed_blocks_stay_cached_until_reused_tail_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4, 5, 6, 7])  # 4 blocks, 3 full
    assert admit(bm, a)
    table = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 4
    again = seq([1, 2, 3, 4, 5, 6, 7, 8])
    assert bm.find_cached_prefix(again) == table[:3]
    # A newcomer takes the blocks freed first: a's tail before its head.
    other = seq([50, 51])
    assert admit(bm, other)
    assert other.block_table == [table[3]]
    other2 = seq([60, 61])
    assert admit(bm, other2)
    assert other2.block_table == [table[2]]  # evicts the third block: its hash is forgotten
    assert bm.find_cached_prefix(again) == table[:2]
    # Reviving cached free blocks takes them off the free list.
    bm.free(other)
    short = seq([1, 2, 3, 4, 5])
    cached = bm.find_cached_prefix(short)
    assert cached == table[:2]
    assert bm.allocate(short, 1, cached)
    assert short.block_table[:2] == table[:2] and short.num_computed_tokens == 4
    assert bm.ref_counts[table[0]] == 1 and table[0] not in bm.free_blocks
    assert bm.num_free_blocks == 0


def test_revived_blocks_count_against_free_space():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = seq([1, 2, 3, 4, 5])
    assert admit(bm, a)
    bm.free(a)
    b = seq([1, 2, 3, 4, 5, 6, 7, 8, 9])  # 2 cached blocks + 3 new = 5 > 3
    cached = bm.find_cached_prefix(b)
    assert len(cached) == 2
    assert not bm.allocate(b, b.num_tokens - 4, cached)
    assert bm.num_free_blocks == 3 and b.block_table == []


def test_prefix_caching_off():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = seq([1, 2, 3, 4, 5])
    assert admit(bm, a)
    assert bm.find_cached_prefix(seq([1, 2, 3, 4, 5])) == []
    assert not bm.hash_to_block


def test_evict_free_cached_forgets_free_blocks_only():
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = seq([1, 2, 3]), seq([7, 8, 9])
    assert admit(bm, a) and admit(bm, b)
    bm.free(a)
    assert bm.evict_free_cached() == 1
    assert bm.find_cached_prefix(seq([1, 2, 3])) == []
    assert bm.find_cached_prefix(seq([7, 8, 9])) == b.block_table[:1]


def test_invalid_sizes():
    with pytest.raises(ValueError):
        BlockManager(0, 16)
    with pytest.raises(ValueError):
        BlockManager(4, 0)
