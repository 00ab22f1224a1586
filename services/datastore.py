"""Where studies come from: one small seam for image sources (in the style of MONAI Label's
``Datastore``), so a new source is a class with ``items()`` and nothing else changes.

Sources today: ``UploadSource`` (files handed over by the browser), ``FolderSource`` (a
folder, e.g. the bundled samples), and ``services.dicomweb.DicomWebSource`` (instances retrieved
from the PACS with WADO-RS): all yield the same ``SourceItem`` values. Every item goes through
``services.ingest.ingest_file`` (load, de-identify, store once, predict once per model).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.ingest import IngestOutcome, ModelHandle, SessionFactory, ingest_file
from settings import IMAGE_SUFFIXES


@dataclass(frozen=True)
class SourceItem:
    name: str  # the display name (never logged)
    read: Callable[[], bytes]  # the file's bytes, read only when the item is ingested


class ImageSource(Protocol):
    """A place studies come from. ``source`` is what ``images.source`` records for them."""

    @property
    def source(self) -> str: ...

    def items(self) -> Iterator[SourceItem]: ...


@dataclass(frozen=True)
class UploadSource:
    """Files the user uploaded: (name, bytes) pairs."""

    files: Sequence[tuple[str, bytes]]
    source: str = "upload"

    def items(self) -> Iterator[SourceItem]:
        for name, data in self.files:
            yield SourceItem(name, functools.partial(bytes, data))


def _is_mask(relative: Path, mask_words: Sequence[str], mask_suffixes: Sequence[str]) -> bool:
    parts = [p.lower() for p in relative.parts]
    in_mask_folder = any(word in part for part in parts for word in mask_words)
    return in_mask_folder or relative.stem.lower().endswith(tuple(mask_suffixes))


@dataclass(frozen=True)
class FolderSource:
    """X-ray files under ``root`` (sorted), named by their path relative to it; files that are
    masks (a folder or file name says so) are left out."""

    root: Path
    source: str = "sample"
    mask_words: tuple[str, ...] = ("mask",)  # folders or files holding masks, not X-rays
    mask_suffixes: tuple[str, ...] = ("_lung", "_infection")  # samples/<class>/<name>_lung.png

    def files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [
            path
            for path in sorted(self.root.rglob("*"))
            if path.is_file()
            and path.suffix.lower() in IMAGE_SUFFIXES
            and not _is_mask(path.relative_to(self.root), self.mask_words, self.mask_suffixes)
        ]

    def items(self) -> Iterator[SourceItem]:
        for path in self.files():
            yield SourceItem(path.relative_to(self.root).as_posix(), path.read_bytes)


def ingest_source(
    scope: SessionFactory,
    source: ImageSource,
    models: Iterable[ModelHandle],
    before_each: Callable[[int, SourceItem], None] | None = None,
) -> list[IngestOutcome]:
    """Ingest every item of ``source`` in order; one bad file never stops the others.
    ``before_each(i, item)`` is called before item ``i`` (from 0) is read: a progress display."""
    handles = list(models)
    outcomes = []
    for i, item in enumerate(source.items()):
        if before_each is not None:
            before_each(i, item)
        outcomes.append(ingest_file(scope, item.read(), item.name, handles, source.source))
    return outcomes
