"""Rule 3, impossible travel / new country for card-present use.

State:

- the account's card-present transactions within ``window`` (plus
  ``rules.lateness``) of the watermark, in the rules' shared recent
  transactions (:mod:`headrace.rules.recent`);
- ``jobs.impossible_travel__countries``: per account and country, how many
  card-present transactions it ever had there (end rows minus start rows);
- ``jobs.impossible_travel__locations``: the configured country centres.

For each new card-present transaction ``t`` (or one whose country, time or
account changed), two checks; either makes a candidate:

- **impossible travel**: the account's previous card-present use before
  ``t`` (within ``window``) was in another country, and the great-circle
  distance between the two countries' centres over the time between the two
  uses exceeds ``max_speed_kmh`` (only when both countries have a location);
- **new country** (``new_country: true``): the account never used a card
  present in ``t``'s country before the batch, and has at least
  ``min_history`` card-present uses elsewhere.

Evidence: the previous use and ``t``; numbers: distance, seconds, speed,
the countries known before.

Updates: a declined card-present attempt still proves where the card was,
so status changes do not matter; a deleted transaction leaves the state.
"""

from __future__ import annotations

from datetime import timedelta

import duckdb

from headrace.jobs.base import JobContext
from headrace.jobs.state import KeyedSums
from headrace.rules.base import (
    Evaluation,
    RuleJob,
    evidence_json,
    present,
    q,
    tx_evidence,
)
from headrace.rules.config import ImpossibleTravelConfig


