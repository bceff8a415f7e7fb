"""`vol3d info`: versions, device, optional backends and DICOM codecs."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys

HELP = "print versions, the device found, xformers and DICOM codec availability"
DESCRIPTION = """Print vol3d, Python and library versions, the compute device, whether xformers
is usable and which compressed DICOM transfer syntaxes can be decoded."""

_LIBS = ("torch", "monai", "transformers", "torchio", "nibabel", "SimpleITK", "pydicom", "h5py", "einops", "peft")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def dicom_codecs() -> dict[str, bool]:
    """Which compressed transfer syntaxes ingest decodes with what is installed (pydicom's
    plugins, and GDCM for the JPEG family: :func:`preprocess.ingest.dicom.decoder_available`)."""
    from pydicom.uid import (
        JPEG2000,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
        RLELossless,
    )

    from preprocess.ingest.dicom import decoder_available

    names = {
        "JPEG baseline": JPEGBaseline8Bit,
        "JPEG extended 12-bit": JPEGExtended12Bit,
        "JPEG lossless": JPEGLossless,
        "JPEG lossless SV1": JPEGLosslessSV1,
        "JPEG-LS lossless": JPEGLSLossless,
        "JPEG-LS near-lossless": JPEGLSNearLossless,
        "JPEG 2000 lossless": JPEG2000Lossless,
        "JPEG 2000": JPEG2000,
        "RLE": RLELossless,
    }
    return {name: decoder_available(uid) for name, uid in names.items()}


def collect() -> dict:
    """Everything `vol3d info` reports, as a dict."""
    from vol3d import __version__
    from vol3d.attention import xformers_status

    info: dict = {"vol3d": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    info["libraries"] = {name: _version(name) for name in _LIBS}
    import torch

    if torch.cuda.is_available():
        info["device"] = f"cuda: {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible)"
        info["bf16"] = bool(torch.cuda.is_bf16_supported())
    else:
        info["device"] = f"cpu ({torch.get_num_threads()} threads)"
        info["bf16"] = False
    info["xformers"] = xformers_status()
    info["dicom_codecs"] = dicom_codecs()
    return info


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"vol3d {info['vol3d']}  (Python {info['python']}, {info['platform']})")
    print(f"device    {info['device']}" + ("  bf16" if info["bf16"] else ""))
    print(f"xformers  {info['xformers']}")
    print("libraries " + ", ".join(f"{k} {v or 'MISSING'}" for k, v in info["libraries"].items()))
    codecs = info["dicom_codecs"]
    print("DICOM     " + ", ".join(f"{k}: {'yes' if ok else 'no'}" for k, ok in codecs.items()))
    if not all(codecs.values()):
        print("          (see the NO_DECODER fix in docs/ingest.md for the package that adds a missing one)")
    return 0
