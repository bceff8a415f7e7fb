"""A generated report made to agree with the perception (vol3d.tasks.reports)."""

from __future__ import annotations

import numpy as np

from vol3d.tasks.mentions import extract_findings, finding_mentions
from vol3d.tasks.regions import Perceived, Region
from vol3d.tasks.reports import is_report_request, reconcile_report

VOCAB = {
    "liver_lesion": {"text": "liver lesion", "organ": "liver", "nouns": ["lesion"], "organ_words": ["liver", "hepatic"]},
    "kidney_cyst": {"text": "kidney cyst", "organ": "kidney", "nouns": ["cyst"], "organ_words": ["kidney", "renal"]},
    "splenomegaly": {"text": "splenomegaly", "organ": "spleen", "nouns": ["enlarged"], "organ_words": ["spleen"],
                     "phrases": ["splenomegaly"], "countable": False},
}


def lesion(size=(31.0, 28.0, 30.0), organ="liver") -> Region:
    return Region("finding", "liver_lesion", np.zeros(6), np.array(size), 1.0, organ)


def test_sentences_that_contradict_the_perception_go_and_missing_findings_come():
    perceived = Perceived([lesion(), lesion((12.0, 10.0, 9.0))], [], {"splenomegaly": 0.9})
    draft = ("FINDINGS: The liver is normal, without focal lesion. A 9 mm cyst in the left kidney. "
             "The spleen is enlarged. No lymphadenopathy.\nIMPRESSION: Simple renal cyst.")
    out = reconcile_report(draft, perceived, VOCAB)
    assert extract_findings(out, VOCAB) == {"liver_lesion": True, "kidney_cyst": False, "splenomegaly": True}
    assert "without focal lesion" not in out and "cyst" not in out  # denied a found lesion; asserted an unseen cyst
    assert "The spleen is enlarged." in out and "No lymphadenopathy." in out  # agreeing sentences stay as written
    added = "There are 2 liver lesions, the largest measuring 31 x 28 mm in the liver."
    assert added in out and out.index(added) < out.index("IMPRESSION")  # before the impression


def test_a_report_that_agrees_is_left_alone_and_a_normal_one_gains_nothing():
    perceived = Perceived([lesion()], [], {"splenomegaly": 0.1})
    draft = "A 31 mm hypodense lesion in the liver. No splenomegaly. Kidneys unremarkable."
    assert reconcile_report(draft, perceived, VOCAB) == draft
    normal = Perceived([], [], {"splenomegaly": 0.2})
    assert reconcile_report("No focal liver lesion. Spleen normal.", normal, VOCAB) == "No focal liver lesion. Spleen normal."
    assert finding_mentions("No focal liver lesion. Spleen normal.", VOCAB) == {"liver_lesion": False}


def test_only_report_requests_are_reconciled():
    assert is_report_request("<vol>\nWrite the findings for this CT.")
    assert is_report_request("<vol>\nWhat does this CT show? Write the report.")
    assert not is_report_request("<vol>\nDescribe the liver lesion.")
    assert not is_report_request("<vol>\nIs there a liver lesion?")


def test_an_organ_label_is_not_a_section_kept_alone():
    perceived = Perceived([lesion()], [], {})
    out = reconcile_report("Liver: unremarkable, without focal lesion. Kidneys: unremarkable.", perceived, VOCAB)
    assert not out.startswith("Liver:") and out.startswith("Kidneys: unremarkable.")
    assert out.endswith("There is a liver lesion measuring 31 x 28 mm in the liver.")


def test_a_word_written_twice_in_a_row_is_written_once():
    normal = Perceived([], [], {"splenomegaly": 0.2})
    draft = "The adrenal glands glands are unremarkable. No no free fluid. Liver lesion 1 x 1 mm, 11 mm."
    out = reconcile_report(draft, normal, VOCAB)
    assert out.startswith("The adrenal glands are unremarkable. No free fluid.")
    assert reconcile_report("The kidneys enhance symmetrically.", normal, VOCAB) == "The kidneys enhance symmetrically."
    assert reconcile_report("Spleen normal. A 11 x 11 mm node.", normal, VOCAB) == "Spleen normal. A 11 x 11 mm node."


def test_boxes_leave_a_report_and_glued_sentences_part():
    one = Perceived([lesion()], [], {"splenomegaly": 0.2})
    draft = "<box>[546,406,656,609,484,780]</box> There is a liver lesion measuring 31 x 28 mm in the liver."
    assert reconcile_report(draft, one, VOCAB) == "There is a liver lesion measuring 31 x 28 mm in the liver."
    # the CT demo at seed 2: "No focal lesion.liver There is a liver lesion ..."; a decimal stays whole
    out = reconcile_report("No free fluid.Kidneys normal. The liver lesion is 3.5 cm <box>.", one, VOCAB)
    assert out.startswith("No free fluid. Kidneys normal. The liver lesion is 3.5 cm.")
    assert "<box>" not in out and "</box>" not in out
