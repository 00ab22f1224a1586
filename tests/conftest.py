"""Shared fixtures: a small random checkpoint (no dependence on training) and a temp database.

``engine`` / ``database_url`` run each database test twice: on a SQLite file and on a fresh
database in a PostgreSQL server that the session starts (``tests/postgres_server.py``). Without
PostgreSQL installed the PostgreSQL half skips, unless ``INFMAP_REQUIRE_SERVERS=1`` (CI).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from db_helpers import DATABASE_BACKENDS
from sqlalchemy import Engine

import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RANDOM_MODEL_VERSION = "random-test"


def make_random_checkpoint(path: Path, version: str = RANDOM_MODEL_VERSION) -> Path:
    """A randomly initialised InfMap network saved in the real checkpoint format (seeded)."""
    import torch

    from inference.model import ModelConfig, build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model(ModelConfig())
    return save_checkpoint(model, path, meta={"version": version, "note": "random weights, tests"})


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.pt")


@pytest.fixture
def temp_database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'infmap.sqlite'}"


# ----------------------------------------------------------------------------- database tests
@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "db" / "infmap.sqlite"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[object]:
    """One throwaway PostgreSQL server for the whole test session."""
    from postgres_server import PostgresUnavailable, start_server

    try:
        server = start_server()
    except PostgresUnavailable as exc:
        if settings.require_servers():
            pytest.fail(f"INFMAP_REQUIRE_SERVERS=1 but {exc}")
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(
    postgres_server, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A new empty database on the session's server; its file store is ``db_path``'s folder."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("INFMAP_DATA_DIR", str(db_path.parent))
    name = f"test_{uuid.uuid4().hex[:16]}"
    url = postgres_server.create_database(name)
    try:
        yield url
    finally:
        postgres_server.drop_database(name)


@pytest.fixture(params=DATABASE_BACKENDS)
def database_url(request: pytest.FixtureRequest, db_path: Path) -> str:
    """An empty database on each backend; the file store is ``db_path``'s folder on both."""
    if request.param == "sqlite":
        return f"sqlite:///{db_path}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    from database.session import init_db

    eng = init_db(database_url)
    yield eng
    eng.dispose()


@pytest.fixture
def sqlite_engine(db_path: Path) -> Iterator[Engine]:
    """For what only SQLite has (PRAGMAs, BEGIN IMMEDIATE, the database file)."""
    from database.session import init_db

    eng = init_db(f"sqlite:///{db_path}")
    yield eng
    eng.dispose()


# ----------------------------------------------------------------------------- AppTest
@pytest.fixture(scope="session")
def bootstrapped(tmp_path_factory: pytest.TempPathFactory, random_checkpoint: Path) -> Path:
    """A database folder after the first start (tables, the random model, the six samples
    predicted), made once per session through the same service the app's start calls."""
    from database.session import init_db, session_scope
    from inference.model import load_checkpoint
    from services import bootstrap

    folder = tmp_path_factory.mktemp("apptest")
    engine = init_db(f"sqlite:///{folder / 'infmap.sqlite'}")
    try:
        report = bootstrap.bootstrap(
            lambda write=True: session_scope(engine, write=write),
            random_checkpoint,
            settings.SAMPLES_DIR,
            load_checkpoint,
        )
    finally:
        engine.dispose()  # closes the WAL so the folder can be copied
    assert report.samples_found == 6 and not report.sample_errors
    return folder


@pytest.fixture
def app_env(
    bootstrapped: Path, tmp_path: Path, random_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """Each AppTest gets its own copy of the started database: no test sees another's saves."""
    folder = shutil.copytree(bootstrapped, tmp_path / "app")
    url = f"sqlite:///{folder / 'infmap.sqlite'}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("INFMAP_CHECKPOINT", str(random_checkpoint))
    monkeypatch.delenv("INFMAP_DATA_DIR", raising=False)
    monkeypatch.delenv("INFMAP_SAMPLES_DIR", raising=False)
    return url


# Real COVID-QU-Ex chest X-rays for the loader tests (test_loading, test_loading_refusals).
@pytest.fixture(scope="module")
def covid_pngs() -> list[Path]:
    from covid_qu_ex import SUBSET, shared_data

    covid_dir = shared_data() / SUBSET / SUBSET / "Test" / "COVID-19" / "images"
    paths = sorted(covid_dir.glob("*.png"))[:3]
    assert len(paths) == 3, f"COVID-QU-Ex test images missing under {covid_dir}"
    return paths


@pytest.fixture(scope="module")
def sample_gray(covid_pngs: list[Path]) -> np.ndarray:
    """A real 256x256 uint8 chest X-ray."""
    import cv2

    image = cv2.imread(str(covid_pngs[0]), cv2.IMREAD_UNCHANGED)
    assert image is not None and image.dtype == np.uint8 and image.ndim == 2
    return image
