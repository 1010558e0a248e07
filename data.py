"""
data.py: lookagain's JSONL records (format, loader, validator), the synthetic "look again" task (CPU demo, tests), image
reading (open_image, the one way images are read) and the pieces benchmarks.py's loaders share to read published files.

A record, one JSON object per line: {"id": "q1", "image": "imgs/q1.jpg" (relative to the JSONL file) or a list of paths,
"question": "...", "answer": "red" or ["ten", "10"], "type": "text" (one of rewards.TYPES: it picks the scorer),
"options": ["..", ".."] (multiple choice), "bbox": [x1, y1, x2, y2] (ground-truth region, original px), "category"
and "source" (file and row) from a benchmark's loader; any other field is kept (a scorer may read it)}

The synthetic task: an 896 px image, a 24 px coloured square near the centre of each cell of a 3x3 grid and around it
three decoy squares of other colours, "What colour is the square at the top left?" (the one at the cell's centre). In
the first 112 px view a square is a 3 px smudge; zoomed on the named cell's centre, a ~40 px block alone; zoomed on the
whole cell, a ~12 px block among the decoys. Where to look is named (a text-to-coordinates mapping the model can
memorise); the colour needs a tight zoom. (A random tiny model learns colours quickly but not where things are: with
a ring to find instead, place words stayed at chance after 1400 steps.) tasks.py holds the other synthetic tasks and
the demonstrators.
"""
import io
import json
import os
from functools import lru_cache, partial

import numpy as np
from PIL import Image, ImageOps

from rewards import TYPES, accuracy

COLOURS = {"red": (230, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 230), "yellow": (240, 220, 30),
           "magenta": (220, 40, 220), "cyan": (30, 220, 220), "orange": (250, 140, 20), "purple": (120, 40, 170)}
DEMO_COLOURS = ("red", "green", "blue", "yellow", "cyan", "orange")  # the demo's (magenta, purple: told apart last)
QUESTION = "What colour is the square at the {place}?"

# -----------------------------------------------------------------------------
# the synthetic task


PLACES = [f"{r} {c}".replace("middle centre", "centre") for r in ("top", "middle", "bottom")
          for c in ("left", "centre", "right")]  # the 3x3 grid's cells, row by row


def synthetic_layout(rng, size=896, grid=3, side=24, colours=DEMO_COLOURS, decoys=3):
    """One item's random draws (no pixels yet): a square of a random colour near each cell's centre, around it `decoys`
    squares of other colours 88-108 px away (outside even the widest tight zoom on the square, +-48 px; inside a zoom
    on its cell, +-112 px), the cell asked."""
    cell = size / grid  # ~299 px at the defaults
    squares, around = [], []  # (x, y, colour) of the asked-about squares, row by row; of the decoys
    for gy in range(grid):
        for gx in range(grid):
            # +-4 px: not a fixed point, yet well inside a tight zoom (+-48 px) on the cell's centre
            x, y = (gx + 0.5) * cell + rng.uniform(-4, 4), (gy + 0.5) * cell + rng.uniform(-4, 4)
            c = colours[rng.integers(len(colours))]
            squares.append((x, y, c))
            # decoys take other colours, so an answer read off a decoy is wrong, never right by chance
            others, a0 = [k for k in colours if k != c], rng.uniform(0, 2 * np.pi)
            for k in range(decoys):  # evenly spread in angle: they never touch each other
                a, r = a0 + 2 * np.pi * k / decoys, rng.uniform(88, 108)
                around.append((x + r * np.cos(a), y + r * np.sin(a), others[rng.integers(len(others))]))
    # target: the index into PLACES and squares of the cell asked; noise_seed: the background, drawn when needed
    return dict(size=size, side=side, squares=squares, decoys=around, target=int(rng.integers(grid * grid)),
                noise_seed=int(rng.integers(2**31)))


def grey_noise(seed, size):
    """A size x size x 3 uint8 background: normal noise, mean 128, std 10, clipped. In place: the same pixels as
    rng.normal(128, 10, ...).clip(0, 255), a quarter faster (the demo draws ~1400 of them at 896 px)."""
    x = np.random.default_rng(seed).standard_normal((size, size, 3))
    x *= 10
    x += 128
    return np.clip(x, 0, 255, out=x).astype(np.uint8)


