"""3D encoders, token reducers, heads and the vision-language model.

Typical use::

    from vol3d.models import create_encoder, list_encoders, Vol3DConfig, Vol3DModel, build_tokenizer

    enc = create_encoder("vit3d_base", in_chans=1)
    tokens = enc.forward_features(volume)            # (B, N, D)

See docs/models.md for presets, the common encoder interface and how to plug a
local LM checkpoint.
"""

from __future__ import annotations

from vol3d.models.inflate import inflate_resnet_state_dict, load_inflated_resnet
from vol3d.models.processor import IGNORE_INDEX, Vol3DProcessor
from vol3d.models.reducers import TokenReducer, create_reducer, list_reducers
from vol3d.models.registry import create_encoder, describe_encoders, list_encoders
from vol3d.models.tokenizer import add_vol3d_tokens, build_tokenizer, load_tokenizer
from vol3d.models.vlm import Vol3DConfig, Vol3DModel

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
