"""The history's rows, drawn as whole numpy columns from one seeded generator.

Used by :mod:`headrace.demo.history`. The mix of transaction kinds, the
amounts, statuses and delays follow the live generator's
(:mod:`headrace.demo.traffic`) so the history and the live stream look alike.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from headrace.demo.bulk import cents_to_decimal
from headrace.demo.clock import DAY_US, SECOND_US, timestamp_array
from headrace.demo.config import (
    ATM_CATEGORY,
    CATEGORY_BY_MCC,
    COUNTRIES,
    EUR_PER_UNIT,
    TIER_BY_NAME,
    HistorySettings,
    NormalEnvelope,
)
from headrace.demo.population import PopulationTables
from headrace.demo.traffic import activity_weights, diurnal_factor
from headrace.demo.traits import device_count_array, device_ip_parts_array, spend_scale_cents_array

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
BOOL = npt.NDArray[np.bool_]

MONTH_DAYS = 30
HOUR_US = 3600 * SECOND_US
# Nothing in the history happens in the last minutes before the anchor, so
# every follow-up (settlement, reversal) also lands before it.
END_MARGIN_US = 10 * 60 * SECOND_US

# Transaction kinds while drawing (mapped to type and channel on output).
POS, ONLINE, ATM, TRANSFER_OUT, TRANSFER_IN, FEE, REFUND = range(7)
_TYPE = np.array(
    ["purchase", "purchase", "withdrawal", "transfer_out", "transfer_in", "fee", "refund"]
)
_OUTFLOW = np.array([True, True, True, True, False, True, False])
# Final statuses while drawing: VOIDED is an authorisation reversed before
# settling (no ledger entry), REVERSED a settled one reversed (two entries).
SETTLED, DECLINED, VOIDED, REVERSED = range(4)
_STATUS = np.array(["settled", "declined", "reversed", "reversed"])
_DECLINE_REASONS = np.array(["do_not_honor", "limit_exceeded", "expired_card"])
_LEDGER_KINDS = np.array(["opening", "settlement", "reversal"])


def avoid_band(cents: I64, envelope: NormalEnvelope) -> I64:
    """Move amounts out of the band just under the structuring threshold (in place)."""
    inside = (cents >= envelope.structuring_band_low_cents) & (
        cents < envelope.structuring_band_high_cents
    )
    cents[inside] = (cents[inside] * 0.8).astype(np.int64)
    return cents


def _ints(array: pa.Array | pa.ChunkedArray) -> I64:
    return np.asarray(array.to_numpy(), np.int64)


def _known_devices(customer_ids: I64, indexes: I64) -> pa.Array:
    """``d<customer hex>-<index>``, as :func:`headrace.demo.traits.known_device`."""
    result: pa.Array = pc.binary_join_element_wise(
        pa.scalar("d"),
        pa.array([f"{c:x}" for c in customer_ids.tolist()], pa.string()),
        pa.scalar("-"),
        pa.array(indexes, pa.int64()).cast(pa.string()),
        "",
    )
    return result


def _addresses(first: I64, customer_ids: I64, indexes: I64) -> pa.Array:
    """The known devices' addresses, as :func:`headrace.demo.traits.device_ip`."""
    second, third, fourth = device_ip_parts_array(customer_ids, indexes)
    parts = [pa.array(p, pa.int64()).cast(pa.string()) for p in (first, second, third, fourth)]
    result: pa.Array = pc.binary_join_element_wise(*parts, ".")
    return result


