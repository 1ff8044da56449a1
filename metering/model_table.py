"""The model table, kept as data: model name -> provider, encoding, message framing, image rule.

Edit this file to add a model; no code elsewhere branches on model names. Sources of the figures:

* Message framing: OpenAI cookbook "How to count tokens with tiktoken" (3 tokens a message, 1 per
  ``name``, 3 to prime the reply; gpt-3.5-turbo-0301: 4 a message and -1 per ``name``).
* Tool definitions: the same cookbook's ``num_tokens_for_tools`` constants per encoding family.
* Images: OpenAI "Images and vision - calculating costs" (tile rule with base/tile tokens per model,
  patch rule with a multiplier for the mini/nano models); Anthropic "Vision" (tokens = w*h/750 after
  the long edge is fitted into 1568 px).
* Claude tool-use system prompt: Anthropic "Tool use - pricing" table (tokens by tool_choice).
* Claude safety factor: published comparisons put Claude's token counts 15-45% above cl100k/o200k for
  English and code; the estimate multiplies the o200k count by the factor below, rounding up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction


@dataclass(frozen=True, slots=True)
class ChatFraming:
    """Tokens the chat format adds around messages (OpenAI cookbook)."""

    tokens_per_message: int = 3
    tokens_per_name: int = 1
    reply_priming: int = 3
    #: Each assistant tool call / legacy function_call: the name and arguments plus this many tokens
    #: (measured by openai-chat-tokens; the cookbook is silent on calls inside the history).
    tokens_per_tool_call: int = 3


@dataclass(frozen=True, slots=True)
class ToolFraming:
    """Constants of the cookbook's ``num_tokens_for_tools`` for one encoding family."""

    func_init: int
    prop_init: int
    prop_key: int
    enum_init: int
    enum_item: int
    func_end: int
    #: tool_choice / function_call: "none" costs 1 token, a named function its name + 4 (openai-chat-tokens).
    choice_none: int = 1
    choice_named_extra: int = 4


@dataclass(frozen=True, slots=True)
class TileImageRule:
    """OpenAI tile rule: fit into 2048 px, shortest side to 768 px, 512 px tiles."""

    base_tokens: int
    tile_tokens: int
    fit_box: int = 2048
    short_side: int = 768
    tile_px: int = 512


@dataclass(frozen=True, slots=True)
class PatchImageRule:
    """OpenAI patch rule (mini/nano models): 32 px patches, at most 1536, times a multiplier."""

    multiplier: Fraction
    patch_px: int = 32
    max_patches: int = 1536


@dataclass(frozen=True, slots=True)
class ClaudeImageRule:
    """Anthropic rule: long edge fitted into 1568 px, pixel area capped, tokens = w*h/750 rounded up."""

    long_edge: int = 1568
    #: The largest image Anthropic's vision table lists as not resized (784 x 1568, 1:2).
    max_pixels: int = 784 * 1568
    pixels_per_token: int = 750


def fraction_text(value: Fraction) -> str:
    """A terminating fraction as a decimal string (``27/20`` -> ``1.35``) for people to read."""
    return str(Decimal(value.numerator) / Decimal(value.denominator))


ImageRule = TileImageRule | PatchImageRule | ClaudeImageRule


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """How to count one canonical model's requests."""

    provider: str  # "openai" | "anthropic"
    encoding: str  # tiktoken encoding (for Claude: the base of the offline estimate)
    framing: ChatFraming
    image: ImageRule
    tools: ToolFraming | None = None  # OpenAI tool-definition constants
    claude_safety_factor: Fraction | None = None  # Claude estimate = ceil(o200k count x factor)
    claude_tool_prompt: tuple[int, int] | None = None  # tool-use system prompt: (auto|none, any|tool)

    @property
    def exact_offline(self) -> bool:
        """True when the offline count is exact (OpenAI), False when it is an estimate (Claude)."""
        return self.claude_safety_factor is None


