"""Requests per second the Amberflo emulator sustains with keep-alive clients.

N client threads, each with its own ``httpx.Client`` (one keep-alive connection), alternate a
small ingest batch and a customer lookup for a few seconds. By default the emulator runs in its
own process through ``serve`` (as ``amberflo-sync emulator`` runs it), so clients and server do
not share a GIL; its CPU time is measured too, which gives the rate it could reach at one full
core. ``--in-process`` runs it in a background thread of this process instead.

    .venv/bin/python bench/emulator_throughput.py [--threads 4] [--seconds 5] [--batch 10]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx
import psutil

from sync.emulator import EmulatorOptions, running_emulator

CUSTOMERS = 50
JSON = {"content-type": "application/json"}
RECORD = (
    '{{"customerId":"c{customer}","meterApiName":"page","meterValue":1,'
    '"meterTimeInMillis":{time},"uniqueId":"{unique}",'
    '"dimensions":{{"path":"_home","browser":"Chrome"}}}}'
)
SERVER_CODE = "from sync.emulator import EmulatorOptions, serve; serve(EmulatorOptions(port=0))"


@contextmanager
def emulator_process() -> Iterator[tuple[str, psutil.Process | None]]:
    """``serve`` in a child process; yields its URL and the process to measure."""
    child = subprocess.Popen([sys.executable, "-c", SERVER_CODE], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if "listening on " not in line:
            raise RuntimeError(f"the emulator did not start: {line!r}")
        yield line.rsplit(" ", 1)[-1].strip(), psutil.Process(child.pid)
    finally:
        child.terminate()
        child.wait(timeout=10)


@contextmanager
def emulator_thread() -> Iterator[tuple[str, psutil.Process | None]]:
    """The emulator in a background thread of this process (sharing its GIL)."""
    with running_emulator(EmulatorOptions(port=0)) as handle:
        yield handle.url, None


def client(url: str, worker: int, batch: int, deadline: float, counts: Counter[str]) -> None:
    """Alternate an ingest of ``batch`` fresh records and a customer lookup until ``deadline``."""
    local: Counter[str] = Counter()
    sequence = 0
    with httpx.Client(base_url=url, headers={"x-api-key": "bench"}, timeout=10) as http:
        while time.perf_counter() < deadline:
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
                local["ok" if response.status_code == 200 else f"http {response.status_code}"] += 1
    counts.update(local)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=10, help="records per ingest request")
    parser.add_argument("--in-process", action="store_true", help="serve from a thread here")
    args = parser.parse_args()

    with ExitStack() as stack:
        start = emulator_thread() if args.in_process else emulator_process()
        url, server = stack.enter_context(start)
        with httpx.Client(base_url=url, headers={"x-api-key": "bench"}) as setup:
            for n in range(CUSTOMERS):
                setup.post("/customers", json={"customerId": f"c{n}", "customerName": f"C {n}"})

        counts: Counter[str] = Counter()
        cpu_before = server.cpu_times() if server else None
        began = time.perf_counter()
        deadline = began + args.seconds
        threads = [
            threading.Thread(target=client, args=(url, n, args.batch, deadline, counts))
            for n in range(args.threads)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - began
        total = sum(counts.values())
        print(
            f"{total} requests in {elapsed:.1f} s with {args.threads} keep-alive clients "
            f"({args.batch} records per ingest): {total / elapsed:,.0f} requests/s"
        )
        print(f"outcomes: {dict(counts)}")
        if server is not None and cpu_before is not None:
            cpu_after = server.cpu_times()
            busy = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
            share = busy / elapsed
            print(
                f"emulator process CPU: {share:.0%} of one core; "
                f"about {total / busy:,.0f} requests per CPU-second"
            )


if __name__ == "__main__":
    main()
