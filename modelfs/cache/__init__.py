"""The block caches: memory (bounded, LRU), disk (bounded, checksummed) and the store over both."""

from modelfs.cache.memory import Block, BlockKey, MemoryCache

__all__ = ["Block", "BlockKey", "MemoryCache"]