def draw_synthetic(lay):  # grey noise, the decoys, the squares
    size, side = lay["size"], lay["side"]
    img = grey_noise(lay["noise_seed"], size)
    for x, y, c in lay.get("decoys", []) + lay["squares"]:  # squares last: drawn over any decoy they meet
        img[int(y - side / 2):int(y + side / 2), int(x - side / 2):int(x + side / 2)] = COLOURS[c]
    return Image.fromarray(img)


def synthetic(n, seed=0, layout=synthetic_layout, **kw):
    """n records of the synthetic task; item i depends only on (seed, i). "image" is a function that draws it.
    layout, kw: the draws (tasks.py's variants: fewer colours, no decoys, ...); a layout's "record" joins the record."""
    out = []
    for i in range(n):
        lay = layout(np.random.default_rng([seed, i]), **kw)  # item i's own generator: items are independent
        x, y, colour = lay["squares"][lay["target"]]
        h = lay["side"] / 2
        # image: drawn on demand (partial), so 2000 items hold draws, not 896 x 896 x 3 bytes each;
        # bbox: the target square in original pixels (rewards.coverage, eval.py's coverage bins)
        out.append(dict(id=f"syn{seed}-{i}", image=partial(draw_synthetic, lay),
                        question=QUESTION.format(place=PLACES[lay["target"]]), answer=colour, type="text",
                        bbox=[round(x - h, 1), round(y - h, 1), round(x + h, 1), round(y + h, 1)],
                        **lay.get("record", {})))
    return out


