"""The pgoutput decoder: every message type from a real server, malformed input."""

from __future__ import annotations

import struct
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headrace.errors import ProtocolError
from headrace.source.postgres.batcher import Batcher
from headrace.source.postgres.protocol import (
    UNCHANGED,
    Begin,
    Commit,
    Delete,
    Insert,
    Message,
    Origin,
    PgOutputDecoder,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    TupleData,
    Type,
    Update,
    decode_message,
    decode_tuple,
)
from headrace.source.postgres.tuples import MessageBlock, read_heads, read_tuples
from tests.conftest import PgDatabase
from tests.source.pgoutput_slot import LogicalSlot


def _scenario(db: PgDatabase) -> list[tuple[int, bytes]]:
    """A stream holding every message type PostgreSQL 15 sends."""
    db.execute("CREATE TYPE mood AS ENUM ('sad', 'happy')")
    db.execute("CREATE TABLE a (id int PRIMARY KEY, m mood, note text)")
    db.execute("CREATE TABLE b (id int PRIMARY KEY, v text)")
    db.execute("ALTER TABLE b REPLICA IDENTITY FULL")
    slot = LogicalSlot(db).create()
    origin = f"up_{db.name}"  # origins are cluster-wide
    db.execute("SELECT pg_replication_origin_create(%s)", (origin,))
    with db.connect() as conn:
        conn.execute("SELECT pg_replication_origin_session_setup(%s)", (origin,))
        with conn.transaction():
            conn.execute("SELECT pg_replication_origin_xact_setup('0/42', now())")
            conn.execute("INSERT INTO a VALUES (1, 'sad', NULL), (2, 'happy', 'x')")
    db.execute("INSERT INTO b VALUES (1, 'one'), (2, 'two')")
    db.execute("UPDATE a SET note = 'y' WHERE id = 1")  # no old tuple
    db.execute("UPDATE a SET id = 3 WHERE id = 2")  # old key
    db.execute("UPDATE b SET v = 'uno' WHERE id = 1")  # old row
    db.execute("DELETE FROM a WHERE id = 3")  # old key
    db.execute("DELETE FROM b WHERE id = 2")  # old row
    db.execute("SELECT pg_logical_emit_message(true, 'tx', 'inside')")
    db.execute("TRUNCATE a, b RESTART IDENTITY CASCADE")
    with db.connect(autocommit=False) as conn:
        conn.execute("INSERT INTO b SELECT g, repeat('z', 50) FROM generate_series(10, 2000) g")
        conn.commit()
        conn.execute("INSERT INTO b SELECT g, repeat('z', 50) FROM generate_series(3000, 5000) g")
        conn.rollback()
    # A rollback does not flush the WAL, and the slot is read up to the flushed end: an
    # xid's commit flushes the rolled-back rows and their abort, so one pass decodes them
    # all (streamed, then aborted), whatever else the machine is doing.
    db.execute("SELECT txid_current()")
    db.execute("SELECT pg_logical_emit_message(false, 'beat', '')")
    changes = slot.changes(work_mem="64kB")
    db.execute("INSERT INTO a VALUES (9, 'sad', 'flush')")  # flushes the heartbeat's WAL
    return changes + slot.changes(work_mem="64kB")


@pytest.fixture
def scenario(pg_db: PgDatabase) -> list[tuple[int, bytes]]:
    return _scenario(pg_db)


