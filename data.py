"""
data.py: datasets. lookagain's JSONL record format, its loader and validator, and the synthetic
"look again" task that the CPU demo and the tests train on.

A record (one JSON object per line):
    {"id": "q1", "image": "imgs/q1.jpg" (relative to the JSONL file) or a list of paths,
     "question": "...", "answer": "red" or ["ten", "10"], "type": "text",
     "options": ["..", ".."] (multiple choice), "bbox": [x1, y1, x2, y2] (ground-truth region, original px)}
type is one of TYPES; it picks the scorer in rewards.py.

The synthetic task: a large image (896 px) with a small coloured square (24 px) near the centre of each
cell of a 3x3 grid: "What colour is the square at the top left?" In the 112 px view the model gets first,
each square is a 3 px smudge; in a zoom on the named cell's centre it is a block of ~40 px. The question
names the place, so finding it is a text-to-coordinates mapping the model can memorise, and reading the
colour needs the zoom. (A random tiny model learns colours quickly but not where things are in an image:
with a ring to find instead, place words stayed at chance after 1400 steps.) Measured with the demo's
defaults (README): 10% tools off (chance 12.5%), 71.5% after SFT, 88.5% after GRPO, with the zoom tool.
"""
import json
import os
from functools import partial

import numpy as np
from PIL import Image

TYPES = ("multiple_choice", "number", "mra", "vqa", "anls", "text", "mathvista")
COLOURS = {"red": (230, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 230), "yellow": (240, 220, 30),
           "magenta": (220, 40, 220), "cyan": (30, 220, 220), "orange": (250, 140, 20), "purple": (120, 40, 170)}
QUESTION = "What colour is the square at the {place}?"

# -----------------------------------------------------------------------------
# the synthetic task


PLACES = [f"{r} {c}".replace("middle centre", "centre") for r in ("top", "middle", "bottom")
          for c in ("left", "centre", "right")]  # the 3x3 grid's cells, row by row


def synthetic_layout(rng, size=896, grid=3, side=24):
    """The random draws of one item (cheap: no pixels yet): a small square of a random colour near the
    centre of every cell, and which cell the question asks about. -> dict"""
    cell = size / grid
    names = list(COLOURS)
    squares = [((gx + 0.5) * cell + rng.uniform(-4, 4), (gy + 0.5) * cell + rng.uniform(-4, 4),
                names[rng.integers(len(names))]) for gy in range(grid) for gx in range(grid)]
    return dict(size=size, side=side, squares=squares, target=int(rng.integers(grid * grid)),
                noise_seed=int(rng.integers(2**31)))


def draw_synthetic(lay):
    """The pixels of a layout: grey noise and the squares."""
    size, side = lay["size"], lay["side"]
    img = np.random.default_rng(lay["noise_seed"]).normal(128, 10, (size, size, 3)).clip(0, 255).astype(np.uint8)
    for x, y, c in lay["squares"]:
        img[int(y - side / 2):int(y + side / 2), int(x - side / 2):int(x + side / 2)] = COLOURS[c]
    return Image.fromarray(img)


def synthetic(n, seed=0, **kw):
    """n records of the synthetic task, reproducible from the seed (item i depends only on seed and i).
    The image is drawn when first needed (record["image"] is a function until then)."""
    out = []
    for i in range(n):
        lay = synthetic_layout(np.random.default_rng([seed, i]), **kw)
        x, y, colour = lay["squares"][lay["target"]]
        h = lay["side"] / 2
        out.append(dict(id=f"syn{seed}-{i}", image=partial(draw_synthetic, lay),
                        question=QUESTION.format(place=PLACES[lay["target"]]), answer=colour, type="text",
                        bbox=[round(x - h, 1), round(y - h, 1), round(x + h, 1), round(y + h, 1)]))
    return out


