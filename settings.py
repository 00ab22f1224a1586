"""Where things are and the words every layer shares: the one home for paths, environment
variables and fixed vocabulary. It imports nothing of InfMap, so every layer may import it.

Environment variables (all optional):

- ``DATABASE_URL``        the database (default ``sqlite:///<repo>/data/infmap.sqlite``)
- ``INFMAP_DATA_DIR``     the file store of image payloads and fine-tuned checkpoints (default: the
                          SQLite file's folder; needed for databases that have no file)
- ``INFMAP_CHECKPOINT``   the checkpoint to register on first start (default ``models/infmap.pt``)
- ``INFMAP_SAMPLES_DIR``  the sample cases imported on first start (default ``samples/``)
- ``INFMAP_DATA``         the COVID-QU-Ex tree for training, evaluation and the data tests
                          (default ``../shared/data/covid-qu-ex`` beside the repository)
- ``INFMAP_EVAL_ROOTS``   folders (separated by ``os.pathsep``) under which the Evaluation page
                          may read a labelled folder (default: ``samples/`` and the folder
                          holding ``INFMAP_DATA``, i.e. ``../shared/data``)
- ``INFMAP_REQUIRE_DATA``     ``1`` (CI): tests needing ``INFMAP_DATA`` fail instead of skipping
- ``INFMAP_REQUIRE_BROWSER``  ``1`` (CI): browser tests fail instead of skipping
- ``INFMAP_REQUIRE_SERVERS``  ``1`` (CI): tests needing a server or tool the tests use from
                          Debian (PostgreSQL; Orthanc + DICOMweb, dicom3tools, dcmtk) fail
                          instead of skipping when it is not installed
- ``INFMAP_DICOMWEB_URL``  the DICOMweb server (QIDO/WADO/STOW root, e.g. Orthanc's
                          ``http://pacs:8042/dicom-web``); unset: no PACS features
- ``INFMAP_DICOMWEB_USER`` / ``INFMAP_DICOMWEB_PASSWORD``  HTTP basic credentials for it
                          (optional; from the environment only, never stored or logged)
- ``INFMAP_ID_SALT``      salt of the hashed patient ID (``inference.deid``)
- ``INFMAP_SESSION_MINUTES``  idle minutes after which a signed-in user is signed out (default 30)
- ``INFMAP_DECODE_SECONDS``   time allowed to read one file (default 60; ``inference.isolation``)
- ``INFMAP_DECODE_MEMORY_MB`` memory allowed to read one file (default 2048)
- ``INFMAP_ENGINE``       the forward pass of ``inference.predict``: ``auto`` (default: ONNX
                          Runtime when the model's ONNX file is already built, else torch; a
                          request never waits for an export), ``torch``, or ``onnx`` (ONNX
                          Runtime, exported on first use; ``inference.onnx_engine``; falls back to
                          torch with a warning when the ONNX file cannot be built)
- ``INFMAP_ONNX_CACHE``   where exported ONNX files are kept (default ``<repo>/.cache/onnx``)
- ``STREAMLIT_SERVER_MAX_UPLOAD_SIZE``  Streamlit's own override of ``server.maxUploadSize`` in
                          ``.streamlit/config.toml``: the one upload limit (MB), which the
                          loader applies to every file too

Importing this module sets ``HF_HUB_OFFLINE=1`` unless it is set: nothing may download weights
at run time. The entry points (Makefile, ``.ci/run``, ``app.py``, the tests' conftest) rely on
that or set it themselves.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent
SHIPPED_CHECKPOINT = REPO_ROOT / "models" / "infmap.pt"
# The click-refinement network of the correction page's click tool (inference.click_model).
SHIPPED_CLICK_CHECKPOINT = REPO_ROOT / "models" / "infmap_click.pt"
SAMPLES_DIR = REPO_ROOT / "samples"
DEFAULT_DATABASE_PATH = REPO_ROOT / "data" / "infmap.sqlite"
DEFAULT_DATA_DIR = REPO_ROOT / "data"
DEFAULT_SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "covid-qu-ex"
STREAMLIT_CONFIG = REPO_ROOT / ".streamlit" / "config.toml"
STREAMLIT_DEFAULT_UPLOAD_MB = 200  # Streamlit's default when server.maxUploadSize is not set
DEFAULT_DECODE_SECONDS = 60.0  # RG1 (3.6 MP JPEG 2000) reads in ~1 s on a busy 2-core machine
DEFAULT_DECODE_MEMORY_MB = 2048.0  # the largest accepted image is estimated at ~1.7 GB
DEFAULT_ONNX_CACHE = REPO_ROOT / ".cache" / "onnx"
INFERENCE_ENGINES: tuple[str, ...] = ("auto", "torch", "onnx")

# ----------------------------------------------------------------------------- vocabulary
ROLES: tuple[str, ...] = ("annotator", "radiologist", "researcher", "admin")
MASK_KINDS: tuple[str, ...] = ("lung", "infection")
# Shown with every result (pages, the study report): what InfMap's output is for.
DECISION_SUPPORT_NOTICE = (
    "Decision support only: InfMap's masks, class probabilities, severity and Grad-CAM support "
    "a radiologist's reading; they do not replace it. Not a diagnosis."
)
# What a reader may record as the study's reading: the model's three classes (the same names as
# inference.model.CLASS_NAMES, so a reading is a class target as it is) and two that are not.
READING_CLASSES: tuple[str, ...] = ("COVID-19", "Non-COVID", "Normal")
READING_LABELS: tuple[str, ...] = (*READING_CLASSES, "other finding", "not assessable")
# X-ray files by suffix (lower case). Extension-less DICOM files are accepted where a folder is
# imported on purpose (``services.import_masks``), not when the samples are scanned.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
MASK_FILE_SUFFIXES: tuple[str, ...] = (".png", ".bmp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- environment
def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value or None


def _flag(name: str) -> bool:
    return os.environ.get(name) == "1"


def database_url() -> str:
    return _env("DATABASE_URL") or f"sqlite:///{DEFAULT_DATABASE_PATH}"


def data_dir_override() -> Path | None:
    """``INFMAP_DATA_DIR`` if set (else the file store follows the database, see
    ``database.session.data_dir_for``)."""
    env = _env("INFMAP_DATA_DIR")
    return Path(env).expanduser().resolve() if env else None


def checkpoint_path() -> Path:
    """The checkpoint to register on first start: ``INFMAP_CHECKPOINT`` or ``models/infmap.pt``."""
    override = _env("INFMAP_CHECKPOINT")
    return Path(override).expanduser().resolve() if override else SHIPPED_CHECKPOINT


def samples_dir() -> Path:
    return Path(_env("INFMAP_SAMPLES_DIR") or SAMPLES_DIR)


def shared_data_dir() -> Path:
    """The COVID-QU-Ex tree (``<root>/<Train|Val|Test>/<class>/{images,lung masks,...}``)."""
    return Path(_env("INFMAP_DATA") or DEFAULT_SHARED_DATA).expanduser()


def eval_roots() -> tuple[Path, ...]:
    """Where the Evaluation page may read folders from (resolved): a path a user types is
    accepted only inside one of these, so the web app cannot be pointed at the whole disk."""
    raw = _env("INFMAP_EVAL_ROOTS")
    roots = ([Path(p) for p in raw.split(os.pathsep) if p.strip()] if raw
             else [samples_dir(), shared_data_dir().parent])
    return tuple(p.expanduser().resolve() for p in roots)


def require_data() -> bool:
    return _flag("INFMAP_REQUIRE_DATA")


def require_browser() -> bool:
    return _flag("INFMAP_REQUIRE_BROWSER")


def require_servers() -> bool:
    return _flag("INFMAP_REQUIRE_SERVERS")


DEV_ID_SALT = "infmap-dev-only-salt-set-INFMAP_ID_SALT-in-production"


def dicomweb_url() -> str | None:
    """``INFMAP_DICOMWEB_URL`` without a trailing slash, or None (no PACS configured)."""
    url = _env("INFMAP_DICOMWEB_URL")
    return url.rstrip("/") if url else None


def dicomweb_credentials() -> tuple[str, str] | None:
    """(user, password) for the DICOMweb server, or None for no authentication."""
    user = _env("INFMAP_DICOMWEB_USER")
    return (user, os.environ.get("INFMAP_DICOMWEB_PASSWORD", "")) if user else None


def id_salt() -> str:
    """``INFMAP_ID_SALT``; the built-in default is for development only (``inference.deid``)."""
    return _env("INFMAP_ID_SALT") or DEV_ID_SALT


DEFAULT_SESSION_MINUTES = 30.0


def session_minutes() -> float:
    """Idle time after which a browser session's sign-in ends (``services.identity``)."""
    return float(_env("INFMAP_SESSION_MINUTES") or DEFAULT_SESSION_MINUTES)


