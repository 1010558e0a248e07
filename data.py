"""
data.py: lookagain's JSONL records (format, loader, validator), the synthetic "look again" task (CPU demo, tests) and
eval.py's benchmark loaders (V*, HR-Bench, TextVQA, DocVQA, MathVista, ScienceQA-IMG; local files, nothing downloaded).

A record, one JSON object per line: {"id": "q1", "image": "imgs/q1.jpg" (relative to the JSONL file) or a list of paths,
"question": "...", "answer": "red" or ["ten", "10"], "type": "text" (one of rewards.TYPES: it picks the scorer),
"options": ["..", ".."] (multiple choice), "bbox": [x1, y1, x2, y2] (ground-truth region, original px)}

The synthetic task: an 896 px image, a 24 px coloured square near the centre of each cell of a 3x3 grid and around it
three decoy squares of other colours, "What colour is the square at the top left?" (the one at the cell's centre). In
the first 112 px view a square is a 3 px smudge; zoomed on the named cell's centre, a ~40 px block alone; zoomed on the
whole cell, a ~12 px block among the decoys. Where to look is named (a text-to-coordinates mapping the model can
memorise); the colour needs a tight zoom. (A random tiny model learns colours quickly but not where things are: with a ring to find instead, place
words stayed at chance after 1400 steps.) tasks.py holds the other synthetic tasks and the demonstrators.
"""
import base64
import csv
import hashlib
import io
import json
import os
import random
import re
from functools import partial

import numpy as np
from PIL import Image, ImageOps

from rewards import TYPES, accuracy

COLOURS = {"red": (230, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 230), "yellow": (240, 220, 30),
           "magenta": (220, 40, 220), "cyan": (30, 220, 220), "orange": (250, 140, 20), "purple": (120, 40, 170)}
DEMO_COLOURS = ("red", "green", "blue", "yellow", "cyan", "orange")  # the demo's: magenta and purple were told apart last
QUESTION = "What colour is the square at the {place}?"

# -----------------------------------------------------------------------------
# the synthetic task


PLACES = [f"{r} {c}".replace("middle centre", "centre") for r in ("top", "middle", "bottom")
          for c in ("left", "centre", "right")]  # the 3x3 grid's cells, row by row


def synthetic_layout(rng, size=896, grid=3, side=24, colours=DEMO_COLOURS, decoys=3):
    """One item's random draws (no pixels yet): a square of a random colour near each cell's centre, around it `decoys`
    squares of other colours 88-108 px away (outside even the widest tight zoom on the square, +-48 px; inside a zoom
    on its cell, +-112 px), the cell asked."""
    cell = size / grid
    squares, around = [], []
    for gy in range(grid):
        for gx in range(grid):
            x, y = (gx + 0.5) * cell + rng.uniform(-4, 4), (gy + 0.5) * cell + rng.uniform(-4, 4)
            c = colours[rng.integers(len(colours))]
            squares.append((x, y, c))
            others, a0 = [k for k in colours if k != c], rng.uniform(0, 2 * np.pi)
            for k in range(decoys):  # evenly spread in angle: they never touch each other
                a, r = a0 + 2 * np.pi * k / decoys, rng.uniform(88, 108)
                around.append((x + r * np.cos(a), y + r * np.sin(a), others[rng.integers(len(others))]))
    return dict(size=size, side=side, squares=squares, decoys=around, target=int(rng.integers(grid * grid)),
                noise_seed=int(rng.integers(2**31)))


def draw_synthetic(lay):  # grey noise, the decoys, the squares
    size, side = lay["size"], lay["side"]
    img = np.random.default_rng(lay["noise_seed"]).normal(128, 10, (size, size, 3)).clip(0, 255).astype(np.uint8)
    for x, y, c in lay.get("decoys", []) + lay["squares"]:
        img[int(y - side / 2):int(y + side / 2), int(x - side / 2):int(x + side / 2)] = COLOURS[c]
    return Image.fromarray(img)