def test_every_message_type_decodes(scenario: list[tuple[int, bytes]]) -> None:
    decoder = PgOutputDecoder()
    messages = [decoder.decode(payload, lsn) for lsn, payload in scenario]
    kinds = Counter(type(m).__name__ for m in messages)
    for name in (
        "Begin",
        "Commit",
        "Origin",
        "Relation",
        "Type",
        "Insert",
        "Update",
        "Delete",
        "Truncate",
        "Message",
        "StreamStart",
        "StreamStop",
        "StreamCommit",
        "StreamAbort",
    ):
        assert kinds[name] > 0, name
    origin = next(m for m in messages if isinstance(m, Origin))
    assert origin.name.startswith("up_")
    assert origin.origin_lsn == 0x42
    mood = next(m for m in messages if isinstance(m, Type))
    assert (mood.namespace, mood.name) == ("public", "mood")
    relation_a = next(m for m in messages if isinstance(m, Relation) and m.name == "a")
    assert relation_a.namespace == "public"
    assert relation_a.replica_identity == "d"
    assert [(c.name, c.is_key) for c in relation_a.columns] == [
        ("id", True),
        ("m", False),
        ("note", False),
    ]
    assert relation_a.columns[1].type_oid == mood.oid
    relation_b = next(m for m in messages if isinstance(m, Relation) and m.name == "b")
    assert relation_b.replica_identity == "f"
    first_insert = next(m for m in messages if isinstance(m, Insert))
    assert first_insert.new == TupleData(b"ttn", (b"1", b"sad", None))
    updates = [m for m in messages if isinstance(m, Update)]
    assert [u.old_kind for u in updates[:3]] == [None, "K", "O"]
    assert updates[1].old is not None
    assert updates[1].old.values == (b"2", None, None)
    assert updates[2].old is not None
    assert updates[2].old.values == (b"1", b"one")
    deletes = [m for m in messages if isinstance(m, Delete)]
    assert [d.old_kind for d in deletes] == ["K", "O"]
    truncate = next(m for m in messages if isinstance(m, Truncate))
    assert len(truncate.relation_oids) == 2
    assert truncate.options == 3  # CASCADE | RESTART IDENTITY
    message = next(m for m in messages if isinstance(m, Message) and m.transactional)
    assert (message.prefix, message.content) == ("tx", b"inside")
    beat = next(m for m in messages if isinstance(m, Message) and not m.transactional)
    assert beat.prefix == "beat"
    assert beat.xid is None
    begin = next(m for m in messages if isinstance(m, Begin))
    commit = next(m for m in messages if isinstance(m, Commit))
    assert begin.final_lsn == commit.commit_lsn < commit.end_lsn
    assert begin.commit_ts == commit.commit_ts
    start = next(m for m in messages if isinstance(m, StreamStart))
    assert start.first_segment
    streamed = [m for m in messages if isinstance(m, Insert) and m.xid is not None]
    assert streamed
    assert {m.xid for m in streamed} >= {start.xid}
    assert any(isinstance(m, StreamCommit) and m.xid == start.xid for m in messages)
    abort = next(m for m in messages if isinstance(m, StreamAbort))
    assert abort.xid == abort.subxid
    assert not any(isinstance(m, StreamStop) and decoder.in_stream for m in messages)


def test_columnar_tuple_parser_matches_reference(scenario: list[tuple[int, bytes]]) -> None:
    decoder = PgOutputDecoder()
    rows: list[tuple[int, bytes, int, Insert | Update | Delete]] = []
    for lsn, payload in scenario:
        in_stream = decoder.in_stream
        message = decoder.decode(payload, lsn)
        if isinstance(message, (Insert, Update, Delete)):
            rows.append((lsn, payload, 5 if in_stream else 1, message))
    _check_block(rows)


def _check_block(rows: list[tuple[int, bytes, int, Insert | Update | Delete]]) -> None:
    block = MessageBlock.build(
        [r[1] for r in rows],
        [r[0] for r in rows],
        np.array([r[2] for r in rows], dtype=np.int64),
    )
    heads = read_heads(block)
    for index, (_, payload, header, message) in enumerate(rows):
        assert heads.relation_oids[index] == message.relation_oid
        assert heads.kinds[index] == payload[0]
        start = int(block.starts[index])
        assert heads.marker_positions[index] - start == header + 4
        if isinstance(message, Insert):
            reference = message.new
        elif isinstance(message, Delete):
            reference = message.old
        else:
            reference = message.old if message.old is not None else message.new
        one = np.array([index], dtype=np.int64)
        parsed = read_tuples(block, one, heads.marker_positions[one] + 1, len(reference.kinds))
        assert bytes(parsed.kinds[0]) == reference.kinds
        for column, value in enumerate(reference.values):
            begin = int(parsed.starts[0, column])
            got = block.data[begin : begin + int(parsed.lengths[0, column])].tobytes()
            if value is None or value is UNCHANGED:
                assert parsed.lengths[0, column] == 0
            else:
                assert got == value


_COLUMN = st.one_of(
    st.just(("n", None)),
    st.just(("u", None)),
    st.tuples(st.sampled_from(["t", "b"]), st.binary(max_size=40)),
)


def _tuple_bytes(columns: list[tuple[str, bytes | None]]) -> bytes:
    out = bytearray(struct.pack("!h", len(columns)))
    for kind, value in columns:
        out += kind.encode()
        if value is not None:
            out += struct.pack("!i", len(value)) + value
    return bytes(out)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=1, max_value=6).flatmap(
        lambda width: st.lists(
            st.tuples(
                st.sampled_from(["I", "U", "UK", "UO", "DK", "DO"]),
                st.lists(_COLUMN, min_size=width, max_size=width),
                st.lists(_COLUMN, min_size=width, max_size=width),
                st.booleans(),
            ),
            min_size=1,
            max_size=12,
        )
    )
)
def test_columnar_parser_matches_reference_on_random_tuples(
    messages: list[
        tuple[str, list[tuple[str, bytes | None]], list[tuple[str, bytes | None]], bool]
    ],
) -> None:
    rows: list[tuple[int, bytes, int, Insert | Update | Delete]] = []
    for index, (kind, new, old, streamed) in enumerate(messages):
        head = kind[0].encode() + (struct.pack("!I", 77) if streamed else b"")
        head += struct.pack("!I", 16384 + index % 3)
        if kind in {"I", "U"}:
            payload = head + b"N" + _tuple_bytes(new)
        elif kind.startswith("U"):
            payload = head + kind[1].encode() + _tuple_bytes(old) + b"N" + _tuple_bytes(new)
        else:
            payload = head + kind[1].encode() + _tuple_bytes(old)
        message = decode_message(payload, index, in_stream=streamed)
        assert isinstance(message, (Insert, Update, Delete))
        rows.append((index, payload, 5 if streamed else 1, message))
    _check_block(rows)


