"""The repository: what calibflow knows and what it holds.

- :mod:`~calib_core.repository.registry`: the SQL registry (SQLite or PostgreSQL) of every camera,
  exposure, raw file, product, input and metric; :mod:`~calib_core.repository.registry.calibs`: products
  in it (recording, validity, certification, lookup).
- :mod:`~calib_core.repository.datastore`: the folder of raws, products and intermediates beside it.
- :mod:`~calib_core.repository.ingest`: raw files into both.
- :mod:`~calib_core.repository.buildruns`: one row per build run, and crashed runs found.
- :mod:`~calib_core.repository.retention`: how long intermediates stay on disk.

This package is the only one that imports SQLAlchemy or the registry's modules: everything else
(the flows, the tasks, the CLI, the science reduction, the morning report) uses the names exported
here, so the database can change without touching them (docs/architecture.md#package-layout;
``tests/test_layout.py`` checks the boundary).
"""

from calib_core.repository.buildruns import finish_build_run, mark_crashed_runs, start_build_run
from calib_core.repository.datastore import (DEFAULT_REPO, TRANSFER_MODES, Datastore, DatastoreError, check_identifier,
                                             sha256_file, verify_raw)
from calib_core.repository.ingest import IngestReport, UpdateReport, find_raw_files, ingest_files, update_exposures
from calib_core.repository.registry import (HEAD_REVISION, CameraMismatch, Registry, RegistryError, is_transient,
                                            mask_url, note_transient, resolve_url, retry_transient)
from calib_core.repository.registry.calibs import (FILTERLESS_TYPES, STATUSES, CalibInput, ValidityRule, calib_digest,
                                                   calib_inputs, calib_metrics, certify, decertify, explain_lookup,
                                                   find_calib, list_calibs, lookup, make_calib_id, overlapping,
                                                   record_calib, settle_candidates)
from calib_core.repository.retention import (PRUNE_CLASSES, RETENTION_ENV, RETENTION_POLICIES, WorkFile, build_files,
                                             remove_files, retention_policy, running_builds, running_types,
                                             survey)

__all__ = [
    "Registry", "RegistryError", "CameraMismatch", "HEAD_REVISION", "mask_url", "resolve_url",
    "is_transient", "note_transient", "retry_transient",
    "CalibInput", "ValidityRule", "calib_digest", "calib_inputs", "calib_metrics", "certify", "decertify",
    "explain_lookup", "find_calib", "list_calibs", "lookup", "make_calib_id", "overlapping", "record_calib",
    "settle_candidates", "FILTERLESS_TYPES", "STATUSES",
    "Datastore", "DatastoreError", "DEFAULT_REPO", "TRANSFER_MODES", "check_identifier", "sha256_file",
    "verify_raw",
    "IngestReport", "UpdateReport", "find_raw_files", "ingest_files", "update_exposures",
    "start_build_run", "finish_build_run", "mark_crashed_runs",
    "PRUNE_CLASSES", "RETENTION_ENV", "RETENTION_POLICIES", "WorkFile", "build_files", "remove_files",
    "retention_policy", "running_builds", "running_types", "survey",
]
