"""Image tokens: OpenAI's tile and patch rules, Anthropic's area rule, and reading sizes from data: URLs.

We never fetch a remote URL while counting (a gateway must not make a request on the user's behalf,
and the count must not depend on a third party's server). Sizes come from ``data:`` URLs (the image
header, read with Pillow), from the caller, or else the rule's conservative maximum is counted and the
count is marked estimated.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from PIL import Image, UnidentifiedImageError

from metering.errors import RequestError
from metering.model_table import ClaudeImageRule, ImageRule, PatchImageRule, TileImageRule

#: Largest decoded image we read a header from (a guard against decompression bombs in data: URLs).
MAX_IMAGE_BYTES = 50 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ImageCount:
    """Tokens for one image, and whether its size was known (else the rule's maximum was counted)."""

    tokens: int
    estimated: bool


def _ceil_div(numerator: Fraction | int, denominator: int) -> int:
    return math.ceil(Fraction(numerator) / denominator)


def tile_tokens(rule: TileImageRule, width: int, height: int, detail: str) -> int:
    """OpenAI tile rule: base + tile x (512 px tiles after fitting into 2048 and shortest side to 768)."""
    if detail == "low":
        return rule.base_tokens
    w, h = Fraction(width), Fraction(height)
    longest = max(w, h)
    if longest > rule.fit_box:
        w, h = w * rule.fit_box / longest, h * rule.fit_box / longest
    shortest = min(w, h)
    if shortest > rule.short_side:  # images are scaled down to 768 on the short side, never up
        w, h = w * rule.short_side / shortest, h * rule.short_side / shortest
    tiles = _ceil_div(w, rule.tile_px) * _ceil_div(h, rule.tile_px)
    return rule.base_tokens + rule.tile_tokens * tiles


def patch_tokens(rule: PatchImageRule, width: int, height: int) -> int:
    """OpenAI patch rule: 32 px patches (at most 1536 after scaling down) times the model multiplier."""
    p = rule.patch_px
    patches = -(-width // p) * -(-height // p)
    if patches > rule.max_patches:
        # Scale so the image fits the patch budget, then shrink once more so the width is a whole
        # number of patches (OpenAI's worked example: 1800 x 2400 -> 1056 x 1408 -> 1452 patches).
        shrink = math.sqrt(p * p * rule.max_patches / (width * height))
        w, h = width * shrink, height * shrink
        whole = math.floor(w / p) / (w / p)
        w, h = w * whole, h * whole
        patches = math.ceil(w / p) * math.ceil(h / p)
    patches = min(patches, rule.max_patches)
    return math.ceil(patches * rule.multiplier)


def claude_tokens(rule: ClaudeImageRule, width: int, height: int) -> int:
    """Anthropic rule: fit the long edge into 1568 px (and the area cap), then w x h / 750, rounded up."""
    w, h = Fraction(width), Fraction(height)
    longest = max(w, h)
    if longest > rule.long_edge:
        w, h = w * rule.long_edge / longest, h * rule.long_edge / longest
    if w * h > rule.max_pixels:
        scale_sq = Fraction(rule.max_pixels) / (w * h)  # both sides scale by sqrt(scale_sq)
        return _ceil_div(w * h * scale_sq, rule.pixels_per_token)
    return _ceil_div(w * h, rule.pixels_per_token)


def max_tokens(rule: ImageRule, detail: str) -> int:
    """The most one image can cost under ``rule``: counted when the size is unknown."""
    if isinstance(rule, TileImageRule):
        if detail == "low":
            return rule.base_tokens
        # After fitting, the short side is at most 768 and the long side at most 2048: 2 x 4 tiles.
        return tile_tokens(rule, rule.short_side, rule.fit_box, detail)
    if isinstance(rule, PatchImageRule):
        return math.ceil(rule.max_patches * rule.multiplier)
    return _ceil_div(rule.max_pixels, rule.pixels_per_token)


def image_tokens(rule: ImageRule, size: tuple[int, int] | None, detail: str = "auto") -> ImageCount:
    """Tokens for one image of ``size`` (width, height) under ``rule``; unknown size -> the maximum."""
    if detail == "low" and isinstance(rule, TileImageRule):
        return ImageCount(rule.base_tokens, estimated=False)  # low detail does not depend on size
    if size is None:
        return ImageCount(max_tokens(rule, detail), estimated=True)
    width, height = size
    if isinstance(rule, TileImageRule):
        return ImageCount(tile_tokens(rule, width, height, detail), estimated=False)
    if isinstance(rule, PatchImageRule):
        return ImageCount(patch_tokens(rule, width, height), estimated=False)
    return ImageCount(claude_tokens(rule, width, height), estimated=False)


def size_from_bytes(data: bytes, path: Sequence[str | int]) -> tuple[int, int]:
    """(width, height) from an image's header, read with Pillow (no full decode)."""
    if len(data) > MAX_IMAGE_BYTES:
        raise RequestError(path, f"image is {len(data)} bytes, above the {MAX_IMAGE_BYTES} byte limit")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise RequestError(path, f"not a readable image ({exc.__class__.__name__})") from None
    if width <= 0 or height <= 0:
        raise RequestError(path, f"image has no area ({width}x{height})")
    return width, height


def decode_base64(data: str, path: Sequence[str | int]) -> bytes:
    """Strictly decode base64 image data, naming the path on failure."""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(path, "image data is not valid base64") from None


def size_from_data_url(url: str, path: Sequence[str | int]) -> tuple[int, int]:
    """(width, height) of the image in a ``data:[<mime>];base64,<data>`` URL."""
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise RequestError(path, "data: URL must be base64 encoded (data:image/...;base64,...)")
    return size_from_bytes(decode_base64(payload, path), path)


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``WIDTHxHEIGHT`` (as given on the command line) into a positive (width, height)."""
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) <= 0 or int(h) <= 0:
        raise ValueError(f"image size must look like 1024x768, got {text!r}")
    return int(w), int(h)
