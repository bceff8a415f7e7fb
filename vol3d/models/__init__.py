"""3D encoders, token reducers, heads and the vision-language model.

Typical use::

    from vol3d.models import create_encoder, list_encoders, Vol3DConfig, Vol3DModel, build_tokenizer

    enc = create_encoder("vit3d_base", in_chans=1)
    tokens = enc.forward_features(volume)            # (B, N, D)

See docs/models.md for presets, the common encoder interface and how to plug a
local LM checkpoint.
"""

from __future__ import annotations

import importlib
from typing import Any

# Names re-exported lazily (PEP 562), so that importing the torch-free
# ``vol3d.models.config`` does not pull torch in through this package.
_EXPORTS = {
    "inflate_resnet_state_dict": "inflate",
    "load_inflated_resnet": "inflate",
    "IGNORE_INDEX": "processor",
    "Vol3DProcessor": "processor",
    "TokenReducer": "reducers",
    "create_reducer": "reducers",
    "list_reducers": "reducers",
    "create_encoder": "registry",
    "describe_encoders": "registry",
    "list_encoders": "registry",
    "add_vol3d_tokens": "tokenizer",
    "build_tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "Vol3DConfig": "config",
    "Vol3DModel": "vlm",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vol3d.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vol3d.models.{_EXPORTS[name]}"), name)


__all__ = [
    "IGNORE_INDEX",
    "TokenReducer",
    "Vol3DConfig",
    "Vol3DModel",
    "Vol3DProcessor",
    "add_vol3d_tokens",
    "build_tokenizer",
    "create_encoder",
    "create_reducer",
    "describe_encoders",
    "inflate_resnet_state_dict",
    "list_encoders",
    "list_reducers",
    "load_inflated_resnet",
    "load_tokenizer",
]
