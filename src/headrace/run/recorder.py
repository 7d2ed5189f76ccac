"""Recording what the writer applies, so ``headrace bench replay`` can apply it again.

``headrace run --record DIR`` (and the benchmarks' ``--record``) writes:

- ``store.duckdb``: a copy of the store taken just before the first recorded
  batch (after a CHECKPOINT, so the file alone is the whole store);
- ``pipeline.pkl``: the pipeline configuration the run used;
- ``batch-000001.pkl`` …: every batch exactly as the writer applied it (after
  queued micro-batches were merged), pickled with its Arrow tables.

Replaying that on a copy of ``store.duckdb`` runs the same statements on the
same data, in-process and without PostgreSQL or a generator competing for the
CPU, which is how engine changes are compared on a noisy machine.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

from headrace.errors import ConfigError
from headrace.pipeline.model import PipelineConfig
from headrace.run.merge import materialized
from headrace.source.changes import ChangeBatch
from headrace.store.duckdb.store import DuckDBStore

STORE_FILE = "store.duckdb"
PIPELINE_FILE = "pipeline.pkl"
BATCH_GLOB = "batch-*.pkl"


class BatchRecorder:
    """Writes a recording (module docstring) into ``directory``, which must be empty or new."""

    def __init__(self, directory: Path) -> None:
        if directory.exists() and any(directory.iterdir()):
            raise ConfigError(
                f"cannot record into {directory}: the directory is not empty",
                "pass a new or empty directory to --record",
            )
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.batches = 0

    def record(self, store: DuckDBStore, config: PipelineConfig, batch: ChangeBatch) -> None:
        """Record ``batch`` (call it on the writer thread, right before applying it)."""
        if self.batches == 0:
            # The copy must be the store as the first recorded batch finds it; the
            # writer is the only writer and it is here, so a checkpointed file is whole.
            store.checkpoint()
            shutil.copyfile(store.path, self.directory / STORE_FILE)
            with (self.directory / PIPELINE_FILE).open("wb") as out:
                pickle.dump(config, out)
        self.batches += 1
        with (self.directory / f"batch-{self.batches:06d}.pkl").open("wb") as out:
            # A batch in pieces is recorded whole (decoded at once): a replay applies it
            # as one transaction, as the run did.
            pickle.dump(materialized(batch), out, protocol=pickle.HIGHEST_PROTOCOL)


def load_recording(directory: Path) -> tuple[PipelineConfig, list[Path]]:
    """The recorded configuration and batch files, in order; a clear error if incomplete."""
    pipeline = directory / PIPELINE_FILE
    batches = sorted(directory.glob(BATCH_GLOB))
    if not (directory / STORE_FILE).exists() or not pipeline.exists() or not batches:
        raise ConfigError(
            f"{directory} is not a headrace recording (no {STORE_FILE}, {PIPELINE_FILE} "
            "or batch files)",
            "record one with `headrace run --record DIR` or `headrace bench pipeline --record DIR`",
        )
    with pipeline.open("rb") as source:
        config = pickle.load(source)  # noqa: S301 - our own recording, read back locally
    if not isinstance(config, PipelineConfig):
        raise ConfigError(f"{pipeline} does not hold a pipeline configuration", "record again")
    # Validated again: fields added to the model since the recording get their defaults.
    return PipelineConfig.model_validate(config.model_dump()), batches


def read_batch(path: Path) -> ChangeBatch:
    with path.open("rb") as source:
        batch = pickle.load(source)  # noqa: S301 - our own recording, read back locally
    if not isinstance(batch, ChangeBatch):
        raise ConfigError(f"{path} does not hold a change batch", "record again")
    return batch
