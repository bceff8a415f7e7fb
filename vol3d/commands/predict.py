"""`vol3d predict`: segment volumes and write masks in the original geometry (NIfTI, DICOM SEG)"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "segment volumes and write masks in the original geometry (NIfTI, DICOM SEG)"
DESCRIPTION = """Run a segmentation run (`vol3d finetune --task seg`) on a NIfTI file, a DICOM series
folder or a folder of them. Each input is prepared like the run's training cache,
segmented with sliding-window inference, and mapped back to its ORIGINAL grid (crop,
resampling and reorientation undone):

  OUT/<id>.nii.gz      label map with the input's own affine (overlays it in any viewer)
  OUT/<id>_seg.dcm     DICOM SEG referencing the source instances (DICOM input only)
  OUT/predictions.jsonl  one row per series/file found: status, reason, outputs

<id> is the pseudonymous case id (set VOL3D_ID_KEY as for `vol3d preprocess`). No input
path is written under OUT: predictions.jsonl names inputs by keyed hashes, and the
crosswalk back to the files (PHI) goes to OUT.crosswalk.jsonl beside OUT (mode 0600).
Exit codes: 0 all done (skipped non-images count as done), 3 some inputs failed,
2 bad arguments or input. Guide: docs/segmentation.md.

example: vol3d predict runs/seg /data/export/dicom --out /data/masks"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, metavar="RUN", help="segmentation run directory (or its model/)")
    parser.add_argument("input", type=Path, metavar="INPUT", help="NIfTI file, DICOM series folder, or a folder of them")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--resample", choices=("probs", "labels"), default="probs",
                        help="back to the original grid: probs = linear class probabilities then argmax "
                             "(smooth, default); labels = nearest neighbour of the label map (fast)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    parser.add_argument("--sw-batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    parser.add_argument("--no-dicom-seg", dest="dicom_seg", action="store_false",
                        help="do not write DICOM SEG objects for DICOM inputs")
    walk = parser.add_mutually_exclusive_group()
    walk.add_argument("--crosswalk", type=Path, metavar="FILE",
                      help="where the id -> input path crosswalk goes (PHI; default OUT.crosswalk.jsonl)")
    walk.add_argument("--keep-paths", action="store_true",
                      help="write input paths into predictions.jsonl instead (no crosswalk)")


def run(args: argparse.Namespace) -> int:
    import logging

    from preprocess.errors import EXIT_OK, EXIT_PARTIAL
    from vol3d.seg.config import InferConfig
    from vol3d.seg.predict import PredictionRow, Predictor, predict, summarise

    if not getattr(args, "verbose", False):
        logging.getLogger("highdicom").setLevel(logging.WARNING)  # one INFO line per copied DICOM module
    infer = InferConfig(overlap=args.overlap, sw_batch_size=args.sw_batch_size)
    predictor = Predictor.from_run(args.run, device=args.device, infer=infer)

    def show(row: PredictionRow) -> None:
        if row.status == "ok":
            outputs = ", ".join(str(args.out / f) for f in (row.nifti, row.dicom_seg) if f)
            note = f"  ({row.detail})" if row.detail else ""
            print(f"{row.id}: ok -> {outputs}{note}")
        elif row.kind != "file":  # non-image files (reports, csv) are not worth a line each
            print(f"{row.id}: {row.status} {row.reason}: {row.detail}")

    rows = predict(predictor, args.input, args.out, resample=args.resample, dicom_seg=args.dicom_seg, on_row=show,
                   keep_paths=args.keep_paths, crosswalk=args.crosswalk)
    counts = summarise(rows)
    print(f"{counts.get('ok', 0)} segmented, {counts.get('skipped', 0)} skipped, {counts.get('failed', 0)} failed; "
          f"masks in {args.out}, one row per input in {args.out / 'predictions.jsonl'}")
    return EXIT_PARTIAL if counts.get("failed") else EXIT_OK
