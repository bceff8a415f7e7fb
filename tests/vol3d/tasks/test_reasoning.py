"""Measurement questions and reasoning chains read from a volume's regions (vol3d.tasks.reasoning)."""

from __future__ import annotations

import numpy as np
import pytest

from preprocess.errors import ConfigError
from preprocess.geometry import denormalise_boxes, parse_boxes
from vol3d.tasks.findings import FindingSpec, as_vocab, parse_criterion
from vol3d.tasks.reasoning import (
    Query,
    call_conditions,
    closed_answer,
    count_answer,
    located_regions,
    location_answer,
    measure,
    parse_question,
    presence_answer,
    reason,
    size_answer,
    truth_queries,
)
from vol3d.tasks.regions import LabelSpec, Perceived, Region
from vol3d.tasks.samples import TEMPLATES, _fill

LABELS = LabelSpec(("background", "liver", "spleen", "kidney_left", "kidney_right", "lesion"), ("lesion",))
ORGANS = list(LABELS.organs[1:])
VOCAB = as_vocab({
    "liver_lesion": {"text": "liver lesion", "organ": "liver", "nouns": ["lesion"], "organ_words": ["liver"]},
    "kidney_cyst": {"text": "kidney cyst", "organ": "kidney", "nouns": ["cyst"], "organ_words": ["kidney"],
                    "criterion": "diameter >= 10 mm"},
    "splenomegaly": {"text": "splenomegaly", "organ": "spleen", "phrases": ["splenomegaly"], "countable": False,
                     "criterion": "craniocaudal > 120 mm"},
})
SPACING = np.array([2.0, 2.0, 5.0])


def region(kind, name, lo, hi, organ="", volume=1.0, score=1.0, cls=0) -> Region:
    box = np.array([*lo, *hi], float)
    return Region(kind, name, box, (box[3:] - box[:3]) * SPACING, volume, organ, score, cls)


def perceived(spleen_slices: float = 30.0, cyst_vox: float = 4.0) -> Perceived:
    """Two liver lesions (16 x 12 x 15 mm and 8 x 8 x 10 mm), a kidney cyst of ``cyst_vox`` voxels
    (2 mm each) across, a spleen ``spleen_slices`` x 5 mm long; splenomegaly probability 0.3."""
    findings = [region("finding", "liver_lesion", (10, 10, 4), (18, 16, 7), "liver", 1.5, 0.9),
                region("finding", "liver_lesion", (30, 10, 8), (34, 14, 10), "liver", 0.3, 0.8),
                region("finding", "kidney_cyst", (40, 30, 4), (40 + cyst_vox, 30 + cyst_vox, 6), "kidney_left", 0.2)]
    organs = [region("organ", "liver", (0, 0, 0), (40, 30, 20), "liver", 1500.0, cls=1),
              region("organ", "spleen", (50, 0, 0), (60, 10, spleen_slices), "spleen", 300.0, cls=2),
              region("organ", "kidney_left", (38, 28, 2), (46, 36, 14), "kidney_left", 150.0, cls=3)]
    return Perceived(findings, organs, {"splenomegaly": 0.3})


def test_criteria_parse_and_bad_ones_say_how_to_write_them():
    c = parse_criterion("craniocaudal > 120 mm")
    assert (c.measure, c.op, c.value, c.unit) == ("craniocaudal", ">", 120.0, "mm") and str(c) == "craniocaudal > 120 mm"
    assert c.holds(121) and not c.holds(120)
    assert parse_criterion("volume <= 2.5 ml").unit == "mL" and parse_criterion("") is None
    with pytest.raises(ConfigError, match="e.g. 'craniocaudal > 120 mm'"):
        parse_criterion("bigger than 12 cm")
    with pytest.raises(ConfigError, match="a volume is in mL"):
        parse_criterion("volume > 3 mm")
    with pytest.raises(ConfigError, match="'spleen'"):  # a vocabulary entry is checked when it is read
        FindingSpec("spleen", "spleen", phrases=("x",), criterion="length > 1")