def synthetic(n, seed=0, layout=synthetic_layout, **kw):
    """n records of the synthetic task; item i depends only on (seed, i). "image" is a function that draws it.
    layout, kw: the draws (tasks.py's variants: fewer colours, no decoys, ...); a layout's "record" joins the record."""
    out = []
    for i in range(n):
        lay = layout(np.random.default_rng([seed, i]), **kw)
        x, y, colour = lay["squares"][lay["target"]]
        h = lay["side"] / 2
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
            if isinstance(img, Image.Image):
                rel = os.path.join("images", f"{r['id']}.png")
                img.save(os.path.join(folder, rel))
                img = rel
            f.write(json.dumps(dict(r, image=img)) + "\n")


# -----------------------------------------------------------------------------
# lookagain JSONL


def _box(b):  # 4 finite numbers (abs(v) < 1e9: False for inf and NaN, and safe for an integer too big for a float)
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
    if b is not None and not (_box(b) and b[0] < b[2] and b[1] < b[3]):
        bad("'bbox' must be [x1, y1, x2, y2], finite numbers with x1 < x2 and y1 < y2")
    p = r.get("precision")
    if p is not None and (isinstance(p, bool) or p not in range(16)):
        bad(f"'precision' must be a number of decimals (0 to 15), got {str(p)[:20]!r}")
    try:  # can the record be scored at all (e.g. a multiple-choice answer that is none of the options)?
        accuracy("", {"type": "text", **r})
    except ValueError as e:
        bad(str(e))


def problem(bad, msg, exc=ValueError):
    """A bad record: raise (msg names file and line), or with --skip-bad append it to `bad` and go on."""
    if bad is None:
        raise exc(msg)
    bad.append(msg)


