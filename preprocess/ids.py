"""Pseudonymous ids: keyed hashes (HMAC-SHA256) of patient, study and series identifiers.

Why keyed: hospital identifiers (medical record numbers, accession numbers) have
little entropy, so a plain SHA-256 of them can be reversed by hashing every
possible number. With a secret key that stays outside the cache, nobody holding
the cache can do that, yet the same key gives the same pseudonym in every run, so
a patient's studies link across runs, shards and machines.

The key comes from the config field ``id_key`` or, when that is empty, from the
environment variable ``VOL3D_ID_KEY``: at least 128 bits of key material, written as
hex (32+ digits) or base64 (22+ characters), or ``passphrase:<words>`` stretched with
scrypt (a passphrase a person can remember; at least 16 characters). Anything else
(``aaaaaaaaaaaaaaaa``, a word) is refused. If neither is set, vol3d refuses to run
(:func:`resolve_id_key`) rather than invent a key: a key generated into the cache
directory would travel with the cache (defeating its purpose) and a fresh random
key per run would break linkage between runs. Only a fingerprint of the key
(:func:`key_check`, through scrypt, so guesses cannot be tested quickly offline) is
stored, in ``params.json``, so a run with a different key is refused instead of
silently mixing two pseudonym spaces. Hashes of source bytes are keyed too
(:func:`source_hash_key`): holding a file does not tell whether it is in a cache.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Sequence

from preprocess.errors import ConfigError
from preprocess.types import Candidate, Identity

#: Environment variable holding the id key when the config's ``id_key`` is empty.
ENV_VAR = "VOL3D_ID_KEY"
#: Fewest bytes of key material (128 bits) in a hex or base64 key.
MIN_KEY_BYTES = 16
#: Shortest accepted passphrase (``passphrase:<text>``), in characters.
MIN_PASSPHRASE_CHARS = 16
#: Prefix of a passphrase key, stretched with scrypt into 32 bytes.
PASSPHRASE_PREFIX = "passphrase:"
#: scrypt cost of a passphrase and of the stored key check (about 50 ms, 16 MiB).
_SCRYPT = {"n": 1 << 14, "r": 8, "p": 1, "maxmem": 64 << 20}
_HEX_RE = re.compile(r"[0-9a-fA-F]+")
_B64_RE = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
#: Hex digits kept from each HMAC (128 bits: collisions are not a concern).
HASH_HEX = 32
#: Split names in the order their fractions are given.
SPLITS = ("train", "val", "test")

_HOW_TO = (
    "set a secret key of at least 128 bits that stays OUTSIDE the cache, e.g.\n"
    "  export {env}=$(python -c 'import secrets; print(secrets.token_hex(32))')\n"
    "(hex of 32+ digits or base64 of 22+ characters; or passphrase:<a phrase of 16+ characters>, "
    "stretched with scrypt) and keep it (in a password manager or a 0600 file you `source`): the same "
    "key gives the same pseudonymous ids in every run, a different key gives unrelated ids. "
    "Alternatively pass --id-key KEY (or id_key: KEY in the preprocess config; a flag shows in the "
    "shell history, so prefer the variable)."
)


def _key_material(text: str) -> bytes | None:
    """The key bytes ``text`` writes (hex, base64 or a passphrase), or None when it is none of them."""
    if text.startswith(PASSPHRASE_PREFIX):
        phrase = text[len(PASSPHRASE_PREFIX):]
        if len(phrase) < MIN_PASSPHRASE_CHARS:
            return None
        return hashlib.scrypt(phrase.encode("utf-8"), salt=b"vol3d-id-key/v1", dklen=32, **_SCRYPT)
    if _HEX_RE.fullmatch(text) and len(text) % 2 == 0:
        raw = bytes.fromhex(text)
    elif _B64_RE.fullmatch(text) and _looks_random(text):
        try:
            raw = base64.b64decode(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            return None
    else:
        return None
    # a key of one repeated byte (16 x 'a' in hex) is no secret, whatever its length
    return raw if len(raw) >= MIN_KEY_BYTES and len(set(raw)) > 4 else None


def _looks_random(text: str) -> bool:
    """Base64 of random bytes mixes upper and lower case and digits or symbols; a phrase of
    words (``secret-key-long-but-only-words``) does not, and is no key."""
    return (any(c.isupper() for c in text) and any(c.islower() for c in text)
            and any(c.isdigit() or c in "+/-_" for c in text))  # fmt: skip


def resolve_id_key(config_key: str | None = None) -> bytes:
    """The id key: ``config_key`` if non-empty, else ``$VOL3D_ID_KEY``; refuse when neither is usable."""
    key = (config_key or os.environ.get(ENV_VAR, "")).strip()
    if not key:
        raise ConfigError("no key for pseudonymous ids: " + _HOW_TO.format(env=ENV_VAR))
    material = _key_material(key)
    if material is None:
        raise ConfigError(
            f"the id key ({len(key)} characters) is not 128 bits of hex or base64 key material, nor a passphrase "
            "of 16+ characters, so it would not keep ids secret: " + _HOW_TO.format(env=ENV_VAR)
        )
    return material


def keyed_hash(key: bytes, domain: str, *parts: str) -> str:
    """HMAC-SHA256 of ``parts`` under ``key``, separated by ``domain`` so equal strings in
    different roles (a patient id equal to a study id) never give equal pseudonyms."""
    msg = "\x1f".join((domain, *parts)).encode("utf-8")
    return hmac.new(key, msg, hashlib.sha256).hexdigest()[:HASH_HEX]


def key_check(key: bytes) -> str:
    """A fingerprint of the key that can be stored: equal keys give equal checks. Through scrypt,
    so testing key guesses against it offline costs about 50 ms each."""
    return "scrypt:" + hashlib.scrypt(key, salt=b"vol3d-key-check/v1", dklen=8, **_SCRYPT).hex()


def source_hash_key(key: bytes) -> bytes:
    """The key of :func:`keyed_source_hash` (derived, so workers never hold the id key itself)."""
    return hmac.new(key, b"vol3d-source-hash", hashlib.sha256).digest()


def keyed_source_hash(hash_key: bytes, content_digest: str) -> str:
    """What the manifest stores for a case's source bytes: a keyed hash of their sha256, so
    holding a file does not tell whether it is in the cache."""
    return hmac.new(hash_key, content_digest.encode(), hashlib.sha256).hexdigest()


def _series_parts(candidate: Candidate) -> tuple[str, ...]:
    # The join key alone is not unique (ingest may split one SeriesInstanceUID into a
    # scout and a volume; skipped files have no key), the source files are. The "@n"
    # ingest appends to a repeated key depends on what else was found, so it is left out.
    return (candidate.kind, re.sub(r"@\d+$", "", candidate.key), *candidate.source)


def case_id(key: bytes, candidate: Candidate) -> str:
    """Pseudonymous id of one series/file found by a scan: ``c_<32 hex>``, stable across runs."""
    return "c_" + keyed_hash(key, "series", *_series_parts(candidate))


def patient_pseudonym(key: bytes, candidate: Candidate) -> str:
    """``p_<32 hex>`` from the PatientID; a case without one counts as its own patient."""
    ident: Identity = candidate.identity
    if ident.patient_id:
        return "p_" + keyed_hash(key, "patient", ident.patient_id)
    return "p_" + keyed_hash(key, "patient-unknown", *_series_parts(candidate))


def study_pseudonym(key: bytes, candidate: Candidate) -> str:
    """``s_<32 hex>`` from the StudyInstanceUID (else the accession number, else the case itself)."""
    ident: Identity = candidate.identity
    if ident.study_uid:
        return "s_" + keyed_hash(key, "study", ident.study_uid)
    if ident.accession:
        return "s_" + keyed_hash(key, "study-accession", ident.accession)
    return "s_" + keyed_hash(key, "study-unknown", *_series_parts(candidate))


def assign_split(patient: str, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
    """``train``/``val``/``test`` from a patient pseudonym, so all of a patient's series share a split.

    ``fractions`` (train, val, test) must sum to 1. The pseudonym is already a keyed hash,
    so a plain SHA-256 of it gives a uniform number in [0, 1).
    """
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(f"split fractions must be 3 non-negative numbers summing to 1, got {list(fractions)}")
    u = int(hashlib.sha256(patient.encode()).hexdigest()[:15], 16) / 16**15
    edge = 0.0
    for name, frac in zip(SPLITS, fractions, strict=True):
        edge += frac
        if u < edge:
            return name
    return SPLITS[-1]