@pytest.mark.parametrize("question, query", [
    ("<vol>\nWhat is the diameter of the largest liver lesion?", Query("diameter", "liver_lesion")),
    ("How big is the kidney cyst?", Query("diameter", "kidney_cyst")),
    ("What is the volume of the largest liver lesion in mL?", Query("volume", "liver_lesion")),
    ("How far apart are the two largest liver lesions?", Query("distance", "liver_lesion")),
    ("What is the craniocaudal length of the spleen?", Query("length", organ="spleen")),
    ("How large is the spleen? Is there splenomegaly?", Query("length", organ="spleen")),  # a condition: its organ
    ("What is the volume of the left kidney?", Query("volume", organ="kidney_left")),
    ("What is the volume of the liver?", Query("volume", organ="liver")),  # "liver" is not "liver lesion"
    ("What is the volume of the kidney?", None),  # two kidneys: ambiguous
    ("<vol>\nIs the largest liver lesion larger than 20 mm?", None),  # yes/no, not a measurement
    ("<vol>\nDoes the largest liver lesion measure more than 20 mm?", None),
    ("<vol>\nTell me about any liver lesion in this scan, with size and location.", None),
    ("How many liver lesions are there?", None),
])
def test_measurement_questions_are_recognised(question, query):
    assert parse_question(question, VOCAB, ORGANS) == query


def test_measurements_in_mm_and_ml_from_the_regions():
    p = perceived()
    m = measure(Query("diameter", "liver_lesion"), p, VOCAB, SPACING)
    assert m.value == 16 and m.regions == [p.findings[0]] and "16 mm (16 x 12 x 15 mm)" in m.text
    assert measure(Query("volume", "liver_lesion"), p, VOCAB, SPACING).value == 1.5
    # centres (14, 13, 5.5) and (32, 12, 9) voxels -> (36, -2, 17.5) mm apart
    d = measure(Query("distance", "liver_lesion"), p, VOCAB, SPACING)
    assert d.value == pytest.approx(np.sqrt(36**2 + 2**2 + 17.5**2)) and len(d.regions) == 2
    assert measure(Query("length", organ="spleen"), p, VOCAB, SPACING).value == 150
    assert measure(Query("volume", organ="kidney_left"), p, VOCAB, SPACING).value == 150.0
    one = measure(Query("distance", "kidney_cyst"), p, VOCAB, SPACING)
    assert one.value is None and "Only one kidney cyst" in one.text
    none = Perceived([], p.organs, {})
    assert measure(Query("diameter", "liver_lesion"), none, VOCAB, SPACING).value is None
    assert measure(Query("length", organ="kidney_right"), p, VOCAB, SPACING).value is None


def test_a_measurement_that_presumes_an_unseen_instance_reads_the_likeliest_candidate_and_says_so():
    """"How far apart are the two kidney cysts?" presumes two; with one seen, the likeliest second one
    below the threshold stands in, named as such; with none seen and no candidate there is no number.
    Presence, counts and the chain's conclusion still read only what was found."""
    p = perceived()
    assert measure(Query("distance", "kidney_cyst"), p, VOCAB, SPACING).value is None  # no candidate: as before
    faint = region("finding", "kidney_cyst", (40, 10, 4), (42, 12, 6), "kidney_left", 0.05, 0.31)
    other = region("finding", "liver_lesion", (0, 0, 0), (2, 2, 2), "liver", 0.01, 0.2)
    p.candidates = [other, faint]
    d = measure(Query("distance", "kidney_cyst"), p, VOCAB, SPACING)
    # centres (42, 32, 5) and (41, 11, 5) voxels -> (2, 42, 0) mm apart
    assert d.value == pytest.approx(np.hypot(2, 42)) and d.regions == [p.findings[2], faint] and d.tentative
    assert d.text.startswith("Only one kidney cyst is seen clearly; with the likeliest second one (score 0.31, "
                             "below the finding threshold): they are 42 mm apart")
    seen = measure(Query("distance", "liver_lesion"), p, VOCAB, SPACING)  # two found: candidates unread
    assert not seen.tentative and seen.regions == p.findings[:2]
    assert measure(Query("diameter", "kidney_cyst"), p, VOCAB, SPACING).regions == [p.findings[2]]
    none_found = Perceived([], p.organs, {}, candidates=[faint])
    m = measure(Query("diameter", "kidney_cyst"), none_found, VOCAB, SPACING)
    assert m.value == 4 and m.tentative and m.text.startswith("No kidney cyst is seen clearly; the likeliest "
                                                              "candidate (score 0.31")
    assert measure(Query("volume", "kidney_cyst"), none_found, VOCAB, SPACING).value == 0.05
    assert measure(Query("distance", "kidney_cyst"), none_found, VOCAB, SPACING).value is None  # one of two
    chain = reason("What is the diameter of the largest kidney cyst?", none_found, VOCAB, LABELS, SPACING)
    assert chain.present is False and "no kidney cyst detected -> kidney cyst: no" in chain.conclusion.text
    assert chain.answer == m.text and [s.kind for s in chain.steps][-2:] == ["measure", "conclusion"]
    assert presence_answer("Is there a kidney cyst?", none_found, VOCAB) == "no"
    assert count_answer("How many kidney cysts are there?", none_found, VOCAB) == "0"


