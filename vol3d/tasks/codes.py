"""EHR code vocabulary: the fixed list of codes a multi-label EHR head predicts."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from preprocess.errors import InputError


def normalise_code(code: str) -> str:
    """Canonical spelling of a code: stripped and upper-case (``" k76.89"`` -> ``"K76.89"``)."""
    return str(code).strip().upper()


class CodeVocab:
    """Ordered list of codes; index ``k`` is output ``k`` of the EHR head ``(B, K)``."""

    def __init__(self, codes: Sequence[str], counts: Sequence[int] | None = None):
        self.codes = [normalise_code(c) for c in codes]
        if len(set(self.codes)) != len(self.codes):
            raise InputError("code vocabulary has duplicate codes; each code may appear once")
        self.counts = [int(c) for c in counts] if counts is not None else [0] * len(self.codes)
        self.index = {c: i for i, c in enumerate(self.codes)}

    @classmethod
    def from_cases(cls, cases: Iterable[Mapping[str, Any] | Sequence[str]], min_count: int = 1) -> CodeVocab:
        """Codes seen in at least ``min_count`` cases, sorted (so the vocabulary is reproducible).

        ``cases`` yields case dicts with a ``codes`` list, or the code lists themselves
        (cheaper than loading volumes: pass the codes from the manifest or a side table).
        """
        counter: Counter[str] = Counter()
        for case in cases:
            codes = case.get("codes", []) if isinstance(case, Mapping) else case
            counter.update({normalise_code(c) for c in codes})  # a code counts once per case
        kept = sorted(c for c, n in counter.items() if n >= min_count)
        return cls(kept, [counter[c] for c in kept])

    def __len__(self) -> int:
        return len(self.codes)

    def encode(self, codes: Iterable[str]) -> np.ndarray:
        """Multi-hot float32 target ``(K,)``; codes outside the vocabulary are ignored."""
        out = np.zeros(len(self.codes), dtype=np.float32)
        for c in codes:
            k = self.index.get(normalise_code(c))
            if k is not None:
                out[k] = 1.0
        return out

    def decode(self, scores: np.ndarray, threshold: float = 0.5) -> list[str]:
        """Codes whose probability (or 0/1 target) ``(K,)`` is at least ``threshold``."""
        return [self.codes[k] for k in np.flatnonzero(np.asarray(scores) >= threshold)]

    def to_dict(self) -> dict[str, Any]:
        return {"codes": self.codes, "counts": self.counts}

    def save(self, path: str | Path) -> None:
        """Write ``{"codes": [...], "counts": [...]}`` as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> CodeVocab:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"code vocabulary {path} does not exist; create it with CodeVocab.save")
        try:
            data = json.loads(path.read_text())
            return cls(data["codes"], data.get("counts"))
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"code vocabulary {path} is not a CodeVocab JSON file ({exc})") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CodeVocab) and self.codes == other.codes

    def __repr__(self) -> str:
        return f"CodeVocab({len(self)} codes)"
