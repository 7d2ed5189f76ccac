"""The reference deployment file: it renders, loads as a pipeline, and its dashboard validates."""

from __future__ import annotations

from pathlib import Path

from headrace.demo.deployment import deployment_text, render_deployment, top_level_sections
from headrace.demo.metrics import DIMENSIONS
from headrace.pipeline.load import load_pipeline
from headrace.serve.settings import ServeSettings


def test_rendered_deployment_loads_with_its_dashboard(tmp_path: Path) -> None:
    deployment = render_deployment(
        "host=/tmp dbname='my bank'", tmp_path / "bank.duckdb", tmp_path / "headrace.yaml"
    )
    assert deployment.pipeline.source.dsn == "host=/tmp dbname='my bank'"
    assert deployment.pipeline.store.path == str(tmp_path / "bank.duckdb")
    loaded = load_pipeline(deployment.path)  # what `headrace run --config` reads
    assert [r.name for r in loaded.rollups] == [r.name for r in deployment.pipeline.rollups]
    assert loaded.rules is not None
    assert loaded.scores is not None
    serve = ServeSettings.model_validate({**deployment.serve, "store": tmp_path / "bank.duckdb"})
    (dashboard,) = serve.dashboards
    assert [d.name for d in dashboard.dimensions] == list(DIMENSIONS)
    assert {"transactions", "tx_per_5m", "money_flows", "fraud_alerts", "alerts"} <= {
        t.name for t in dashboard.tiles
    }
    assert serve.masked_columns["viewer"]


def test_no_section_is_written_twice() -> None:
    """headrace.yaml and rules.yaml are concatenated: a key in both would silently drop one."""
    text = deployment_text("dbname=x", "x.duckdb")
    keys = [line.split(":", 1)[0] for line in text.splitlines() if line[:1].isalpha()]
    assert len(keys) == len(set(keys)), keys
    assert set(top_level_sections(text)) == set(keys)