def jsonl_rows(path, bad=None):
    """(where, object) for each non-empty line of a JSONL file; where = "file:line"."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:  # bytes, decoded line by line: a line that is not UTF-8 is that line's problem
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
            r.setdefault("id", where)
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
        if draft:
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
        im.load()  # decode now: a truncated file fails here, not in the middle of a run
        if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation: the camera was turned
            im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # 16/32-bit grey: 0..65535 -> 0..255
            a = np.asarray(im, dtype=np.float64)  # scaled, not clipped: a 16-bit PNG would turn white
            a = a / 257 if im.mode.startswith("I;16") or a.max() > 255 else a
            im = Image.fromarray(np.rint(a.clip(0, 255)).astype(np.uint8))
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
    key = (path, st.st_size, st.st_mtime_ns)
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


def dataset(spec, split="train", n=None, seed=0):
    """--data: "synthetic" (n items; the test split uses a disjoint seed) or a JSONL path."""
    if spec == "synthetic":
        return synthetic(n or (2000 if split == "train" else 200), seed=seed if split == "train" else 10_000 + seed)
    return load_jsonl(spec)[:n or None]


# -----------------------------------------------------------------------------
# loaders: a benchmark as published -> lookagain records, plus `category` (if any) and `source` (file and row)


def _read_json(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def _image(path, where, bad):  # path if check_image passes, else a bad row (None)
    try:
        check_image(path, where)
        return path
    except (ValueError, FileNotFoundError) as e:
        problem(bad, str(e), type(e))


def _vstar_record(key, img, question, options, correct, shuffle_seed, category, where, ann):
    """One V* record: options shuffled by (shuffle_seed, key) (V* puts the answer first); bbox around all targets."""
    order = list(range(len(options)))
    random.Random(f"{shuffle_seed}:{key}").shuffle(order)  # str seeds hash with sha512: stable across runs
    r = dict(id=f"vstar-{key.replace('/', '-')}", image=img, question=question, answer=chr(65 + order.index(correct)),
             type="multiple_choice", options=[options[k] for k in order], category=category, source=where)
    boxes = ann.get("bbox") if isinstance(ann, dict) else None
    boxes = [b for b in (boxes if isinstance(boxes, list) else []) if _box(b) and b[2] > 0 and b[3] > 0]
    if boxes:
        r["bbox"] = [min(b[0] for b in boxes), min(b[1] for b in boxes),
                     max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)]
    return r


VSTAR_CATEGORIES = ("direct_attributes", "relative_position")


def load_vstar(path, shuffle_seed=0, bad=None):
    """V*: its folder (direct_attributes/, relative_position/: <name>.jpg, <name>.json {"question", "options" (correct
    first), "bbox": [[x, y, w, h]]}) or test_questions.jsonl ({"image", "category", "label", "text" with "(A) ..."})."""
    if os.path.isfile(path):
        return _load_vstar_jsonl(path, shuffle_seed, bad)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such folder (give the V* folder or its test_questions.jsonl)")
    cats = [c for c in VSTAR_CATEGORIES if os.path.isdir(os.path.join(path, c))]
    if not cats:
        if os.path.isfile(os.path.join(path, "test_questions.jsonl")):
            return _load_vstar_jsonl(os.path.join(path, "test_questions.jsonl"), shuffle_seed, bad)
        raise FileNotFoundError(f"{path}: no {' or '.join(VSTAR_CATEGORIES)} folder and no test_questions.jsonl")
    out = []
    for cat in cats:
        folder = os.path.join(path, cat)
        files = sorted(os.listdir(folder))
        for name in [f for f in files if f.endswith(".json")]:
            where, stem = os.path.join(folder, name), name[:-len(".json")]
            try:
                ann = _read_json(where)
            except ValueError as e:
                problem(bad, str(e))
                continue
            imgs = [f for f in files if os.path.splitext(f)[0] == stem and not f.endswith(".json")]
            ann = ann if isinstance(ann, dict) else {}
            opts = ann.get("options")
            if not imgs:
                problem(bad, f"{where}: no image {stem}.* next to it", FileNotFoundError)
            elif not isinstance(ann.get("question"), str) or not (isinstance(opts, list) and len(opts) >= 2):
                problem(bad, f"{where}: needs an object with a 'question' and at least two 'options'")
            elif _image(os.path.join(folder, imgs[0]), where, bad):
                out.append(_vstar_record(f"{cat}/{stem}", os.path.join(folder, imgs[0]), ann["question"],
                                         [str(o) for o in opts], 0, shuffle_seed, cat, where, ann))
    return out


def _load_vstar_jsonl(path, shuffle_seed, bad):
    folder, out = os.path.dirname(os.path.abspath(path)), []
    for where, q in jsonl_rows(path, bad):
        if not isinstance(q, dict) or not all(isinstance(q.get(k), str) for k in ("image", "text", "label")):
            problem(bad, f"{where}: needs 'image', 'text' and 'label' strings")
            continue
        label, rel, options, question = q["label"].strip().upper(), q["image"], [], []
        for s in q["text"].split("\n"):
            m = re.match(r"\s*\(([A-Z])\)\s*(.*)", s)
            if m:
                options.append(m.group(2).strip())
            elif not options and s.strip() and not s.lower().startswith("answer with"):
                question.append(s.strip())
        if len(options) < 2 or len(label) != 1 or not "A" <= label <= chr(64 + len(options)):
            problem(bad, f"{where}: label {label!r} is not one of the {len(options)} '(A) ...' options in 'text'")
            continue
        img = _image(os.path.join(folder, rel), where, bad)
        if img is None:
            continue
        side = os.path.splitext(img)[0] + ".json"  # the per-image JSON, when present, has the target boxes
        try:
            ann = _read_json(side) if os.path.isfile(side) else None
        except ValueError as e:
            problem(bad, str(e))
            continue
        stem = os.path.splitext(rel)[0]
        out.append(_vstar_record(stem, img, " ".join(question), options, ord(label) - 65, shuffle_seed,
                                 q.get("category") or os.path.dirname(stem), where, ann))
    return out


HRBENCH_COLUMNS = ("index", "question", "A", "B", "answer", "category", "cycle_category", "image")


def load_hrbench(path, bad=None):
    """HR-Bench 4K/8K TSV: index, question, A-D, answer (letter), category, cycle_category (option rotation), image
    (base64 JPEG, or as in VLMEvalKit the index of the row with it), decoded when needed: no 8K image stays decoded."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    csv.field_size_limit(2 ** 31 - 1)  # a base64 8K image is tens of MB in one field
    rows, by_index, opened = [], {}, {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        try:
            missing = [c for c in HRBENCH_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}; HR-Bench's TSV has "
                                 f"{', '.join(HRBENCH_COLUMNS)}, C, D")
            for row in reader:  # one pass; only the compressed bytes of each distinct image are kept
                s = (row.pop("image") or "").strip()
                if len(s) > 64:
                    key = hashlib.blake2b(s.encode(), digest_size=16).digest()
                    if key not in opened:  # decoded once here (at 1/8 scale), to fail now rather than mid-run
                        opened[key] = "image is not valid base64"
                        try:  # b64decode raises a ValueError (binascii.Error is one) on bad base64
                            opened[key] = partial(_open_bytes, base64.b64decode(s, validate=True))
                            open_image(opened[key], draft=True)
                        except ValueError as e:
                            if callable(opened[key]):
                                opened[key] = f"image is base64 of no image PIL can read whole ({e})"
                    by_index[row["index"]] = opened[key]
                    s = row["index"]
                rows.append((f"{path}:{reader.line_num}", row, s))
        except (UnicodeDecodeError, csv.Error) as e:
            raise ValueError(f"{path}:{reader.line_num + 1}: unreadable TSV ({e})") from None
    stem, out = os.path.splitext(os.path.basename(path))[0], []
    for where, row, key in rows:
        img = by_index.get(key, f"image field {key[:20]!r} is neither base64 nor the index of a row")
        options = [row[c] for c in "ABCD" if row.get(c)]
        answer = (row["answer"] or "").strip().upper()
        if isinstance(img, str):
            problem(bad, f"{where}: {img}")
        elif not row["question"] or len(options) < 2 or len(answer) != 1 or not "A" <= answer <= chr(64 + len(options)):
            problem(bad, f"{where}: needs a question, options A-D and an answer letter (got {answer!r})")
        else:
            out.append(dict(id=f"{stem}-{row['index']}", image=img, question=row["question"], answer=answer,
                            type="multiple_choice", options=options, category=row["category"],
                            cycle_category=row["cycle_category"], source=where))
    return out