@dataclass
class _Txn:
    """Transaction columns while drawing (one entry per transaction)."""

    acct: I64  # account index (id - 1)
    kind: I64  # POS .. REFUND
    merchant: I64  # merchant id, -1 for none
    card: I64  # card id, -1 for none
    country: I64  # country index
    amount: I64  # cents
    status: I64  # SETTLED .. REVERSED
    created: I64  # us
    settle_at: I64  # when it settled (or would have)
    final_at: I64  # when it reached its final status
    device: I64  # index of the customer's known device
    parent: I64  # index of the parent row in the draw, -1 for none
    reason: I64  # decline reason index

    def take(self, index: I64) -> _Txn:
        return _Txn(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @staticmethod
    def concat(parts: list[_Txn]) -> _Txn:
        return _Txn(
            **{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(_Txn)}
        )


class HistoryDraw:
    """Draws transactions, ledger entries and logins for one history window."""

    def __init__(
        self, settings: HistorySettings, tables: PopulationTables, start_us: int, end_us: int
    ) -> None:
        self.settings = settings
        self.envelope = settings.envelope
        self.rng = np.random.default_rng(settings.seed)
        self.start_us = start_us
        self.end_us = end_us - END_MARGIN_US
        self.codes = np.array([c.code for c in COUNTRIES])
        self.ip_octets = np.array([c.ip_octet for c in COUNTRIES], np.int64)
        self._frame(tables)
        self._txn: _Txn | None = None
        self._ids: I64 = np.zeros(0, np.int64)

    def _frame(self, tables: PopulationTables) -> None:
        """The population as columns indexed by id - 1."""
        index = {code: i for i, code in enumerate(self.codes.tolist())}
        customers, accounts, cards, merchants = (
            tables.customers,
            tables.accounts,
            tables.cards,
            tables.merchants,
        )
        self.customer_ids = _ints(customers.column("id"))
        self.customer_country = np.array(
            [index[c] for c in customers.column("country").to_pylist()], np.int64
        )
        self.customer_created = _ints(customers.column("created_at").cast(pa.int64()))
        self.account_ids = _ints(accounts.column("id"))
        self.account_customer = _ints(accounts.column("customer_id"))
        self.account_country = self.customer_country[self.account_customer - 1]
        self.account_active = np.array(
            [s == "active" for s in accounts.column("status").to_pylist()], np.bool_
        )
        self.account_opened = np.asarray(tables.opened_us, np.int64)
        self.opening_cents = np.asarray(tables.opening_cents, np.int64)
        currencies = accounts.column("currency").to_pylist()
        self.account_currency = np.array(currencies)
        self.eur_per_unit = np.array([EUR_PER_UNIT[c] for c in currencies])
        self.account_scale = spend_scale_cents_array(
            self.account_ids,
            np.array([TIER_BY_NAME[t].spend_eur for t in accounts.column("tier").to_pylist()]),
            self.eur_per_unit,
        )
        # the card each kind of use goes on: the first active physical card;
        # online the virtual card when there is one
        self.physical_card = np.full(len(self.account_ids), -1, np.int64)
        self.online_card = np.full(len(self.account_ids), -1, np.int64)
        for card_id, account_id, kind, status in zip(
            *(cards.column(n).to_pylist() for n in ("id", "account_id", "kind", "status")),
            strict=True,
        ):
            if status != "active":
                continue
            if kind == "physical" and self.physical_card[account_id - 1] < 0:
                self.physical_card[account_id - 1] = card_id
            if self.online_card[account_id - 1] < 0 or kind == "virtual":
                self.online_card[account_id - 1] = card_id
        ids = _ints(merchants.column("id"))
        mccs = merchants.column("mcc").to_pylist()
        country = np.array([index[c] for c in merchants.column("country").to_pylist()])
        shop = np.asarray(merchants.column("card_present").to_numpy(zero_copy_only=False))
        web = np.asarray(merchants.column("online").to_numpy(zero_copy_only=False))
        atm = np.array([mcc == ATM_CATEGORY.mcc for mcc in mccs])
        self.merchant_factor = np.array([CATEGORY_BY_MCC[mcc].amount_factor for mcc in mccs])
        self.merchant_country = country
        countries = range(len(self.codes))
        self.pos_by_country = [ids[(country == c) & shop & ~atm] for c in countries]
        self.atm_by_country = [ids[(country == c) & atm] for c in countries]
        self.online_by_country = [ids[(country == c) & web] for c in countries]
        self.online_all = ids[web]

    # -- helpers --------------------------------------------------------------------

    def _diurnal_times(self, lower: I64) -> I64:
        """Times in [lower, end) with the generator's daily rhythm."""
        rng = self.rng
        raw = lower + (rng.random(len(lower)) * (self.end_us - lower)).astype(np.int64)
        amplitude = self.settings.diurnal_amplitude
        weights = np.array(
            [diurnal_factor(h * HOUR_US + HOUR_US // 2, amplitude) for h in range(24)]
        )
        hour = rng.choice(24, size=len(lower), p=weights / weights.sum())
        within = (rng.random(len(lower)) * HOUR_US).astype(np.int64)
        shaped = raw - raw % DAY_US + hour * HOUR_US + within
        keep = (shaped >= lower) & (shaped < self.end_us)
        return np.where(keep, shaped, raw)

    def _seconds(self, low: float, high: float, size: int) -> I64:
        return (self.rng.uniform(low, high, size) * SECOND_US).astype(np.int64)

    def _pick(self, pool: I64, size: int) -> I64:
        return pool[self.rng.integers(0, len(pool), size)]

    # -- transactions -------------------------------------------------------------------

    def transactions(self) -> pa.Table:
        """Every transaction of the window in time order, ids from 1."""
        base = self._base()
        txn = _Txn.concat([base, self._fees(base), self._refunds(base)])
        order = np.argsort(txn.created, kind="stable")
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order))
        txn = txn.take(order)
        txn.parent = np.where(txn.parent >= 0, rank[np.maximum(txn.parent, 0)], -1)
        self._txn = txn
        self._ids = np.arange(1, len(order) + 1, dtype=np.int64)
        return self._transaction_table(txn)

    def _base(self) -> _Txn:
        """The transactions accounts start themselves (all but fees and refunds)."""
        s = self.settings
        rng = self.rng
        weights = np.array(activity_weights(len(self.account_ids), s.seed, s.zipf_exponent))
        weights = np.where(self.account_active, weights, 0.0)
        begin = np.maximum(self.start_us, self.account_opened + HOUR_US)
        days = np.clip((self.end_us - begin) / DAY_US, 0.0, None)
        total = s.transactions_per_account_month * s.months * self.account_active.sum()
        expected = total * weights / weights.sum() * days / (MONTH_DAYS * s.months)
        expected = np.minimum(expected, s.max_transactions_per_account_day * days)
        acct = np.repeat(np.arange(len(self.account_ids)), rng.poisson(expected))
        n = len(acct)
        kind = self._kinds(acct)
        merchant = self._merchants(acct, kind)
        country = self.account_country[acct].copy()
        has_merchant = merchant >= 0
        country[has_merchant] = self.merchant_country[merchant[has_merchant] - 1]
        card = np.where(
            (kind == POS) | (kind == ATM),
            self.physical_card[acct],
            np.where(kind == ONLINE, self.online_card[acct], -1),
        )
        created = self._diurnal_times(begin[acct])
        status = self._statuses(kind)
        settle_at = created + self._seconds(1.0, 8.0, n)
        final_at = np.select(
            [status == DECLINED, status == VOIDED, status == REVERSED],
            [
                created + self._seconds(0.2, 1.5, n),
                created + self._seconds(2.0, 20.0, n),
                settle_at + self._seconds(5.0, 90.0, n),
            ],
            settle_at,
        )
        devices = device_count_array(self.account_customer[acct])
        return _Txn(
            acct=acct,
            kind=kind,
            merchant=merchant,
            card=card,
            country=country,
            amount=self._amounts(acct, kind, merchant),
            status=status,
            created=created,
            settle_at=settle_at,
            final_at=final_at,
            device=(rng.random(n) * devices).astype(np.int64),
            parent=np.full(n, -1, np.int64),
            reason=rng.integers(0, len(_DECLINE_REASONS), n),
        )

    def _kinds(self, acct: I64) -> I64:
        """The live generator's mix; accounts without a usable card transfer instead."""
        roll = self.rng.random(len(acct)) * 100.0
        kind = np.full(len(acct), TRANSFER_IN, np.int64)
        kind[roll < 90.0] = TRANSFER_OUT
        kind[roll < 80.5] = ATM
        kind[roll < 74.5] = ONLINE
        kind[roll < 46.5] = POS
        no_physical = self.physical_card[acct] < 0
        kind[((kind == POS) | (kind == ATM)) & no_physical] = TRANSFER_OUT
        kind[(kind == ONLINE) & (self.online_card[acct] < 0)] = TRANSFER_OUT
        return kind

    def _merchants(self, acct: I64, kind: I64) -> I64:
        """Shops and cash machines at home; web shops 75% at home, else anywhere."""
        merchant = np.full(len(acct), -1, np.int64)
        home = self.account_country[acct]
        local_web = self.rng.random(len(acct)) < 0.75
        for c in range(len(self.codes)):
            here = home == c
            for mask, pool in (
                (here & (kind == POS), self.pos_by_country[c]),
                (here & (kind == ATM), self.atm_by_country[c]),
                (here & (kind == ONLINE) & local_web, self.online_by_country[c]),
            ):
                if mask.any() and len(pool):
                    merchant[mask] = self._pick(pool, int(mask.sum()))
        rest = (kind == ONLINE) & (merchant < 0)
        merchant[rest] = self._pick(self.online_all, int(rest.sum()))
        return merchant

    def _amounts(self, acct: I64, kind: I64, merchant: I64) -> I64:
        """Amounts within the normal envelope, in cents of the account's currency."""
        rng = self.rng
        n = len(acct)
        scale = self.account_scale[acct]
        limit = self.envelope.max_ticket_factor
        noise = np.clip(rng.lognormal(0.0, 0.5, n), 1.0 / limit, limit)
        factor = np.where(merchant >= 0, self.merchant_factor[np.maximum(merchant, 1) - 1], 1.0)
        ticket = np.maximum(np.round(scale * factor * noise), self.envelope.min_card_amount_cents)
        cash_units = rng.uniform(20.0, 300.0, n) / self.eur_per_unit[acct]
        cash = np.maximum(1, np.round(cash_units / 10.0)) * 1000
        out = np.round(scale * rng.uniform(2.0, 15.0, n))
        inflow = np.round(scale * rng.uniform(5.0, 40.0, n))
        amount = np.select(
            [(kind == POS) | (kind == ONLINE), kind == ATM, kind == TRANSFER_OUT],
            [ticket, cash, out],
            inflow,
        ).astype(np.int64)
        return avoid_band(np.maximum(amount, 100), self.envelope)

    def _statuses(self, kind: I64) -> I64:
        """Card purchases: 2% declined, 0.3% voided, 0.5% reversed after settling."""
        outcome = self.rng.random(len(kind))
        card = (kind == POS) | (kind == ONLINE)
        status = np.full(len(kind), SETTLED, np.int64)
        status[card & (outcome > 0.995)] = REVERSED
        status[card & (outcome < 0.023)] = VOIDED
        status[card & (outcome < 0.02)] = DECLINED
        return status

    def _fees(self, base: _Txn) -> _Txn:
        """A fee on 30% of withdrawals, booked when the withdrawal settles."""
        of = np.flatnonzero((base.kind == ATM) & (self.rng.random(len(base.kind)) < 0.3))
        fees = base.take(of)
        fees.kind = np.full(len(of), FEE, np.int64)
        fees.amount = self.rng.integers(150, 500, len(of))
        fees.created = fees.final_at = fees.settle_at
        fees.parent = of
        return fees

    def _refunds(self, base: _Txn) -> _Txn:
        """Refunds of 1.5% of settled purchases, an hour to ten days later."""
        rng = self.rng
        delay = self._seconds(3600.0, 10 * 86400.0, len(base.kind))
        purchase = (base.kind == POS) | (base.kind == ONLINE)
        of = np.flatnonzero(
            purchase
            & (base.status == SETTLED)
            & (rng.random(len(base.kind)) < 0.015)
            & (base.settle_at + delay < self.end_us)
        )
        refunds = base.take(of)
        full = rng.random(len(of)) < 0.6
        partial = (refunds.amount * rng.uniform(0.3, 0.9, len(of))).astype(np.int64)
        refunds.amount = avoid_band(
            np.maximum(np.where(full, refunds.amount, partial), 1), self.envelope
        )
        refunds.kind = np.full(len(of), REFUND, np.int64)
        refunds.status = np.full(len(of), SETTLED, np.int64)
        refunds.created = refunds.settle_at + delay[of]
        refunds.settle_at = refunds.final_at = refunds.created + self._seconds(1.0, 5.0, len(of))
        refunds.parent = of
        return refunds

    def _transaction_table(self, txn: _Txn) -> pa.Table:
        channel = np.select(
            [txn.kind == POS, txn.kind == ONLINE, txn.kind == ATM],
            ["pos", "online", "atm"],
            "transfer",
        )
        has_parent = txn.parent >= 0
        channel[has_parent] = channel[txn.parent[has_parent]]  # fees, refunds: the parent's
        terminal = pa.array((channel == "pos") | (channel == "atm"))
        customers = self.account_customer[txn.acct]
        at_terminal = pc.binary_join_element_wise(
            pa.array(np.where(channel == "atm", "atm-", "pos-")),
            pa.array(txn.merchant, pa.int64()).cast(pa.string()),
            "",
        )
        device = pc.if_else(terminal, at_terminal, _known_devices(customers, txn.device))
        ip = _addresses(self.ip_octets[self.account_country[txn.acct]], customers, txn.device)
        reason = _DECLINE_REASONS[txn.reason].astype(object)
        reason[txn.status != DECLINED] = None
        parent_id = np.where(has_parent, txn.parent + 1, -1)
        return pa.table(
            {
                "id": pa.array(self._ids, pa.int64()),
                "account_id": pa.array(self.account_ids[txn.acct], pa.int64()),
                "card_id": pa.array(txn.card, pa.int64(), mask=txn.card < 0),
                "merchant_id": pa.array(txn.merchant, pa.int64(), mask=txn.merchant < 0),
                "parent_id": pa.array(parent_id, pa.int64(), mask=parent_id < 0),
                "amount": cents_to_decimal(txn.amount),
                "currency": pa.array(self.account_currency[txn.acct]),
                "channel": pa.array(channel),
                "type": pa.array(_TYPE[txn.kind]),
                "status": pa.array(_STATUS[txn.status]),
                "decline_reason": pa.array(reason, pa.string()),
                "country": pa.array(self.codes[txn.country]),
                "device": device,
                "ip": pc.if_else(terminal, pa.nulls(len(txn.kind), pa.string()), ip),
                "created_at": timestamp_array(txn.created),
                "updated_at": timestamp_array(txn.final_at),
            }
        )

    # -- ledger ----------------------------------------------------------------------

    def ledger(self) -> tuple[pa.Table, I64]:
        """Opening, settlement and reversal entries; and each account's final balance.

        Opening deposits are raised where needed so that no balance goes
        negative anywhere in the history. Call after :meth:`transactions`.
        """
        txn = self._txn
        if txn is None:
            raise RuntimeError("draw the transactions first")
        signed = np.where(_OUTFLOW[txn.kind], -txn.amount, txn.amount)
        booked = (txn.status == SETTLED) | (txn.status == REVERSED)
        undone = txn.status == REVERSED
        accounts = len(self.account_ids)
        # entry kinds 0 opening, 1 settlement, 2 reversal (also their order at one instant)
        acct = np.concatenate([np.arange(accounts), txn.acct[booked], txn.acct[undone]])
        kind = np.concatenate(
            [np.zeros(accounts, np.int64), np.ones(int(booked.sum()), np.int64),
             np.full(int(undone.sum()), 2, np.int64)]
        )  # fmt: skip
        ref = np.concatenate(
            [np.full(accounts, -1, np.int64), self._ids[booked], self._ids[undone]]
        )
        at = np.concatenate([self.account_opened, txn.settle_at[booked], txn.final_at[undone]])
        delta = np.concatenate([np.zeros(accounts, np.int64), signed[booked], -signed[undone]])
        order = np.lexsort((ref, kind, at, acct))  # by account, then time
        acct, kind, ref, at, delta = (a[order] for a in (acct, kind, ref, at, delta))
        starts = np.flatnonzero(np.r_[True, acct[1:] != acct[:-1]])
        lengths = np.diff(np.r_[starts, len(acct)])
        running = np.cumsum(delta)
        prefix = running - np.repeat(running[starts] - delta[starts], lengths)
        opening = self.opening_cents + np.maximum(0, -np.minimum.reduceat(prefix, starts))
        delta = np.where(kind == 0, opening[acct], delta)
        balance_after = prefix + opening[acct]
        final = balance_after[starts + lengths - 1]
        by_time = np.lexsort((kind, acct, at))
        ref = ref[by_time]
        table = pa.table(
            {
                "id": pa.array(np.arange(1, len(acct) + 1), pa.int64()),
                "account_id": pa.array(self.account_ids[acct[by_time]], pa.int64()),
                "transaction_id": pa.array(ref, pa.int64(), mask=ref < 0),
                "kind": pa.array(_LEDGER_KINDS[kind[by_time]]),
                "delta": cents_to_decimal(delta[by_time]),
                "balance_after": cents_to_decimal(balance_after[by_time]),
                "at": timestamp_array(at[by_time]),
            }
        )
        return table, final

    # -- logins ------------------------------------------------------------------------

    def logins(self) -> pa.Table:
        """Logins of every customer from known devices; 2% after 1-2 failed tries."""
        s = self.settings
        rng = self.rng
        begin = np.maximum(self.start_us, self.customer_created)
        days = np.clip((self.end_us - begin) / DAY_US, 0.0, None)
        who = np.repeat(
            np.arange(len(self.customer_ids)),
            rng.poisson(s.logins_per_customer_month * days / MONTH_DAYS),
        )
        n = len(who)
        at = self._diurnal_times(begin[who])
        device = (rng.random(n) * device_count_array(self.customer_ids[who])).astype(np.int64)
        tries = np.where(
            rng.random(n) < 0.02, rng.integers(1, self.envelope.max_failed_logins + 1, n), 0
        )
        # the k-th failure comes k times 3-10 s before the login it precedes
        failed = np.repeat(np.arange(n), tries)
        starts = np.repeat(np.cumsum(tries) - tries, tries)
        step = np.arange(len(failed)) - starts + 1
        failed_at = at[failed] - (step * self._seconds(3.0, 10.0, len(failed)))
        success = np.r_[np.ones(n, np.bool_), np.zeros(len(failed), np.bool_)]
        who = np.r_[who, who[failed]]
        device = np.r_[device, device[failed]]
        at = np.r_[at, failed_at]
        order = np.lexsort((success, at))
        who, device, at, success = (a[order] for a in (who, device, at, success))
        customer_ids = self.customer_ids[who]
        countries = self.customer_country[who]
        return pa.table(
            {
                "id": pa.array(np.arange(1, len(at) + 1), pa.int64()),
                "customer_id": pa.array(customer_ids, pa.int64()),
                "success": pa.array(success),
                "failure_reason": pa.array(["bad_password"] * len(at), pa.string(), mask=success),
                "device": _known_devices(customer_ids, device),
                "ip": _addresses(self.ip_octets[countries], customer_ids, device),
                "country": pa.array(self.codes[countries]),
                "at": timestamp_array(at),
            }
        )
