"""The account health score equals a from-scratch computation on PostgreSQL."""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from headrace.scores.config import HealthScoreConfig
from headrace.scores.health import window_start, worst_accounts
from tests.conftest import PgDatabase
from tests.rules.bank import Bank, open_bank

HOUR = 3600.0
CONFIG = "\nscores:\n  health: {}\n"

REFERENCE = """
WITH tx AS (
    SELECT account_id, count(*) AS n,
           count(*) FILTER (WHERE status = 'declined') AS declined,
           count(*) FILTER (WHERE status = 'reversed') AS reversed,
           coalesce(sum(amount) FILTER (WHERE type IN ('purchase', 'withdrawal', 'transfer_out',
               'fee') AND status NOT IN ('declined', 'reversed')), 0)::float8 AS outflow,
           coalesce(sum(amount) FILTER (WHERE type IN ('refund', 'transfer_in')
               AND status NOT IN ('declined', 'reversed')), 0)::float8 AS inflow
    FROM transactions
    WHERE to_timestamp(floor(extract(epoch FROM created_at) / 300) * 300) >= %(start)s
    GROUP BY account_id
), firsts AS (
    SELECT l.*, success AND row_number() OVER (PARTITION BY customer_id, device, success
                                               ORDER BY at, id) = 1 AS first_seen
    FROM logins l
), lg AS (
    SELECT customer_id, count(*) FILTER (WHERE NOT success) AS failed,
           count(*) FILTER (WHERE first_seen) AS new_devices
    FROM firsts
    WHERE to_timestamp(floor(extract(epoch FROM at) / 300) * 300) >= %(start)s
    GROUP BY customer_id
), c AS (
    SELECT a.id, a.balance::float8 AS balance, coalesce(tx.n, 0) AS n,
           coalesce(tx.declined, 0) AS declined, coalesce(tx.reversed, 0) AS reversed,
           coalesce(tx.outflow, 0) AS outflow, coalesce(tx.inflow, 0) AS inflow,
           coalesce(lg.failed, 0) AS failed, coalesce(lg.new_devices, 0) AS new_devices
    FROM accounts a LEFT JOIN tx ON tx.account_id = a.id
    LEFT JOIN lg ON lg.customer_id = a.customer_id
)
SELECT id, n, declined, reversed, failed, new_devices,
       greatest(0, least(100, 100 - (
           25.0 * declined / greatest(n, 4)
           + 15.0 * least(1.0, greatest(0.0, (n - 40) / 160.0))
           + least(15.0, 5.0 * reversed)
           + 20.0 * least(1.0, greatest(0.0, (outflow - inflow)
                                             / greatest(balance + outflow - inflow, 1.0)))
           + CASE WHEN balance < 0 THEN 15.0 ELSE 0.0 END
           + least(15.0, 3.0 * failed)
           + least(20.0, 10.0 * new_devices)))) AS score
FROM c ORDER BY id
"""


def check_scores(
    bank: Bank, pg_db: PgDatabase, config: HealthScoreConfig | None = None
) -> dict[int, float]:
    """Every account's stored score equals the reference at the job's watermark (the
    reference's weights are the defaults; ``config`` may change the window)."""
    ((watermark,),) = bank.duck(
        "SELECT watermark FROM headrace.job_watermarks WHERE job = 'health_score'"
    )
    assert isinstance(watermark, datetime)
    start = window_start(config or HealthScoreConfig(), watermark)
    expected = pg_db.fetchall(REFERENCE, {"start": start})  # type: ignore[arg-type]
    stored = {
        int(r[0]): (float(r[1]), json.loads(str(r[2])))
        for r in bank.duck("SELECT account_id, score, components FROM headrace.health_scores")
    }
    assert len(stored) == len(expected)
    scores = {}
    for account, n, declined, reversed_, failed, new_devices, score in expected:
        got, components = stored[int(account)]  # type: ignore[call-overload]
        want: Any = (n, declined, reversed_, failed, new_devices)
        have = tuple(
            components[k]
            for k in ("transactions", "declined", "reversed", "failed_logins", "new_devices")
        )
        assert have == want, (account, have, want)
        assert math.isclose(got, float(score), abs_tol=1e-9), (account, got, score)  # type: ignore[arg-type]
        scores[int(account)] = got  # type: ignore[call-overload]
    return scores


