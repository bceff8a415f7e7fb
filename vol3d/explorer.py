"""Ask a trained model about cached cases and see its answers, boxes and findings in one view.

:func:`explore` is the one call a notebook needs::

    from vol3d import viz
    viz.explore("runs/tiny", "cache/tiny")

It shows a case dropdown (held-out cases first), a question box with the questions the model's
finding vocabulary suggests, a "locate" switch (the answer must start with a box), and, updated
in place after every question: the answer with its boxes highlighted, the findings digest the
model read, three orthogonal slices through the first box (predicted boxes solid, the case's
true boxes of the asked finding dashed) and the box table in every frame. The same
:class:`Explorer` answers from code (:meth:`Explorer.ask`), and every view it draws is also an
HTML snapshot with the slices embedded as a PNG (:meth:`ExplorerView.html`), which is what a
static rendering of the notebook (nbconvert HTML, a shared report) shows where widgets cannot run.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from preprocess.errors import InputError

#: Splits listed first in the case dropdown: cases the model never trained on.
HELD_OUT = ("test", "val")


@dataclasses.dataclass
class ExplorerView:
    """One answered question: the :class:`~vol3d.inference.Answer`, the true boxes of the finding it
    asks about (model-input voxels) and the figure of three orthogonal slices."""

    case: str
    answer: Any
    finding: str | None
    truth: np.ndarray
    figure: Any

    def png(self, dpi: int = 90) -> bytes:
        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()

    def answer_html(self) -> str:
        from vol3d.inference import format_boxes
        from vol3d.viz import highlight_boxes_in_text

        a = self.answer
        parts = [f'<div style="color:#b00"><b>warning:</b> {html.escape(w)}</div>' for w in a.warnings]
        parts.append(f"<b>case</b> {html.escape(self.case)}")
        if a.findings:
            parts.append(f'<div style="color:#555"><b>perceived:</b> {html.escape(a.findings)}</div>')
        parts.append(f"<b>Q:</b> {html.escape(a.question)}<br><b>A:</b> {highlight_boxes_in_text(a.text)._repr_html_()}")
        if a.steps:
            rows = "".join(f"<tr><td>{i}</td><td>{html.escape(st.kind)}</td><td>{html.escape(st.text)}</td></tr>"
                           for i, st in enumerate(a.steps, start=1))
            parts.append(f"<b>steps</b><table style='font-size:12px'>{rows}</table>")
        if a.boxes:
            parts.append(f"<pre style='font-size:11px'>{html.escape(format_boxes(a.boxes))}</pre>")
        elif self.finding and len(self.truth):
            parts.append(f"<i>no box in the answer; the slices go through the true {html.escape(self.finding)}</i>")
        return "<br>".join(parts)

    def html(self) -> str:
        """The answer, the slices as an embedded PNG and the box table: a static snapshot of the view."""
        img = base64.b64encode(self.png()).decode("ascii")
        return f'<div>{self.answer_html()}<br><img src="data:image/png;base64,{img}" style="max-width:100%"/></div>'

    def _repr_html_(self) -> str:
        return self.html()


class Explorer:
    """Questions about the cases of a cache, answered by a trained model (see :func:`explore`).

    Args:
        run: a ``vol3d train`` run directory, or a loaded :class:`~vol3d.inference.Vol3DPipeline`.
        cache: the cache the cases come from; None: the run's training cache (``RUN/config.yaml``).
        device: for loading ``run``; None picks a GPU when there is one.
        max_new_tokens: longest answer.
    """

    def __init__(self, run: Any, cache: str | os.PathLike | None = None, device: str | None = None,
                 max_new_tokens: int = 128) -> None:
        from vol3d.data.cache import CacheDataset
        from vol3d.inference import Vol3DPipeline, cache_of_run, load

        if isinstance(run, Vol3DPipeline):
            self.pipe = run
        else:
            if cache is None:
                cache = cache_of_run(Path(run))
                if cache is None:
                    raise InputError(f"the training cache named in {run}/config.yaml is not found; pass cache=")
            self.pipe = load(run, device=device, preprocess_config=cache)
        if cache is None:
            raise InputError("pass cache= (the cache whose cases to explore) with a loaded pipeline")
        self.cache = Path(cache)
        self.max_new_tokens = max_new_tokens
        self.cases = CacheDataset(self.cache, mode="volume", input_size=tuple(self.pipe.input_shape))
        if not len(self.cases):
            raise InputError(f"{self.cache} has no ok case to explore; run `vol3d preprocess` into it first")
        rank = {s: i for i, s in enumerate(HELD_OUT)}
        self._order = sorted(range(len(self.cases)), key=lambda i: (
            rank.get(str(self.cases.rows[i].get("split")), len(rank)), str(self.cases.rows[i]["id"])))
        self._scan: dict[int, dict[str, Any]] = {}
        self._vocab: Any = None
        self.last: ExplorerView | None = None

    # ------------------------------------------------------------------ what can be asked

    @property
    def vocab(self) -> Any:
        """The findings to ask about: the model's vocabulary (perception models), else the cache's
        ``vocab.json``, else the synthetic default."""
        if self._vocab is None:
            from preprocess.sidecars import cache_vocabulary
            from vol3d.tasks.findings import as_vocab

            found = getattr(self.pipe.model, "vocab", None) or cache_vocabulary(self.cache).get("findings") or None
            self._vocab = as_vocab(found)
        return self._vocab

    def case_ids(self) -> list[str]:
        """Case ids, held-out splits first."""
        return [str(self.cases.rows[i]["id"]) for i in self._order]

    def _index(self, case: str | None) -> int:
        if case is None:
            return self._order[0]
        for i, row in enumerate(self.cases.rows):
            if str(row["id"]) == str(case):
                return i
        raise InputError(f"case {case!r} is not an ok case of {self.cache}; pick one of explorer.case_ids()")

    def _truth(self, index: int) -> dict[str, Any]:
        """The case's true boxes per finding (read once, without the voxels)."""
        from vol3d.tasks import finding_truth

        if index not in self._scan:
            self._scan[index] = finding_truth(self.cases.item_without_pixels(index), self.vocab)
        return self._scan[index]

    def _findings_of(self, index: int) -> list[str]:
        return [name for name, t in self._truth(index).items() if t.n > 0]

    def case_label(self, case: str | None = None) -> str:
        """``"<id> (test split: liver lesion, kidney cyst)"``: what the dropdown shows."""
        i = self._index(case)
        found = [self.vocab[n].text for n in self._findings_of(i)]
        return f"{self.cases.rows[i]['id']} ({self.cases.rows[i].get('split')}: {', '.join(found) or 'no finding'})"

    def questions(self, case: str | None = None) -> list[str]:
        """Suggested questions: about the case's findings first, then every finding of the vocabulary (where,
        whether, how many, how large)."""
        first = self._findings_of(self._index(case))
        names = first + [n for n in self.vocab if n not in first]
        out = []
        for name in names:
            spec = self.vocab[name]
            out.append(f"Where is the {spec.text}?")
            if spec.countable:
                article = "an" if spec.text[:1].lower() in "aeiou" else "a"
                out += [f"Is there {article} {spec.text}?", f"How many {spec.plural_text} are there?",
                        f"What is the diameter of the largest {spec.text}?"]
            else:
                out.append(f"Is there {spec.text}?")
        return ["Write the report.", *out]

    # ------------------------------------------------------------------ asking

    def ask(self, question: str, case: str | None = None, locate: bool = False) -> ExplorerView:
        """Answer ``question`` about ``case`` (default: the first held-out case); the view is kept in
        :attr:`last`."""
        from vol3d.tasks.findings import finding_named
        from vol3d.viz import answer_slices, match_order

        index = self._index(case)
        case_id = str(self.cases.rows[index]["id"])
        answer = self.pipe.ask(f"{self.cache}::{case_id}", question, max_new_tokens=self.max_new_tokens, locate=locate)
        finding = finding_named(question, self.vocab)  # the finding whose true boxes are drawn
        truth = self._truth(index)[finding].boxes if finding else np.zeros((0, 6))
        figure = answer_slices(answer, truth, self.vocab[finding].text if finding else "box")
        self.last = ExplorerView(case_id, answer, finding, match_order(answer.model_boxes, truth), figure)
        return self.last

    # ------------------------------------------------------------------ the widget

    def widget(self, question: str | None = None, case: str | None = None) -> Any:
        """An ``ipywidgets.VBox``: case dropdown, question box (with suggestions), "locate" switch and
        "Ask" button, then the answer and the slices, redrawn in place after each question."""
        import ipywidgets as w

        ids = self.case_ids()
        start = case or ids[0]
        cases = w.Dropdown(options=[(self.case_label(c), c) for c in ids], value=start, description="case",
                           layout=w.Layout(width="95%"))
        suggestions = self.questions(start)
        q = w.Combobox(value=question or suggestions[1], options=suggestions, placeholder="ask about the volume",
                       description="question", ensure_option=False, layout=w.Layout(width="70%"))
        locate = w.Checkbox(value=False, description="locate (answer with a box)", indent=False)
        button = w.Button(description="Ask", button_style="primary")
        status = w.HTML()
        text = w.HTML()
        image = w.Image(format="png")

        def run(*_: Any) -> None:
            status.value = "<i>thinking...</i>"
            try:
                view = self.ask(q.value, cases.value, locate=locate.value)
            except Exception as exc:  # shown in the widget: a notebook callback's traceback goes nowhere
                status.value = f'<span style="color:#b00">{html.escape(type(exc).__name__)}: {html.escape(str(exc))}</span>'
                return
            text.value = view.answer_html()
            image.value = view.png()
            status.value = ""

        def new_case(change: Any) -> None:
            q.options = self.questions(change["new"])
            run()

        button.on_click(run)
        cases.observe(new_case, names="value")
        run()
        return w.VBox([cases, w.HBox([q, locate, button]), status, text, image])


