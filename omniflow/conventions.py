"""Sampling conventions: what a generation feeds for the modalities a task or a guidance branch leaves out.

Three choices change a model's outputs without touching its weights:

    absent              noise    an absent modality enters as noise at t = 1 (how the reference trains)
                        skip     it is left out of the forward pass (a model trained with `skip_absent`)
    dropped_condition   noise    a guidance branch that drops a condition feeds it as noise at t = 1 and
                                 takes a zero pooled vector (the released pipeline's `cfg_mode='new'`)
                        null     it feeds the latent of the modality's null input at t = 0: the empty
                                 caption, an image that is zero in the VAE's input range, an all-zero
                                 log-mel (its default `cfg_mode='old'`); the pooled vector is the
                                 null caption's for text, the null clip's for audio, zeros for images
    absent_text         noise    the text of i2a and a2i enters as noise at t = 1 (with `absent: noise`)
                        null     it enters as the empty caption's latent at t = 1 (the released pipeline)
    text_condition      latent   a caption that conditions (t2i, t2a) enters as its text latent
                        clip_prefix  the CLIP text encoders' penultimate hidden states come first, then
                                 the text latent, each zero-padded to the transformer's text width
                                 (the released pipeline; needs a `clip-text-pooled` text encoder)
    pooled_input        prepared the pooled encoders read an image or a clip as its codec does (resized,
                                 cropped, resampled, normalised), as the encode job computes them
                        original they read the request's own bytes (the released pipeline)

A model directory names them in `omniflow.json` as `"conventions": {"profile": "reference"}` or field
by field (`{"absent": "skip"}`); the fields named override the profile's. Directories written before
conventions existed say `"absent": ...` at the top level, which still counts.

    >>> resolve_conventions({"conventions": {"profile": "reference"}}).dropped_condition
    'null'
"""

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError


class Conventions(BaseModel):
    """One choice per left-out input; the defaults are this project's (see the module's table)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    absent: Literal["noise", "skip"] = "noise"
    dropped_condition: Literal["noise", "null"] = "noise"
    absent_text: Literal["noise", "null"] = "noise"
    text_condition: Literal["latent", "clip_prefix"] = "latent"
    pooled_input: Literal["prepared", "original"] = "prepared"


PROFILES: dict[str, Conventions] = {
    "project": Conventions(),
    # the released OmniFlow pipeline's defaults (its README's example sets cfg_mode='new', which is
    # this profile with dropped_condition: noise)
    "reference": Conventions(dropped_condition="null", absent_text="null", text_condition="clip_prefix",
                             pooled_input="original"),
}


def conventions_from(value: str | Mapping[str, Any] | None, *, base: Conventions | None = None) -> Conventions:
    """A profile name, or a mapping of fields with an optional "profile", over `base` (default: project)."""
    if value is None:
        return base or PROFILES["project"]
    if isinstance(value, str):
        value = {"profile": value}
    fields = dict(value)
    name = fields.pop("profile", None)
    if name is not None and name not in PROFILES:
        raise ValueError(f"unknown conventions profile {name!r}; choose one of {sorted(PROFILES)}")
    start = PROFILES[name] if name is not None else (base or PROFILES["project"])
    try:
        return Conventions.model_validate({**start.model_dump(), **fields})
    except ValidationError as err:
        why = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ValueError(f"invalid conventions {dict(value)}: {why}") from None


def resolve_conventions(info: Mapping[str, Any], override: str | Mapping[str, Any] | None = None) -> Conventions:
    """The conventions of a model directory's `omniflow.json`, then `override` (e.g. a service's setting)."""
    legacy = {"absent": info["absent"]} if "absent" in info else {}
    own = conventions_from(info.get("conventions"), base=conventions_from(legacy))
    return conventions_from(override, base=own)


def clip_prefixed(hidden_BLC: torch.Tensor, latents_BQD: torch.Tensor, width: int) -> torch.Tensor:
    """`text_condition: clip_prefix`: CLIP hidden states (B, L, C), then text latents (B, Q, D), each
    zero-padded to `width` features: (B, L + Q, width)."""
    if max(hidden_BLC.shape[-1], latents_BQD.shape[-1]) > width:
        raise ValueError(f"CLIP hidden states ({hidden_BLC.shape[-1]} wide) and text latents ({latents_BQD.shape[-1]} "
                         f"wide) must fit the transformer's text width {width}")
    pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[-1]))
    return torch.cat([pad(hidden_BLC.to(latents_BQD.dtype)), pad(latents_BQD)], dim=1)
