"""The reference fintech deployment's pipeline file, rendered for one database and store.

The file ships in the package (``headrace/demo/headrace.yaml``) with two
holes, ``@DSN@`` and ``@STORE@``. :func:`render_deployment` fills them and
writes a ready ``headrace.yaml`` that ``headrace run --config`` accepts;
:func:`load_deployment` also returns the parsed pipeline and the serving
settings (the dashboard) built from the same file.

>>> text = deployment_text("host=/tmp dbname=bank", "/var/lib/headrace/bank.duckdb")
>>> "dbname=bank" in text and "@DSN@" not in text
True
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from headrace.pipeline.load import parse_pipeline
from headrace.pipeline.model import PipelineConfig

TEMPLATE = "headrace.yaml"
"""Name of the deployment's pipeline file inside the ``headrace.demo`` package."""
RULES = "rules.yaml"
"""The deployment's ``rules:``, ``scores:`` and ``sinks:`` sections, appended to it."""

DSN_HOLE = "@DSN@"
STORE_HOLE = "@STORE@"

_TOP_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):(?:\s|$)")

PIPELINE_SECTIONS = frozenset(PipelineConfig.model_fields)
"""Top-level sections :class:`PipelineConfig` reads; others (``serve:``) belong to their parts."""


def template_text() -> str:
    """The deployment file as shipped, with its ``@DSN@`` and ``@STORE@`` holes.

    ``headrace.yaml`` followed by ``rules.yaml`` (when the package has it).
    """
    package = resources.files("headrace.demo")
    text = package.joinpath(TEMPLATE).read_text()
    rules = package.joinpath(RULES)
    if rules.is_file():
        text = text.rstrip("\n") + "\n\n" + rules.read_text()
    return text


def deployment_text(dsn: str, store: str | Path) -> str:
    """The deployment file for ``dsn`` and the DuckDB file ``store``.

    Values are written as JSON strings (valid YAML scalars), so any DSN or
    path is quoted safely.
    """
    text = template_text()
    text = text.replace(f'"{DSN_HOLE}"', json.dumps(dsn))
    return text.replace(f'"{STORE_HOLE}"', json.dumps(str(store)))


@dataclass(frozen=True)
class Deployment:
    """The rendered deployment: its file, its pipeline, and its other sections."""

    path: Path
    pipeline: PipelineConfig
    sections: dict[str, Any]
    """Parsed top-level sections the pipeline model does not read."""

    @property
    def serve(self) -> dict[str, Any]:
        """The ``serve:`` section (dashboards, masking), wherever it was parsed."""
        section = getattr(self.pipeline, "serve", None) or self.sections.get("serve")
        return dict(section) if isinstance(section, dict) else {}


def top_level_sections(text: str) -> dict[str, tuple[int, int]]:
    """Line ranges ``[first, end)`` of each top-level section of a YAML mapping's text."""
    starts: list[tuple[str, int]] = []
    lines = text.splitlines()
    for number, line in enumerate(lines):
        match = _TOP_KEY.match(line)
        if match:
            starts.append((match.group(1), number))
    ranges: dict[str, tuple[int, int]] = {}
    for index, (key, first) in enumerate(starts):
        end = starts[index + 1][1] if index + 1 < len(starts) else len(lines)
        ranges[key] = (first, end)
    return ranges


def pipeline_part(text: str) -> str:
    """The text with only the sections :class:`PipelineConfig` knows.

    The deployment file also holds sections of other parts (the dashboard
    under ``serve:``). While the pipeline model does not accept one of them,
    its lines are blanked here (kept as comments, so line numbers in error
    messages stay right); as soon as the model knows a section it is kept.
    """
    lines = text.splitlines()
    for key, (first, end) in top_level_sections(text).items():
        if key not in PIPELINE_SECTIONS:
            for number in range(first, end):
                lines[number] = "#" + lines[number] if lines[number] else lines[number]
    return "\n".join(lines) + "\n"


def replace_section(text: str, key: str, section: str) -> str:
    """``text`` with its top-level section ``key`` replaced by ``section`` (YAML text that
    starts with ``key:``), or with ``section`` appended when it has none."""
    lines = text.splitlines()
    ranges = top_level_sections(text)
    replacement = section.rstrip("\n").splitlines()
    if key in ranges:
        first, end = ranges[key]
        lines[first:end] = replacement
    else:
        lines += ["", *replacement]
    return "\n".join(lines) + "\n"


def other_sections(text: str) -> dict[str, Any]:
    """The sections :class:`PipelineConfig` does not know, parsed (e.g. ``serve``)."""
    out: dict[str, Any] = {}
    lines = text.splitlines()
    for key, (first, end) in top_level_sections(text).items():
        if key not in PIPELINE_SECTIONS:
            document = yaml.safe_load("\n".join(lines[first:end]))
            if isinstance(document, dict):
                out[key] = document.get(key)
    return out


def render_deployment(dsn: str, store: str | Path, path: str | Path) -> Deployment:
    """Write the deployment file for ``dsn`` and ``store`` to ``path`` and parse it."""
    text = deployment_text(dsn, store)
    target = Path(path)
    target.write_text(text)
    pipeline = parse_pipeline(pipeline_part(text), str(target))
    return Deployment(target, pipeline, other_sections(text))