def test_truth_queries_ask_what_the_case_can_answer():
    qs = truth_queries(perceived(), VOCAB, LABELS)
    assert Query("distance", "liver_lesion") in qs and Query("distance", "kidney_cyst") not in qs
    assert {q.organ for q in qs if q.organ} == {"liver", "spleen", "kidney_left"}  # kidney_right not seen
    assert all(q.kind in ("length", "volume") for q in qs if q.organ)


def test_a_finding_chain_goes_organ_finding_measure_conclusion():
    p = perceived()
    chain = reason("Is there a liver lesion?", p, VOCAB, LABELS, SPACING)
    assert [s.kind for s in chain.steps] == ["organ", "finding", "finding", "measure", "conclusion"]
    assert chain.steps[0].name == "liver" and np.allclose(chain.steps[0].box, p.organs[0].box)
    assert np.allclose(chain.steps[1].box, p.findings[0].box) and chain.steps[3].value == 16
    assert chain.present is True and chain.conclusion.text == "2 detected -> liver lesion: yes"
    absent = reason("Is there a liver lesion?", Perceived([], p.organs, {}), VOCAB, LABELS, SPACING)
    assert [s.kind for s in absent.steps] == ["organ", "finding", "conclusion"] and absent.present is False
    # a measurement question adds its step before the conclusion and answers with the number
    dist = reason("How far apart are the two largest liver lesions?", p, VOCAB, LABELS, SPACING)
    assert dist.steps[-2].kind == "measure" and dist.steps[-2].unit == "mm" and dist.answer.endswith("apart "
                                                                                                    "(centre to centre).")
    assert reason("Write the report.", p, VOCAB, LABELS, SPACING) is None


def test_a_criterion_decides_the_conclusion_and_is_stated():
    small = reason("Is there a kidney cyst?", perceived(cyst_vox=4.0), VOCAB, LABELS, SPACING)  # 8 mm
    big = reason("Is there a kidney cyst?", perceived(cyst_vox=6.0), VOCAB, LABELS, SPACING)  # 12 mm
    assert small.present is False and small.conclusion.text == "8 mm < 10 mm -> kidney cyst: no"
    assert big.present is True and big.conclusion.text == "12 mm >= 10 mm -> kidney cyst: yes"
    # a condition is measured on its organ: 30 slices x 5 mm = 150 mm > 120 mm, whatever its classifier says
    spleen = reason("Is there splenomegaly?", perceived(), VOCAB, LABELS, SPACING)
    assert [s.kind for s in spleen.steps] == ["organ", "measure", "conclusion"] and spleen.steps[1].value == 150
    assert spleen.present is True and spleen.conclusion.text.startswith("150 mm > 120 mm")
    assert "classifier 0.30 disagrees" in spleen.conclusion.text
    normal = reason("Is there splenomegaly?", perceived(spleen_slices=20), VOCAB, LABELS, SPACING)
    assert normal.present is False and normal.conclusion.text.startswith("100 mm <= 120 mm -> splenomegaly: no")
    # without a criterion, the condition's probability decides, and the chain says so
    plain = {**VOCAB, "splenomegaly": FindingSpec("splenomegaly", "spleen", phrases=("splenomegaly",),
                                                  countable=False)}
    chain = reason("Is there splenomegaly?", perceived(), plain, LABELS, SPACING)
    assert chain.present is False and chain.conclusion.text == "probability 0.30 < 0.5 -> splenomegaly: no"


