"""Hostile image files, made by the tests: each small on disk, each a trap for a decoder.

PNGs are written chunk by chunk (no pixels are ever allocated here); the JPEG is a real 28x28
one whose frame header is patched to lie about its size.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png(width: int, height: int, extra: bytes = b"", rows: int | None = None) -> bytes:
    """A grey 8-bit PNG declaring ``width`` x ``height``, with ``rows`` rows of zeros (all by
    default: a valid file; fewer: a header that promises more than the file holds)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    c = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    idat = b"".join(c.compress(row) for _ in range(height if rows is None else rows)) + c.flush()
    head = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra
    return head + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def bomb_png(side: int = 20000) -> bytes:
    """A valid PNG of side x side zero pixels: 400 million for 20000, about 400 KB on disk."""
    return png(side, side)


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but holds one row: tiny, and fast to make."""
    return png(width, height, rows=1)


def text_bomb_png(inflated: int = 4_000_000) -> bytes:
    """A 28x28 PNG with a zTXt chunk that inflates to ``inflated`` bytes (PIL stops at 1 MB)."""
    ztxt = b"comment\0\0" + zlib.compress(b"a" * inflated, 9)
    return png(28, 28, extra=_chunk(b"zTXt", ztxt))


def frames(kind: str, n: int = 3) -> bytes:
    """An animated ``GIF`` or ``PNG`` (APNG) of ``n`` 28x28 grey frames."""
    images = [Image.new("L", (28, 28), 40 * i) for i in range(n)]
    buf = io.BytesIO()
    images[0].save(buf, format=kind, save_all=True, append_images=images[1:])
    return buf.getvalue()


def lying_jpeg(width: int, height: int) -> bytes:
    """A real 28x28 JPEG whose SOF0 header says ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.new("L", (28, 28), 100).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def good_png(value: int = 128, size: int = 28) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), value).save(buf, format="PNG")
    return buf.getvalue()


# The cases both readers (vae encode and the folder dataset) refuse the same way: file name ->
# (its bytes, a part of the one line that refuses it). Header-only PNGs: refused unread.
CASES: dict[str, tuple[Callable[[], bytes], str]] = {
    "bomb.png": (
        lambda: header_only_png(20000, 20000),
        "declares 400,000,000 pixels, over the limit of 16,777,216",
    ),
    "big.png": (lambda: header_only_png(5000, 5000), "declares 5000x5000 = 25,000,000"),
    "text.png": (text_bomb_png, "not a readable image (Decompressed data too large"),
    "animated.gif": (lambda: frames("GIF"), "3 frames (an animated or multi-frame"),
    "animated.png": (lambda: frames("PNG"), "3 frames (an animated or multi-frame"),
    "liar.jpg": (lambda: lying_jpeg(60000, 60000), "declares 3,600,000,000 pixels"),
}
