"""``curate demo``: a crawl generated on the spot, served on 127.0.0.1, curated end to end.

Nothing is downloaded: images are drawn procedurally (five seed "classes" of patterns plus
unrelated distractors), a threaded HTTP server on loopback plays the web (with 404s, a flaky
host, an HTML page and a truncated body), and a local folder adds planted exact duplicates,
near duplicates, crops, corrupt, zero-byte and odd-mode files. Every fault must end in the ledger.
"""

from __future__ import annotations

import io
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circles", "stripes", "checker", "rings", "triangles")


def _pattern(kind: str, rng: np.random.Generator, size: int = 160) -> Image.Image:
    hue = {"circles": (220, 60, 60), "stripes": (60, 160, 220), "checker": (240, 200, 40), "rings": (90, 200, 90), "triangles": (160, 80, 200)}.get(kind)
    if hue is None:  # distractor: random colours and lines
        hue = tuple(int(x) for x in rng.integers(0, 255, 3))
    bg = tuple(int(np.clip(c * 0.25 + rng.normal(0, 10), 0, 255)) for c in hue)
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    col = tuple(int(np.clip(c + rng.normal(0, 25), 0, 255)) for c in hue)
    if kind == "circles":
        for _ in range(int(rng.integers(4, 9))):
            x, y, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(8, 30))]
            d.ellipse([x - r, y - r, x + r, y + r], fill=col)
    elif kind == "stripes":
        w = int(rng.integers(6, 16))
        for x in range(-size, 2 * size, 2 * w):
            d.polygon([(x, 0), (x + w, 0), (x + w + size // 2, size), (x + size // 2, size)], fill=col)
    elif kind == "checker":
        c = int(rng.integers(12, 28))
        for i in range(0, size, c):
            for j in range(0, size, c):
                if (i // c + j // c) % 2 == 0:
                    d.rectangle([i, j, i + c - 1, j + c - 1], fill=col)
    elif kind == "rings":
        cx, cy = rng.integers(size // 3, 2 * size // 3, 2).tolist()
        for r in range(int(rng.integers(6, 12)), size, int(rng.integers(10, 18))):
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=col, width=4)
    elif kind == "triangles":
        for _ in range(int(rng.integers(3, 7))):
            pts = [tuple(rng.integers(0, size, 2).tolist()) for _ in range(3)]
            d.polygon(pts, fill=col)
    else:
        for _ in range(int(rng.integers(10, 30))):
            d.line([tuple(rng.integers(0, size, 2).tolist()) for _ in range(2)], fill=tuple(int(x) for x in rng.integers(0, 255, 3)), width=int(rng.integers(1, 5)))
    # Each image gets its own orientation and lighting, as photos of one kind of object do:
    # without this, images of one class share their low frequencies and look like copies to a
    # perceptual hash.
    img = img.rotate(float(rng.uniform(0, 360)), resample=Image.BILINEAR, expand=False, fillcolor=bg)
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * np.pi)
    light = (np.cos(angle) * xx + np.sin(angle) * yy - 0.5) * rng.uniform(60, 140)
    noise = rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + light[..., None] + noise, 0, 255).astype("uint8"))


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def generate(root: Path, seed: int = 0, pool_size: int = 240) -> dict:
    """Write seeds/, crawl/ (served over HTTP) and local/ under ``root``."""
    rng = np.random.default_rng(seed)
    seeds, crawl, local = root / "seeds", root / "crawl", root / "local"
    for d in (seeds, crawl, local):
        d.mkdir(parents=True, exist_ok=True)
    for cls in CLASSES:
        (seeds / cls).mkdir(exist_ok=True)
        for i in range(8):
            (seeds / cls / f"{cls}_{i:02d}.jpg").write_bytes(_jpeg(_pattern(cls, rng)))
    names = []
    for i in range(pool_size):
        kind = CLASSES[i % len(CLASSES)] if i % 3 else "distractor"
        name = f"img_{i:04d}.jpg"
        (crawl / name).write_bytes(_jpeg(_pattern(kind, rng), quality=int(rng.integers(70, 95))))
        names.append(name)
    # Planted faults in the crawl.
    (crawl / "page.html").write_bytes(b"<html><body>not an image</body></html>")
    good = (crawl / names[0]).read_bytes()
    (crawl / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (crawl / "empty.jpg").write_bytes(b"")
    urls = [f"/{n}" for n in names] + ["/page.html", "/truncated.jpg", "/empty.jpg", "/missing-1.jpg", "/missing-2.jpg", "/error/500.jpg"]
    urls += [f"/{names[i]}" for i in range(0, 12, 3)]  # the same URL listed twice: exact duplicates
    # Local folder: exact and near duplicates of crawl images, odd modes and broken files.
    for i in range(10):
        src = Image.open(crawl / names[i])
        (local / f"copy_{i}.jpg").write_bytes((crawl / names[i]).read_bytes())
        (local / f"resized_{i}.jpg").write_bytes(_jpeg(src.resize((128, 128)), quality=60))
    for i in (30, 36, 39, 45):  # crops of distractors (random lines, enough keypoints): no perceptual hash sees them
        src = Image.open(crawl / names[i])
        (local / f"crop_{i}.jpg").write_bytes(_jpeg(src.crop((20, 12, 140, 132)).resize((136, 136)), quality=80))
    Image.open(crawl / names[20]).convert("CMYK").save(local / "cmyk.jpg")
    Image.open(crawl / names[21]).convert("P", palette=Image.Palette.ADAPTIVE).save(local / "palette.png")
    rgba = Image.open(crawl / names[22]).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(local / "alpha.png")
    Image.open(crawl / names[23]).convert("I;16").save(local / "sixteen_bit.png")
    (local / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 255, 3000, dtype=np.uint8)))
    (local / "zero.jpg").write_bytes(b"")
    (local / "tiny.png").write_bytes(_png(Image.new("RGB", (12, 12), (9, 9, 9))))
    (local / "banner.png").write_bytes(_png(Image.new("RGB", (1200, 60), (30, 90, 200))))
    (local / "notes.txt").write_text("crawl notes, not an image\n")
    return {"seeds": seeds, "crawl": crawl, "local": local, "url_paths": urls}


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the demo's console for the pipeline
        pass

    def do_GET(self):  # noqa: N802 - http.server API
        if self.path.startswith("/error/"):
            self.send_error(500, "demo server error")
            return
        super().do_GET()


def serve(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    """Serve ``directory`` on 127.0.0.1 (a free port) from a daemon thread."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def run_demo(out: Path, keep_server: bool = False) -> int:
    from curation.config import load_config
    from curation.runner import RunRequest, run_pipeline
    from curation.summary import print_summary

    import shutil

    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)  # the crawl server's port changes: always start fresh
    data = generate(out / "data")
    server, base = serve(data["crawl"])
    try:
        url_list = out / "data" / "urls.txt"
        url_list.write_text("\n".join(base + p for p in data["url_paths"]) + "\nftp://example.invalid/x.jpg\nfile:///etc/passwd\n")
        req = RunRequest(
            pools=[str(url_list), str(data["local"])],
            seeds=[str(data["seeds"])],
            out=out / "run",
            config=load_config("demo"),
            allow_missing_weights=True,
        )
        manifest = run_pipeline(req)
        print_summary(manifest)
        print(f"\nexplore it: curate query \"select reason, count(*) from ledger group by all\" --run {out / 'run'}")
    finally:
        if not keep_server:
            server.shutdown()
    return 0
