"""Crafted media for tests: files whose headers lie, cut-off files and decoding bombs.

Each builder returns a few hundred bytes at most (the JPEG scan bomb a few tens of KB) that claim
much more than they hold, so a decoder that trusts a header before checking it shows up as a slow
or memory-hungry test.
"""

import io
import struct
import zlib

import numpy as np
from PIL import Image

from omniflow.codecs.media import encode_audio


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` pixels, with hardly any data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def wav_claiming(
    *, frames: int, channels: int = 1, sample_rate: int = 16_000, data: bytes = b"\x10\x00" * 100
) -> bytes:
    """A 16-bit PCM WAV whose header claims `frames` x `channels` at `sample_rate`; holds `data`."""
    block = channels * 2
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, (sample_rate * block) % 2**32, block, 16)
    size = min(frames * block, 2**32 - 1)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + len(data))
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", size)
        + data
    )


def flac_claiming(*, frames: int, sample_rate: int = 16_000) -> bytes:
    """A real 0.1 s FLAC whose STREAMINFO claims `frames` samples at `sample_rate` (up to 2^36 - 1
    frames and 2^20 - 1 Hz, the fields' widths)."""
    tone = (0.5 * np.sin(np.arange(1600) / 3)).astype(np.float32)
    flac = encode_audio(tone, 16_000, format="FLAC")
    info = bytearray(flac[8:42])  # STREAMINFO, after "fLaC" and its 4-byte block header
    # bytes 10..17: sample rate (20 bits), channels - 1 (3), bits per sample - 1 (5), frames (36)
    fields = int.from_bytes(info[10:18], "big")
    fields &= ((1 << 8) - 1) << 36  # keep channels and bits per sample
    fields |= (sample_rate << 44) | frames
    info[10:18] = fields.to_bytes(8, "big")
    return flac[:8] + bytes(info) + flac[42:]


def jpeg(side: int = 64, *, progressive: bool = False) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", progressive=progressive, quality=50)
    return buffer.getvalue()


def jpeg_scan_bomb(scans: int, side: int = 2048) -> bytes:
    """A progressive JPEG with its smallest scan repeated until it has `scans` scans: every scan
    is a pass over the whole image, so decoding costs scans x pixels (10,000 scans of 2048 x 2048:
    about 30 s for Pillow) from a file of 16 bytes a scan."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (128, 128, 128)).save(buffer, format="JPEG", progressive=True)
    data = buffer.getvalue()
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xDA]
    pieces = [data[a:b] for a, b in zip(starts, starts[1:] + [len(data) - 2])]
    smallest = min(pieces[1:], key=len)  # an AC scan: the DC scan must come first
    return data[:-2] + smallest * (scans - len(pieces)) + b"\xff\xd9"
