"""Scale benchmark of the scan: headers of a large synthetic DICOM export, read cold (threads in one
process, or processes), and warm (from the scan index), with files/s and peak memory of each.

    .venv/bin/python scripts/bench_scan.py --out /tmp/vol3d_bench_scan --files 100000 --per-series 5

The export (``--files`` small CT slices, ``--per-series`` per series, 10 series per patient folder) is
written once into ``OUT/export`` and reused. Each mode runs in its own Python process, so its peak
resident memory (``ru_maxrss`` of the process and of its header-reading children) is its own:

- ``threads``: ``ingest.scan(..., processes=1)``: the thread pool of one process (the scan before the
  index existed);
- ``processes``: ``processes=0`` (one per core, at most 8);
- ``index cold``: processes, recording every header into a new scan index;
- ``index warm``: the same scan again, every header taken from the index.

Prints a table (and ``--json FILE`` saves it). Record the figures in docs/benchmarks/preprocess.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_export(out: Path, files: int, per_series: int) -> None:
    """``files`` 16 x 16 CT slices, ``per_series`` per series, each series in its own folder."""
    import numpy as np
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    done = out / ".complete"
    if done.is_file() and int(done.read_text()) == files * 1000 + per_series:
        return
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 2.0
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelData = np.full((16, 16), 1064, np.uint16).tobytes()
    n_series = files // per_series
    t0 = time.time()
    for s in range(n_series):
        patient, series = divmod(s, 10)
        folder = out / f"P{patient:05d}" / f"SE{series:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        ds.PatientID = f"MRN{patient:07d}"
        ds.PatientName = f"SYNTH^{patient}"
        ds.StudyInstanceUID = generate_uid(entropy_srcs=["bench-scan", str(patient)])
        ds.AccessionNumber = f"A{patient:07d}"
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=["bench-scan", str(s)])
        ds.FrameOfReferenceUID = ds.StudyInstanceUID
        ds.SeriesNumber = series + 1
        for k in range(per_series):
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["bench-scan", str(s), str(k)])
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [0.0, 0.0, 2.0 * k]
            ds.save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)
        if s % 2000 == 0:
            print(f"  wrote {s * per_series} files ({time.time() - t0:.0f} s)", flush=True)
    done.write_text(str(files * 1000 + per_series))


def run_mode(mode: str, src: Path, index: Path) -> dict:
    """One scan in this process (called in a child process by :func:`main`)."""
    sys.path.insert(0, str(ROOT))
    from preprocess import ingest
    from preprocess.ingest.config import IngestConfig
    from preprocess.ingest.scan_index import ScanIndex

    processes = 1 if mode == "threads" else 0
    idx = None
    if mode.startswith("index"):
        if mode == "index cold" and index.exists():
            index.unlink()
        idx = ScanIndex(index, b"k" * 32)
    t0 = time.perf_counter()
    rows = ingest.scan(src, IngestConfig(min_slices=2), index=idx, processes=processes)
    seconds = time.perf_counter() - t0
    if idx is not None:
        idx.close()
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"mode": mode, "seconds": round(seconds, 2), "series": len(rows),
            "ok": sum(r.status == "ok" for r in rows), "peak_rss_mb": round(self_kb / 1024),
            "peak_child_rss_mb": round(child_kb / 1024)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/vol3d_bench_scan"))
    p.add_argument("--files", type=int, default=100_000)
    p.add_argument("--per-series", type=int, default=5)
    p.add_argument("--modes", nargs="+", default=["threads", "processes", "index cold", "index warm"])
    p.add_argument("--json", type=Path)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # MODE SRC INDEX: one scan, JSON to stdout
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_mode(args.child[0], Path(args.child[1]), Path(args.child[2]))))
        return 0
    src = args.out / "export"
    src.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    write_export(src, args.files, args.per_series)
    print(f"export: {args.files} files in {args.files // args.per_series} series ({time.time() - t0:.0f} s to write)")
    results = {"machine": {"cpu_cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                           "python": platform.python_version(), "load_avg_start": list(os.getloadavg())},
               "files": args.files, "per_series": args.per_series, "modes": []}
    for mode in args.modes:
        out = subprocess.run([sys.executable, __file__, "--child", mode, str(src), str(args.out / "scan.sqlite")],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["files_per_s"] = round(args.files / r["seconds"], 1)
        results["modes"].append(r)
        print(f"{mode:<12} {r['seconds']:>8.1f} s  {r['files_per_s']:>9.0f} files/s  series {r['series']} "
              f"(ok {r['ok']})  peak RSS {r['peak_rss_mb']} MB (+ children {r['peak_child_rss_mb']} MB)", flush=True)
    results["load_avg_end"] = list(os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