def _payload(scenario: list[tuple[int, bytes]], kind: str) -> tuple[int, bytes]:
    return next((lsn, p) for lsn, p in scenario if p[:1] == kind.encode())


def test_truncated_messages_raise_with_lsn_and_offset(scenario: list[tuple[int, bytes]]) -> None:
    for kind in "BCORYIUDTM":
        lsn, payload = _payload(scenario, kind)
        for cut in range(1, len(payload)):
            with pytest.raises(ProtocolError) as info:
                decode_message(payload[:cut], lsn)
            assert info.value.lsn == lsn
            assert info.value.offset is not None
            assert 0 <= info.value.offset <= cut
            assert "at LSN" in str(info.value)


def test_unknown_message_type_and_trailing_bytes(scenario: list[tuple[int, bytes]]) -> None:
    with pytest.raises(ProtocolError, match="unknown message type 'Z'") as info:
        decode_message(b"Z\x00\x00", 0x1234)
    assert info.value.lsn == 0x1234
    assert info.value.offset == 0
    assert "0/1234" in str(info.value)
    with pytest.raises(ProtocolError, match="empty message"):
        decode_message(b"", 1)
    lsn, begin = _payload(scenario, "B")
    with pytest.raises(ProtocolError, match="trailing") as info:
        decode_message(begin + b"\x00", lsn)
    assert info.value.offset == len(begin)


def test_unknown_tuple_kind(scenario: list[tuple[int, bytes]]) -> None:
    lsn, insert = _payload(scenario, "I")
    broken = bytearray(insert)
    first_kind = 1 + 4 + 1 + 2  # type, relation OID, 'N', column count
    assert chr(broken[first_kind]) == "t"
    broken[first_kind] = ord("x")
    with pytest.raises(ProtocolError, match="unknown tuple column kind 'x'") as info:
        decode_message(bytes(broken), lsn)
    assert info.value.offset == first_kind
    with pytest.raises(ProtocolError, match="unknown tuple column kind 'x'") as info:
        _feed_all(scenario, replace=(insert, bytes(broken)))
    assert info.value.lsn == lsn
    assert info.value.offset == first_kind


def test_truncated_row_message_through_the_batcher(scenario: list[tuple[int, bytes]]) -> None:
    lsn, insert = _payload(scenario, "I")
    for cut in (1, 5, 6, 8, 12, len(insert) - 1):
        with pytest.raises(ProtocolError) as info:
            _feed_all(scenario, replace=(insert, insert[:cut]))
        assert info.value.lsn == lsn
        assert info.value.offset is not None
        assert info.value.offset <= cut
    with pytest.raises(ProtocolError, match="trailing") as info:
        _feed_all(scenario, replace=(insert, insert + b"\x00"))
    assert info.value.offset == len(insert)


def _feed_all(scenario: list[tuple[int, bytes]], replace: tuple[bytes, bytes]) -> None:
    batcher = Batcher()
    for lsn, payload in scenario:
        batcher.feed(lsn, replace[1] if payload == replace[0] else payload)
    batcher.take()


def test_decoder_tracks_stream_chunks() -> None:
    decoder = PgOutputDecoder()
    start = b"S" + struct.pack("!IB", 700, 1)
    insert = b"I" + struct.pack("!II", 700, 16384) + b"N" + _tuple_bytes([("t", b"1")])
    assert decoder.decode(start) == StreamStart(700, True)
    message = decoder.decode(insert)
    assert isinstance(message, Insert)
    assert message.xid == 700
    assert decoder.decode(b"E") == StreamStop()
    with pytest.raises(ProtocolError, match="Stream Stop without a Stream Start"):
        decoder.decode(b"E")
    # Outside the chunk the same bytes do not parse: the xid is read as the OID.
    with pytest.raises(ProtocolError):
        decoder.decode(insert)


def test_stream_abort_with_parallel_apply_fields() -> None:
    short = decode_message(b"A" + struct.pack("!II", 5, 6))
    assert short == StreamAbort(5, 6)
    long = decode_message(b"A" + struct.pack("!IIQq", 5, 6, 0x10, 0))
    assert isinstance(long, StreamAbort)
    assert long.abort_lsn == 0x10
    assert long.abort_ts == 946_684_800_000_000


def test_decode_tuple_round_trip() -> None:
    data = _tuple_bytes([("t", b"abc"), ("n", None), ("u", None), ("b", b"\x00\x01")])
    parsed, end = decode_tuple(data, 0)
    assert end == len(data)
    assert parsed == TupleData(b"tnub", (b"abc", None, UNCHANGED, b"\x00\x01"))