def explore(run: Any, cache: str | os.PathLike | None = None, question: str | None = None,
            case: str | None = None, interactive: bool | None = None, device: str | None = None,
            max_new_tokens: int = 128) -> Explorer:
    """Explore a trained model's grounded answers on a cache's cases, in a notebook.

    Displays the :meth:`Explorer.widget` when a notebook kernel with ipywidgets runs this
    (``interactive=None``), and under it a static snapshot of the first answer (answer, slices and
    box table as HTML with an embedded PNG): a static rendering of the notebook cannot run widgets,
    so the snapshot is what it shows. ``interactive=False`` displays the snapshot alone. Returns the
    :class:`Explorer` (``.ask(question, case)`` answers from code).
    """
    from IPython.display import HTML, display

    from vol3d.viz import _widgets_available

    explorer = Explorer(run, cache, device=device, max_new_tokens=max_new_tokens)
    if interactive is None:
        interactive = _widgets_available()
    first = question or explorer.questions(case)[1]
    if interactive:
        display(explorer.widget(first, case))
        view = explorer.last
        assert view is not None
        display(HTML("<p><i>static snapshot of the first answer (what a page without widgets shows):</i></p>"
                     + view.html()))
    else:
        display(HTML(explorer.ask(first, case).html()))
    return explorer


__all__ = ["Explorer", "ExplorerView", "explore"]
