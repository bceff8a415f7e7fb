"""The layout of a run directory, defined once (docs/formats.md section 4).

::

    RUN/
      config.yaml            the full TrainConfig / SegConfig of the run
      model/                 the trained model (safetensors, configs, tokenizer)
        model.safetensors
        vol3d_config.json    (vision-language model) or seg_config.json (segmentation)
        preprocess.json      the preprocessing config of the training cache
        domain.json          what the training volumes looked like (vol3d.domain)
        lm/                  the LM's HF config and tokenizer (vision-language model)
      checkpoints/step_N/    resumable checkpoints
      metrics.csv, tb/       training curves
"""

from __future__ import annotations

from pathlib import Path

CONFIG_NAME = "config.yaml"
MODEL_DIR = "model"
WEIGHTS_NAME = "model.safetensors"
VLM_CONFIG_NAME = "vol3d_config.json"
SEG_CONFIG_NAME = "seg_config.json"
PREPROCESS_NAME = "preprocess.json"
DOMAIN_NAME = "domain.json"
LM_DIR = "lm"
ADAPTER_DIR = "lm_adapter"  # LoRA runs: the adapter in PEFT's own format
CHECKPOINTS_DIR = "checkpoints"
METRICS_NAME = "metrics.csv"


def model_dir_of(run_or_model: str | Path) -> Path:
    """``RUN/model`` for a run directory, or the folder itself when it already holds a saved model."""
    path = Path(run_or_model)
    if (path / VLM_CONFIG_NAME).is_file() or (path / SEG_CONFIG_NAME).is_file():
        return path
    return path / MODEL_DIR
