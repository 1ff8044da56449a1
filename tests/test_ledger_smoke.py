"""The ledger's basic flow on every database: credit, authorize, settle, release, audit."""

from __future__ import annotations

from metering import Meter, QuotaExceeded

BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 100}
RESPONSE = {"model": "gpt-4o", "choices": [{"message": {"role": "assistant", "content": "Hi!"}}],
            "usage": {"prompt_tokens": 8, "completion_tokens": 3}}


def test_the_basic_flow(ledger_url: str) -> None:
    meter = Meter.open(ledger_url)
    try:
        uid = meter.create_user("alice")
        assert meter.grant(uid, "signup") == 100_000 and meter.grant(uid, "signup") == 0  # $0.2, once
        assert meter.topup(uid, "10", "CNY", "order-1") == 5_000_000  # 1 CNY = $1 promotion
        assert meter.topup(uid, "10", "CNY", "order-1") == 5_000_000 and meter.balance(uid) == 5_100_000
        secret = meter.create_key(uid, "k1")
        hold = meter.authorize(secret, BODY, "req-1")
        # gpt-4o: 8 prompt tokens (cookbook framing) x $2.50 + 100 max tokens x $10 per 1M = $0.00102 -> 510 units
        assert hold.amount == 510 and meter.balance(uid) == 5_100_000 - 510
        receipt = meter.settle(hold, response=RESPONSE)
        assert receipt.quota == 25  # 8 x $2.50 + 3 x $10 per 1M = $0.00005 -> 25 units
        assert meter.settle(hold, response=RESPONSE) == receipt and meter.balance(uid) == 5_100_000 - 25
        second = meter.authorize(secret, BODY, "req-2")
        assert meter.release(second) and not meter.release(second)
        assert meter.balance(uid) == 5_100_000 - 25
        assert meter.audit().ok
        poor = meter.create_user("bob")
        try:
            meter.authorize(meter.create_key(poor, "k"), BODY, "req-3")
        except QuotaExceeded as exc:
            assert (exc.needed, exc.available) == (510, 0) and exc.openai_error()[0] == 429
        else:
            raise AssertionError("an empty balance must refuse")
    finally:
        meter.close()


def test_a_cut_stream_without_usage_bills_the_holds_prompt_count(tmp_path) -> None:
    meter = Meter.open(f"sqlite:///{tmp_path}/l.db")
    uid = meter.create_user("alice")
    meter.topup(uid, "1", "USD", "o-1")
    hold = meter.authorize(meter.create_key(uid, "k"), BODY, "req-1")
    accumulator = meter.accumulator(hold)
    accumulator.feed(b'data: {"choices": [{"index": 0, "delta": {"content": "Hello"}}]}\n\n')  # then the stream is cut
    receipt = meter.settle(hold, stream=accumulator)
    # input: the hold's 8 prompt tokens; output: "Hello" = 1 token (o200k). gpt-4o: (8 x 2.5 + 1 x 10) / 1M = $0.00003 = 15 units
    assert (receipt.outcome, receipt.quota, receipt.source) == ("aborted", 15, "local")
    meter.close()


def test_sqlite_on_a_network_filesystem_is_refused(tmp_path, monkeypatch) -> None:
    import pytest

    from metering.ledger import UnsafeDatabase, database

    monkeypatch.setattr(database, "filesystem_type", lambda path: "nfs4")  # as /proc/mounts would say on NFS
    with pytest.raises(UnsafeDatabase, match="network filesystem"):
        Meter.open(f"sqlite:///{tmp_path}/ledger.db")


def test_the_longest_mount_point_decides_the_filesystem() -> None:
    from pathlib import Path

    from metering.ledger.database import filesystem_type

    mounts = "/dev/sda1 / ext4 rw 0 0\nfiler:/export /srv/data nfs4 rw 0 0\nfiler:/x /srv/data/local\\040dir ext4 rw 0 0\n"
    assert filesystem_type(Path("/srv/data/ledger"), mounts) == "nfs4"
    assert filesystem_type(Path("/srv/data/local dir/ledger"), mounts) == "ext4"  # \040 is a space in /proc/mounts
    assert filesystem_type(Path("/srv/database"), mounts) == "ext4"  # a prefix of the name is not a parent
