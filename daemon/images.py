"""Profile images from peers: a real PNG, JPEG or GIF within a pixel limit, kept per remote.

Only the image's header is parsed (no decoding), enough to know it is one of the three formats
and how many pixels it claims, so a decompression bomb is refused before anything could inflate
it. The image is stored as ``images/<remote id>/<user id>``: a remote can only ever replace its
own users' images.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)


class ImageError(ValueError):
    """The bytes are not an acceptable image; the message says why."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the header says."""

    format: str
    width: int
    height: int


def _png(data: bytes) -> ImageInfo:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ImageError("a PNG must start with its IHDR chunk")
    length = struct.unpack(">I", data[8:12])[0]
    if length != 13 or zlib.crc32(data[12:29]) != struct.unpack(">I", data[29:33])[0]:
        raise ImageError("the PNG header is damaged")
    width, height = struct.unpack(">II", data[16:24])
    return ImageInfo("png", width, height)


def _gif(data: bytes) -> ImageInfo:
    if len(data) < 14 or not data.rstrip(b"\x00").endswith(b";"):
        raise ImageError("the GIF is truncated")
    width, height = struct.unpack("<HH", data[6:10])
    return ImageInfo("gif", width, height)


def _jpeg(data: bytes) -> ImageInfo:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ImageError("the JPEG's segments are damaged")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2:
            raise ImageError("the JPEG's segments are damaged")
        if marker in _JPEG_SOF:
            if pos + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return ImageInfo("jpeg", width, height)
        if marker == 0xDA:  # start of scan before any frame header
            break
        pos += 2 + length
    raise ImageError("the JPEG has no frame header")


def inspect(data: bytes, max_pixels: int) -> ImageInfo:
    """Check that ``data`` is a PNG, JPEG or GIF of at most ``max_pixels`` pixels."""
    if data.startswith(PNG_SIGNATURE):
        info = _png(data)
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        info = _gif(data)
    elif data[:3] == b"\xff\xd8\xff":
        info = _jpeg(data)
    else:
        raise ImageError("not a PNG, JPEG or GIF image")
    if info.width == 0 or info.height == 0:
        raise ImageError("the image has no pixels")
    if info.width * info.height > max_pixels:
        raise ImageError(
            f"the image has {info.width}x{info.height} pixels, more than the limit of {max_pixels}"
        )
    return info
