"""The headless-Chromium harness itself, on tiny hand-written pages."""

from __future__ import annotations

import base64
import struct
import zlib

import pytest

from report.browser import chromium_unavailable_reason, open_in_chromium


@pytest.fixture(autouse=True)
def _needs_chromium():
    reason = chromium_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def _png(width: int, height: int) -> bytes:
    """A solid red RGB PNG, written with zlib and struct only."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def _page(tmp_path, body: str, title: str = "t"):
    path = tmp_path / "page.html"
    path.write_text(
        f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title></head>'
        f"<body>{body}</body></html>",
        encoding="utf-8",
    )
    return path


def test_inline_png_renders(tmp_path):
    src = "data:image/png;base64," + base64.b64encode(_png(4, 3)).decode()
    svg = '<svg width="20" height="10"><rect width="20" height="10"/></svg>'
    check = open_in_chromium(_page(tmp_path, f'<img alt="dot" src="{src}">{svg}', title="Tiny report"))
    assert check.console_errors == []
    assert check.requests_outside == []
    assert check.title == "Tiny report"
    [image] = check.images
    assert (image["alt"], image["naturalWidth"], image["naturalHeight"]) == ("dot", 4, 3)
    assert image["width"] > 0 and image["height"] > 0
    assert check.svgs == [{"width": 20, "height": 10}]


def test_console_error_is_reported(tmp_path):
    check = open_in_chromium(_page(tmp_path, '<p>x</p><script>console.error("boom")</script>'))
    assert check.console_errors
    assert any("boom" in message for message in check.console_errors)


def test_escaped_markup_stays_text(tmp_path):
    check = open_in_chromium(_page(tmp_path, "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>"))
    assert check.console_errors == []
    assert "<script>alert(1)</script>" in check.text
