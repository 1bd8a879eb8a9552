"""The three modalities OmniFlow models, in the order their tokens are joined for attention."""

from enum import StrEnum


class Modality(StrEnum):
    IMAGE = "image"
    TEXT = "text"
    AUDIO = "audio"


MODALITIES: tuple[Modality, ...] = (Modality.IMAGE, Modality.TEXT, Modality.AUDIO)


def parse_modality(name: str) -> Modality:
    """`Modality` from its name, with an error that lists the valid names."""
    try:
        return Modality(name)
    except ValueError:
        raise ValueError(
            f"unknown modality {name!r}; expected one of {[m.value for m in MODALITIES]}"
        ) from None
