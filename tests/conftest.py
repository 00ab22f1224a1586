"""Shared fixtures: a small random checkpoint (no dependence on training) and a temp database."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine

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


@pytest.fixture
def engine(db_path: Path) -> Iterator[Engine]:
    from database.session import init_db

    eng = init_db(f"sqlite:///{db_path}")
    yield eng
    eng.dispose()


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
