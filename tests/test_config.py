"""Settings: TOML, environment and .env, with clear errors."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from sync.config import JEMALLOC_DECAY, load_settings
from sync.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_relative_paths_resolve_from_the_config_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config works from any working directory: its paths are relative to itself."""
    config = write(tmp_path / "sync.toml", '[source]\npath = "data/x.csv"\n[state]\ndir = "st"\n')
    monkeypatch.chdir("/")
    settings = load_settings(config, require_api_key=False)
    assert settings.source is not None
    assert settings.source.path == str(tmp_path / "data" / "x.csv")
    assert settings.state.dir == tmp_path / "st"


def test_environment_wins_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AMBERFLO_* and AMBERFLO_SYNC_* variables override the TOML file."""
    config = write(tmp_path / "sync.toml", "[amberflo]\nconcurrency = 3\n")
    monkeypatch.setenv("AMBERFLO_BASE_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("AMBERFLO_SYNC_AMBERFLO__CONCURRENCY", "5")
    monkeypatch.setenv("AMBERFLO_API_KEY", "k-123")
    settings = load_settings(config)
    assert settings.base_url == "http://127.0.0.1:9"
    assert settings.amberflo.concurrency == 5
    assert settings.api_key_value == "k-123"


def test_a_misspelt_key_is_an_error_naming_it(tmp_path: Path) -> None:
    """An unknown setting is refused with its section and name, not silently ignored."""
    config = write(tmp_path / "sync.toml", '[source]\npath = "x"\nlayot = "wide"\n')
    with pytest.raises(ConfigError, match=r"source\.layot: unknown setting"):
        load_settings(config, require_api_key=False)


def test_an_invalid_value_names_the_key(tmp_path: Path) -> None:
    """A value outside the allowed set names the key and the allowed values."""
    config = write(tmp_path / "sync.toml", '[source]\npath = "x"\nlayout = "tall"\n')
    with pytest.raises(ConfigError, match=r"source\.layout: .*'wide', 'long' or 'membership'"):
        load_settings(config, require_api_key=False)


def test_an_api_key_in_the_file_is_refused(tmp_path: Path) -> None:
    """The API key may come only from the environment."""
    config = write(tmp_path / "sync.toml", 'api_key = "oops"\n')
    with pytest.raises(ConfigError, match="AMBERFLO_API_KEY"):
        load_settings(config, require_api_key=False)


def test_a_missing_api_key_explains_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without AMBERFLO_API_KEY a sending command stops with the variable to set."""
    monkeypatch.delenv("AMBERFLO_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="AMBERFLO_API_KEY is not set"):
        load_settings(None)


def test_a_missing_or_broken_file_is_a_config_error(tmp_path: Path) -> None:
    """A config file that is absent or not TOML gives one message naming it."""
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml", require_api_key=False)
    broken = write(tmp_path / "broken.toml", "[source\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken, require_api_key=False)


def test_the_api_key_is_hidden_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    """Printing the settings never shows the key."""
    monkeypatch.setenv("AMBERFLO_API_KEY", "very-secret-key")
    settings = load_settings(None)
    assert "very-secret-key" not in repr(settings)
    assert "very-secret-key" not in str(settings.model_dump())


_CHOSEN_POOL = (
    "jemalloc" if sys.platform == "linux" and platform.machine() == "x86_64" else "system"
)


def _shown_after_choosing_allocators(variable: str, given: str | None, show: str) -> str:
    """What ``show`` prints in a fresh interpreter that called choose_allocators first, with
    ``variable`` set to ``given`` (or unset)."""
    probe = f"from sync.config import choose_allocators; choose_allocators(); {show}"
    env = {k: v for k, v in os.environ.items() if k != variable}
    if given is not None:
        env[variable] = given
    shown = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert "<jemalloc>" not in shown.stderr  # jemalloc complains of a setting it cannot take
    return shown.stdout.strip()


@pytest.mark.parametrize(
    ("given", "used"), [(None, _CHOSEN_POOL), ("system", "system"), ("mimalloc", "mimalloc")]
)
def test_pyarrow_allocates_with_jemalloc_unless_the_environment_says_otherwise(
    given: str | None, used: str
) -> None:
    """The entry point picks pyarrow's allocator (jemalloc where its wheels carry it, malloc
    elsewhere, never mimalloc), and an explicit ARROW_DEFAULT_MEMORY_POOL still wins."""
    shown = _shown_after_choosing_allocators(
        "ARROW_DEFAULT_MEMORY_POOL",
        given,
        "import pyarrow; print(pyarrow.default_memory_pool().backend_name)",
    )
    assert shown == used


@pytest.mark.parametrize(("given", "used"), [(None, False), ("1", True), ("0", False)])
def test_numpy_asks_for_no_huge_pages_unless_the_environment_says_otherwise(
    given: str | None, used: bool
) -> None:
    """The entry point turns off numpy's request for transparent huge pages, and an explicit
    NUMPY_MADVISE_HUGEPAGE still wins."""
    shown = _shown_after_choosing_allocators(
        "NUMPY_MADVISE_HUGEPAGE",
        given,
        "import numpy; print(numpy._core.multiarray._set_madvise_hugepage(False))",
    )
    assert shown == str(used)


@pytest.mark.parametrize(
    ("given", "used"), [(None, JEMALLOC_DECAY), ("dirty_decay_ms:0", "dirty_decay_ms:0")]
)
def test_jemalloc_returns_pages_after_half_a_second_unless_the_environment_says_otherwise(
    given: str | None, used: str
) -> None:
    """The entry point tells pyarrow's jemalloc to hand back pages unused for half a second,
    in a form jemalloc takes, and an explicit JE_ARROW_MALLOC_CONF still wins."""
    shown = _shown_after_choosing_allocators(
        "JE_ARROW_MALLOC_CONF",
        given,
        "import os, pyarrow; pyarrow.array(range(99)); print(os.environ['JE_ARROW_MALLOC_CONF'])",
    )
    assert shown == used
