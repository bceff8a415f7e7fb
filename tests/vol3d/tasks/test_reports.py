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
    assert reconcile_report("Spleen normal. A 9 x 9 mm node.", normal, VOCAB) == "Spleen normal."  # unmeasured


def test_boxes_leave_a_report_and_glued_sentences_part():
    one = Perceived([lesion()], [], {"splenomegaly": 0.2})
    draft = "<box>[546,406,656,609,484,780]</box> There is a liver lesion measuring 31 x 28 mm in the liver."
    assert reconcile_report(draft, one, VOCAB) == "There is a liver lesion measuring 31 x 28 mm in the liver."
    # the CT demo at seed 2: "No focal lesion.liver There is a liver lesion ..."; a decimal stays whole
    out = reconcile_report("No free fluid.Kidneys normal. The liver lesion is 3.1 cm <box>.", one, VOCAB)
    assert out == "No free fluid. Kidneys normal. The liver lesion is 3.1 cm."
    assert "<box>" not in out and "</box>" not in out


def test_every_number_in_a_report_is_one_the_perception_measured():
    # a report of the seventh CT draw's model (round 15): sizes the regions do not have, stray numbers
    kidney = Region("finding", "kidney_cyst", np.zeros(6), np.array([9.4, 6.2, 5.0]), 0.2, "kidney_right")
    organ = Region("organ", "spleen", np.zeros(6), np.array([90.0, 80.0, 118.0]), 240.0, "spleen")
    perceived = Perceived([lesion((14.0, 11.0, 12.0)), kidney], [organ], {"splenomegaly": 0.1})
    draft = ("No suspicious lung nodule in the imaged lungs. There is a up to 2 x 2 x There is a kidney cyst measuring "
             "9 x 6 mm in the right kidney. Spleen: unremarkable. Spleen: present, measuring 18 mm. Spleen: "
             "unremarkable. 1. 2. 2 mm. 24 mm. 1. 16 mm), benign. 20 x 2. A 22 x 2 x 18 mm and 2 mm. "
             "18 mm hypodense liver lesions, measuring 24 mm. The spleen measures 118 mm (240 mL). "
             "No free fluid on T2.")
    out = reconcile_report(draft, perceived, VOCAB)
    assert out == ("No suspicious lung nodule in the imaged lungs. Spleen: unremarkable. The spleen measures 118 mm "
                   "(240 mL). No free fluid on T2. There is a liver lesion measuring 14 x 11 mm in the liver. "
                   "There is a kidney cyst measuring 9 x 6 mm in the right kidney.")
    assert extract_findings(out, VOCAB) == {"liver_lesion": True, "kidney_cyst": True, "splenomegaly": False}
    # a size is the measurement of what the sentence is about, not of another region
    assert "cyst measuring 14" not in reconcile_report("A kidney cyst measuring 14 x 11 mm.", perceived, VOCAB)
    assert reconcile_report("Liver lesion 14 x 11 mm. normal in size.", perceived, VOCAB).startswith(
        "Liver lesion 14 x 11 mm. There is a kidney cyst")  # a fragment in lower case goes
    # a size in cm is the same measurement; one the LM invents is not
    assert reconcile_report("A 1.4 cm liver lesion.", perceived, VOCAB).startswith("A 1.4 cm liver lesion.")
    assert "2.4 cm" not in reconcile_report("A 2.4 cm liver lesion.", perceived, VOCAB)


def test_a_report_with_nothing_left_says_so():
    normal = Perceived([], [], {"splenomegaly": 0.2})
    assert reconcile_report("1. 2. 24 x 2. 2 mm.", normal, VOCAB) == "No significant findings."
    assert reconcile_report("No PE. 2 mm.", normal, VOCAB) == "No PE."  # an abbreviation is a word
    assert reconcile_report("", normal, VOCAB) == "No significant findings."


def test_token_soup_goes_and_the_perception_says_what_it_found():
    """An untrained LM's soup (as the clock-stopped demo printed it) is no sentence; real words that repeat
    letters stay ("grade III", "Mississippi", "1000 mL")."""
    perceived = Perceived([lesion()], [], {"splenomegaly": 0.9})
    soup = "....alalalalmetricmetricmetricmetricalalalystystystyst!!!! BoBoBoBoQQQQ focal spine spineLLLL"
    out = reconcile_report(soup, perceived, VOCAB)
    assert out == ("There is a liver lesion measuring 31 x 28 mm in the liver. Splenomegaly is present.")
    kept = "A grade III lesion in the liver. The spleen is enlarged."
    assert reconcile_report(kept, perceived, VOCAB) == kept
    from vol3d.tasks.reports import _SOUP

    assert not any(_SOUP.search(w) for w in ("III", "Mississippi", "1000", "coccoid", "sessile", "hyperattenuating"))
