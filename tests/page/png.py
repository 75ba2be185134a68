"""Just enough PNG decoding (8-bit RGB/RGBA, not interlaced) to read a screenshot's pixels."""

from __future__ import annotations

import struct
import zlib
from collections import Counter

Pixel = tuple[int, int, int]


def decode(data: bytes) -> tuple[int, int, list[Pixel]]:
    """Width, height and the RGB pixels, row by row, of a PNG as Chromium writes it."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    channels = {2: 3, 6: 4}.get(colour)
    if depth != 8 or channels is None or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {colour}, interlace {interlace}")
    raw = zlib.decompress(idat)
    stride = width * channels
    pixels: list[Pixel] = []
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        _unfilter(kind, line, prev, channels)
        pixels.extend((line[i], line[i + 1], line[i + 2]) for i in range(0, stride, channels))
        prev = line
    return width, height, pixels


def _unfilter(kind: int, line: bytearray, prev: bytearray, bpp: int) -> None:
    for i in range(len(line)):
        left = line[i - bpp] if i >= bpp else 0
        up = prev[i]
        if kind == 1:
            line[i] = (line[i] + left) & 0xFF
        elif kind == 2:
            line[i] = (line[i] + up) & 0xFF
        elif kind == 3:
            line[i] = (line[i] + (left + up) // 2) & 0xFF
        elif kind == 4:
            corner = prev[i - bpp] if i >= bpp else 0
            p = left + up - corner
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
            pred = left if pa <= pb and pa <= pc else (up if pb <= pc else corner)
            line[i] = (line[i] + pred) & 0xFF
        elif kind != 0:
            raise ValueError(f"bad PNG filter type {kind}")


def hue_name(pixel: Pixel) -> str | None:
    """red, yellow or green for a clearly saturated pixel; None for greys and dark pixels."""
    r, g, b = pixel
    if max(r, g, b) < 120 or max(r, g, b) - min(r, g, b) < 80:
        return None
    if r > 1.6 * g and r > 1.6 * b:
        return "red"
    if r > 1.6 * b and g > 1.6 * b and abs(r - g) < 0.35 * max(r, g):
        return "yellow"
    if g > 1.25 * r and g > 1.6 * b:
        return "green"
    return None


def dominant_hue(png: bytes) -> str | None:
    """The most frequent of red, yellow and green among a PNG's saturated pixels."""
    _, _, pixels = decode(png)
    counts = Counter(name for name in map(hue_name, pixels) if name is not None)
    return counts.most_common(1)[0][0] if counts else None
