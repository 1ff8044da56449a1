"""The report's options (no pandas here: the command line reads them at start-up)."""

from __future__ import annotations

#: ``--by`` fields and the report columns each one adds.
BY_FIELDS: dict[str, tuple[str, ...]] = {
    "day": ("day",), "user": ("user_id", "user_name"), "model": ("model",), "key": ("key_id", "key_prefix"),
    "channel": ("channel",),
}
#: ``--format`` values.
FORMATS = ("table", "csv", "json", "html")
