"""Images and their file store: the de-identified payload of each study.

A payload lives at ``<data_dir>/images/<sha256>.npz`` (``database.session.data_dir_for``: the
``INFMAP_DATA_DIR`` setting, else the SQLite file's folder), written atomically and checked
against its recorded hash on every read. Every function takes a Session; the caller owns the
transaction.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, object_session

import settings
from database.models import IMAGE_SOURCES, Image
from database.session import data_dir_for

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class PayloadError(RuntimeError):
    """A stored image payload is missing or does not match its recorded hash."""


def session_data_dir(session: Session) -> Path:
    """The file-store root of the database ``session`` is bound to."""
    bind = session.get_bind()
    return data_dir_for(bind if isinstance(bind, Engine) else bind.engine)


STALE_TEMP_SECONDS = 600.0  # no payload write takes this long; a younger one may be under way


def remove_stale_temp_payloads(session: Session, older_than: float = STALE_TEMP_SECONDS) -> int:
    """Delete ``images/*.tmp`` files left by a write that was killed (SIGKILL during an upload);
    younger ones may belong to a write still under way in another process. Returns how many."""
    cutoff = time.time() - older_than
    removed = 0
    for tmp in (session_data_dir(session) / "images").glob("*.tmp"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:  # another process cleaned it first
            continue
    return removed


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_image(
    session: Session,
    xray_payload_bytes: bytes,
    sha256: str,
    display_name: str,
    metadata: dict[str, Any] | None,
    width: int,
    height: int,
    source: str = "upload",
) -> tuple[Image, bool]:
    """Store a study, deduplicated by the original file's sha256. Returns (image, created).

    The payload (``inference.storage.xray_to_npz_bytes``) is written atomically to
    ``<data_dir>/images/<sha256>.npz`` before the row is flushed; a crash after the write leaves
    only a content-addressed file that the next add of the same image reuses.
    """
    sha256 = sha256.lower()
    if not _SHA256.match(sha256):
        raise ValueError("sha256 must be 64 hex digits")
    if source not in IMAGE_SOURCES:
        raise ValueError(f"source must be one of {', '.join(IMAGE_SOURCES)}, not {source!r}")
    if width <= 0 or height <= 0:
        raise ValueError("width and height must be positive")
    data_dir = session_data_dir(session)
    relative = f"images/{sha256}.npz"
    existing = get_image_by_sha256(session, sha256)
    if existing is not None:
        if not (data_dir / existing.payload_path).is_file():  # repair a lost file store entry
            _write_atomic(data_dir / existing.payload_path, xray_payload_bytes)
        return existing, False
    target = data_dir / relative
    if not target.is_file():
        _write_atomic(target, xray_payload_bytes)
    image = Image(
        sha256=sha256,
        payload_path=relative,
        payload_sha256=hashlib.sha256(xray_payload_bytes).hexdigest(),
        display_name=display_name,
        source=source,
        meta=dict(metadata or {}),
        width=int(width),
        height=int(height),
    )
    try:
        with session.begin_nested():
            session.add(image)
    except IntegrityError:  # the same file added concurrently by another session
        existing = get_image_by_sha256(session, sha256)
        if existing is None:
            raise
        return existing, False
    log.info("stored image id=%s sha256=%s", image.id, sha256[:12])
    return image, True


def get_image(session: Session, image_id: int) -> Image | None:
    return session.get(Image, image_id)


def get_image_by_sha256(session: Session, sha256: str) -> Image | None:
    return session.scalar(select(Image).where(Image.sha256 == sha256.lower()))


def image_payload_path(image: Image, data_dir: str | Path | None = None) -> Path:
    """Where ``image``'s payload is: under ``data_dir``, else under its session's file store, else
    (a detached image) under the configured database's (``settings.database_url``)."""
    if data_dir is None:
        session = object_session(image)
        bind: Any = session.get_bind() if session is not None else settings.database_url()
        data_dir = data_dir_for(bind)
    return Path(data_dir) / image.payload_path


def read_image_payload(image: Image, data_dir: str | Path | None = None) -> bytes:
    """The stored de-identified payload (feed to ``inference.storage.xray_from_npz_bytes``)."""
    path = image_payload_path(image, data_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise PayloadError(f"the stored file for image {image.id} is missing") from exc
    if hashlib.sha256(data).hexdigest() != image.payload_sha256:
        raise PayloadError(f"the stored file for image {image.id} is corrupt (hash mismatch)")
    return data


