"""Where things are: the database, the shipped checkpoint, the bundled sample cases.

``DATABASE_URL`` selects the database (default: the SQLite file of ``database.session``);
``INFMAP_CHECKPOINT`` overrides the shipped checkpoint ``models/infmap.pt`` (tests use a small
random one). Nothing here opens anything.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CHECKPOINT = REPO_ROOT / "models" / "infmap.pt"
SAMPLES_DIR = REPO_ROOT / "samples"


def database_url() -> str:
    from database.session import default_database_url

    return default_database_url()


def checkpoint_path() -> Path:
    """The checkpoint to register on first start: ``INFMAP_CHECKPOINT`` or ``models/infmap.pt``."""
    override = os.environ.get("INFMAP_CHECKPOINT")
    return Path(override).expanduser().resolve() if override else SHIPPED_CHECKPOINT


def samples_dir() -> Path:
    return Path(os.environ.get("INFMAP_SAMPLES_DIR") or SAMPLES_DIR)
