"""``viz.explore``: pick a case, ask, and the answer, its boxes on three slices and the box table update
in place; a static snapshot shows the same where widgets cannot run.

A saved tiny model with a grounding head (untrained weights: the real load, preprocessing, generate
and box mapping path) answers with ``locate`` so every answer has a box to draw.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from preprocess.errors import InputError
from tests.vol3d.test_ask_eval_cli import save_tiny_run
from tests.vol3d.test_inference import INPUT, build_export_and_cache
from vol3d import viz
from vol3d.explorer import Explorer


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("explore")
    data = build_export_and_cache(root, cases=4)
    data["run"] = save_tiny_run(root / "run", data["cfg"], box_head=True)
    return data


def test_cases_held_out_first_and_questions_from_the_vocabulary(world):
    ex = Explorer(world["run"], world["cache"], device="cpu")
    splits = {str(r["id"]): r["split"] for r in world["rows"]}
    ids = ex.case_ids()
    assert sorted(ids) == sorted(splits) and splits[ids[0]] == "test"
    assert [splits[i] for i in ids] == sorted((splits[i] for i in ids), key=lambda s: s != "test")
    with_finding = next(i for i in ids if "no finding" not in ex.case_label(i))
    label = ex.case_label(with_finding)
    first = label.split(": ", 1)[1].split(",")[0].rstrip(")")
    qs = ex.questions(with_finding)
    assert qs[0] == "Write the report." and qs[1] == f"Where is the {first}?"  # the case's own finding first
    assert any(q.startswith("How many") for q in qs)
    with pytest.raises(InputError, match="not an ok case"):
        ex.ask("Is there a liver lesion?", case="nope")


def test_ask_draws_the_answer_box_and_the_true_boxes_and_a_static_snapshot(world):
    ex = Explorer(world["run"], world["cache"], device="cpu", max_new_tokens=2)
    case = next(i for i in ex.case_ids() if "liver lesion" in ex.case_label(i))
    view = ex.ask("Where is the liver lesion?", case, locate=True)
    assert ex.last is view and view.case == case and view.finding == "liver_lesion"
    assert len(view.answer.boxes) == 1 and view.answer.volume.shape[1:] == INPUT
    assert len(view.truth) >= 1  # the case's true liver lesion boxes, in model-input voxels
    gids = [p.get_gid() for ax in view.figure.axes for p in ax.patches if p.get_gid()]
    assert "pred-0" in gids and any(g.startswith("true-") for g in gids)
    page = view.html()
    png = base64.b64decode(re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "Where is the liver lesion?" in page and "world" in page  # the question and the box table
    assert "<box>" not in page.split("<b>A:</b>")[1].split("<pre")[0].replace("&lt;box&gt;", "")  # boxes highlighted


def test_widget_updates_in_place_when_the_case_or_question_changes(world):
    pytest.importorskip("ipywidgets")
    ex = Explorer(world["run"], world["cache"], device="cpu", max_new_tokens=2)
    box = ex.widget("Where is the liver lesion?")
    cases, row, status, text, image = box.children
    question, locate, button = row.children
    assert cases.value == ex.case_ids()[0] and image.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Where is the liver lesion?" in text.value and status.value == ""
    question.value, locate.value = "Where is the kidney cyst?", True
    button.click()
    assert "kidney cyst" in text.value and ex.last.answer.boxes and "world" in text.value
    other = ex.case_ids()[-1]
    cases.value = other  # a new case asks again and offers that case's questions
    assert ex.last.case == other and f"case</b> {other}" in text.value
    assert list(question.options) == ex.questions(other)
    question.value = "Where is the liver lesion?"
    ex.pipe = None  # a failing answer is shown in the widget, not lost in a callback
    button.click()
    assert "Error" in status.value


def test_explore_without_widgets_displays_the_snapshot(world, monkeypatch):
    shown: list[Any] = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    ex = viz.explore(world["run"], world["cache"], interactive=False, device="cpu", max_new_tokens=2)
    assert isinstance(ex, Explorer) and len(shown) == 1
    assert "data:image/png;base64," in shown[0].data and ex.last is not None
    assert np.asarray(ex.last.answer.volume).shape[1:] == INPUT


def test_explore_finds_the_runs_training_cache(world, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    with pytest.raises(InputError, match="config.yaml"):
        Explorer(run, None, device="cpu")  # a saved model without a training config names no cache: say so
    (run / "config.yaml").write_text(f"data:\n  cache_dir: {world['cache']}\n")
    assert Explorer(run, None, device="cpu").cache == Path(world["cache"])
