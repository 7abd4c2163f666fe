"""Paged KV cache bookkeeping: fixed-size blocks, a free list, reference counts and prefix caching.

Pure Python (no torch): the model runner owns the tensors, this owns which block holds what.

Prefix caching: every full block is named by a hash of its tokens and of the hash of the block
before it (so a hash names the whole prefix up to the block's end). A sequence starting with
the same tokens finds those blocks and skips their prefill; blocks are shared by reference count.
A block's hash is registered when the step that computes it is scheduled: within one forward
pass the model writes every new key/value of a layer before any attention of that layer reads
the cache, so a sequence scheduled later in the same step may already share it.

Freed blocks keep their hash and stay findable until reused: the free list is kept in eviction
order (least recently freed first; a sequence's tail blocks before its head, so that shared
prefixes stay longest).

Sliding windows: when every layer of the model attends only to the last `sliding_window`
positions, a block whose positions all lie before the window of a sequence's next token is never
read again; `release_out_of_window` frees it (the table keeps FREED in its place, so positions
still index the table).
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from collections import OrderedDict
from typing import Optional

from .sequence import Sequence

FREED = -1  # a block table entry whose block was released (out of every layer's window)


def hash_block(parent: Optional[bytes], token_ids: list[int], lora_id: int = 0) -> bytes:
    """A collision-resistant name for a full block given the name of the block before it. The
    first block of a sequence run with a LoRA adapter also names the adapter (lora_id > 0), so
    a cached prefix never crosses adapters (their keys and values differ)."""
    h = hashlib.blake2b(digest_size=16)
    if parent is not None:
        h.update(parent)
    elif lora_id:
        h.update(b"lora" + lora_id.to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: Optional[int] = None) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        self._released: dict[int, int] = {}  # seq_id -> leading blocks already released
        self.num_released_out_of_window = 0  # blocks given back early (statistics)
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[Optional[bytes]] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        # Blocks with ref count 0, in eviction order (first = next to reuse).
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        # Prefix cache statistics, in prompt tokens.
        self.prefix_queries = 0
        self.prefix_hits = 0

    # -------------------------------------------------------------------------------- queries

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (cached free blocks count as free)."""
        return 1.0 - len(self.free_blocks) / self.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _update_hashes(self, seq: Sequence, num_tokens: int) -> None:
        """Extend seq.block_hashes to cover the full blocks among its first num_tokens tokens."""
        bs = self.block_size
        hashes = seq.block_hashes
        for i in range(len(hashes), num_tokens // bs):
            hashes.append(hash_block(hashes[-1] if hashes else None, seq.token_ids[i * bs : (i + 1) * bs],
                                     seq.lora_id))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached prefix of seq's tokens (not yet referenced).

        At least the last token is always left to compute: its logits pick the next token.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._update_hashes(seq, max_blocks * self.block_size)
        blocks = []
        for h in seq.block_hashes[:max_blocks]:
            block = self.hash_to_block.get(h)
            if block is None:
                break
            blocks.append(block)
        if self.sliding_window is not None:  # blocks before the first computed token's window: not needed
            first_visible = len(blocks) * self.block_size - self.sliding_window + 1
            for i in range(max(first_visible, 0) // self.block_size):
                blocks[i] = FREED
        return blocks

    # -------------------------------------------------------------------------------- changes

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: Optional[list[int]] = None) -> bool:
        """Give seq the blocks for `num_new_tokens` more tokens (after `cached_blocks`, the prefix
        found by find_cached_prefix, for a sequence being admitted). False, changing nothing, if
        there are not enough free blocks."""
        cached_blocks = cached_blocks or []
        if cached_blocks and seq.block_table:
            raise ValueError("cached prefix blocks can only be given to a sequence without blocks")
        num_computed = seq.num_computed_tokens + len(cached_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_new_blocks = self.blocks_needed(total) - len(seq.block_table) - len(cached_blocks)
        # Cached blocks that sit in the free list are taken out of it by this allocation.
        num_revived = sum(1 for b in cached_blocks if b != FREED and self.ref_counts[b] == 0)
        if num_new_blocks + num_revived > len(self.free_blocks):
            return False
        for block in cached_blocks:
            if block == FREED:  # before the window (find_cached_prefix): position kept, block not held
                seq.block_table.append(FREED)
                continue
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
        if cached_blocks:
            seq.num_computed_tokens = num_computed
            self.prefix_hits += num_computed
        for _ in range(max(num_new_blocks, 0)):
            block, _ = self.free_blocks.popitem(last=False)
            old = self.block_hash[block]
            if old is not None:  # evict its cached content
                self.block_hash[block] = None
                if self.hash_to_block.get(old) == block:
                    del self.hash_to_block[old]
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        if self.enable_prefix_caching:
            # Only verified tokens: draft positions (speculative decoding) past token_ids may be rejected.
            self._register_full_blocks(seq, min(total, seq.num_tokens))
        return True

    def record_prefix_query(self, num_tokens: int) -> None:
        self.prefix_queries += num_tokens

    def _register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        self._update_hashes(seq, num_tokens)
        for i in range(num_tokens // self.block_size):
            block = seq.block_table[i]
            if block == FREED or self.block_hash[block] is not None:
                continue
            h = seq.block_hashes[i]
            if h in self.hash_to_block:  # the same content is already cached in another block
                continue
            self.block_hash[block] = h
            self.hash_to_block[h] = block

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; blocks nobody holds go to the free list (tail first)."""
        for block in reversed(seq.block_table):
            if block == FREED:
                continue
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
            elif self.ref_counts[block] < 0:  # pragma: no cover - a bookkeeping bug
                raise RuntimeError(f"block {block} freed more often than allocated")
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._released.pop(seq.seq_id, None)

    def trim(self, seq: Sequence) -> int:
        """Give back seq's blocks past those its computed tokens need (after speculative decoding
        rejected drafts whose keys and values were written there). Returns how many. Those blocks
        hold no verified full block, so no prefix hash: they go first in line for reuse."""
        keep = self.blocks_needed(seq.num_computed_tokens)
        extra = seq.block_table[keep:]
        if not extra:
            return 0
        del seq.block_table[keep:]
        for block in extra:
            if block == FREED:  # pragma: no cover - windows free blocks from the front
                continue
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                h = self.block_hash[block]
                if h is not None:  # pragma: no cover - never registered (allocate stops at num_tokens)
                    self.block_hash[block] = None
                    if self.hash_to_block.get(h) == block:
                        del self.hash_to_block[h]
                self.free_blocks[block] = None
                self.free_blocks.move_to_end(block, last=False)
        return len(extra)

    def release_out_of_window(self, seq: Sequence) -> int:
        """Free seq's blocks that no future token can see: with window W, the token at position p
        sees p - W < k <= p, and the next token is at num_computed_tokens. Returns how many."""
        if self.sliding_window is None:
            return 0
        first_visible = seq.num_computed_tokens - self.sliding_window + 1
        end = max(first_visible, 0) // self.block_size  # blocks wholly before first_visible
        start = self._released.get(seq.seq_id, 0)
        released = 0
        for i in range(start, end):
            block = seq.block_table[i]
            if block == FREED:
                continue
            seq.block_table[i] = FREED
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
            released += 1
        self.num_released_out_of_window += released
        if end > start:
            self._released[seq.seq_id] = end
        return released

    def take_scratch(self, num_blocks: int) -> Optional[list[int]]:
        """`num_blocks` free blocks for work whose keys and values are thrown away right after it
        (embeddings, engine/pooling.py): no hash is ever registered for them. Blocks that hold no
        cached prefix are taken first, so the prefix cache stays as it was whenever enough of them
        are free; only then the least recently freed cached blocks (their content forgotten, as a
        new prompt would). None, changing nothing, when fewer than `num_blocks` blocks are free."""
        if num_blocks > len(self.free_blocks):
            return None
        blocks = list(itertools.islice((b for b in self.free_blocks if self.block_hash[b] is None), num_blocks))
        if len(blocks) < num_blocks:
            taken = set(blocks)
            blocks += itertools.islice((b for b in self.free_blocks if b not in taken), num_blocks - len(blocks))
        for block in blocks:
            del self.free_blocks[block]
            old = self.block_hash[block]
            if old is not None:
                self.block_hash[block] = None
                if self.hash_to_block.get(old) == block:
                    del self.hash_to_block[old]
            self.ref_counts[block] = 1
        return blocks

    def return_scratch(self, blocks: list[int]) -> None:
        """Give back take_scratch's blocks: free, first in line for reuse (they hold nothing worth keeping)."""
        for block in reversed(blocks):
            if self.ref_counts[block] != 1:  # pragma: no cover - a bookkeeping bug
                raise RuntimeError(f"scratch block {block} has {self.ref_counts[block]} references")
            self.ref_counts[block] = 0
            self.free_blocks[block] = None
            self.free_blocks.move_to_end(block, last=False)

    def evict_free_cached(self) -> int:
        """Forget the content of every free block (after a failed step whose KV writes may not
        have happened). Returns how many blocks were forgotten."""
        count = 0
        for block in self.free_blocks:
            h = self.block_hash[block]
            if h is not None:
                self.block_hash[block] = None
                if self.hash_to_block.get(h) == block:
                    del self.hash_to_block[h]
                count += 1
        return count
