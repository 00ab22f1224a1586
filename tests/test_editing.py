"""The correction page's own undo/redo history (services.editing)."""

from __future__ import annotations

import numpy as np
import pytest

from services.editing import MAX_STATES, MaskEdits


def _mask(*cells: tuple[int, int]) -> np.ndarray:
    m = np.zeros((5, 7), bool)
    for c in cells:
        m[c] = True
    return m


def test_undo_redo_clear_walk_the_committed_states() -> None:
    edits = MaskEdits.starting_from(_mask())
    assert not edits.can_undo() and not edits.can_redo()
    assert edits.apply(_mask((1, 1)))
    assert edits.apply(_mask((1, 1), (2, 3)))
    assert not edits.apply(_mask((1, 1), (2, 3)))  # no change: no step
    assert edits.undo()
    np.testing.assert_array_equal(edits.current(), _mask((1, 1)))
    assert edits.redo()
    np.testing.assert_array_equal(edits.current(), _mask((1, 1), (2, 3)))
    assert edits.clear()
    np.testing.assert_array_equal(edits.current(), _mask())
    assert edits.undo()  # clear is a step too
    np.testing.assert_array_equal(edits.current(), _mask((1, 1), (2, 3)))
    edits.undo()
    edits.apply(_mask((4, 6)))  # a new shape after an undo drops the redo
    assert not edits.can_redo()
    np.testing.assert_array_equal(edits.current(), _mask((4, 6)))


def test_history_is_bounded_and_keeps_its_start() -> None:
    start = _mask((0, 0))
    edits = MaskEdits.starting_from(start)
    for i in range(MAX_STATES + 10):
        edits.apply(_mask((i % 5, (i // 5) % 7), (4, 6)) if i % 2 else _mask((i % 5, 0)))
    assert len(edits.states) == MAX_STATES
    np.testing.assert_array_equal(edits.start(), start)


def test_a_mask_of_another_shape_is_refused() -> None:
    edits = MaskEdits.starting_from(_mask())
    with pytest.raises(ValueError, match="shape"):
        edits.apply(np.zeros((3, 3), bool))
