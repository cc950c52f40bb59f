"""dcc/runtime/html_report.py: the PNG bytes decode to the image (8-bit, rounded), and the page is written whole,
with one row per prompt and its text escaped."""
import base64
import io
import re

import pytest
import torch

from dcc.runtime.html_report import png_bytes, write_report

PIL = pytest.importorskip("PIL.Image", reason="Pillow comes with diffusers")


def test_png_round_trip():
    img = torch.rand(3, 9, 13, generator=torch.Generator().manual_seed(0))
    back = torch.from_numpy(__import__("numpy").array(PIL.open(io.BytesIO(png_bytes(img))).convert("RGB")))
    assert back.shape == (9, 13, 3)
    assert torch.equal(back.permute(2, 0, 1), (img * 255).round().to(torch.uint8))


def test_page(tmp_path):
    imgs = [torch.rand(3, 8, 8), torch.rand(3, 8, 8)]
    results = {"architecture": "X", "model": "transformer", "settings": {"height": 8, "width": 8, "steps": 2,
                                                                         "seed": 0, "device": "cpu"},
               "images": [{"prompt": "a <b>cat</b>", "psnr_db": 30.0, "ssim": 0.9}, {"prompt": "b", "psnr_db": None,
                                                                                     "ssim": 1.0}],
               "mean": {"psnr_db": None, "ssim": 0.95}}
    out = write_report(tmp_path / "r.html", results, imgs, imgs, "t")
    text = out.read_text()
    assert text.count("<tr><td>") == 2 and "a &lt;b&gt;cat&lt;/b&gt;" in text and ">inf<" in text
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    assert len(pngs) == 4 and base64.b64decode(pngs[0]) == png_bytes(imgs[0])
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]   # no temporary file left
