"""The PIL + numpy way of pre-processing images, as a reference for kiln's pipeline.

  pil_reference.py make DIR       writes test images into DIR (JPEG and PNG, several
                                  sizes and aspect ratios, gray, RGBA, CMYK, an
                                  EXIF-rotated JPEG, one smaller than the output) and prints their
                                  paths as JSON
  pil_reference.py make-bad DIR   writes files that must be refused: truncated.jpg,
                                  empty.jpg, notes.jpg (text), bomb.png (a valid header
                                  claiming 50000x50000), image.ppm (a format kiln does
                                  not read); prints their paths as JSON
  pil_reference.py text-lines DIR N
                                  renders N lines of text (Pillow's built-in font) upright
                                  and N turned 180 degrees; prints {path: degrees} as JSON
  pil_reference.py compare OURS.npy FILES...
                                  letterboxes FILES to 224x224 with PIL (LANCZOS, black
                                  padding, alpha composited on it, EXIF orientation
                                  applied, ImageNet mean/std, CHW float32) and prints, as
                                  JSON, the mean and max absolute difference per image
                                  between OURS and that, in 0..255 pixel units (the
                                  normalisation undone)
  pil_reference.py bench FILES... times the same PIL steps one image at a time
"""
import json
import sys
import time

import numpy as np
from PIL import Image, ImageOps

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
T = 224


def reference(path):
    im = ImageOps.exif_transpose(Image.open(path))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
    im = im.convert("RGB")
    w, h = im.size
    nw, nh = (T, T * h // w) if w >= h else (T * w // h, T)
    resized = im.resize((nw, nh), Image.LANCZOS)
    canvas = Image.new("RGB", (T, T), (0, 0, 0))
    canvas.paste(resized, ((T - nw) // 2, (T - nh) // 2))
    a = np.asarray(canvas, np.float32) / 255.0
    return ((a - MEAN) / STD).transpose(2, 0, 1)


def photo(h, w, seed):
    """A photo-like image: 1/f^1.6 noise per channel (natural images' spectrum)."""
    r = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    amp = 1 / np.maximum(np.hypot(fx, fy), 1 / max(h, w)) ** 1.6
    out = []
    for _ in range(3):
        c = np.real(np.fft.ifft2(np.fft.fft2(r.normal(size=(h, w))) * amp))
        out.append(128 + 50 * (c - c.mean()) / c.std() + r.normal(0, 2, (h, w)))
    return np.clip(np.stack(out, -1), 0, 255).astype(np.uint8)


def make(d):
    files = []

    def save(name, im, **kw):
        path = f"{d}/{name}"
        im.save(path, **kw)
        files.append(path)

    save("hd.jpg", Image.fromarray(photo(1080, 1920, 0)), quality=90)
    save("vga.jpg", Image.fromarray(photo(480, 640, 1)), quality=85)
    save("tall.png", Image.fromarray(photo(800, 300, 2)))
    save("square.png", Image.fromarray(photo(1000, 1000, 3)))
    save("gray.jpg", Image.fromarray(photo(333, 500, 4)).convert("L"), quality=90)
    save("gray.png", Image.fromarray(photo(90, 200, 5)).convert("L"))
    rgba = Image.fromarray(photo(300, 400, 6)).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 400, dtype=np.float32), (300, 1)).astype(np.uint8)
    rgba.putalpha(Image.fromarray(alpha))
    save("rgba.png", rgba)
    save("small.png", Image.fromarray(photo(30, 50, 7)))
    save("cmyk.jpg", Image.fromarray(photo(200, 300, 11)).convert("CMYK"), quality=92)
    rotated = Image.fromarray(photo(600, 900, 8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    save("rotated.jpg", rotated, quality=90, exif=exif.tobytes())
    json.dump(files, sys.stdout)


def make_bad(d):
    import struct
    import zlib

    files = []

    def write(name, data):
        with open(f"{d}/{name}", "wb") as f:
            f.write(data)
        files.append(f"{d}/{name}")

    Image.fromarray(photo(480, 640, 9)).save(f"{d}/whole.jpg", quality=90)
    whole = open(f"{d}/whole.jpg", "rb").read()
    write("truncated.jpg", whole[: len(whole) // 2])
    write("empty.jpg", b"")
    write("notes.jpg", b"These are notes, not a picture.\n" * 10)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)
    write("bomb.png", b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    Image.fromarray(photo(20, 20, 10)).save(f"{d}/image.ppm")
    files.append(f"{d}/image.ppm")
    json.dump(files, sys.stdout)


def text_lines(d, n):
    from PIL import ImageDraw, ImageFont

    words = ("kiln fires clay into stone while the glaze melts over every pot in the "
             "studio at nine hundred degrees for six long hours before cooling").split()
    r = np.random.default_rng(12)
    out = {}
    for i in range(int(n)):
        text = " ".join(r.choice(words, size=int(r.integers(2, 5))))
        font = ImageFont.load_default(size=int(r.integers(24, 34)))
        left, top, right, bottom = font.getbbox(text)
        im = Image.new("RGB", (right - left + 16, bottom - top + 16), (255, 255, 255))
        ImageDraw.Draw(im).text((8 - left, 8 - top), text, fill=(0, 0, 0), font=font)
        for degrees in (0, 180):
            path = f"{d}/line_{i:03}_{degrees}.png"
            im.rotate(degrees).save(path)
            out[path] = degrees
    json.dump(out, sys.stdout)


def compare(ours_path, files):
    ours = np.load(ours_path)
    assert ours.shape == (len(files), 3, T, T), (ours.shape, len(files))
    out = {}
    for i, f in enumerate(files):
        d = np.abs((ours[i] - reference(f)) * STD[:, None, None]) * 255
        out[f] = {"mean": float(d.mean()), "max": float(d.max())}
    json.dump(out, sys.stdout)


def bench(files):
    for f in files[:2]:
        reference(f)
    started = time.perf_counter()
    for f in files:
        reference(f)
    seconds = time.perf_counter() - started
    json.dump({"images": len(files), "seconds": seconds, "images_per_s": len(files) / seconds}, sys.stdout)


if __name__ == "__main__":
    {"make": lambda: make(sys.argv[2]), "make-bad": lambda: make_bad(sys.argv[2]),
     "text-lines": lambda: text_lines(sys.argv[2], sys.argv[3]), "compare": lambda: compare(sys.argv[2], sys.argv[3:]),
     "bench": lambda: bench(sys.argv[2:])}[sys.argv[1]]()
