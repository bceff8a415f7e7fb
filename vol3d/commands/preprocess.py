"""`vol3d preprocess`: ingest DICOM/DICOMDIR/zip/NIfTI/NRRD/MHA into a chunked HDF5 cache + manifest"""

from __future__ import annotations

import argparse
from pathlib import Path

from preprocess.errors import InputError

HELP = "ingest DICOM/DICOMDIR/zip/NIfTI/NRRD/MHA into a chunked HDF5 cache + manifest"
USAGE = """vol3d preprocess SRC --out CACHE [--config YAML | --preset NAME] [--workers N] [--shard i/N]
                        [--reports CSV] [--codes CSV] [--labels DIR] [--boxes JSON] [--lesions DIR]
                        [--overwrite] [--keep-paths | --crosswalk FILE] [--scan-index FILE | --no-scan-index]
                        [--scan-only] [CONFIG FLAGS]
       vol3d preprocess merge CACHE_SHARD [CACHE_SHARD ...] --out CACHE [--overwrite]"""
DESCRIPTION = """Scan a hospital export, split and validate series, convert to RAS+, rescale HU,
resample to the preset spacing, and write one chunked HDF5 file per series plus
manifest.jsonl (one row per series or file found, with status ok/skipped/failed).
Reports (by AccessionNumber), EHR codes (by PatientID), label masks, boxes and
lesion instance maps are joined before identifiers are dropped; ids are keyed hashes
(set VOL3D_ID_KEY). One run at a time per cache (a lock file, .vol3d.lock).

No input path reaches the cache: the manifest names files by keyed hashes, and the
link back to the export (which QC needs, and which is PHI) goes to the crosswalk
CACHE.crosswalk.jsonl beside the cache (mode 0600; --crosswalk moves it). The headers
read are indexed in CACHE.scan.sqlite beside it (PHI too, mode 0600; --scan-index moves it):
a rerun reads only the files whose size or mtime changed. For an array job, build the
index once with --scan-only, then run each --shard i/N with --scan-index on it.

Resumable: run the same command again after an interruption (even kill -9); finished
cases are kept, changed inputs or side data are redone. A cache made with other
parameters is refused unless --overwrite.

  vol3d preprocess merge SHARD... --out CACHE   joins the caches of `--shard i/N` runs
  (a folder literally named "merge" can be given as ./merge).

Guide: docs/preprocess.md. Exit codes: 0 all ok or skipped by policy, 3 some series
failed (the rest was written), 2 bad arguments or input (nothing changed)."""

#: Side-table and run options that make no sense for `merge`.
_RUN_ONLY = ("config", "preset", "shard", "reports", "codes", "labels", "boxes", "lesions", "keep_paths",
             "crosswalk", "rehash", "no_scrub_reports", "split_fractions", "scan_index", "no_scan_index",
             "scan_only")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from preprocess.config import PreprocessConfig
    from preprocess.config_io import add_dataclass_args

    parser.usage = USAGE
    parser.add_argument("paths", nargs="+", metavar="SRC", help="input folder/DICOMDIR/zip/file (or: merge SHARD...)")
    parser.add_argument("--out", required=True, type=Path, metavar="CACHE", help="cache directory to write")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--config", type=Path, metavar="YAML", help="preprocess config file")
    group.add_argument("--preset", metavar="NAME", help="a preset from configs/preprocess/ (e.g. tiny)")
    parser.add_argument("--shard", metavar="i/N", help="process only shard i of N (0 <= i < N); join with merge")
    parser.add_argument("--reports", type=Path, metavar="CSV", help="reports: AccessionNumber,Findings,Impression")
    parser.add_argument("--codes", type=Path, metavar="CSV", help="EHR codes: PatientID,Code[,Description]")
    parser.add_argument("--labels", type=Path, metavar="DIR", help="label maps <key>.nii.gz (key: SeriesInstanceUID or NIfTI stem)")
    parser.add_argument("--boxes", type=Path, metavar="JSON", help="finding boxes in world RAS mm (docs/formats.md)")
    parser.add_argument("--vocab", type=Path, metavar="FILE", help="names of the findings and label values "
                        "(JSON/YAML, docs/tasks_and_metrics.md); copied to CACHE/vocab.json for training")
    parser.add_argument(
        "--lesions",
        type=Path,
        metavar="DIR",
        help="lesion instance maps <key>.nii.gz (value k = the box with \"instance\": k): tight boxes from the "
        "lesion's voxels instead of its world box (which encloses too much on oblique series)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild a cache made with other parameters (only vol3d's own files there are replaced)",
    )
    walk = parser.add_mutually_exclusive_group()
    walk.add_argument("--crosswalk", type=Path, metavar="FILE",
                      help="where the id -> input path crosswalk goes (PHI; default CACHE.crosswalk.jsonl beside "
                      "the cache; never inside it)")  # fmt: skip
    walk.add_argument("--keep-paths", action="store_true",
                      help="write input paths into the manifest instead (only for exports whose file names hold "
                      "no identifier); no crosswalk")  # fmt: skip
    parser.add_argument("--redact-paths", action="store_true", help=argparse.SUPPRESS)  # the default now
    parser.add_argument("--no-scrub-reports", action="store_true",
                        help="store report text as given (default: the patient's name, PatientID, accession, "
                        "birth and study dates found in the headers are replaced by <name>/<id>/<date>)")
    parser.add_argument("--rehash", action="store_true",
                        help="on a rerun, re-read every source byte to decide what changed (default: a file whose "
                        "size and modification time are unchanged is unchanged)")  # fmt: skip
    parser.add_argument(
        "--split-fractions",
        nargs=3,
        type=float,
        metavar=("TRAIN", "VAL", "TEST"),
        default=None,
        help="fractions of patients per split (default 0.8 0.1 0.1)",
    )
    index = parser.add_mutually_exclusive_group()
    index.add_argument("--scan-index", type=Path, metavar="FILE",
                       help="index of the DICOM headers read (PHI; default CACHE.scan.sqlite beside the cache): "
                       "a rerun reads only changed files; shards read it without writing")  # fmt: skip
    index.add_argument("--no-scan-index", action="store_true", help="read every header, keep no index")
    parser.add_argument("--scan-only", action="store_true",
                        help="scan SRC into the scan index and stop (before `--shard i/N` runs that share it)")
    parser.add_argument("--scan-processes", type=int, default=0, metavar="N",
                        help="processes reading DICOM headers (default 0: one per CPU core, at most 8, once there "
                        "are thousands of files; 1: threads only)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    fields = parser.add_argument_group(
        "config fields", "every PreprocessConfig field (docs/preprocess.md); a flag wins over --config/--preset"
    )
    add_dataclass_args(fields, PreprocessConfig)  # type: ignore[arg-type]  (a group adds arguments alike)


