"""The undo/redo history of one mask edit, kept by the app rather than by the canvas.

The correction page commits every shape the canvas sends (a finished stroke, a closed polygon)
into this history at once and gives the canvas a fresh, empty drawing layer on top of the new
mask. So the canvas never holds more than the shape being drawn, and undo, redo and clear are
the app's own buttons acting here: what the canvas shows, the preview, the live figures and the
saved mask are always the same ``current`` mask. (The component's own undo history is
per-vertex for polygons and is not reported back in polygon mode: streamlit-drawable-canvas
0.13 sends undo/redo only when ``update_streamlit`` applies, which it never does for polygons.)

States are whole masks, bit-packed (an 1024x1024 mask is 128 KiB), at most ``MAX_STATES``.
Each state also keeps the clicks of the click tool that led to it (on the mask grid): the
click-refinement network sees all of them, so undoing a click takes it back from the network
too. A brush or polygon edit keeps the clicks so far; clear and starting again drop them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_STATES = 60
ClickMark = tuple[int, int, bool]  # (y, x, positive) on the mask grid


def _pack(mask: np.ndarray) -> bytes:
    return np.packbits(np.asarray(mask, bool), axis=None).tobytes()


@dataclass
class MaskEdits:
    """States of one mask, oldest first; ``position`` is the one shown."""

    shape: tuple[int, int]
    states: list[bytes] = field(default_factory=list)
    position: int = 0
    clicks: list[tuple[ClickMark, ...]] = field(default_factory=list)  # one entry per state

    @classmethod
    def starting_from(cls, mask: np.ndarray) -> MaskEdits:
        mask = np.asarray(mask, bool)
        return cls(shape=(int(mask.shape[0]), int(mask.shape[1])), states=[_pack(mask)],
                   clicks=[()])

    def _unpack(self, index: int) -> np.ndarray:
        h, w = self.shape
        bits = np.frombuffer(self.states[index], dtype=np.uint8)
        return np.unpackbits(bits, count=h * w).reshape(h, w).astype(bool)

    def current(self) -> np.ndarray:
        return self._unpack(self.position)

    def current_clicks(self) -> tuple[ClickMark, ...]:
        """The clicks that led to the current state."""
        return self.clicks[self.position]

    def start(self) -> np.ndarray:
        """The mask the edit started from (what Clear returns to)."""
        return self._unpack(0)

    @property
    def steps(self) -> int:
        """How many committed changes lead to the current mask."""
        return self.position

    def can_undo(self) -> bool:
        return self.position > 0

    def can_redo(self) -> bool:
        return self.position < len(self.states) - 1

    def apply(self, mask: np.ndarray, clicks: tuple[ClickMark, ...] | None = None) -> bool:
        """Make ``mask`` the current state (dropping any redo); False if nothing changed.
        ``clicks``: the clicks that led to it (default: those of the current state)."""
        mask = np.asarray(mask, bool)
        if mask.shape != self.shape:
            raise ValueError(f"mask shape {mask.shape} is not the edited {self.shape}")
        packed = _pack(mask)
        if packed == self.states[self.position]:
            return False
        marks = self.current_clicks() if clicks is None else tuple(clicks)
        self.states = [*self.states[: self.position + 1], packed]
        self.clicks = [*self.clicks[: self.position + 1], marks]
        if len(self.states) > MAX_STATES:  # forget the oldest steps, keep the start
            self.states = [self.states[0], *self.states[-(MAX_STATES - 1) :]]
            self.clicks = [self.clicks[0], *self.clicks[-(MAX_STATES - 1) :]]
        self.position = len(self.states) - 1
        return True

    def undo(self) -> bool:
        if not self.can_undo():
            return False
        self.position -= 1
        return True

    def redo(self) -> bool:
        if not self.can_redo():
            return False
        self.position += 1
        return True

    def clear(self) -> bool:
        """Back to the starting mask, as one more (undoable) step, without clicks."""
        return self.apply(self.start(), clicks=())
