"""The HTML page of `dcc eval --images`: one row per prompt with the 16-bit and the artifact's image side by side
(embedded as base64 PNG, so the page is one self-contained file) and their PSNR and SSIM, written atomically (a
temporary file beside it, renamed into place). PNG through Pillow, which diffusers depends on."""
from __future__ import annotations

import base64
import html
import io
import os
import tempfile
from pathlib import Path

import torch

STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:6px;vertical-align:top;text-align:left}"
         "img{image-rendering:pixelated;width:256px}")


def png_bytes(img: torch.Tensor) -> bytes:
    """A [3, H, W] image in [0, 1] as 8-bit RGB PNG bytes (rounded to nearest, as diffusers' numpy_to_pil does)."""
    from PIL import Image
    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _img(img: torch.Tensor, alt: str) -> str:
    data = base64.b64encode(png_bytes(img)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render(results: dict, ref: list[torch.Tensor], got: list[torch.Tensor], title: str) -> str:
    def db(v):
        return "inf" if v is None else f"{v:.2f}"
    s, m = results["settings"], results["mean"]
    rows = "\n".join(
        f"<tr><td>{i}</td><td>{html.escape(r['prompt'])}</td><td>{_img(a, '16-bit')}</td><td>{_img(b, 'artifact')}"
        f"</td><td>{db(r['psnr_db'])}</td><td>{r['ssim']:.4f}</td></tr>"
        for i, (r, a, b) in enumerate(zip(results["images"], ref, got)))
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
            f"<p>{html.escape(str(results['architecture']))}: the pipeline's 16-bit {results['model']} (left) and "
            f"the artifact's (right); {s['height']}x{s['width']}, {s['steps']} steps, seed {s['seed']} + image "
            f"index, device {s['device']}. Mean PSNR {db(m['psnr_db'])} dB, mean SSIM {m['ssim']:.4f}.</p>\n"
            f"<table>\n<tr><th>#</th><th>prompt</th><th>16-bit</th><th>artifact</th><th>PSNR dB</th><th>SSIM</th>"
            f"</tr>\n{rows}\n</table>\n</body></html>\n")


def write_report(path, results: dict, ref: list[torch.Tensor], got: list[torch.Tensor], title: str) -> Path:
    """Render and write the page atomically: a reader never sees half a file, and a failure leaves none."""
    return write_atomic(path, render(results, ref, got, title))


def write_atomic(path, text: str) -> Path:
    """Write `text` to `path` through a temporary file beside it, renamed into place (also `dcc report`'s page)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp's file is private; the page is as readable as any file written
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
