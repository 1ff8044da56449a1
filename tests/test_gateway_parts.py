"""The relay's pure parts: the usage-chunk filter, the configuration, the error table, exact dollar amounts."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi", reason="the [gateway] extra is not installed")

from gateway.billing import usd_text  # noqa: E402
from gateway.config import ConfigError, GatewayConfig, Upstream, load_config  # noqa: E402
from gateway.provider_errors import ERRORS, error_body  # noqa: E402
from gateway.usage_chunk import UsageChunkFilter, is_usage_only_chunk  # noqa: E402


def _chunk(content: str | None, *, usage: bool = False, finish: str | None = None) -> dict[str, object]:
    choices = [] if usage else [{"index": 0, "delta": {} if content is None else {"content": content},
                                 "finish_reason": finish}]
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
            "choices": choices, "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12} if usage else None}


def _stream(newline: str, words: list[str]) -> tuple[bytes, bytes]:
    """(what the upstream sends with include_usage, what a client that did not ask should get)."""
    events = [_chunk(w) for w in words] + [_chunk(None, finish="stop")]
    usage = f"data: {json.dumps(_chunk(None, usage=True))}{newline}{newline}"
    body = "".join(f"data: {json.dumps(e, ensure_ascii=False)}{newline}{newline}" for e in events)
    done = f"data: [DONE]{newline}{newline}"
    return (body + usage + done).encode(), (body + done).encode()


@settings(max_examples=200, deadline=None)
@given(
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
    words=st.lists(st.text(min_size=1, max_size=8), min_size=0, max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
)
def test_the_usage_chunk_is_dropped_and_every_other_byte_kept_however_the_stream_is_cut(
    newline: str, words: list[str], cuts: list[int]
) -> None:
    sent, expected = _stream(newline, words)
    points = sorted({c % (len(sent) + 1) for c in cuts})
    pieces = [sent[a:b] for a, b in zip([0, *points], [*points, len(sent)])]
    relay = UsageChunkFilter()
    got = b"".join(relay.feed(p) for p in pieces) + relay.flush()
    assert got == expected


def test_content_chunks_with_a_null_usage_field_are_not_usage_chunks() -> None:
    assert not is_usage_only_chunk(f"data: {json.dumps(_chunk('hi'))}\n\n".encode())
    assert is_usage_only_chunk(f"data: {json.dumps(_chunk(None, usage=True))}\n\n".encode())
    assert not is_usage_only_chunk(b'data: {"choices": [], "usage": nul\n\n')  # broken JSON passes on untouched


def test_an_unterminated_last_event_is_passed_on_at_the_end() -> None:
    relay = UsageChunkFilter()
    assert relay.feed(b"data: [DONE]") == b""
    assert relay.flush() == b"data: [DONE]"


def test_config_from_yaml_names_the_bad_field(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "gateway.yaml"
    path.write_text("upstreams:\n  - provider: openai\n    channel: oa\n    base_url: ftp://x\n    api_key: k\n")
    with pytest.raises(ConfigError, match=r"upstreams\.0\.base_url"):
        load_config(path)
    path.write_text("upstreams:\n  - provider: openai\n    channel: oa\n    base_url: https://x\n    api_key_env: NO_SUCH_VAR_X\n")
    monkeypatch.delenv("NO_SUCH_VAR_X", raising=False)
    with pytest.raises(ConfigError, match="NO_SUCH_VAR_X is not set"):
        load_config(path)
    monkeypatch.setenv("NO_SUCH_VAR_X", "sk-up")
    config = load_config(path)
    assert config.upstream("openai").credential() == "sk-up"  # type: ignore[union-attr]
    assert config.upstream("anthropic") is None


def test_two_upstreams_for_one_provider_are_refused() -> None:
    one = Upstream(provider="openai", channel="a", base_url="https://a", api_key="k")
    with pytest.raises(ValueError, match="one upstream per provider"):
        GatewayConfig(upstreams=(one, one))


def test_the_backup_is_tried_after_the_main_address_under_its_own_channel() -> None:
    upstream = Upstream(provider="anthropic", channel="cf", base_url="https://cdn.example/", api_key="k",
                        backup_url="https://origin.example")
    assert upstream.addresses() == [("https://cdn.example", "cf"), ("https://origin.example", "cf-backup")]


def test_every_error_kind_has_both_formats() -> None:
    for kind, spec in ERRORS.items():
        openai_body = error_body("openai", kind, "m")
        anthropic_body = error_body("anthropic", kind, "m")
        assert openai_body["error"]["type"] == spec.openai_type  # type: ignore[index]
        assert anthropic_body == {"type": "error", "error": {"type": spec.anthropic_type, "message": "m"}}
    # The contract: invalid key 401, insufficient quota 429 insufficient_quota, unknown model 404.
    assert (ERRORS["invalid_api_key"].status, ERRORS["insufficient_quota"].status, ERRORS["model_not_found"].status) == (401, 429, 404)
    assert ERRORS["insufficient_quota"].openai_code == "insufficient_quota"


@given(st.integers(min_value=0, max_value=10**18), st.sampled_from([500_000, 1_000_000, 3, 7]))
def test_dollar_amounts_are_exact_decimals(units: int, per_usd: int) -> None:
    text = usd_text(units, per_usd)
    if per_usd in (500_000, 1_000_000):
        assert Fraction(text) == Fraction(units, per_usd)  # exact: the divisor divides a power of ten
    else:
        assert abs(Fraction(text) - Fraction(units, per_usd)) <= Fraction(1, 2 * 10**12)
    assert "e" not in text.lower()


def test_the_readme_gateway_yaml_is_a_valid_config(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    start = readme.index("cat > gateway.yaml <<'YAML'\n") + len("cat > gateway.yaml <<'YAML'\n")
    path = tmp_path / "gateway.yaml"
    path.write_text(readme[start : readme.index("\nYAML\n", start)], encoding="utf-8")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-a")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-b")
    config = load_config(path)
    assert [u.provider for u in config.upstreams] == ["openai", "anthropic"]
    assert config.upstream("openai").addresses()[1][1] == "openai-official-backup"  # type: ignore[union-attr]


def test_a_settle_after_the_answer_is_retried_while_the_ledger_is_busy(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from gateway import settling
    from metering.ledger.errors import LedgerBusy, SettleConflict

    monkeypatch.setattr(settling, "PAUSE_SECONDS", 0.0)
    calls: list[int] = []

    def settle_failing(failures: int, error: Exception):  # type: ignore[no-untyped-def]
        async def settle() -> str:
            calls.append(1)
            if len(calls) <= failures:
                raise error
            return "receipt"
        return settle

    assert asyncio.run(settling.settle_after_answer(settle_failing(2, LedgerBusy("lock wait")), "r1")) == "receipt"
    assert len(calls) == 3  # two busy answers, then the settle (the same hold: idempotent)
    calls.clear()
    reason = asyncio.run(settling.settle_after_answer(settle_failing(99, LedgerBusy("lock wait")), "r2"))
    assert len(calls) == settling.ATTEMPTS and reason.startswith("LedgerBusy after")  # type: ignore[union-attr]
    calls.clear()
    reason = asyncio.run(settling.settle_after_answer(settle_failing(99, SettleConflict("other usage")), "r3"))
    assert len(calls) == 1 and reason.startswith("SettleConflict")  # type: ignore[union-attr]  (refused: no retry)