def test_a_region_cut_by_the_border_is_measured_as_a_lower_bound():
    from vol3d.tasks.regions import perceived_from_maps, touches_border

    assert touches_border(np.array([-0.5, 2.5, 2.5, 4.5, 6.5, 8.5]), (10, 10, 10))
    assert not touches_border(np.array([0.5, 2.5, 2.5, 4.5, 6.5, 8.5]), (10, 10, 10))
    organ_map = np.zeros((10, 10, 20), np.int64)
    organ_map[2:6, 2:6, 0:18] = 2  # the spleen runs out of the volume at z = 0
    organ_map[6:9, 2:6, 2:12] = 1  # the liver lies inside
    p, _ = perceived_from_maps(organ_map, np.zeros((10, 10, 20)), np.ones((2, 10, 10, 20)) / 2, [0.9], SPACING,
                               VOCAB, LABELS)
    spleen, liver = (next(r for r in p.organs if r.name == n) for n in ("spleen", "liver"))
    assert spleen.at_edge and not liver.at_edge
    m = measure(Query("length", organ="spleen"), p, VOCAB, SPACING)
    assert m.value == 90 and m.text == "The spleen measures at least 90 mm craniocaudally (it reaches the edge of the volume)."
    chain = reason("Is there splenomegaly?", p, VOCAB, LABELS, SPACING)  # 90 mm or more: not settled
    assert chain.present is False and "(a lower bound: it reaches the edge of the volume)" in chain.conclusion.text
    assert "at least 90 mm" in chain.steps[1].text
    spleen_long = np.zeros((10, 10, 30), np.int64)
    spleen_long[2:6, 2:6, 0:26] = 2  # 130 mm or more: settled even though cut
    p, _ = perceived_from_maps(spleen_long, np.zeros((10, 10, 30)), np.ones((2, 10, 10, 30)) / 2, [0.9], SPACING,
                               VOCAB, LABELS)
    chain = reason("Is there splenomegaly?", p, VOCAB, LABELS, SPACING)
    assert chain.present is True and "lower bound" not in chain.conclusion.text


def test_how_many_and_where_are_answered_by_the_regions():
    p = perceived()
    shape = (64, 64, 32)
    for q in ("How many liver lesions are there?", "What is the number of liver lesions? Answer with a number.",
              "<vol>\nCount the liver lesions in this scan."):
        assert count_answer(q, p, VOCAB) == "2"
    assert count_answer("How many kidney cysts are there?", Perceived([], p.organs, {}), VOCAB) == "0"
    assert count_answer("Is there a liver lesion?", p, VOCAB) is None  # not a count question
    assert count_answer("How many lesions are there?", p, VOCAB) is None  # names no vocabulary finding
    assert count_answer("How many times is splenomegaly seen?", p, VOCAB) is None  # a condition is not counted
    # where: one box per instance, ordered by its first corner, in 0..999 of the model input
    answer = location_answer("Where is the liver lesion?", "There is no liver lesion.", p, VOCAB, shape)
    boxes = parse_boxes(answer)
    assert len(boxes) == 2 and answer.count("<box>") == 2
    assert np.allclose(denormalise_boxes(np.stack(boxes), shape), [p.findings[0].box, p.findings[1].box], atol=0.1)
    # the language model wrote a box for a question that does not say "where": the regions still decide
    assert location_answer("Show me the kidney cyst.", "<box>[1,2,3,4,5,6]</box>", p, VOCAB, shape).count("<box>") == 1
    none = Perceived([], p.organs, {"splenomegaly": 0.2})
    assert location_answer("Where is the kidney cyst?", "<box>[1,2,3,4,5,6]</box>", none, VOCAB, shape) == \
        "There is no kidney cyst."
    assert location_answer("Where is the kidney cyst?", "<box>[1,2,3,4,5,6]</box>", none, VOCAB, shape,
                           keep_refusal=True) is None  # a forced box keeps the model's own
    assert location_answer("Describe the liver lesion.", "A lesion.", p, VOCAB, shape) is None
    # a condition present is located at its organ
    spleen = location_answer("Where is the splenomegaly?", "", Perceived([], p.organs, {"splenomegaly": 0.9}), VOCAB,
                             shape)
    assert np.allclose(denormalise_boxes(np.stack(parse_boxes(spleen)), shape), [p.organs[1].box], atol=0.1)
    assert location_answer("Where is the splenomegaly?", "", none, VOCAB, shape) == "There is no splenomegaly."
    assert located_regions(p, "liver_lesion", VOCAB) == [p.findings[0], p.findings[1]]