CHATML = ChatFraming()
CHATML_0301 = ChatFraming(tokens_per_message=4, tokens_per_name=-1)
CLAUDE_FRAMING = ChatFraming(tokens_per_message=3, tokens_per_name=0, reply_priming=3)

TOOLS_CL100K = ToolFraming(func_init=10, prop_init=3, prop_key=3, enum_init=-3, enum_item=3, func_end=12)
TOOLS_O200K = ToolFraming(func_init=7, prop_init=3, prop_key=3, enum_init=-3, enum_item=3, func_end=12)

IMG_85 = TileImageRule(base_tokens=85, tile_tokens=170)
IMG_4O_MINI = TileImageRule(base_tokens=2833, tile_tokens=5667)
IMG_O_SERIES = TileImageRule(base_tokens=75, tile_tokens=150)
IMG_GPT5 = TileImageRule(base_tokens=70, tile_tokens=140)
IMG_PATCH_MINI = PatchImageRule(multiplier=Fraction("1.62"))
IMG_PATCH_NANO = PatchImageRule(multiplier=Fraction("2.46"))
IMG_PATCH_O4_MINI = PatchImageRule(multiplier=Fraction("1.72"))
IMG_CLAUDE = ClaudeImageRule()


def _openai(encoding: str, image: ImageRule, framing: ChatFraming = CHATML) -> ModelSpec:
    tools = TOOLS_O200K if encoding == "o200k_base" else TOOLS_CL100K
    return ModelSpec("openai", encoding, framing, image, tools=tools)


def _claude(factor: str, tool_prompt: tuple[int, int]) -> ModelSpec:
    return ModelSpec(
        "anthropic",
        "o200k_base",
        CLAUDE_FRAMING,
        IMG_CLAUDE,
        claude_safety_factor=Fraction(factor),
        claude_tool_prompt=tool_prompt,
    )


_CL = "cl100k_base"
_O2 = "o200k_base"
# Anthropic "Tool use - pricing": tool-use system prompt tokens, (auto or none, any or tool).
_TOOLS_CLAUDE_4 = (346, 313)  # Claude 4.x, 3.7 Sonnet, 3.5 Sonnet
_TOOLS_HAIKU_3 = (264, 340)  # Claude 3 Haiku and 3.5 Haiku

