"""The command line contract: names, JSON fields, exit codes (run as a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parents[1] / "metering" / "samples" / "requests"


def metering(*args: str, stdin: str | None = None, module: str = "metering") -> subprocess.CompletedProcess[str]:
    """``python -m metering ARGS``; ``module="workers"``: the whole command line (the console script's)."""
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", module, *args], input=stdin, capture_output=True, text=True, env=env)


def test_count_json_for_the_cookbook_sample() -> None:
    out = metering("count", "--request", str(SAMPLES / "openai-cookbook-messages.json"), "--json")
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    # OpenAI cookbook: these messages are 124 prompt tokens on gpt-4o.
    assert payload["prompt_tokens"] == 124
    assert payload["model"] == "gpt-4o" and payload["encoding"] == "o200k_base" and payload["source"] == "local"


def test_count_reads_stdin_and_model_overrides_the_body() -> None:
    body = (SAMPLES / "openai-cookbook-messages.json").read_text()
    out = metering("count", "--request", "-", "--model", "gpt-4-0613", "--json", stdin=body)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["prompt_tokens"] == 129  # the cookbook's gpt-4 figure
    assert json.loads(out.stdout)["encoding"] == "cl100k_base"


def test_claude_estimate_has_no_encoding() -> None:
    out = metering("count", "-r", str(SAMPLES / "claude-vision-tools.json"), "--json")
    payload = json.loads(out.stdout)
    assert payload["encoding"] is None and payload["source"] == "estimated" and payload["prompt_tokens"] > 0


def test_bad_input_exits_2_naming_the_json_path() -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                            {"role": "user", "content": "c"},
                                            {"role": "user", "content": [{"type": "text", "text": "d"},
                                                                         {"type": "image_url", "image_url": 7}]}]}
    out = metering("count", "--request", "-", "--json", stdin=json.dumps(body))
    assert out.returncode == 2
    assert "messages[3].content[1].image_url" in out.stderr
    assert out.stdout == ""


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        ('{"model": "gpt-4o",\n "messages": [}', "line 2"),
        ('{"model": "gpt-9", "messages": []}', "unknown model 'gpt-9'"),
        ('[1, 2]', "request body must be a JSON object"),
        ('{"messages": []}', "model: is required"),
    ],
)
def test_other_bad_input_exits_2(stdin: str, message: str) -> None:
    out = metering("count", "-r", "-", stdin=stdin)
    assert out.returncode == 2
    assert message in out.stderr


def test_missing_file_exits_2() -> None:
    out = metering("count", "-r", "/nonexistent/request.json")
    assert out.returncode == 2 and "cannot read" in out.stderr


def test_image_size_option_makes_a_remote_image_exact() -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}
    out = metering("count", "-r", "-", "--json", "--image-size", "https://example.com/a.png=1024x1024", stdin=json.dumps(body))
    payload = json.loads(out.stdout)
    assert payload["image_tokens"] == 765 and payload["source"] == "local"  # OpenAI doc: 1024x1024 high = 765


@pytest.mark.parametrize("command", [[], ["count"], ["models"]])
def test_every_command_has_help(command: list[str]) -> None:
    out = metering(*command, "--help")
    assert out.returncode == 0 and "Usage" in out.stdout


def test_python_m_metering_and_workers_run_the_whole_command_line() -> None:
    """Both entry points run the console script's app (metering/__main__.py sits above every layer)."""
    assert metering("demo", "--help", module="workers").returncode == 0
    assert metering("demo", "--help").returncode == 0


def test_models_json_lists_the_table() -> None:
    rows = json.loads(metering("models", "--json").stdout)
    by_name = {row["model"]: row for row in rows}
    assert by_name["gpt-4o"]["encoding"] == "o200k_base" and by_name["gpt-4o"]["exact_offline"] is True
    assert by_name["claude-3-opus"]["claude_safety_factor"] == "1.35"


def test_demo_json_counts_and_replays_the_samples(tmp_path: Path) -> None:
    out = metering("demo", "--json", "--days", "1", "--out", str(tmp_path), module="workers")
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    by_sample = {row["sample"]: row for row in payload["requests"]}
    assert by_sample["openai-cookbook-messages.json"]["prompt_tokens"] == 124
    assert by_sample["openai-tools-weather.json"]["prompt_tokens"] == 101  # cookbook, gpt-4o-mini with tools
    statuses = {row["sample"]: row["status"] for row in payload["streams"]}
    assert statuses == {"openai-with-usage.sse": "completed", "openai-cut.sse": "aborted",
                        "anthropic-complete.sse": "completed", "anthropic-error.sse": "error"}
    ledger = payload["ledger"]
    assert ledger["audit_ok"]
    # $0.2 signup + 10 CNY at the promotion = 5,100,000 units, less the three settled streams' quota
    # (each priced in payload["streams"]); the errored stream's hold is released, not charged.
    charged = sum(row["priced"]["quota"] for row in payload["streams"] if row["status"] != "error")
    assert ledger["balance"] == 5_100_000 - charged


def test_demo_plain_output_is_quiet_when_not_a_terminal(tmp_path: Path) -> None:
    out = metering("demo", "--days", "1", "--out", str(tmp_path), module="workers")
    assert out.returncode == 0, out.stderr
    assert "Prompt counts" in out.stdout and "Counting sample requests" not in out.stdout
    assert "Day closes" in out.stdout and "Summary" in out.stdout and "audit" in out.stdout
    assert "Traffic, day" not in out.stdout + out.stderr  # no progress bar off a terminal
