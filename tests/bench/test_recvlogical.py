"""The peer asks ``pg_recvlogical`` for what headrace's change source asks for."""

from __future__ import annotations

from headrace.bench.recvlogical import recvlogical_options
from headrace.source.postgres.replication import StreamOptions


def test_options_are_the_sources_start_replication_options() -> None:
    assert recvlogical_options(StreamOptions(publications=("pub", 'odd"name'))) == [
        *("--option", "proto_version=2"),
        *("--option", 'publication_names="pub","odd""name"'),
        *("--option", "messages=true"),
        *("--option", "streaming=true"),
    ]
    binary = StreamOptions(publications=("p",), messages=False, streaming=False, binary=True)
    assert recvlogical_options(binary)[-2:] == ["--option", "binary=true"]