def write_jsonl(records, path):
    """Save records as lookagain JSONL, with PIL images written as PNGs next to it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            img = r["image"]() if callable(r["image"]) else r["image"]
            if isinstance(img, Image.Image):  # a path (or a list of them) is written as it is
                rel = os.path.join("images", f"{r['id']}.png")
                img.save(os.path.join(folder, rel))
                img = rel
            f.write(json.dumps(dict(r, image=img)) + "\n")


# -----------------------------------------------------------------------------
# lookagain JSONL


def is_box(b):  # 4 finite numbers (abs(v) < 1e9: False for inf and NaN, and safe for an integer too big for a float)
    return isinstance(b, list) and len(b) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e9 for v in b)


def validate(r, where):
    def bad(msg):  # where: "file:line"
        raise ValueError(f"{where}: {msg}")
    if not isinstance(r, dict):
        bad("a record must be a JSON object")
    if not isinstance(r.get("question"), str) or not r["question"].strip():
        bad("missing or empty 'question'")
    ans = r.get("answer")
    if not (isinstance(ans, str) or (isinstance(ans, list) and ans and all(isinstance(a, str) for a in ans))):
        bad("'answer' must be a string or a non-empty list of strings")
    # a path from a file; an image or a function from a loader (a parquet benchmark, the synthetic tasks)
    imgs = r.get("image") if isinstance(r.get("image"), list) else [r.get("image")]
    if not imgs or not all(isinstance(i, (str, Image.Image)) or callable(i) for i in imgs):
        bad("'image' must be a path or a non-empty list of paths")
    if r.get("type", "text") not in TYPES:
        bad(f"unknown type {r.get('type')!r}; known: {', '.join(TYPES)}")
    opts = r.get("options")
    if opts is not None and not (isinstance(opts, list) and all(isinstance(o, str) for o in opts) and len(opts) >= 2):
        bad("'options' must be a list of at least two strings")
    if r.get("type") == "multiple_choice" and not opts:
        bad("a multiple_choice record needs 'options'")
    b = r.get("bbox")
    if b is not None and not (is_box(b) and b[0] < b[2] and b[1] < b[3]):
        bad("'bbox' must be [x1, y1, x2, y2], finite numbers with x1 < x2 and y1 < y2")
    p = r.get("precision")
    if p is not None and (isinstance(p, bool) or p not in range(16)):  # a float64 holds about 15 significant digits
        bad(f"'precision' must be a number of decimals (0 to 15), got {str(p)[:20]!r}")
    try:  # can the record be scored at all (e.g. a multiple-choice answer that is none of the options)?
        accuracy("", {"type": "text", **r})  # an empty response: scores 0, or raises for a broken record
    except ValueError as e:
        bad(str(e))


def problem(bad, msg, exc=ValueError):
    """A bad record: raise (msg names file and line), or with --skip-bad append it to `bad` and go on."""
    if bad is None:
        raise exc(msg)
    bad.append(msg)


def jsonl_rows(path, bad=None, stream=None):
    """(where, object) for each non-empty line of a JSONL file (or of `stream`, named path); where = "file:line"."""
    if stream is None and not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with stream or open(path, "rb") as f:  # bytes, decoded line by line: a line not UTF-8 is that line's problem
        for ln, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig")  # -sig: a byte-order mark (some editors write one) is dropped
            except UnicodeDecodeError as e:
                problem(bad, f"{path}:{ln}: not UTF-8 text (byte {e.start})")
                continue
            if line.strip():
                try:
                    yield f"{path}:{ln}", json.loads(line)
                except ValueError as e:
                    problem(bad, f"{path}:{ln}: invalid JSON ({e})")


def load_jsonl(path, bad=None):
    """Every record, validated, its image paths made absolute (relative to the JSONL's folder); bad: see problem()."""
    folder, out = os.path.dirname(os.path.abspath(path)), []
    for where, r in jsonl_rows(path, bad):
        try:
            validate(r, where)
            r.setdefault("id", where)  # "file:line": rejections and items.jsonl can still name the record
            r.setdefault("type", "text")
            paths = r["image"] if isinstance(r["image"], list) else [r["image"]]
            r["image"] = [os.path.join(folder, p) for p in paths]  # an absolute p stays as it is
            for p in r["image"]:
                check_image(p, where)
            out.append(r)
        except (ValueError, FileNotFoundError) as e:
            problem(bad, str(e), type(e))
    if not out and bad is None:
        raise ValueError(f"{path}: no records")
    return out


MAX_PIXELS = 8192 * 8192  # an HR-Bench 8K photo (7680 x 4320) fits; a decompression bomb does not
MAX_ASPECT = 200          # Qwen2-VL's smart_resize refuses a longer side over 200 times the shorter


def open_image(src, draft=False):
    """A path, a function returning an image, or an image -> RGB, the one way images are read; draft: at 1/8 scale."""
    if isinstance(src, str) and not os.path.isfile(src):
        raise FileNotFoundError(f"image {src} not found")
    try:
        im = src() if callable(src) else src
        im = Image.open(im) if not isinstance(im, Image.Image) else im
        w, h = im.size
        if w * h > MAX_PIXELS or max(w, h) > MAX_ASPECT * min(w, h):
            raise ValueError(f"{w}x{h} is over the limits ({MAX_PIXELS} pixels, aspect {MAX_ASPECT})")
        if draft:  # JPEG decodes at 1/2, 1/4 or 1/8 scale for little cost; other formats ignore it
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
        im.load()  # decode now: a truncated file fails here, not in the middle of a run
        if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation: the camera was turned
            im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # 16/32-bit grey: 0..65535 -> 0..255
            a = np.asarray(im, dtype=np.float64)  # scaled, not clipped: a 16-bit PNG would turn white
            a = a / 257 if im.mode.startswith("I;16") or a.max() > 255 else a
            im = Image.fromarray(np.rint(a.clip(0, 255)).astype(np.uint8))
        # transparency over white, as a viewer shows it (a plain convert would show the hidden pixels' colours)
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
            im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
        return im.convert("RGB")
    except Exception as e:  # a decoder raises many kinds (OSError, SyntaxError, EOFError, DecompressionBombError...)
        name = src if isinstance(src, str) else "image"
        raise ValueError(f"cannot read {name} ({type(e).__name__}: {str(e)[:200]})") from None


_checked = {}  # (path, size, mtime) -> the problem, or None: an image shared by many records is decoded once


def check_image(path, where):
    """At load time: can `path` be read (open_image at 1/8 scale, nothing kept)? Errors name `where`."""
    try:
        st = os.stat(path)
    except OSError:
        raise FileNotFoundError(f"{where}: image {path} not found") from None
    key = (path, st.st_size, st.st_mtime_ns)  # a file replaced on disk is checked again
    if key not in _checked:
        try:
            open_image(path, draft=True)
            _checked[key] = None
        except ValueError as e:
            _checked[key] = str(e)
    if _checked[key]:
        raise ValueError(f"{where}: {_checked[key]}")


def load_images(record):
    """The record's images (open_image), full size: tools.py resizes the view; zooms cut from the originals."""
    imgs = record["image"] if isinstance(record["image"], list) else [record["image"]]
    try:
        return [open_image(im) for im in imgs]
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"record {record.get('id')}: {e}") from None


