"""The names inside a state folder, and the way out a broken one points to.

::

    state.parquet            the users table as of the last commit (zstd), with the store's
                             ``_last_run`` per user (see ``_last_run.py``)
    state.parquet.next       a commit in flight: written before the manifest, renamed after it
    manifest.json            the commit point: version, keys, row count, size and sha256
    checkpoints/<run_id>-<seq>.parquet   acknowledged users since the last commit
    runs.jsonl               one line per finished run
    failures/<run_id>.jsonl, dead-letter/<run_id>.jsonl
    backups/<UTC timestamp>/ what ``state reset`` moved aside
    lock                     held (flock) for the whole of a run
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "state.parquet"
NEXT_STATE_FILE = "state.parquet.next"
MANIFEST_FILE = "manifest.json"
CHECKPOINTS_DIR = "checkpoints"
RUNS_FILE = "runs.jsonl"
BACKUPS_DIR = "backups"
LOCK_FILE = "lock"

# Run ids become file names, so they are held to a safe alphabet (``new_run_id`` makes
# ``YYYYMMDDTHHMMSSZ-<6 hex>``, well inside it).
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# The sequence number is global to the folder, not per run, so the manifest can say "every
# checkpoint up to N is folded in" whatever the run ids and the clock did.
_CHECKPOINT = re.compile(r"(?P<run_id>.+)-(?P<seq>\d{8,})\.parquet")


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is safe to use in a file name, else raise ``ValueError``."""
    if not _RUN_ID.fullmatch(run_id):
        raise ValueError(
            f"run id {run_id!r} is not usable in a file name "
            "(letters, digits, '.', '_' and '-' only, at most 128)"
        )
    return run_id


@dataclass(frozen=True, slots=True, order=True)
class CheckpointName:
    """A checkpoint file's place in the folder's sequence, and the run that wrote it."""

    seq: int
    run_id: str

    @property
    def file_name(self) -> str:
        """The file name under ``checkpoints/``."""
        return f"{self.run_id}-{self.seq:08d}.parquet"

    @classmethod
    def parse(cls, file_name: str) -> CheckpointName | None:
        """The checkpoint a file name stands for, or None for any other file."""
        match = _CHECKPOINT.fullmatch(file_name)
        if match is None:
            return None
        return cls(seq=int(match["seq"]), run_id=match["run_id"])


def way_out(directory: Path) -> str:
    """The sentence every state error ends with: how to get going again."""
    return (
        f"Run `amberflo-sync state reset` to move the state in {directory} aside "
        f"(into {directory / BACKUPS_DIR}/) and start again with a full sync, "
        f"or restore an earlier copy from {directory / BACKUPS_DIR}/."
    )