class ImpossibleTravel(RuleJob):
    """See the module docstring."""

    name = "impossible_travel"

    @property
    def config(self) -> ImpossibleTravelConfig:
        return present(self.rules.impossible_travel, self.name)

    @property
    def span(self) -> timedelta:
        return self.config.window + self.rules.lateness

    @property
    def window_filter(self) -> str:
        return self.tx.card_present

    def countries(self) -> KeyedSums:
        return KeyedSums(
            table=self.state("countries"),
            groups=(("account", q(self.tx.account)), ("country", q(self.tx.country))),
            sums=(),
            where=self.tx.card_present,
        )

    def setup(self, con: duckdb.DuckDBPyConnection) -> None:
        table = self.state("locations")
        con.execute(
            f"CREATE TABLE IF NOT EXISTS {table} (country VARCHAR PRIMARY KEY, lat DOUBLE, "
            "lon DOUBLE)"
        )
        con.execute(f"DELETE FROM {table}")
        if self.config.locations:
            con.executemany(
                f"INSERT INTO {table} VALUES (?, ?, ?)",
                [[code, lat, lon] for code, (lat, lon) in self.config.locations.items()],
            )

    def _prefilter(self, countries: str) -> str:
        """SQL over the trigger ``e``: it can be a candidate. Travel needs an earlier use of
        the account within the window in another country (its previous use is one); a new
        country one the account has not used before the batch, and ``min_history`` uses
        elsewhere (most first uses of an account have none: they stay out)."""
        config = self.config
        window_s = config.window.total_seconds()
        travel = self.recent_check(
            lambda own: (
                f"bool_or({own} AND w.t < e.t AND w.t > e.t - to_seconds({window_s}) "
                "AND w.country IS DISTINCT FROM e.country)"
            )
        )
        if not config.new_country:
            return travel
        # One pass over the account's countries: unseen here, and enough uses elsewhere.
        new_country = (
            f"(SELECT count(*) FILTER (WHERE c.country = e.country) = 0 "
            f"AND coalesce(sum(c._rows), 0) >= {config.min_history} "
            f"FROM {countries} c WHERE c.account = e.account AND c._rows > 0)"
        )
        return f"({travel} OR {new_country})"

    def evaluate(self, ctx: JobContext) -> Evaluation:
        delta = ctx.delta(self.tx_ref)
        if delta is None:
            return Evaluation()
        con = ctx.con
        watermark = self.advance(ctx, self.tx_time(ctx))
        uses, countries = self.recent_rows(watermark - self.span), self.countries()
        if not self.ready:
            countries.ensure(con, delta.mirror)
            self.ready = True
        config = self.config
        triggers = self.tx_triggers(
            delta,
            (self.tx.account, self.tx.country, self.tx.time),
            self.tx.card_present,
            watermark - self.rules.lateness,
            prefilter=self._prefilter(countries.table),
        )
        locations = self.state("locations")
        km = (
            "2 * 6371.0 * asin(sqrt(pow(sin(radians(lt.lat - lp.lat) / 2), 2) + "
            "cos(radians(lp.lat)) * cos(radians(lt.lat)) * "
            "pow(sin(radians(lt.lon - lp.lon) / 2), 2)))"
        )
        window_s = config.window.total_seconds()
        new_country = "true" if config.new_country else "false"
        candidates = f"""            WITH paired AS (
                SELECT t.*, p._k0 AS p_k0, p.t AS p_t, p.country AS p_country,
                       p.account AS p_account, p.amount AS p_amount, p.merchant AS p_merchant,
                       p.card AS p_card, p.device AS p_device, p.status AS p_status,
                       p.channel AS p_channel, p.type AS p_type
                FROM {triggers} t
                ASOF LEFT JOIN {uses} p ON p.account = t.account AND t.t > p.t
            ), measured AS (
                SELECT x.*,
                       CASE WHEN x.p_t IS NOT NULL AND x.p_t > x.t - to_seconds({window_s})
                                 AND x.p_country IS DISTINCT FROM x.country
                            THEN {km} END AS km,
                       epoch(x.t) - epoch(x.p_t) AS seconds,
                       k.history, k.known,
                       NOT coalesce(list_contains(k.known, x.country), false) AS unseen
                FROM paired x
                LEFT JOIN {locations} lp ON lp.country = x.p_country
                LEFT JOIN {locations} lt ON lt.country = x.country
                LEFT JOIN (SELECT account, sum(_rows) AS history, list(country ORDER BY country)
                                  AS known
                           FROM {countries.table}
                           WHERE _rows > 0 AND account IN (SELECT account FROM {triggers})
                           GROUP BY account) k ON k.account = x.account
            ), judged AS (
                SELECT *, km / greatest(seconds, 1) * 3600 AS speed_kmh,
                       coalesce(km / greatest(seconds, 1) * 3600 > {config.max_speed_kmh}, false)
                           AS impossible,
                       {new_country} AND unseen
                           AND coalesce(history, 0) >= {config.min_history} AS new_country
                FROM measured
            )
            SELECT account AS account_id, 'impossible_travel:' || account AS dedup_key,
                   t AS event_at, coalesce(CASE WHEN impossible THEN p_t END, t) AS started_at,
                   commit_ts, lsn, '{config.severity.value}' AS severity,
                   CASE WHEN impossible
                        THEN format('card present in {{}} then {{}} {{}} s later: {{}} km, '
                                    '{{}} km/h (account {{}})', p_country, country,
                                    round(seconds), round(km), round(speed_kmh), account)
                        ELSE format('card present in {{}}, a country new for account {{}} '
                                    '(known: {{}})', country, account, known)
                   END AS summary,
                   json_object(
                       'numbers', json_object('km', round(km, 1), 'seconds', seconds,
                                              'speed_kmh', round(speed_kmh, 1),
                                              'max_speed_kmh', {config.max_speed_kmh},
                                              'impossible_travel', impossible,
                                              'new_country', new_country,
                                              'known_countries', known,
                                              'history', coalesce(history, 0)),
                       'trigger', _k0,
                       'evidence', {
            evidence_json(
                "list_filter([CASE WHEN p_k0 IS NOT NULL THEN struct_pack("
                "id := p_k0, at := p_t, account := p_account, amount := p_amount, "
                "merchant := p_merchant, card := p_card, country := p_country, "
                "device := p_device, status := p_status, channel := p_channel, "
                f"type := p_type) END, {tx_evidence('judged')}], lambda e: e IS NOT NULL)"
            )
        }
                   ) AS payload
            FROM judged WHERE impossible OR new_country"""
        return Evaluation(candidates, after=lambda: countries.update(con, delta))

    def rebuild(self, ctx: JobContext) -> None:
        con = ctx.con
        mirror = ctx.mirror(self.tx_ref)
        countries = self.countries()
        countries.ensure(con, mirror)
        countries.rebuild(con, mirror)
        self.rebuild_recent(ctx)
