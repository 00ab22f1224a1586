"""The services the pages stand on, without Streamlit: ingest, masks from canvas strokes,
window presets and the four panels, identity rules, the version table."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from app_helpers import scope_for

from services import bootstrap, display, identity, ingest, masks, studies


def test_ingest_dedupes_and_reports_bad_files(tmp_path: Path, random_checkpoint: Path) -> None:
    from inference.model import load_checkpoint

    scope = scope_for(f"sqlite:///{tmp_path / 'db.sqlite'}")
    row, created = bootstrap.register_checkpoint(scope, random_checkpoint, load_checkpoint)
    assert created
    model = ingest.ModelHandle(row.id, row.version, load_checkpoint(random_checkpoint))
    ok, png = cv2.imencode(".png", (np.random.default_rng(1).random((128, 160)) * 255).astype("u1"))
    first = ingest.ingest_file(scope, png.tobytes(), "a.png", [model])
    again = ingest.ingest_file(scope, png.tobytes(), "copy.png", [model])
    bad = ingest.ingest_file(scope, b"hello, I am text\n" * 10, "notes.dcm", [model])
    assert first.ok and first.created and first.predicted == (row.version,)
    assert again.ok and not again.created and again.predicted == ()
    assert again.image_id == first.image_id
    assert not bad.ok and bad.image_id is None and len(bad.error) > 10
    # registering the same checkpoint again is a no-op
    assert bootstrap.register_checkpoint(scope, random_checkpoint, load_checkpoint)[1] is False


def test_strokes_add_and_erase_on_the_image_grid() -> None:
    base = np.zeros((100, 200), bool)
    base[:, :100] = True
    ch, cw = masks.canvas_size(*base.shape, max_side=400)
    assert (ch, cw) == (200, 400)
    rgba = np.zeros((ch, cw, 4), np.uint8)
    alpha = round(255 * masks.STROKE_ALPHA)
    rgba[20:60, 240:320] = (*masks.hex_to_rgb(masks.ADD_COLOR), alpha)  # add on the right
    rgba[100:140, 40:120] = (*masks.hex_to_rgb(masks.ERASE_COLOR), alpha)  # erase on the left
    edited = masks.composite_strokes(base, rgba)
    assert edited[10:30, 120:160].all()  # added, in image coordinates (half the canvas)
    assert not edited[50:70, 20:60].any()  # erased
    assert edited[80:, :100].all() and not edited[80:, 170:].any()  # untouched elsewhere
    assert masks.dice(base, base) == 1.0 and masks.dice(base, ~base) == 0.0
    assert masks.dice(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0
    assert masks.composite_strokes(base, None).sum() == base.sum()


def test_later_stroke_wins_where_see_through_strokes_overlap() -> None:
    add = np.array(masks.hex_to_rgb(masks.ADD_COLOR), float)
    erase = np.array(masks.hex_to_rgb(masks.ERASE_COLOR), float)
    a = masks.STROKE_ALPHA
    # erase painted over add, and add over erase ("over" compositing, un-premultiplied)
    out_alpha = a + a * (1 - a)
    erase_on_top = (erase * a + add * a * (1 - a)) / out_alpha
    add_on_top = (add * a + erase * a * (1 - a)) / out_alpha
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0, :3], rgba[0, 1, :3] = erase_on_top.round(), add_on_top.round()
    rgba[..., 3] = round(255 * out_alpha)
    added, erased = masks.stroke_layers(rgba)
    assert erased[0, 0] and added[0, 1]


def test_window_presets_follow_the_raw_range_and_inversion() -> None:
    raw = np.linspace(1000, 5000, 256 * 256, dtype=np.float32).reshape(256, 256)
    presets = display.window_presets(raw, (3000.0, 2000.0), invert=False)
    assert list(presets)[0] == "Header" and presets["Header"] == (3000.0, 2000.0)
    lo, hi = display.raw_range(raw)
    assert presets["Lung"][0] < presets["Bone"][0]  # lungs are the dark end
    assert presets["Full range"] == pytest.approx(((lo + hi) / 2, hi - lo))
    inverted = display.window_presets(raw, None, invert=True)
    assert "Header" not in inverted and inverted["Lung"][0] > inverted["Bone"][0]


def test_four_panels_share_zoom_and_scale() -> None:
    pixels = np.random.default_rng(0).random((1200, 1000)).astype(np.float32)
    mask = np.zeros(pixels.shape, bool)
    mask[300:900, 200:800] = True
    grid = display.DisplayGrid.for_shape(*pixels.shape)
    panels = display.panel_images(pixels, mask, mask, pixels, 0.4, grid)
    assert [p.shape for p in panels] == [(*grid.shape, 3)] * 4
    fig = display.panels_figure(panels, grid)
    images = [t for t in fig.data if t.type == "image"]
    assert len(images) == 4
    scales = [t for t in fig.data if t.type == "scatter" and t.marker.showscale]
    assert len(scales) == 1 and scales[0].xaxis == "x4"  # the Grad-CAM's colour bar
    marks = [(a.text, a.xref) for a in fig.layout.annotations if a.text in ("<b>R</b>", "<b>L</b>")]
    assert len(marks) == 8  # R and L on every panel
    assert {fig.layout[f"xaxis{i}"].matches for i in (2, 3, 4)} == {"x"}
    assert {fig.layout[f"yaxis{i}"].matches for i in (2, 3, 4)} == {"y"}
    assert fig.data[0].dx == pytest.approx(1200 / display.DISPLAY_MAX_SIDE)


def test_identity_rules() -> None:
    with pytest.raises(identity.IdentityError):
        identity.clean_name("   ")
    assert identity.clean_name("  Ada   Lovelace ") == "Ada Lovelace"
    rad = identity.Identity(1, "R", "radiologist")
    ann = identity.Identity(2, "A", "annotator")
    assert identity.can_review(rad) and not identity.can_review(ann)
    assert identity.can_edit(ann) and not identity.can_edit(None)


def test_version_table_has_dice_against_the_model() -> None:
    from datetime import UTC, datetime

    model = np.zeros((10, 10), bool)
    model[:5] = True
    v = studies.VersionInfo(3, "lung", "draft", "Ann", "annotator", datetime.now(UTC), None,
                            True, None)  # fmt: skip
    rows = studies.version_table([v], {3: model.copy()}, model)
    assert rows[0]["Dice vs model"] == 1.0 and "conflict draft" in rows[0]["status"]
