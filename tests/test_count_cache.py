"""The bounded count cache: LRU order, both bounds, oversize texts, and many threads at once."""

from __future__ import annotations

import threading

import pytest

from metering.count_cache import TokenCountCache
from metering.encodings import get_encoding

ENC = get_encoding("o200k_base")


def exact(text: str) -> int:
    return len(ENC.encode_ordinary(text))


def test_hits_return_the_encoded_count_and_are_counted() -> None:
    cache = TokenCountCache()
    assert cache.count(ENC, "计费 billing") == exact("计费 billing")
    assert cache.count(ENC, "计费 billing") == exact("计费 billing")
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)


def test_least_recently_used_is_evicted_first() -> None:
    cache = TokenCountCache(max_entries=2)
    cache.count(ENC, "a")
    cache.count(ENC, "b")
    cache.count(ENC, "a")  # "a" is now the most recent
    cache.count(ENC, "c")  # evicts "b"
    hits = cache.hits
    cache.count(ENC, "a")
    assert cache.hits == hits + 1
    cache.count(ENC, "b")
    assert cache.hits == hits + 1  # "b" was a miss: it had been evicted


def test_the_character_budget_is_enforced() -> None:
    cache = TokenCountCache(max_entries=1000, max_chars=100)
    for i in range(50):
        cache.count(ENC, f"{i:02d}" * 5)  # 10 chars each
    assert cache.chars <= 100 and len(cache) == 10


def test_a_text_over_an_eighth_of_the_budget_is_counted_but_not_kept() -> None:
    cache = TokenCountCache(max_entries=10, max_chars=800)
    cache.count(ENC, "short")
    big = "长文本 long text " * 10  # 150 chars > 800 / 8
    assert cache.count(ENC, big) == exact(big)
    assert len(cache) == 1 and cache.chars == len("short")


def test_encodings_do_not_share_entries() -> None:
    cache = TokenCountCache()
    cl100k = get_encoding("cl100k_base")
    text = "お誕生日おめでとう"  # cookbook: 9 tokens in cl100k_base, 8 in o200k_base
    assert cache.count(cl100k, text) == 9
    assert cache.count(ENC, text) == 8


def test_the_stated_memory_bound_covers_what_is_held() -> None:
    cache = TokenCountCache(max_entries=300, max_chars=6000)
    for i in range(2000):
        cache.count(ENC, f"条目 {i} 🙂 " * (i % 7 + 1))
    assert cache.memory_used_bytes() <= cache.memory_bound_bytes()


@pytest.mark.parametrize(("entries", "chars"), [(0, 10), (10, 0)])
def test_bounds_must_be_positive(entries: int, chars: int) -> None:
    with pytest.raises(ValueError):
        TokenCountCache(max_entries=entries, max_chars=chars)


def test_many_threads_get_exact_counts_and_the_bounds_hold() -> None:
    cache = TokenCountCache(max_entries=64, max_chars=4000)
    texts = [f"消息 {i} message number {i} " * (i % 5 + 1) for i in range(300)]
    expected = {text: exact(text) for text in texts}
    errors: list[str] = []

    def worker(offset: int) -> None:
        for round_ in range(3):
            for text in texts[offset:] + texts[:offset]:
                if cache.count(ENC, text) != expected[text]:
                    errors.append(text)

    threads = [threading.Thread(target=worker, args=(k * 37,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(cache) <= 64 and cache.chars <= 4000
    assert cache.chars == sum(len(text) for (_, text) in cache._data)  # the running total never drifts
