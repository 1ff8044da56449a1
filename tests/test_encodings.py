"""Offline encodings: shipped files, verified by tiktoken's own hashes, identical tokens."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from importlib import resources

import pytest
import tiktoken_ext.openai_public as openai_public

from metering.encodings import SHIPPED_ENCODINGS, get_encoding, parse_tiktoken_bpe, verify_sha256
from metering.errors import EncodingIntegrityError


def _expected_hash(name: str) -> str:
    """The sha256 tiktoken itself passes for ``name``'s BPE file (captured from its constructor)."""
    seen: dict[str, str] = {}
    constructor = openai_public.ENCODING_CONSTRUCTORS[name]

    def capture(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        seen["hash"] = expected_hash or ""
        return {}

    import types

    types.FunctionType(constructor.__code__, {**constructor.__globals__, "load_tiktoken_bpe": capture})()
    return seen["hash"]


@pytest.mark.parametrize("name", sorted(SHIPPED_ENCODINGS))
def test_shipped_file_has_the_hash_tiktoken_expects(name: str) -> None:
    data = resources.files("metering").joinpath("bpe", SHIPPED_ENCODINGS[name]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == _expected_hash(name)


def test_a_tampered_file_is_refused() -> None:
    data = resources.files("metering").joinpath("bpe", SHIPPED_ENCODINGS["cl100k_base"]).read_bytes()
    tampered = data.replace(b" 100\n", b" 101\n", 1)
    with pytest.raises(EncodingIntegrityError, match="sha256"):
        verify_sha256(tampered, _expected_hash("cl100k_base"), "cl100k_base.tiktoken")


# Token ids from OpenAI's cookbook "How to count tokens with tiktoken", sections 3 and 5.
@pytest.mark.parametrize(
    ("name", "text", "tokens"),
    [
        ("o200k_base", "tiktoken is great!", [83, 8251, 2488, 382, 2212, 0]),
        ("cl100k_base", "antidisestablishmentarianism", [519, 85342, 34500, 479, 8997, 2191]),
        ("o200k_base", "antidisestablishmentarianism", [493, 129901, 376, 160388, 21203, 2367]),
        ("cl100k_base", "2 + 2 = 4", [17, 489, 220, 17, 284, 220, 19]),
        ("o200k_base", "お誕生日おめでとう", [8930, 9697, 243, 128225, 8930, 17693, 4344, 48669]),
    ],
)
def test_tokens_match_the_cookbook(name: str, text: str, tokens: list[int]) -> None:
    assert get_encoding(name).encode_ordinary(text) == tokens


def test_vocabulary_sizes() -> None:
    # n_vocab of tiktoken's encodings: cl100k_base 100277, o200k_base 200019 (ranks + special tokens).
    assert get_encoding("cl100k_base").n_vocab == 100277
    assert get_encoding("o200k_base").n_vocab == 200019


def test_parse_round_trips_a_small_file() -> None:
    assert parse_tiktoken_bpe(b"YQ== 0\nYg== 1\n\n") == {b"a": 0, b"b": 1}


def test_loading_leaves_a_users_tiktoken_cache_alone(tmp_path) -> None:
    """With TIKTOKEN_CACHE_DIR set, we load from the package and neither read nor write that cache."""
    cache_dir = tmp_path / "tiktoken-cache"
    cache_dir.mkdir()
    code = (
        "import os; from metering.encodings import get_encoding;"
        "e = get_encoding('o200k_base'); print(len(e.encode_ordinary('hello world')));"
        "print(os.environ['TIKTOKEN_CACHE_DIR'])"
    )
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache_dir)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2", str(cache_dir)]
    assert list(cache_dir.iterdir()) == []