def write_jsonl(records, path):
    """Save records as lookagain JSONL, with PIL images written as PNGs next to it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            r = dict(r)
            if callable(r["image"]):
                r["image"] = r["image"]()
            if isinstance(r["image"], Image.Image):
                rel = os.path.join("images", f"{r['id']}.png")
                r["image"].save(os.path.join(folder, rel))
                r["image"] = rel
            f.write(json.dumps(r) + "\n")


# -----------------------------------------------------------------------------
# lookagain JSONL


def validate(r, where):
    """Check one record; raise ValueError naming the file and line (`where`) and the problem."""
    def bad(msg):
        raise ValueError(f"{where}: {msg}")
    if not isinstance(r, dict):
        bad("a record must be a JSON object")
    if not isinstance(r.get("question"), str) or not r["question"].strip():
        bad("missing or empty 'question'")
    ans = r.get("answer")
    if not (isinstance(ans, str) or (isinstance(ans, list) and ans and all(isinstance(a, str) for a in ans))):
        bad("'answer' must be a string or a non-empty list of strings")
    imgs = r.get("image")
    if not (isinstance(imgs, (str, Image.Image)) or callable(imgs) or (isinstance(imgs, list) and imgs)):
        bad("'image' must be a path or a non-empty list of paths")
    if r.get("type", "text") not in TYPES:
        bad(f"unknown type {r.get('type')!r}; known: {', '.join(TYPES)}")
    opts = r.get("options")
    if opts is not None and not (isinstance(opts, list) and all(isinstance(o, str) for o in opts) and len(opts) >= 2):
        bad("'options' must be a list of at least two strings")
    if r.get("type") == "multiple_choice" and not opts:
        bad("a multiple_choice record needs 'options'")
    b = r.get("bbox")
    if b is not None and not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)
                              and b[0] < b[2] and b[1] < b[3]):
        bad("'bbox' must be [x1, y1, x2, y2] with x1 < x2 and y1 < y2")


def problem(bad, msg, exc=ValueError):
    """A bad record: raise (msg names file and line), or with --skip-bad append it to `bad` and go on."""
    if bad is None:
        raise exc(msg)
    bad.append(msg)


def jsonl_rows(path, bad=None):
    """(where, object) for each non-empty line of a JSONL file; where = "file:line"."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{path}:{ln}", json.loads(line)
                except ValueError as e:
                    problem(bad, f"{path}:{ln}: invalid JSON ({e})")


def load_jsonl(path, bad=None):
    """Read and validate every record; image paths become absolute (relative to the JSONL's folder).
    bad: None stops at the first bad record; a list collects the problems and skips those records."""
    folder = os.path.dirname(os.path.abspath(path))
    out = []
    for where, r in jsonl_rows(path, bad):
        try:
            validate(r, where)
            r.setdefault("id", where)
            r.setdefault("type", "text")
            paths = r["image"] if isinstance(r["image"], list) else [r["image"]]
            r["image"] = [p if os.path.isabs(p) else os.path.join(folder, p) for p in paths]
            for p in r["image"]:
                if not os.path.isfile(p):
                    raise FileNotFoundError(f"{where}: image {p} not found")
        except (ValueError, FileNotFoundError) as e:
            problem(bad, str(e), type(e))
            continue
        out.append(r)
    if not out and bad is None:
        raise ValueError(f"{path}: no records")
    return out


def load_images(record):
    """The record's images as RGB PIL images, at full resolution (the view is resized later, by tools.py,
    to the pixel budget; originals are kept whole because zooms cut from them)."""
    imgs = record["image"] if isinstance(record["image"], list) else [record["image"]]
    out = []
    for im in imgs:
        if callable(im):  # a synthetic image, drawn on demand
            im = im()
        if isinstance(im, Image.Image):
            out.append(im.convert("RGB"))
            continue
        try:
            with Image.open(im) as f:
                out.append(f.convert("RGB"))
        except FileNotFoundError:
            raise FileNotFoundError(f"record {record.get('id')}: image {im} not found") from None
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"record {record.get('id')}: cannot read image {im} ({e})") from None
    return out


def dataset(spec, split="train", n=None, seed=0):
    """--data: "synthetic" (n items; the test split uses a disjoint seed) or a JSONL path."""
    if spec == "synthetic":
        return synthetic(n or (2000 if split == "train" else 200), seed=seed if split == "train" else 10_000 + seed)
    recs = load_jsonl(spec)
    return recs[:n] if n else recs
