"""``kill -9`` a real ``vol3d preprocess`` process mid-run, rerun it, and check nothing is lost,
duplicated, corrupt or redone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_runner import make_nifti_export

from preprocess.manifest import latest_by_id, read_manifest
from preprocess.store import read_case

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.name != "posix", reason="process groups and SIGKILL are POSIX")


#: A run that SIGKILLs itself (workers too) right after its N-th case is durable: a deterministic kill point.
_KILL_AT = """
import os, signal, sys
from preprocess.config import PreprocessConfig
from preprocess.config_io import load_yaml
from preprocess.runner import RunOptions, run_preprocess
from vol3d.presets import preset_path

def kill_at(n):
    if n >= int(sys.argv[3]):
        os.killpg(os.getpgrp(), signal.SIGKILL)

cfg = load_yaml(PreprocessConfig, preset_path("tiny"))
run_preprocess(sys.argv[1], sys.argv[2], cfg, opts=RunOptions(workers=2, progress=False, on_case_written=kill_at))
"""


def _start(src: Path, out: Path, kill_after: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vol3d.cli", "preprocess", str(src), "--out", str(out), "--preset", "tiny",
           "--workers", "2", "--no-progress"]  # fmt: skip
    if kill_after:
        cmd = [sys.executable, "-c", _KILL_AT, str(src), str(out), str(kill_after)]
    full_env = {**os.environ, "VOL3D_ID_KEY": os.environ.get("VOL3D_ID_KEY", "0123456789abcdef" * 4)}
    # its own session: the kill also reaches its worker processes, as a crash of the machine would
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _ok_rows(out: Path) -> dict:
    return {i: r for i, r in latest_by_id(read_manifest(out / "manifest.jsonl")).items() if r.status == "ok"}


def _rerun_and_check(src: Path, out: Path, n: int) -> None:
    before = _ok_rows(out)
    assert before, "the killed run should have finished some cases"
    mtimes = {i: (out / r.h5).stat().st_mtime_ns for i, r in before.items()}
    proc = _start(src, out)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-4000:]
    rows = read_manifest(out / "manifest.jsonl")
    assert len(rows) == len({r.id for r in rows}) == n  # complete, no duplicate rows
    for r in rows:
        assert r.status == "ok"
        assert read_case(out / r.h5, r.key)["image"].shape[1:] == tuple(r.shape)  # every file readable
    # cases finished before the kill were not redone
    assert {i: (out / before[i].h5).stat().st_mtime_ns for i in before} == mtimes
    assert f"reused (unchanged) {len(before)}" in log
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".part"))]
    assert not (out / ".work").exists() and not list(out.parent.glob(".cache.staging-*"))


def test_kill_hook_at_a_deterministic_point_then_resume(tmp_path):
    make_nifti_export(tmp_path / "export", 10)
    src, out = tmp_path / "export/nifti", tmp_path / "cache"
    proc = _start(src, out, kill_after=4)
    try:
        proc.wait(timeout=300)
    finally:
        _kill_group(proc)  # the orphaned workers
    assert proc.returncode == -signal.SIGKILL
    assert len(_ok_rows(out)) == 4
    _rerun_and_check(src, out, 10)


def test_external_kill_mid_run_then_resume(tmp_path):
    make_nifti_export(tmp_path / "export", 24)
    src, out = tmp_path / "export/nifti", tmp_path / "cache"
    proc = _start(src, out)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "manifest.jsonl").exists() and len(_ok_rows(out)) >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed; use more cases"
    finally:
        _kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    assert len(_ok_rows(out)) < 24
    _rerun_and_check(src, out, 24)


_SCRIPT = """
import sys
from preprocess.config import PreprocessConfig
from preprocess.config_io import load_yaml
from preprocess.runner import RunOptions, run_preprocess
from vol3d.presets import preset_path

def main():
    cfg = load_yaml(PreprocessConfig, preset_path("tiny"))
    run_preprocess(sys.argv[1], sys.argv[2], cfg, opts=RunOptions(workers=2, progress=False))
"""


@pytest.mark.parametrize("guarded", [False, True])
def test_a_script_without_a_main_guard_is_told_how_to_fix_it(tmp_path, guarded):
    # workers start with 'spawn', which imports the calling script again in each of them: an unguarded
    # script runs itself there and its workers die before finishing anything
    src = tmp_path / "src"
    make_nifti_export(src, n=3)
    script = tmp_path / "make_cache.py"
    script.write_text(_SCRIPT + ('if __name__ == "__main__":\n    main()\n' if guarded else "main()\n"))
    env = {**os.environ, "VOL3D_ID_KEY": os.environ.get("VOL3D_ID_KEY", "0123456789abcdef" * 4)}
    done = subprocess.run([sys.executable, str(script), str(src), str(tmp_path / "cache")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    if guarded:
        assert done.returncode == 0, done.stderr[-3000:]
        rows = read_manifest(tmp_path / "cache" / "manifest.jsonl")
        assert len([r for r in rows if r.status == "ok"]) >= 3 and not [r for r in rows if r.status == "failed"]
        return
    assert done.returncode != 0
    assert "WorkerStartError" in done.stderr and 'if __name__ == "__main__":' in done.stderr
    assert str(script) in done.stderr  # names the script to fix
    manifest = tmp_path / "cache" / "manifest.jsonl"
    # no case is reported failed ("worker died"): the run stops instead of retrying pools that cannot start
    assert not manifest.exists() or not [r for r in read_manifest(manifest) if r.status == "failed"]


_HEADERS = """
import sys
from pathlib import Path
from pydicom.data import get_testdata_file
import preprocess.ingest.dicom as dicom
from preprocess.ingest.discover import FoundFile

dicom.PROCESS_SCAN_MIN_FILES = 1  # worker processes for a handful of files

def main():
    found = FoundFile(Path(get_testdata_file("CT_small.dcm")), "ct.dcm")
    print("headers", sum(h is not None for h in dicom.read_headers([(found, True)] * 4, processes=2)))
"""


@pytest.mark.parametrize("guarded", [False, True])
def test_the_header_scan_of_a_script_without_a_main_guard_says_how_to_fix_it(tmp_path, guarded):
    script = tmp_path / "scan.py"
    script.write_text(_HEADERS + ('if __name__ == "__main__":\n    main()\n' if guarded else "main()\n"))
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300)
    if guarded:
        assert done.returncode == 0 and "headers 4" in done.stdout, done.stderr[-3000:]
    else:
        assert "WorkerStartError" in done.stderr and 'if __name__ == "__main__":' in done.stderr
        assert "after 0 of 4 files" in done.stderr and "--scan-processes 1" in done.stderr