def test_health_score_matches_a_from_scratch_computation(pg_db: PgDatabase, tmp_path: Path) -> None:
    before = (  # history loaded by the snapshot: the score is rebuilt from the mirrors
        "INSERT INTO logins VALUES (100, 1, true, NULL, 'old-phone', '10.0.0.1', 'DE', "
        "'2026-03-02 10:00+00'), (101, 2, false, 'bad_password', 'old-phone', '10.0.0.1', 'DE', "
        "'2026-03-02 10:01+00')",
        "INSERT INTO transactions (id, account_id, card_id, merchant_id, amount, currency, "
        "channel, type, status, decline_reason, country, created_at, updated_at) VALUES "
        "(1, 1, 1, 1, 100, 'EUR', 'pos', 'purchase', 'declined', 'x', 'DE', "
        "'2026-03-02 09:00+00', '2026-03-02 09:00+00'), "
        "(2, 2, 2, 1, 700, 'EUR', 'pos', 'purchase', 'settled', NULL, 'DE', "
        "'2026-03-01 09:00+00', '2026-03-01 09:00+00')",  # 27 h before T0
    )
    bank = open_bank(pg_db, tmp_path, CONFIG, before_snapshot=before)
    first = check_scores(bank, pg_db)
    assert first[1] < 100  # a decline
    assert first[2] == 97.0  # a failed login

    ids = []
    for n in range(12):
        ids.append(bank.tx(1, 50 + n, n * 60, status="pending"))
        bank.tx(2, 20, n * 120, channel="online", device="phone-1")
    bank.tx(3, 4_000, 300, channel="transfer", type="transfer_out")
    bank.tx(3, 500, 400, channel="transfer", type="transfer_in")
    bank.login(1, 100, device="old-phone")  # known
    bank.login(1, 200, device="tablet")  # new
    bank.login(4, 300, success=False)
    bank.login(4, 310, success=False)
    bank.login(4, 320)  # customer 4's first login ever: a new device
    bank.sync()
    check_scores(bank, pg_db)

    for tx_id in ids[:5]:
        bank.set_status(tx_id, "declined")
    for tx_id in ids[5:8]:
        bank.set_status(tx_id, "reversed")
    bank.execute(f"DELETE FROM transactions WHERE id = {ids[11]}")
    bank.set_balance(3, -50)
    bank.sync()
    scores = check_scores(bank, pg_db)
    assert scores[3] < scores[5] == 100.0
    worst = worst_accounts(bank.store.writer, 2)
    assert (
        worst.column("account_id").to_pylist()
        == [a for a, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]))][:2]
    )

    bank.restart()
    bank.tx(5, 10, 23 * HOUR)  # the window still holds everything since T0
    bank.sync()
    check_scores(bank, pg_db)
    bank.tx(5, 10, 25 * HOUR)  # the window moves: T0's first hour leaves it
    bank.sync()
    later = check_scores(bank, pg_db)
    assert later[1] > scores[1]
    history = bank.duck("SELECT count(*), count(DISTINCT account_id) FROM headrace.health_history")
    assert history[0][0] > history[0][1]  # several points per account

    # A closed account (its card first: foreign key) leaves the scores, in the same
    # batch as another account's change; the others stay exact.
    assert 6 in later
    bank.execute("DELETE FROM cards WHERE account_id = 6", "DELETE FROM accounts WHERE id = 6")
    bank.set_balance(4, 10)
    bank.sync()
    closed = check_scores(bank, pg_db)
    assert 6 not in closed
    assert 4 in closed
    bank.close()
