"""Pseudonymous ids: keyed, stable, unique per series, splits by patient."""

from __future__ import annotations

import base64
import hashlib
from collections import Counter

import pytest

from preprocess import ids
from preprocess.errors import ConfigError
from preprocess.types import Candidate, Identity

KEY = b"k" * 32


def _cand(pid: str = "PAT-001", study: str = "1.2.3", series: str = "1.2.3.4", src: str = "dicom/a") -> Candidate:
    return Candidate(
        kind="dicom", source=[src], key=series, identity=Identity(pid, study, series, "ACC1"), modality="CT"
    )


def test_resolve_key_prefers_config_then_env_and_refuses_without(monkeypatch):
    monkeypatch.setenv(ids.ENV_VAR, "0123456789abcdef" * 2)
    assert ids.resolve_id_key("fedcba9876543210" * 2) == bytes.fromhex("fedcba9876543210" * 2)
    assert ids.resolve_id_key("") == bytes.fromhex("0123456789abcdef" * 2)
    monkeypatch.delenv(ids.ENV_VAR)
    with pytest.raises(ConfigError, match="VOL3D_ID_KEY"):
        ids.resolve_id_key(None)


def test_keys_need_128_bits_of_material():
    raw = bytes(range(16))
    assert ids.resolve_id_key(raw.hex()) == raw
    assert ids.resolve_id_key(base64.b64encode(raw).decode()) == raw
    assert ids.resolve_id_key(base64.urlsafe_b64encode(raw).decode().rstrip("=")) == raw
    phrase = ids.resolve_id_key("passphrase:correct horse battery staple")
    assert len(phrase) == 32 and phrase == ids.resolve_id_key("passphrase:correct horse battery staple")
    for weak in ("a" * 16, "a" * 64, "0123456789abcdef", "secret-key-long-but-only-words",
                 "passphrase:short", base64.b64encode(bytes(15)).decode(), "ab" * 20):  # fmt: skip
        with pytest.raises(ConfigError, match="128 bits"):
            ids.resolve_id_key(weak)


def test_key_check_is_a_slow_kdf_and_source_hashes_are_keyed(monkeypatch):
    a, b = bytes(range(16)), bytes(range(1, 17))
    costs = []
    real = hashlib.scrypt
    monkeypatch.setattr(ids.hashlib, "scrypt", lambda *x, **kw: costs.append(kw["n"]) or real(*x, **kw))
    check = ids.key_check(a)
    assert check.startswith("scrypt:") and check == ids.key_check(a) != ids.key_check(b)
    assert costs and min(costs) >= 1 << 14  # a memory-hard KDF per guess, not one HMAC
    digest = hashlib.sha256(b"pixels").hexdigest()
    ha, hb = (ids.keyed_source_hash(ids.source_hash_key(k), digest) for k in (a, b))
    assert ha != hb and digest not in (ha, hb)


def test_pseudonyms_are_keyed_stable_and_never_contain_the_identifier():
    c = _cand()
    p1, p2 = ids.patient_pseudonym(KEY, c), ids.patient_pseudonym(KEY, _cand(series="9.9", src="dicom/b"))
    assert p1 == p2 and p1.startswith("p_") and "PAT-001" not in p1  # same patient links
    assert ids.patient_pseudonym(b"x" * 32, c) != p1  # depends on the key
    assert ids.study_pseudonym(KEY, c).startswith("s_")
    # domain separation: a patient id equal to a study uid gets a different pseudonym
    same = _cand(pid="1.2.3", study="1.2.3")
    assert ids.patient_pseudonym(KEY, same)[2:] != ids.study_pseudonym(KEY, same)[2:]
    assert ids.key_check(KEY) == ids.key_check(KEY) != ids.key_check(b"y" * 32)


def test_case_id_unique_per_series_even_with_shared_uid():
    a = _cand(src="dicom/scout")
    b = _cand(src="dicom/volume")  # same SeriesInstanceUID split by ingest into two candidates
    assert ids.case_id(KEY, a) != ids.case_id(KEY, b)
    assert ids.case_id(KEY, a) == ids.case_id(KEY, _cand(src="dicom/scout"))


def test_patientless_cases_are_their_own_patient():
    a, b = _cand(pid="", src="x.nii.gz"), _cand(pid="", src="y.nii.gz")
    assert ids.patient_pseudonym(KEY, a) != ids.patient_pseudonym(KEY, b)


def test_split_fractions_and_patient_consistency():
    pats = [ids.patient_pseudonym(KEY, _cand(pid=f"P{i}")) for i in range(3000)]
    counts = Counter(ids.assign_split(p, (0.7, 0.2, 0.1)) for p in pats)
    assert abs(counts["train"] / 3000 - 0.7) < 0.04
    assert abs(counts["val"] / 3000 - 0.2) < 0.04
    assert abs(counts["test"] / 3000 - 0.1) < 0.04
    assert {ids.assign_split(pats[0]) for _ in range(5)} == {ids.assign_split(pats[0])}
    assert ids.assign_split(pats[0], (1.0, 0.0, 0.0)) == "train"
    with pytest.raises(ConfigError):
        ids.assign_split(pats[0], (0.5, 0.5, 0.5))