def dataset(spec, n=None):
    """--data as a JSONL path: its first n records (the synthetic tasks: tasks.dataset)."""
    return load_jsonl(spec)[:n or None]


# -----------------------------------------------------------------------------
# reading published files: the pieces benchmarks.py's loaders share


def read_json(path):
    """A JSON file's content; a missing file or invalid JSON: one line naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def checked_image(path, where, bad):
    """path if check_image passes, else a bad row (None; see problem())."""
    try:
        check_image(path, where)
        return path
    except (ValueError, FileNotFoundError) as e:
        problem(bad, str(e), type(e))


def open_bytes(raw):
    """An image file's bytes opened (a record's image can be partial(open_bytes, raw): decoded when needed)."""
    return Image.open(io.BytesIO(raw))


def resolve_data(spec):
    """--data as given (a file or folder), or a dataset hub id (org/name) through the Hugging Face cache, offline
    first, as --model's are (model.hub_snapshot); else FileNotFoundError with one line saying why."""
    if os.path.exists(spec) or spec.count("/") != 1 or spec.startswith((".", "/")):  # a path, or not org/name
        return spec
    import model  # (it imports torch and transformers: only a hub id needs them)
    return model.hub_snapshot(spec, f"--data {spec}: no such file or folder", "dataset", error=FileNotFoundError)


@lru_cache(maxsize=4)  # records in file order: one read per row group
def _row_group(path, group, column):
    import pyarrow.parquet as pq
    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(0).to_pylist()


def parquet_image(path, group, row, column, k=None):
    """One image of a parquet row, read again from the file (a record keeps this, not the bytes): a {bytes, path}
    struct, raw bytes, or item k of a list of them."""
    v = _row_group(path, group, column)[row]
    v = v[k] if k is not None else v
    return open_bytes(v["bytes"] if isinstance(v, dict) else v)


def _is_image(v):
    return isinstance(v, bytes) or isinstance(v, dict) and isinstance(v.get("bytes"), bytes)


def parquet_rows(path, need, bad=None):
    """(where, row) for each row of a parquet file, one row group at a time (memory stays flat): each image (a
    {bytes, path} struct, raw bytes, or a list of them) checked now and replaced by a function that reads it again
    (parquet_image). A missing column: one error naming the file (--skip-bad: the file is skipped, counted); an image
    that does not decode: that row's problem."""
    import pyarrow.parquet as pq
    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own kinds (ArrowInvalid, OSError) on a file that is no parquet
        return problem(bad, f"{path}: not a parquet file ({type(e).__name__}: {str(e)[:100]})")
    missing = [c for c in need if c not in f.schema_arrow.names]
    if missing:
        return problem(bad, f"{path}: missing column(s) {missing}; it has {f.schema_arrow.names}")
    start = 0
    for g in range(f.num_row_groups):
        rows = f.read_row_group(g).to_pylist()
        for i, row in enumerate(rows):
            where = f"{path}: row {start + i}"
            try:
                for c, v in row.items():
                    if _is_image(v):
                        row[c] = partial(parquet_image, path, g, i, c)
                    elif isinstance(v, list) and v and all(_is_image(x) for x in v):
                        row[c] = [partial(parquet_image, path, g, i, c, k) for k in range(len(v))]
                    else:
                        continue
                    for im in row[c] if isinstance(row[c], list) else [row[c]]:
                        open_image(im, draft=True)
            except ValueError as e:
                problem(bad, f"{where}: image {c}: {e}")
                continue
            yield where, row
        start += len(rows)


def sample_frames(frames, n):
    """n of a video's frames as the reference samples them: np.linspace(0, total - 1, n, dtype=int) (truncated, not
    rounded); a video with fewer frames than n: ValueError."""
    if len(frames) < n:
        raise ValueError(f"{len(frames)} frames, fewer than the {n} asked (--frames)")
    return [frames[i] for i in np.linspace(0, len(frames) - 1, n, dtype=int)]
