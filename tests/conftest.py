"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sync.emulator import EmulatorHandle, EmulatorOptions, running_emulator


@pytest.fixture
def emulator() -> Iterator[EmulatorHandle]:
    """A fresh Amberflo emulator on a free loopback port, no faults, any API key accepted."""
    with running_emulator(EmulatorOptions(port=0)) as handle:
        yield handle
