"""`vol3d synth`: write a synthetic hospital export (DICOM/NIfTI CT or MR with reports, EHR codes, masks, boxes)"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HELP = "write a synthetic hospital export (DICOM/NIfTI CT or MR with reports, EHR codes, masks, boxes)"
DESCRIPTION = """Write a deterministic synthetic hospital export: CT DICOM series of a chest/abdomen
(with scouts, feet-first and non-axial acquisitions) or, with --modality mr, brain MR studies
(T1, T2 and FLAIR with MR tags, per-series scale and coil bias), some NIfTI cases, organ/lesion
masks, finding boxes in world mm, radiology reports by AccessionNumber and ICD-10 codes by
PatientID. The layout is described in docs/formats.md (section 1) and docs/synth.md.

example: vol3d synth /tmp/export --cases 20 --seed 0 --size small
         vol3d synth /tmp/export_mr --cases 20 --modality mr --size small"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from preprocess.config_io import add_dataclass_args
    from vol3d.synth.export import SynthConfig

    parser.add_argument("out", type=Path, help="output folder (created; must be empty unless --overwrite)")
    add_dataclass_args(parser, SynthConfig)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous synth export in OUT (only synth's own files are deleted; "
        "a folder that is not a synth export is refused)",
    )


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from preprocess.config_io import build_config
    from preprocess.errors import InputError
    from vol3d.synth import SynthConfig, generate
    from vol3d.synth.export import OWN_ENTRIES, remove_export

    cfg = build_config(SynthConfig, None, args)
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder; choose another OUT")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise InputError(
                f"{out} is not empty; choose an empty or new folder, or pass --overwrite to replace "
                "a previous synth export there"
            )
        try:
            remove_export(out)  # refuses (ValueError) a folder that is not a synth export
        except ValueError:
            # --overwrite must never wipe a folder someone typed by mistake (a home, a real export)
            raise InputError(
                f"{out} is not empty and is not a vol3d synth export (no .vol3dignore and truth.json from "
                "vol3d synth), so --overwrite does not touch it; choose an empty or new folder"
            ) from None
        others = sorted(p.name for p in out.iterdir() if p.name not in OWN_ENTRIES)
        if others:
            print(f"kept {len(others)} file(s) in {out} that synth did not write: {', '.join(others[:5])}")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tqdm(total=cfg.cases, unit="case", desc="synth") as bar:
        truth = generate(out, cfg, progress=bar.update)
    elapsed = time.perf_counter() - start
    cases = truth["cases"]
    n_series = sum(len(c["series"]) for c in cases)
    n_findings = sum(len(c["findings"]) for c in cases)
    n_nifti = sum(c["format"] == "nifti" for c in cases)
    n_normal = sum(not c["findings"] for c in cases)
    print(
        f"wrote {len(cases)} cases ({len(cases) - n_nifti} DICOM, {n_nifti} NIfTI; {n_normal} normal), "
        f"{n_series} series, {n_findings} findings in {elapsed:.1f} s to {out}"
    )
    print(
        f"  images: {out / 'dicom'}, {out / 'nifti'}\n"
        f"  truth:  {out / 'labels'}, {out / 'lesions'}, boxes.json, reports.csv, ehr_codes.csv, truth.json"
    )
    return 0
