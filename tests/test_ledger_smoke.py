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