def _open_bytes(raw):
    return Image.open(io.BytesIO(raw))


def _load_answer_list(path, bad, name, kind, image_of, id_key):
    """TextVQA and DocVQA share a layout: {"data": [{"question", <image>, "answers": [...], <id>}]}."""
    js = _read_json(path)
    if not isinstance(js, dict) or not isinstance(js.get("data"), list):
        raise ValueError(f"{path}: expected an object with a 'data' list (the official {name} layout)")
    out = []
    for n, q in enumerate(js["data"]):
        where = f"{path}: data[{n}]"
        img = image_of(q) if isinstance(q, dict) else None
        if img is None or not isinstance(q.get("question"), str):
            problem(bad, f"{where}: needs a 'question' and its image")
        elif not (isinstance(q.get("answers"), list) and q["answers"]
                  and all(isinstance(a, str) for a in q["answers"])):
            problem(bad, f"{where}: no 'answers' ({name}'s test split has none: evaluate on val)")
        elif _image(img, where, bad):
            out.append(dict(id=f"{name.lower()}-{q.get(id_key, n)}", image=img, question=q["question"],
                            answer=q["answers"], type=kind, source=where))
    return out


def load_textvqa(path, images=None, bad=None):
    """TextVQA (VQA accuracy): <image_id>.jpg in --images, else in train_images/ next to the JSON, else its folder."""
    root = os.path.join(os.path.dirname(os.path.abspath(path)), "train_images")
    root = images or (root if os.path.isdir(root) else os.path.dirname(root))
    return _load_answer_list(path, bad, "TextVQA", "vqa", lambda q: os.path.join(root, f"{q['image_id']}.jpg")
                             if "image_id" in q else None, "question_id")


def load_docvqa(path, images=None, bad=None):
    """DocVQA (ANLS): "image": "documents/x.png", relative to --images, else to the JSON's folder."""
    root = images or os.path.dirname(os.path.abspath(path))
    return _load_answer_list(path, bad, "DocVQA", "anls", lambda q: os.path.join(root, q["image"])
                             if isinstance(q.get("image"), str) else None, "questionId")


