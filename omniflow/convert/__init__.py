"""Checkpoint conversion into `OmniFlowTransformer`'s layout.

Two sources are supported:

- `reference`: the public OmniFlow release (`OmniFlowTransformerModel`, its `transformer/` folder,
  optionally with its EMA weights). The converted model computes the same function.
- `sd3`: a diffusers `SD3Transformer2DModel`. Its weights fill the image and text streams and the
  audio stream is added fresh (or seeded from the image stream), so that with audio absent the
  converted model computes SD3's image prediction exactly.

The key mappings are pure functions over state dicts; reading and writing files is kept apart.
Command line: `python -m omniflow.convert --help`.
"""

from omniflow.convert.reference import (
    config_from_reference,
    load_reference_dir,
    state_dict_from_reference,
    transformer_from_reference,
)
from omniflow.convert.sd3 import transformer_from_sd3

__all__ = [
    "config_from_reference",
    "load_reference_dir",
    "state_dict_from_reference",
    "transformer_from_reference",
    "transformer_from_sd3",
]
