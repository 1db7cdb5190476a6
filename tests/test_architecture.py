"""Architecture as a test: the import allow-table and the one-boundary rules of DESIGN.md."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sync"

# Each module's allowed imports from this package. Imports run one way:
# errors/config/logs -> pure core and adapters -> deliver -> pipeline -> cli.
BASE = {"sync", "sync.errors", "sync.model"}
ALLOWED: dict[str, set[str]] = {
    # foundations
    "sync": set(),
    "sync.errors": set(),
    "sync.model": set(),
    "sync.runid": set(),
    "sync.config": {"sync.errors"},
    "sync.logs": set(),
    "sync.progress": set(),
    "sync.signals": set(),
    "sync.orjson_safe": set(),
    "sync.threads": set(),
    # pure core
    "sync.keys": set(),
    "sync.fingerprint": {"sync.threads"},
    "sync.idorder": set(),
    "sync.diff": BASE | {"sync.fingerprint", "sync.idorder", "sync.threads"},
    "sync.settle": BASE | {"sync.diff", "sync.fingerprint"},
    "sync.plan": BASE | {"sync.diff"},
    "sync.report": BASE,
    "sync.events": BASE | {"sync.keys"},
    "sync.history": set(),
    # adapters: they do not import each other
    "sync.snapshot": BASE
    | {"sync.config", "sync.diff", "sync.fingerprint", "sync.keys", "sync.settle", "sync.threads"},
    "sync.event_input": BASE | {"sync.events", "sync.orjson_safe"},
    "sync.amberflo": BASE | {"sync.orjson_safe"},
    "sync.state": BASE,
    "sync.emulator": BASE | {"sync.orjson_safe"},
    "sync.alerts": BASE | {"sync.config"},
    # delivery
    "sync.deliver": BASE | {"sync.amberflo"},
    # large event inputs forwarded by worker processes: mapping and meter delivery in each
    "sync.event_workers": BASE
    | {"sync.amberflo", "sync.deliver", "sync.event_input", "sync.events"},
    # orchestration
    "sync.pipeline": BASE
    | {
        "sync.amberflo",
        "sync.config",
        "sync.deliver",
        "sync.diff",
        "sync.logs",
        "sync.plan",
        "sync.progress",
        "sync.report",
        "sync.runid",
        "sync.signals",
        "sync.snapshot",
        "sync.state",
    },
    "sync.forward": BASE
    | {
        "sync.amberflo",
        "sync.config",
        "sync.deliver",
        "sync.event_input",
        "sync.event_workers",
        "sync.events",
        "sync.logs",
        "sync.progress",
        "sync.runid",
        "sync.state",
    },
    "sync.state_commands": BASE | {"sync.config", "sync.pipeline", "sync.state"},
    "sync.schedule": BASE
    | {
        "sync.alerts",
        "sync.config",
        "sync.forward",
        "sync.logs",
        "sync.pipeline",
        "sync.runid",
        "sync.signals",
    },
    "sync.__main__": {"sync.cli"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def owner(module: str) -> str:
    """The allow-table entry of a module: sub-packages answer for their private modules."""
    for package in ("sync.emulator", "sync.state"):
        if module == package or module.startswith(package + "."):
            return package
    return module


def sync_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "sync"}
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] == "sync"
        ):
            found.add(node.module)
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_imports_follow_the_allow_table(path: Path) -> None:
    """Every module imports only the modules its layer may use."""
    module = module_name(path)
    if module == "sync.cli":
        return  # the entry point may import everything
    entry = owner(module)
    assert entry in ALLOWED, f"{module} is not in the allow-table: add it with its layer"
    outside = {name for name in sync_imports(path) if owner(name) != entry}
    forbidden = outside - ALLOWED[entry]
    assert not forbidden, f"{module} imports {sorted(forbidden)}"


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_only_the_client_speaks_http_and_only_config_reads_the_environment(path: Path) -> None:
    """httpx lives in amberflo.py alone; os.environ and getenv in config.py alone."""
    module = module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imports = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    if module != "sync.amberflo":
        assert "httpx" not in imports, f"{module} imports httpx"
    if module != "sync.config":
        reads = [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in {"environ", "getenv"}
        ]
        assert not reads, f"{module} reads the environment"


def test_only_the_orchestrators_commit_state() -> None:
    """StateStore.commit is called from pipeline.py alone (the state package defines it)."""
    callers = {
        module_name(path)
        for path in MODULES
        if ".commit(" in path.read_text(encoding="utf-8")
        and owner(module_name(path)) != "sync.state"
    }
    assert callers <= {"sync.pipeline"}, callers


def test_the_events_command_starts_without_pandas_or_pyarrow() -> None:
    """Loading the events path (CLI, forwarding, run logs) leaves pandas and pyarrow unloaded:
    they cost about half a second of start-up the command has no use for."""
    probe = (
        "import sys, sync.cli, sync.forward, sync.state; "
        "sync.state.RunLogs; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'pandas', 'pyarrow', 'numpy'}))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "[]"


def test_the_state_store_still_loads_on_first_use() -> None:
    """``sync.state.StateStore`` resolves (lazily) to the store class, pandas with it."""
    from sync.state import StateStore  # noqa: PLC0415 - the lazy attribute is what is tested
    from sync.state._store import StateStore as Defined  # noqa: PLC0415

    assert StateStore is Defined
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        _ = importlib.import_module("sync.state").Nothing
