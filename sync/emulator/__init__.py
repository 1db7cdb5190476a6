"""A faithful in-memory Amberflo API on loopback, for the quick start, tests and benchmarks.

It serves the contract of ``spec/amberflo-api.md`` section 5:

- ``POST /ingest``: a JSON object, a JSON array or NDJSON, optionally gzipped; every record
  validated (a request is all or nothing), stored deduplicated on the whole record; answers
  ``200`` ``text/plain`` ``"<N> records were ingested"`` (N counts duplicates too).
- ``/customers``: ``GET ?customerId=`` (``{}`` when none), ``GET`` (all), ``GET /paging``,
  ``POST`` (create; ``400`` when it exists), ``PUT`` (full replace; a missing customer is
  created or answered ``404``, as configured), ``DELETE /customers/{id}``.
- ``x-api-key`` on every API route, else ``403 {"message": "Forbidden"}``.
- Fault injection decided before a request is processed: 429 with ``Retry-After``, 500/502/503,
  dropped connections, latency, and "everything fails"; and chosen customer ids whose
  ``POST``/``PUT`` is always refused with ``400`` (one customer Amberflo will not take).
- ``/_emulator/``: ``GET customers|ingested|stats|requests|faults``, ``PUT faults``,
  ``POST reset``. No key needed, never faulted, not counted.

Paths work with and without a trailing slash, on any host name. Error bodies are synthetic: only
their status and their key (``errorMessage`` for ingest validation, ``message`` elsewhere) follow
what is known of Amberflo.
"""

from sync.emulator._options import EmulatorOptions, FaultSettings
from sync.emulator._run import EmulatorHandle, running_emulator, serve

__all__ = ["EmulatorHandle", "EmulatorOptions", "FaultSettings", "running_emulator", "serve"]