def test_whether_and_larger_than_are_answered_by_the_regions():
    p = perceived()
    empty = Perceived([], p.organs, {"splenomegaly": 0.7})
    # every phrasing the training questions use, about a finding found and one not found
    for template in TEMPLATES["presence"]:
        lesion, cyst = (template.format(**_fill(VOCAB[n])) for n in ("liver_lesion", "kidney_cyst"))
        assert presence_answer(lesion, p, VOCAB) == "yes" and presence_answer(lesion, empty, VOCAB) == "no"
        assert closed_answer(cyst, p, VOCAB) == "yes" and closed_answer(cyst, empty, VOCAB) == "no"
    assert presence_answer("Any splenomegaly?", p, VOCAB) is None  # not a yes/no question's form
    assert presence_answer("Is there splenomegaly?", p, VOCAB) == "no"  # probability 0.3
    assert presence_answer("Is there splenomegaly?", empty, VOCAB) == "yes"
    assert presence_answer("Do you see any kidney cyst?", p, VOCAB) == "yes"
    for other in ("Is the liver lesion benign?", "Does the liver lesion have a rim?", "Is there a liver lesion larger than 20 mm?",
                  "Is there a lesion?", "Is there a liver lesion or a kidney cyst?", "Where is the liver lesion?",
                  "Describe the kidney cyst."):
        assert presence_answer(other, p, VOCAB) is None, other
    # the largest liver lesion is 16 x 12 x 15 mm: its largest extent on any axis against the threshold
    for template in TEMPLATES["size"]:
        assert size_answer(template.format(**_fill(VOCAB["liver_lesion"], mm=15)), p, VOCAB) == "yes"
        assert size_answer(template.format(**_fill(VOCAB["liver_lesion"], mm=20)), p, VOCAB) == "no"
        assert closed_answer(template.format(**_fill(VOCAB["liver_lesion"], mm=10)), empty, VOCAB) == "no"
    assert size_answer("Is the largest liver lesion larger than 1.5 cm?", p, VOCAB) == "yes"
    assert size_answer("Is the largest liver lesion smaller than 2 cm?", p, VOCAB) == "yes"
    assert size_answer("Is the largest liver lesion smaller than 10 mm?", p, VOCAB) == "no"
    for other in ("Is the liver lesion between 10 and 20 mm?", "Is the liver lesion 15 mm?",
                  "Is the largest splenomegaly larger than 10 mm?", "What is the size of the liver lesion in mm?"):
        assert size_answer(other, p, VOCAB) is None, other
    # how many still comes first; a question none of them reads is left to the language model
    assert closed_answer("How many liver lesions are there?", p, VOCAB) == "2"
    assert closed_answer("Is the liver lesion benign?", p, VOCAB) is None


def test_a_condition_with_a_criterion_is_called_by_it_on_the_perceived_organ():
    long_spleen = perceived()  # 150 mm, classifier 0.3
    called = call_conditions(long_spleen, VOCAB, LABELS)
    assert called.conditions == {"splenomegaly": 1.0} and called.classifier == {"splenomegaly": 0.3}
    assert long_spleen.conditions == {"splenomegaly": 0.3}  # the input is left as it was
    normal = call_conditions(perceived(spleen_slices=20), VOCAB, LABELS)  # 100 mm
    assert normal.conditions == {"splenomegaly": 0.0}
    # the chain still names the classifier that disagrees
    chain = reason("Is there splenomegaly?", called, VOCAB, LABELS, SPACING)
    assert chain.present is True and "classifier 0.30 disagrees" in chain.conclusion.text
    # no spleen found where the perception segments spleens: no splenomegaly, however sure the classifier
    no_spleen = Perceived([], [r for r in long_spleen.organs if r.name != "spleen"], {"splenomegaly": 0.9})
    uncalled = call_conditions(no_spleen, VOCAB, LABELS)
    assert uncalled.conditions == {"splenomegaly": 0.0} and uncalled.classifier == {"splenomegaly": 0.9}
    assert presence_answer("Is there splenomegaly?", uncalled, VOCAB) == "no"
    chain = reason("Is there splenomegaly?", uncalled, VOCAB, LABELS, SPACING)
    assert chain.present is False and chain.conclusion.text == "no spleen found -> splenomegaly: no"
    # a perception without organ labels has nothing to look for: the classifier's probability stays
    assert call_conditions(no_spleen, VOCAB, None) is no_spleen
    assert reason("Is there splenomegaly?", no_spleen, VOCAB, None, SPACING).present is True
    # a criterion a lower bound does not settle: the classifier's probability stays
    cut = perceived(spleen_slices=20)
    cut.organs[1].at_edge = True  # at least 100 mm: may be more
    assert call_conditions(cut, VOCAB, LABELS).conditions == {"splenomegaly": 0.3}
    cut_long = perceived()
    cut_long.organs[1].at_edge = True  # at least 150 mm: settled
    assert call_conditions(cut_long, VOCAB, LABELS).conditions == {"splenomegaly": 1.0}
    # without a criterion nothing changes
    plain = {**VOCAB, "splenomegaly": FindingSpec("splenomegaly", "spleen", phrases=("splenomegaly",),
                                                  countable=False)}
    assert call_conditions(long_spleen, plain, LABELS) is long_spleen
