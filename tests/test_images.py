"""Image tokens: the worked examples in OpenAI's and Anthropic's vision docs."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from metering import count_request
from metering.images import image_tokens, patch_tokens, size_from_data_url
from metering.model_table import IMG_4O_MINI, IMG_85, IMG_CLAUDE, IMG_PATCH_MINI, IMG_PATCH_NANO


def data_url(width: int, height: int, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, fmt)
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64," + base64.b64encode(buffer.getvalue()).decode()


# OpenAI "Images and vision - calculating costs" (tile rule, gpt-4o): 1024x1024 high = 765,
# 2048x4096 high = 1105, 4096x8192 low = 85.
@pytest.mark.parametrize(
    ("size", "detail", "tokens"),
    [((1024, 1024), "high", 765), ((2048, 4096), "high", 1105), ((4096, 8192), "low", 85), ((1024, 1024), "auto", 765)],
)
def test_openai_tile_examples(size: tuple[int, int], detail: str, tokens: int) -> None:
    assert image_tokens(IMG_85, size, detail).tokens == tokens


def test_small_images_are_not_scaled_up() -> None:
    assert image_tokens(IMG_85, (512, 512), "high").tokens == 85 + 170  # one tile
    assert image_tokens(IMG_85, (100, 30), "high").tokens == 85 + 170


def test_gpt_4o_mini_costs_2833_plus_5667_a_tile() -> None:
    # Same doc, gpt-4o-mini row: base 2833, 5667 a tile. 1024x1024 -> 4 tiles.
    assert image_tokens(IMG_4O_MINI, (1024, 1024), "high").tokens == 2833 + 4 * 5667
    assert image_tokens(IMG_4O_MINI, (1024, 1024), "low").tokens == 2833


# OpenAI patch rule worked examples: 1024x1024 -> 1024 patches; 1800x2400 -> 1056x1408 -> 1452 patches;
# gpt-4.1-mini multiplies by 1.62, gpt-4.1-nano by 2.46 (rounded up here: never under-count).
def test_openai_patch_examples() -> None:
    assert patch_tokens(IMG_PATCH_MINI, 1024, 1024) == 1659  # ceil(1024 x 1.62)
    assert patch_tokens(IMG_PATCH_NANO, 1800, 2400) == 3572  # ceil(1452 x 2.46)
    assert patch_tokens(IMG_PATCH_MINI, 1800, 2400) == 2353  # ceil(1452 x 1.62)


# Anthropic "Vision": tokens = (width x height) / 750; 1000x1000 ~ 1334; 1092x1092 (1:1, not resized) ~ 1590.
@pytest.mark.parametrize(("size", "tokens"), [((1000, 1000), 1334), ((1092, 1092), 1590), ((200, 200), 54)])
def test_claude_area_rule(size: tuple[int, int], tokens: int) -> None:
    assert image_tokens(IMG_CLAUDE, size).tokens == tokens


def test_claude_long_edge_is_fitted_into_1568() -> None:
    # 3136x1568 -> 1568x784, the 2:1 size in Anthropic's table: 1568*784/750 = 1639.03 -> 1640.
    assert image_tokens(IMG_CLAUDE, (3136, 1568)).tokens == 1640
    assert image_tokens(IMG_CLAUDE, (8000, 8000)).tokens <= 1640


def test_sizes_are_read_from_data_urls() -> None:
    assert size_from_data_url(data_url(640, 480), ["x"]) == (640, 480)
    assert size_from_data_url(data_url(33, 17, "JPEG"), ["x"]) == (33, 17)
    assert size_from_data_url(data_url(70, 20, "WEBP"), ["x"]) == (70, 20)


def test_a_data_url_image_is_counted_exactly_in_a_request() -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(2048, 4096), "detail": "high"}}]}]}
    result = count_request(body)
    assert result.image_tokens == 1105 and result.images == 1 and result.estimated_images == 0
    assert str(result.source) == "local"


def test_remote_urls_are_never_fetched_and_counted_at_the_maximum() -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}
    result = count_request(body)  # the autouse fixture fails the test if anything connects
    assert result.image_tokens == 85 + 170 * 8  # 768x2048 after fitting: 2 x 4 tiles, the most possible
    assert str(result.source) == "estimated" and result.estimated_images == 1
    given = count_request(body, image_sizes={"https://example.com/cat.png": (1024, 1024)})
    assert given.image_tokens == 765 and str(given.source) == "local"


def test_low_detail_remote_url_is_exact_without_a_size() -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}}]}]}
    result = count_request(body)
    assert result.image_tokens == 85 and str(result.source) == "local"


def test_vision_preview_and_mini_use_their_own_rules() -> None:
    content = [{"type": "image_url", "image_url": {"url": data_url(1024, 1024)}}]
    for model, tokens in (("gpt-4-vision-preview", 765), ("gpt-4o-mini", 2833 + 4 * 5667), ("gpt-4.1-mini", 1659)):
        result = count_request({"model": model, "messages": [{"role": "user", "content": content}]})
        assert result.image_tokens == tokens, model
