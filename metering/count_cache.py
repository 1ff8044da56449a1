"""A bounded per-text token count cache: chat clients resend the whole history every turn.

Keys are (encoding name, exact text), so a hit is the count tiktoken would give for that text: the
cache can never change a count, only skip re-encoding. It is an LRU bounded two ways, by entries and by
the characters it holds, so its memory has a stated ceiling (see ``memory_bound_bytes``).
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict

import tiktoken

#: Measured on CPython 3.11 x86_64 (bench/bench_counting.py reports it): an entry's fixed cost is the
#: OrderedDict node, the key tuple and the str header (270-300 B seen). A char costs up to 8 bytes: up
#: to 4 in the str itself, plus up to 4 in the UTF-8 copy CPython caches on a non-ASCII str once
#: tiktoken has read it (the key is that very str).
ENTRY_OVERHEAD_BYTES = 320
MAX_BYTES_PER_CHAR = 8


class TokenCountCache:
    """LRU of (encoding, text) -> token count, bounded by ``max_entries`` and ``max_chars``."""

    def __init__(self, max_entries: int = 50_000, max_chars: int = 2_000_000) -> None:
        if max_entries < 1 or max_chars < 1:
            raise ValueError("max_entries and max_chars must be positive")
        self.max_entries = max_entries
        self.max_chars = max_chars
        # A text longer than this is counted but not kept: one huge paste must not flush the cache.
        self.max_text_chars = max(1, max_chars // 8)
        self._data: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def count(self, encoding: tiktoken.Encoding, text: str) -> int:
        """Tokens of ``text`` in ``encoding`` (ordinary text: special-token strings count as text)."""
        key = (encoding.name, text)
        data = self._data
        with self._lock:
            tokens = data.get(key)
            if tokens is not None:
                data.move_to_end(key)
                self.hits += 1
                return tokens
        tokens = len(encoding.encode_ordinary(text))
        if len(text) <= self.max_text_chars:
            with self._lock:
                self.misses += 1
                if key not in data:
                    data[key] = tokens
                    self._chars += len(text)
                    while len(data) > self.max_entries or self._chars > self.max_chars:
                        (_, old_text), _ = data.popitem(last=False)
                        self._chars -= len(old_text)
        return tokens

    def clear(self) -> None:
        """Forget every entry and reset the hit/miss counters."""
        with self._lock:
            self._data.clear()
            self._chars = 0
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def chars(self) -> int:
        """Characters of text currently held."""
        return self._chars

    def memory_bound_bytes(self) -> int:
        """The most memory the cache can hold: every entry's overhead plus every char at 8 bytes."""
        return self.max_entries * ENTRY_OVERHEAD_BYTES + self.max_chars * MAX_BYTES_PER_CHAR

    def memory_used_bytes(self) -> int:
        """Memory held now, measured with sys.getsizeof (keys, texts and the table)."""
        total = sys.getsizeof(self._data)
        for key in self._data:
            total += sys.getsizeof(key) + sys.getsizeof(key[1]) + 2 * 8 + 3 * 8  # link node
        return total


#: The process-wide cache used when a caller does not pass one (None disables caching).
DEFAULT_CACHE = TokenCountCache()
