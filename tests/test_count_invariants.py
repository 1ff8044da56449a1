"""Invariants of counting, checked with hypothesis over generated requests."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from metering import TokenCountCache, count_request
from metering.models import resolve_model
from metering.openai_prompt import message_tokens

# Text that exercises the tokenizer: English, Chinese, emoji, whitespace runs and special-token strings.
texts = st.one_of(
    st.text(max_size=200),
    st.sampled_from(["", " ", "\n\n", "<|endoftext|>", "<|im_start|>", "你好,世界", "🙂👍🏽", "   leading", "a" * 300]),
    st.lists(st.sampled_from(["token", " 计费", "配额", " quota", "!", " ", "\t", "123", "é"]), max_size=40).map("".join),
)
roles = st.sampled_from(["system", "user", "assistant", "developer", "tool"])
text_parts = st.lists(st.builds(lambda t: {"type": "text", "text": t}, texts), min_size=1, max_size=3)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": roles, "content": st.one_of(texts, text_parts)},
        optional={"name": st.from_regex(r"[a-z_]{1,12}", fullmatch=True)},
    ),
    max_size=8,
)
models = st.sampled_from(["gpt-4", "gpt-4o", "gpt-3.5-turbo-0301", "gpt-4o-mini", "o3"])


@settings(max_examples=150, deadline=None)
@given(messages, models)
def test_request_count_is_the_sum_of_message_counts_plus_priming(msgs: list[dict], model: str) -> None:
    result = count_request({"model": model, "messages": msgs})
    resolved = resolve_model(model)
    assert result.prompt_tokens == sum(result.message_tokens) + result.tools_tokens + result.priming_tokens
    assert result.priming_tokens == 3 and result.tools_tokens == 0
    # Each entry of the breakdown is what that message costs on its own.
    assert list(result.message_tokens) == [message_tokens(m, resolved) for m in msgs]


@settings(max_examples=150, deadline=None)
@given(messages, models, st.integers(min_value=1, max_value=6), st.integers(min_value=8, max_value=400))
def test_the_cache_never_changes_a_count(msgs: list[dict], model: str, entries: int, chars: int) -> None:
    # A tiny cache evicts constantly: hits, misses and evictions must all give the uncached count.
    tiny = TokenCountCache(max_entries=entries, max_chars=chars)
    body = {"model": model, "messages": msgs}
    uncached = count_request(body, cache=None)
    for _ in range(2):
        assert count_request(body, cache=tiny) == uncached
    assert len(tiny) <= entries and tiny.chars <= chars


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(texts, texts), min_size=1, max_size=6))
def test_a_growing_conversation_counts_the_same_with_the_shared_cache(turns: list[tuple[str, str]]) -> None:
    cache = TokenCountCache()
    history: list[dict] = [{"role": "system", "content": "You are helpful."}]
    for question, answer in turns:
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        body = {"model": "gpt-4o", "messages": history}
        assert count_request(body, cache=cache) == count_request(body, cache=None)