def decode_seconds() -> float:
    return float(_env("INFMAP_DECODE_SECONDS") or DEFAULT_DECODE_SECONDS)


def decode_memory_mb() -> float:
    return float(_env("INFMAP_DECODE_MEMORY_MB") or DEFAULT_DECODE_MEMORY_MB)


def inference_engine() -> str:
    """``INFMAP_ENGINE``: which runtime serves the forward pass (``INFERENCE_ENGINES``)."""
    value = (_env("INFMAP_ENGINE") or "auto").strip().lower()
    if value not in INFERENCE_ENGINES:
        choices = ", ".join(INFERENCE_ENGINES)
        raise ValueError(f"INFMAP_ENGINE must be one of {choices}, not {value!r}")
    return value


def onnx_cache_dir() -> Path:
    """Where exported ONNX files are kept, one per checkpoint (``INFMAP_ONNX_CACHE``)."""
    override = _env("INFMAP_ONNX_CACHE")
    return Path(override).expanduser().resolve() if override else DEFAULT_ONNX_CACHE


def upload_limit_mb(config_path: Path = STREAMLIT_CONFIG) -> int:
    """``server.maxUploadSize`` as Streamlit applies it: its environment override, else
    ``.streamlit/config.toml``, else Streamlit's default."""
    override = _env("STREAMLIT_SERVER_MAX_UPLOAD_SIZE")
    if override:
        return int(override)
    try:
        with open(config_path, "rb") as fh:
            config = tomllib.load(fh)
    except FileNotFoundError:
        return STREAMLIT_DEFAULT_UPLOAD_MB
    return int(config.get("server", {}).get("maxUploadSize", STREAMLIT_DEFAULT_UPLOAD_MB))


# ----------------------------------------------------------------------------- command lines
def cli_path(value: str) -> Path:
    """A path given on a command line, made absolute (``~`` expanded, ``..`` folded) at once, so
    a relative path means the caller's folder wherever it is used later, and a link made to it
    from another folder resolves. Symlinks are kept (a linked file keeps its own name).
    argparse ``type=``."""
    return Path(os.path.abspath(Path(value).expanduser()))


def cli_path_str(value: str) -> str:
    """:func:`cli_path` as a string; an empty value stays empty (it means "none" where allowed)."""
    return str(cli_path(value)) if value else value