def load_mathvista(path, images=None, bad=None):
    """MathVista testmini: {pid: {"question", "image", "choices", "unit", "precision", "answer", ...}} or a list."""
    js = _read_json(path)
    problems = list(js.items()) if isinstance(js, dict) else list(enumerate(js)) if isinstance(js, list) else None
    if problems is None:
        raise ValueError(f"{path}: expected MathVista's {{pid: problem}} object or a list of problems")
    root = images or os.path.dirname(os.path.abspath(path))
    out = []
    for key, p in problems:
        pid = str(p.get("pid", key)) if isinstance(p, dict) else str(key)
        where = f"{path}: pid {pid}"
        if not isinstance(p, dict) or not isinstance(p.get("question"), str) or not isinstance(p.get("image"), str):
            problem(bad, f"{where}: needs 'question' and 'image'")
        elif p.get("answer") in (None, ""):
            problem(bad, f"{where}: no 'answer' (MathVista's test split has none: evaluate on testmini)")
        elif p.get("choices") and not isinstance(p["choices"], list):  # a string would become one option a letter
            problem(bad, f"{where}: 'choices' must be a list, got {str(p['choices'])[:40]!r}")
        elif not isinstance(p.get("metadata") or {}, dict):
            problem(bad, f"{where}: 'metadata' must be an object, got {str(p['metadata'])[:40]!r}")
        elif _image(os.path.join(root, p["image"]), where, bad):
            q = p["question"] + (f" (Unit: {p['unit']})" if p.get("unit") else "")
            r = dict(id=f"mathvista-{pid}", image=os.path.join(root, p["image"]), question=q, answer=str(p["answer"]),
                     type="mathvista", answer_type=p.get("answer_type"), precision=p.get("precision"),
                     question_type=p.get("question_type"), category=(p.get("metadata") or {}).get("category"),
                     source=where)
            if p.get("choices"):
                r["options"] = [str(c) for c in p["choices"]]
            out.append(r)
    return out


def load_scienceqa(path, images=None, split="test", bad=None):
    """ScienceQA-IMG: problems.json {pid: {"question", "choices", "answer": index, "hint", "image", "subject", "split"}}
    and images/<split>/<pid>/ next to it (or --images); only `split`'s with an image; category: subject (paper's)."""
    js = _read_json(path)
    if not isinstance(js, dict):
        raise ValueError(f"{path}: expected ScienceQA's {{pid: problem}} object")
    root = images or os.path.join(os.path.dirname(os.path.abspath(path)), "images")
    out = []
    for pid, p in js.items():
        if not isinstance(p, dict) or p.get("split") != split or not p.get("image"):
            continue
        where = f"{path}: pid {pid}"
        choices, ans = p.get("choices"), p.get("answer")
        if not isinstance(p.get("question"), str) or not isinstance(choices, list) or len(choices) < 2:
            problem(bad, f"{where}: needs 'question' and at least two 'choices'")
        elif isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(choices):
            problem(bad, f"{where}: 'answer' must be the index of a choice, got {ans!r}")
        elif not isinstance(p["image"], str):
            problem(bad, f"{where}: 'image' must be a file name, got {str(p['image'])[:40]!r}")
        else:
            img = _image(os.path.join(root, split, str(pid), p["image"]), where, bad)
            if img:
                q = (f"Context: {p['hint']}\n" if p.get("hint") else "") + p["question"]
                out.append(dict(id=f"scienceqa-{pid}", image=img, question=q, answer=chr(65 + ans),
                                type="multiple_choice", options=[str(c) for c in choices],
                                category=p.get("subject"), source=where))
    return out


BENCHES = ("vstar", "hrbench", "textvqa", "docvqa", "mathvista", "scienceqa", "jsonl")


def load_benchmark(bench, path, images=None, split="test", shuffle_seed=0, bad=None):
    """--bench's records, validated as JSONL's are (a precision that is no number, a box of inf); bad: see problem()."""
    if bench == "jsonl":
        return load_jsonl(path, bad)
    load = dict(vstar=lambda: load_vstar(path, shuffle_seed, bad), hrbench=lambda: load_hrbench(path, bad),
                textvqa=lambda: load_textvqa(path, images, bad), docvqa=lambda: load_docvqa(path, images, bad),
                mathvista=lambda: load_mathvista(path, images, bad),
                scienceqa=lambda: load_scienceqa(path, images, split, bad)).get(bench)
    if load is None:
        raise ValueError(f"unknown --bench {bench!r}; known: {', '.join(BENCHES)}")
    recs, out = load(), []
    for r in recs:
        try:
            validate(r, r["source"])
            out.append(r)
        except ValueError as e:
            problem(bad, str(e))
    return out
