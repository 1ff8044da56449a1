"""Offline tiktoken encodings: the BPE files ship inside this package and are checked by hash.

tiktoken downloads its BPE files on first use, which fails in the locked-down networks gateways run in.
We ship ``cl100k_base`` and ``o200k_base`` under ``metering/bpe/`` and build the ``Encoding``
from tiktoken's own constructor (``tiktoken_ext.openai_public``), so the regex, the special tokens and
the sha256 the file must have all come from tiktoken itself, not from a copy of ours that could drift.

We never touch ``TIKTOKEN_CACHE_DIR``: a user's own cache keeps working for everything else, and an
encoding we do not ship is left to ``tiktoken.get_encoding`` (which honours that cache).
"""

from __future__ import annotations

import base64
import hashlib
import threading
import types
from importlib import resources
from typing import Any

import tiktoken
import tiktoken_ext.openai_public as openai_public

from metering.errors import EncodingIntegrityError

#: Encodings whose BPE files ship with the package, by name -> file in ``metering/bpe/``.
SHIPPED_ENCODINGS: dict[str, str] = {
    "cl100k_base": "cl100k_base.tiktoken",
    "o200k_base": "o200k_base.tiktoken",
}

_cache: dict[str, tiktoken.Encoding] = {}
_lock = threading.Lock()


def _read_shipped(file_name: str) -> bytes:
    """The bytes of a BPE file shipped in the package."""
    return resources.files("metering").joinpath("bpe", file_name).read_bytes()


def parse_tiktoken_bpe(contents: bytes) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file: one ``base64(token) rank`` pair a line."""
    ranks: dict[bytes, int] = {}
    for line in contents.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def verify_sha256(data: bytes, expected_hash: str, what: str) -> None:
    """Raise ``EncodingIntegrityError`` unless ``data`` has the sha256 ``expected_hash``."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_hash:
        raise EncodingIntegrityError(f"{what}: sha256 {actual} is not the expected {expected_hash}")


def _constructor_args(name: str, file_name: str) -> dict[str, Any]:
    """tiktoken's constructor arguments for ``name``, with the BPE file read from our package.

    tiktoken's constructor (e.g. ``openai_public.cl100k_base``) calls ``load_tiktoken_bpe(url,
    expected_hash=...)``. We run a copy of that function whose ``load_tiktoken_bpe`` reads our shipped
    file instead and verifies it against the very hash tiktoken passes, so nothing is downloaded and
    nothing of tiktoken's is patched in place (other threads keep the real loader).
    """
    constructor = openai_public.ENCODING_CONSTRUCTORS[name]

    def load_shipped(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        data = _read_shipped(file_name)
        if not expected_hash:
            raise EncodingIntegrityError(f"tiktoken gives no expected hash for {url}; refusing an unverified file")
        verify_sha256(data, expected_hash, f"metering/bpe/{file_name}")
        return parse_tiktoken_bpe(data)

    offline = types.FunctionType(
        constructor.__code__,
        {**constructor.__globals__, "load_tiktoken_bpe": load_shipped},
        constructor.__name__,
        constructor.__defaults__,
        constructor.__closure__,
    )
    return offline()


def get_encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken ``Encoding`` called ``name``, loaded offline when we ship it (cached per process)."""
    encoding = _cache.get(name)
    if encoding is not None:
        return encoding
    with _lock:
        encoding = _cache.get(name)
        if encoding is None:
            file_name = SHIPPED_ENCODINGS.get(name)
            if file_name is None:
                encoding = tiktoken.get_encoding(name)  # not ours to ship: tiktoken's own cache/download
            else:
                encoding = tiktoken.Encoding(**_constructor_args(name, file_name))
            _cache[name] = encoding
    return encoding
