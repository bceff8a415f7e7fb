"""vol3d: vision-language modelling of 3D CT and MRI.

Heavy dependencies (torch, transformers) are imported lazily so that
``vol3d --help`` and ``import vol3d`` stay instant.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(run_dir, device: str | None = None, preprocess_config=None):
    """Load a trained run directory for inference: ``vol3d.load(run).ask(volume, question)``.

    See :func:`vol3d.inference.load` and :class:`vol3d.inference.Vol3DPipeline`.
    """
    from vol3d.inference import load as _load

    return _load(run_dir, device=device, preprocess_config=preprocess_config)