def _run_merge(args: argparse.Namespace) -> int:
    from preprocess.config_io import overrides_from_args
    from preprocess.runner import merge_caches

    given = [f"--{n.replace('_', '-')}" for n in _RUN_ONLY if getattr(args, n, None)]
    given += [f"--{k.replace('_', '-')}" for k in overrides_from_args(args)]
    if given:
        raise InputError(f"merge takes only SHARD... --out CACHE [--overwrite]; drop {', '.join(given)}")
    if len(args.paths) < 2:
        raise InputError("merge needs the shard caches to join: vol3d preprocess merge SHARD... --out CACHE")
    summary = merge_caches(args.paths[1:], args.out, overwrite=args.overwrite)
    print(summary.table())
    return summary.exit_code


def run(args: argparse.Namespace) -> int:
    if args.paths[0] == "merge":
        return _run_merge(args)
    if len(args.paths) != 1:
        raise InputError(f"expected one input SRC, got {len(args.paths)}: {' '.join(args.paths)}")
    from preprocess.config import PreprocessConfig
    from preprocess.config_io import build_config
    from preprocess.runner import DEFAULT_SPLIT, RunOptions, parse_shard, run_preprocess
    from preprocess.sidecars import SideTables
    from vol3d.presets import preset_path, resolve_config

    config_path = preset_path(args.preset) if args.preset else (
        resolve_config(args.config, "preprocess") if args.config else None)
    cfg = build_config(PreprocessConfig, config_path, args)
    fractions = args.split_fractions or DEFAULT_SPLIT
    opts = RunOptions(
        workers=cfg.workers,
        shard=parse_shard(args.shard) if args.shard else None,
        overwrite=args.overwrite,
        redact_paths=not args.keep_paths,
        crosswalk=args.crosswalk,
        rehash=args.rehash,
        split_fractions=tuple(fractions),
        progress=not args.no_progress,
        scan_index=args.scan_index,
        use_scan_index=not args.no_scan_index,
        scan_only=args.scan_only,
        scan_processes=args.scan_processes,
    )
    side = SideTables.load(
        reports=args.reports, codes=args.codes, boxes=args.boxes, labels=args.labels, lesions=args.lesions,
        vocab=args.vocab,
    )
    side.scrub_reports = not args.no_scrub_reports
    summary = run_preprocess(args.paths[0], args.out, cfg, side, opts)
    if opts.scan_only:
        print(f"scanned {sum(summary.counts.values())} series/files into {summary.out} ({summary.total_rows} "
              f"headers, {summary.seconds:.1f} s): ok {summary.counts['ok']}, skipped {summary.counts['skipped']}, "
              f"failed {summary.counts['failed']}")
        return 0
    print(summary.table())
    return summary.exit_code
