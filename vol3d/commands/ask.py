"""`vol3d ask`: ask a question about a volume (NIfTI, DICOM folder or cache entry)"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "ask a question about a volume (NIfTI, DICOM folder or cache entry)"
DESCRIPTION = """Answer a question about one volume with a trained run. The volume is prepared
exactly like the run's training data (its preprocessing config and model-input size).
Boxes in the answer are reported in the model frame, the cached grid, the original
image's voxel indices and world RAS+ millimetres.

VOLUME is a NIfTI/NRRD/MHA file, a DICOM series folder (a folder with several series
needs --series N; the error lists them) or a cache entry CACHE_DIR::CASE_ID.

examples:
  vol3d ask runs/tiny scan.nii.gz "Where is the liver lesion?"
  vol3d ask runs/tiny export/ST0001/SE02 "Write the findings for this CT." --json
  vol3d ask runs/tiny cache/tiny::c_3f9a... "Is there a lung nodule?" --ehr
  vol3d ask runs/tiny scan.nii.gz "What is the diameter of the largest liver lesion?" --json
  vol3d ask runs/tiny scan.nii.gz "What is the volume of the spleen?" --expert runs/seg

Python: vol3d.load(RUN).ask(volume, question) (docs/inference.md)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, metavar="RUN", help="run directory of `vol3d train` / `vol3d finetune`")
    parser.add_argument("volume", metavar="VOLUME", help="NIfTI file, DICOM series folder, or CACHE_DIR::CASE_ID")
    parser.add_argument("question", metavar="QUESTION", help='the question, e.g. "Where is the liver lesion?"')
    parser.add_argument("--json", action="store_true", help="print the answer, boxes and geometry as JSON")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens (default 128)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: a GPU if present)")
    parser.add_argument("--series", type=int, default=None, metavar="N",
                        help="which series of a folder holding several (numbers as listed by the error)")
    parser.add_argument("--preprocess-config", type=Path, default=None, metavar="PATH",
                        help="preprocessing of the training data when the run does not record it: a "
                             "configs/preprocess/*.yaml, a cache's params.json or the cache folder")
    parser.add_argument("--locate", action="store_true",
                        help="start the answer with a box: say where the finding would be, taking for granted "
                             "that it is there (for a finding you know is present)")
    parser.add_argument("--ehr", action="store_true", help="also give the EHR-code probabilities (runs with an EHR head)")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search width (1 = greedy, the default)")
    parser.add_argument("--expert", type=Path, default=None, metavar="SEG_RUN",
                        help="a `vol3d finetune --task seg` run that volume and organ-length questions consult; its "
                             "call and result are a step of the answer")
    parser.add_argument("--out-of-domain", choices=("refuse", "answer"), default="refuse",
                        help="a volume unlike the training data gets a warning; refuse (default): its answer "
                             "gives no box; answer: keep the model's answer anyway")


def run(args: argparse.Namespace) -> int:
    from preprocess.errors import InputError
    from vol3d.inference import load

    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    pipe = load(args.run, device=args.device, preprocess_config=args.preprocess_config, expert=args.expert)
    inp = pipe.prepare(args.volume, series=args.series)
    gen = {"num_beams": args.num_beams} if args.num_beams > 1 else {}
    answer = pipe.ask(inp, args.question, max_new_tokens=args.max_new_tokens, locate=args.locate,
                      out_of_domain=args.out_of_domain, **gen)
    codes = pipe.ehr(inp) if args.ehr else None
    if args.json:
        out = answer.to_dict()
        if codes is not None:
            out["ehr"] = codes
        print(json.dumps(out, indent=2))
        return 0
    print(answer)
    g = answer.input
    sp = " x ".join(f"{s:.2f}" for s in g.spacing)
    print(f"\ninput: {g.source} ({g.modality}); original grid {tuple(g.orig_shape)}, "
          f"model input {g.input_shape} at {sp} mm" + (f"; flags {', '.join(g.flags)}" if g.flags else ""))
    if codes is not None:
        top = sorted(codes.items(), key=lambda kv: -kv[1])
        print("\nEHR codes (probability):")
        for code, p in top:
            print(f"  {code:<10} {p:.3f}")
    return 0