#: Canonical model name -> how to count it.
MODELS: dict[str, ModelSpec] = {
    # OpenAI, cl100k_base
    "gpt-3.5-turbo": _openai(_CL, IMG_85),
    "gpt-3.5-turbo-16k": _openai(_CL, IMG_85),
    "gpt-3.5-turbo-0301": _openai(_CL, IMG_85, CHATML_0301),
    "gpt-4": _openai(_CL, IMG_85),
    "gpt-4-32k": _openai(_CL, IMG_85),
    "gpt-4-turbo": _openai(_CL, IMG_85),
    "gpt-4-turbo-preview": _openai(_CL, IMG_85),
    "gpt-4-1106-preview": _openai(_CL, IMG_85),
    "gpt-4-0125-preview": _openai(_CL, IMG_85),
    "gpt-4-vision-preview": _openai(_CL, IMG_85),
    "gpt-4-1106-vision-preview": _openai(_CL, IMG_85),
    # OpenAI, o200k_base
    "gpt-4o": _openai(_O2, IMG_85),
    "chatgpt-4o-latest": _openai(_O2, IMG_85),
    "gpt-4o-mini": _openai(_O2, IMG_4O_MINI),
    "gpt-4.1": _openai(_O2, IMG_85),
    "gpt-4.1-mini": _openai(_O2, IMG_PATCH_MINI),
    "gpt-4.1-nano": _openai(_O2, IMG_PATCH_NANO),
    "gpt-4.5-preview": _openai(_O2, IMG_85),
    "o1": _openai(_O2, IMG_O_SERIES),
    "o1-pro": _openai(_O2, IMG_O_SERIES),
    "o1-mini": _openai(_O2, IMG_O_SERIES),
    "o1-preview": _openai(_O2, IMG_O_SERIES),
    "o3": _openai(_O2, IMG_O_SERIES),
    "o3-pro": _openai(_O2, IMG_O_SERIES),
    "o3-mini": _openai(_O2, IMG_O_SERIES),
    "o4-mini": _openai(_O2, IMG_PATCH_O4_MINI),
    "gpt-5": _openai(_O2, IMG_GPT5),
    "gpt-5-chat-latest": _openai(_O2, IMG_GPT5),
    "gpt-5-mini": _openai(_O2, IMG_PATCH_MINI),
    "gpt-5-nano": _openai(_O2, IMG_PATCH_NANO),
    "gpt-5.1": _openai(_O2, IMG_GPT5),
    # Anthropic (offline counts are estimates; the exact count comes from messages.count_tokens)
    "claude-3-opus": _claude("1.35", (530, 281)),
    "claude-3-sonnet": _claude("1.35", (159, 235)),
    "claude-3-haiku": _claude("1.35", _TOOLS_HAIKU_3),
    "claude-3-5-sonnet": _claude("1.35", _TOOLS_CLAUDE_4),
    "claude-3-5-haiku": _claude("1.35", _TOOLS_HAIKU_3),
    "claude-3-7-sonnet": _claude("1.35", _TOOLS_CLAUDE_4),
    "claude-sonnet-4": _claude("1.35", _TOOLS_CLAUDE_4),
    "claude-opus-4": _claude("1.35", _TOOLS_CLAUDE_4),
    "claude-opus-4-1": _claude("1.35", _TOOLS_CLAUDE_4),
    "claude-sonnet-4-5": _claude("1.35", _TOOLS_CLAUDE_4),
    "claude-haiku-4-5": _claude("1.35", _TOOLS_CLAUDE_4),
    "claude-opus-4-5": _claude("1.35", _TOOLS_CLAUDE_4),
    "claude-sonnet-4-6": _claude("1.35", _TOOLS_CLAUDE_4),
    "claude-opus-4-6": _claude("1.35", _TOOLS_CLAUDE_4),
    # Opus 4.7 moved to a tokenizer that Anthropic says yields up to 35% more tokens for the same text.
    "claude-opus-4-7": _claude("1.8", _TOOLS_CLAUDE_4),
}

#: Other names gateways and clients use -> canonical name.
ALIASES: dict[str, str] = {
    "gpt-4-turbo-2024-04-09": "gpt-4-turbo",
    "gpt-4.5": "gpt-4.5-preview",
    "claude-3.5-sonnet": "claude-3-5-sonnet",
    "claude-3.5-haiku": "claude-3-5-haiku",
    "claude-3.7-sonnet": "claude-3-7-sonnet",
    "claude-4-sonnet": "claude-sonnet-4",
    "claude-4-opus": "claude-opus-4",
    "claude-sonnet-4.5": "claude-sonnet-4-5",
    "claude-haiku-4.5": "claude-haiku-4-5",
    "claude-opus-4.1": "claude-opus-4-1",
    "claude-opus-4.5": "claude-opus-4-5",
    "claude-sonnet-4.6": "claude-sonnet-4-6",
    "claude-opus-4.6": "claude-opus-4-6",
    "claude-opus-4.7": "claude-opus-4-7",
}

#: Provider prefixes gateways put in front of model names (LiteLLM style).
PROVIDER_PREFIXES: tuple[str, ...] = ("openai/", "anthropic/")

#: Suffixes that mark a dated snapshot or a moving pointer of a model; stripped one at a time.
SNAPSHOT_SUFFIXES: tuple[re.Pattern[str], ...] = (
    re.compile(r"-\d{4}-\d{2}-\d{2}$"),  # gpt-4o-2024-08-06
    re.compile(r"-\d{8}$"),  # claude-3-5-sonnet-20241022
    re.compile(r"-\d{4}$"),  # gpt-4-0613, gpt-3.5-turbo-1106
    re.compile(r"-latest$"),  # claude-3-5-sonnet-latest
    re.compile(r"-v\d+(:\d+)?$"),  # bedrock-style -v1:0
)
