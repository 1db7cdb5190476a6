"""Requests per second the Amberflo emulator sustains with keep-alive clients.

Client threads, each with its own ``httpx.Client`` (one keep-alive connection), alternate a
small ingest batch and a customer lookup for a few seconds. By default the emulator runs in its
own process (``amberflo-sync emulator``), so clients and server do not share a GIL, and its
CPU time is measured: requests per CPU-second is the rate one full core
of emulator would reach, whatever the clients manage. httpx costs several times more CPU per
request than the emulator, so on a small machine the clients are the limit: spread them over
``--processes`` to load the emulator harder. ``--in-process`` serves from a thread of this
process instead, as the test suite does.

    .venv/bin/python bench/emulator_throughput.py [--processes 2] [--threads 2] [--seconds 5]
"""

from __future__ import annotations

import argparse
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import psutil
from _emulator import emulator_process

from sync.emulator import EmulatorOptions, running_emulator

CUSTOMERS = 50
JSON = {"content-type": "application/json"}
RECORD = (
    '{{"customerId":"c{customer}","meterApiName":"page","meterValue":1,'
    '"meterTimeInMillis":{time},"uniqueId":"{unique}",'
    '"dimensions":{{"path":"_home","browser":"Chrome"}}}}'
)


@contextmanager
def emulator_thread() -> Iterator[tuple[str, psutil.Process | None]]:
    """The emulator in a background thread of this process (sharing its GIL)."""
    with running_emulator(EmulatorOptions(port=0)) as handle:
        yield handle.url, None


@dataclass(frozen=True)
class Load:
    """What every client does: ``batch`` records per ingest, from ``start`` to ``stop``
    (``time.monotonic``, one clock for every process on Linux, so all clients start together)."""

    url: str
    batch: int
    start: float
    stop: float


def client(load: Load, worker: int) -> Counter[str]:
    """Alternate an ingest of fresh records and a customer lookup, from start to stop."""
    url, batch, start, stop = load.url, load.batch, load.start, load.stop
    counts: Counter[str] = Counter()
    sequence = 0
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # plain HTTP; spares loading CA bundles
    with httpx.Client(base_url=url, headers={"x-api-key": "bench"}, timeout=10, verify=tls) as http:
        http.get("/customers", params={"customerId": "c0"})  # connect before the clock starts
        time.sleep(max(0.0, start - time.monotonic()))
        while time.monotonic() < stop:
            # Formatted, not json.dumps'd: the clients' CPU is the scarce resource here.
            records = ",".join(
                RECORD.format(
                    customer=(sequence + i) % CUSTOMERS,
                    time=1_700_000_000_000 + sequence + i,
                    unique=f"w{worker}-{sequence + i}",
                )
                for i in range(batch)
            )
            sequence += batch
            ingest = http.post("/ingest", content=f"[{records}]".encode(), headers=JSON)
            lookup = http.get("/customers", params={"customerId": f"c{sequence % CUSTOMERS}"})
            for response in (ingest, lookup):
                counts["ok" if response.status_code == 200 else f"http {response.status_code}"] += 1
    return counts


def client_threads(load: Load, first_worker: int, threads: int) -> Counter[str]:
    """Run ``threads`` clients in this process and add up their outcomes."""
    results: list[Counter[str]] = []

    def run(worker: int) -> None:
        results.append(client(load, worker))

    pool = [threading.Thread(target=run, args=(first_worker + n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(results, Counter())


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--threads", type=int, default=2, help="client threads per process")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=10, help="records per ingest request")
    parser.add_argument("--in-process", action="store_true", help="serve from a thread here")
    args = parser.parse_args()

    start_emulator = emulator_thread() if args.in_process else emulator_process()
    with start_emulator as (url, server):
        with httpx.Client(base_url=url, headers={"x-api-key": "bench"}) as setup:
            for n in range(CUSTOMERS):
                setup.post("/customers", json={"customerId": f"c{n}", "customerName": f"C {n}"})

        start = time.monotonic() + 1.0 + 0.5 * args.processes  # time to start the clients
        load = Load(url, args.batch, start, start + args.seconds)
        with ProcessPoolExecutor(args.processes) as pool:
            jobs = [
                pool.submit(client_threads, load, p * args.threads, args.threads)
                for p in range(args.processes)
            ]
            time.sleep(max(0.0, start - time.monotonic()))
            cpu_before = server.cpu_times() if server else None
            counts = sum((job.result() for job in jobs), Counter())
            cpu_after = server.cpu_times() if server else None

    total = sum(counts.values())
    clients = args.processes * args.threads
    print(
        f"{total} requests in {args.seconds:.1f} s from {clients} keep-alive clients "
        f"({args.processes} process(es) x {args.threads} threads, {args.batch} records per "
        f"ingest): {total / args.seconds:,.0f} requests/s"
    )
    print(f"outcomes: {dict(counts)}")
    if cpu_before is not None and cpu_after is not None:
        busy = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
        print(
            f"emulator process: {busy / args.seconds:.0%} of one core busy, "
            f"{total / busy:,.0f} requests per CPU-second"
        )


if __name__ == "__main__":
    main()
