"""
convert.py: the methods' released training data, as published, -> lookagain JSONL for grpo.py / eval.py --data (the
RL formats) or trajectory JSONL for sft.py --data (the SFT formats), with its images under --out/images/:

    python convert.py virl39k TIGER-Lab/ViRL39K --out data/virl39k
    python convert.py virl39k TIGER-Lab/ViRL39K --out data/virl39k-hard --max-pass-rate 0.75
    python convert.py deepeyes ChenShawn/DeepEyes-Datasets-47k --out data/deepeyes
    python convert.py textvqa lmms-lab/textvqa --split train --out data/textvqa
    python convert.py textvqa TextVQA_0.5.1_train.json train_val_images.zip --out data/textvqa
    python convert.py vilasr_rl ViLaSR-data --out data/vilasr-rl
    python convert.py vilasr_sft ViLaSR-data --out data/vilasr-sft
    python convert.py vlm_r3_rl data.zip --out data/r3-rl
    python convert.py vlm_r3_sft dataset.zip --out data/r3-sft
    python convert.py vlm_r3_sft dataset.zip --out data/r3-sft-la --dialect lookagain --view-max-pixels 1605632

INPUT: parquet, JSON and JSONL files, zip archives (of images, of data files or both), folders holding them, or the
dataset's hub id (the Hugging Face cache first, else downloaded, unless HF_HUB_OFFLINE is set). A row's image is its
bytes (a {bytes, path} struct) or a path, looked up from the data file's folder up to the INPUT it came from (an
archive counts as unzipped where it lies), then without its leading folders, then in --images.
--out gets data.jsonl and images/<hash>.<ext>, each image once, named by its content: a second run writes no image
and the same data.jsonl byte for byte. Everything is written aside and put in place at the end. A bad row (a field
missing, an image that does not decode or is over data.py's limits, an answer with no \\boxed{}) or an archive member
whose path leaves its folder stops the run with one line naming file, row and field, nothing written; --skip-bad
counts, names (--out/skipped.tsv) and skips it instead. The formats and what each keeps: FORMATS, or --help.
"""
import argparse
import fnmatch
import hashlib
import io
import json
import math
import os
import re
import shutil
import stat
import zipfile
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

import data as D
import scorers as S

MAX_IMAGE_BYTES = 256 * 2**20  # an image file (or archive member) larger than this is refused unread
EXT = {"JPEG": "jpg", "MPO": "jpg", "TIFF": "tif"}  # PIL's format -> the file's extension (else format.lower())

# -----------------------------------------------------------------------------
# 1. the inputs: hub ids, folders, zip archives, the rows of their data files


def hub_folder(name, patterns):
    """A hub dataset id -> its snapshot folder, found as --model's are (model.hub_snapshot: the cache first)."""
    if patterns is None:  # (VLM-R3's data is on ModelScope: the file must be given)
        raise SystemExit(f"{name}: no such file or folder (this format is not on the Hugging Face hub: docs/data.md)")
    import model  # (it imports torch: only a hub id needs it)
    return model.hub_snapshot(name, f"{name}: no such file or folder", "dataset", patterns)


def zip_members(path, skip):
    """An archive's files -> (ZipFile, {member path: ZipInfo}). A member whose path leaves the archive's folder (..,
    an absolute path or drive) or that is a link is refused: skip() stops the run, or with --skip-bad counts it."""
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        skip("file", f"{path}: not a readable zip archive ({e})")
        return None, {}
    members = {}
    for info in zf.infolist():
        name, parts = info.filename, re.split(r"[\\/]", info.filename)  # either separator: archives made on Windows
        if info.is_dir():
            continue
        if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts:  # "zip slip"
            skip("zip member", f"{path}: member {name!r} leaves the archive's folder: refused")
        elif stat.S_ISLNK(info.external_attr >> 16):  # the Unix mode is the high 16 bits of external_attr
            skip("zip member", f"{path}: member {name!r} is a link: refused")
        else:
            members["/".join(p for p in parts if p not in ("", "."))] = info  # a//b and a/./b are a/b
    return zf, members


def matches(rel, patterns):  # a pattern with a folder matches that folder anywhere; one without, the file name
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel, "*/" + p) if "/" in p
               else fnmatch.fnmatch(os.path.basename(rel), p) for p in patterns)


def open_inputs(inputs, patterns, hub, skip):
    """INPUT... -> (data files: [dict(label, path, root, src)], archive members: {path: src}). path: where the file
    is, or would be if its archive were unzipped where it lies; root: the INPUT it came from (paths in its rows are
    looked up from the file's folder up to root); src: a path on disk or (ZipFile, ZipInfo)."""
    files, members = [], {}

    def add_zip(path, root, rel):
        zf, inside = zip_members(path, skip)
        for name, info in sorted(inside.items()):
            full = os.path.join(os.path.dirname(path), name)  # where it would be, unzipped beside the archive
            members.setdefault(full, (zf, info))  # the first archive holding a path wins
            if matches(os.path.join(rel, name), patterns):
                files.append(dict(label=f"{path}:{name}", path=full, root=root, src=(zf, info)))

    for inp in inputs:
        if not os.path.exists(inp):  # owner/name and no such path: a hub id
            inp = hub_folder(inp, hub) if re.fullmatch(r"[\w.-]+/[\w.-]+", inp) else inp
        if not os.path.exists(inp):
            raise SystemExit(f"{inp}: no such file or folder")
        inp = os.path.abspath(inp)
        if os.path.isfile(inp):
            root = os.path.dirname(inp)
            if inp.lower().endswith(".zip"):
                add_zip(inp, root, "")
            else:
                files.append(dict(label=inp, path=inp, root=root, src=inp))
            continue
        for folder, dirs, names in sorted(os.walk(inp)):  # sorted: the same rows in the same order on any machine
            dirs.sort()
            for name in sorted(names):
                path, rel = os.path.join(folder, name), os.path.relpath(os.path.join(folder, name), inp)
                if name.lower().endswith(".zip"):  # its members match patterns as if unzipped where it lies
                    add_zip(path, inp, os.path.dirname(rel))
                elif matches(rel, patterns):
                    files.append(dict(label=path, path=path, root=inp, src=path))
    return files, members


def open_src(src):  # a member is read from its archive, never unzipped to disk
    return open(src, "rb") if isinstance(src, str) else src[0].open(src[1])


def file_rows(f, columns, bad):
    """A data file -> (rows or None, iterator of (where, row)): parquet read by row group, only `columns` (memory stays
    flat however large the file), a JSON list or an object's "data" list (TextVQA), JSONL; where = file[row] (0-based)
    or file:line. A file that cannot be read raises ValueError; bad JSONL lines: see data.jsonl_rows."""
    label, lower = f["label"], f["label"].lower()
    if lower.endswith(".parquet"):
        try:
            pf = pq.ParquetFile(open_src(f["src"]))
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{label}: not a readable parquet file ({e})") from None
        have = pf.schema_arrow.names  # a column the file lacks is not asked for: the reader reports it missing

        def rows():  # one row group at a time (iter_batches reads ahead: its memory grew with the file)
            n = 0
            for g in range(pf.num_row_groups):
                # 64 rows at a time into Python objects: a DeepEyes row holds a whole image
                for batch in pf.read_row_group(g, columns=[c for c in columns if c in have]).to_batches(64):
                    for row in batch.to_pylist():
                        yield f"{label}[{n}]", row
                        n += 1
        return pf.metadata.num_rows, rows()  # the count from the footer: the progress bar's total, nothing read
    if lower.endswith(".jsonl"):
        return None, D.jsonl_rows(label, bad, stream=open_src(f["src"]))
    try:
        with open_src(f["src"]) as s:
            js = json.load(s)
    except (ValueError, OSError) as e:
        raise ValueError(f"{label}: invalid JSON ({e})") from None
    js = js.get("data") if isinstance(js, dict) else js  # TextVQA's official JSON: {"dataset_type": ..., "data": [...]}
    if not isinstance(js, list):
        raise ValueError(f"{label}: expected a JSON list of rows (or an object with a 'data' list)")
    return len(js), ((f"{label}[{n}]", row) for n, row in enumerate(js))

# -----------------------------------------------------------------------------
# 2. what the formats share: a row's fields, the question's placeholders and options, the record's type


def need(ok, field, msg):
    """A bad row: ValueError(field, message), the field naming what is wrong (and counting it)."""
    if not ok:
        raise ValueError(field, msg)


def text(row, key, field=None):
    """row[key], a non-empty string (an integer is taken as its digits)."""
    v = row.get(key) if isinstance(row, dict) else None
    v = str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # a JSON number (an answer 42); true is no text
    need(isinstance(v, str) and v.strip(), field or key, "missing or empty" if v is None or isinstance(v, str) else
         f"must be a string, got {type(v).__name__}")
    return v.strip()


def path_list(row, key):
    """row[key]: a path or a non-empty list of them -> the list."""
    v = row.get(key)
    v = [v] if isinstance(v, str) else v
    need(isinstance(v, list) and v and all(isinstance(p, str) and p.strip() for p in v), key,
         "no image path (a path or a list of them)")
    return v


def strip_placeholders(q):
    """The question without its <image> placeholders (our prompt puts the images first) -> (question, count)."""
    q, n = re.subn(r"[ \t]*<image>[ \t]*\n?", "", q)  # with its spaces and one newline: '<image>\nQ' -> 'Q'
    return q.strip(), n


OPTION = re.compile(r"\s*\(?([A-Z])\s*[).:：]\s*(.+?)\s*")  # A. x, A) x, (A) x, A: x, A： x (a full-width colon)


def split_options(question, answer):
    """Lettered options on the question's last lines (A first, in order, at least two, an optional "Choices:" line
    above) and an answer that picks one (its letter, "(B)", "B) text", the option's text) -> (question without
    them, option texts, letter), else None: the options then stay in the question."""
    lines = question.rstrip().split("\n")
    start = len(lines)
    while start and OPTION.fullmatch(lines[start - 1]):  # up from the end while the lines read as options
        start -= 1
    found = [OPTION.fullmatch(s) for s in lines[start:]]
    # A, B, C, ... in order from A: lines lettered otherwise (from C, with a gap) are no option list
    if len(found) < 2 or [m.group(1) for m in found] != [chr(65 + i) for i in range(len(found))]:
        return None
    options = [m.group(2) for m in found]
    letter = S.extract_choice(answer, options)  # the letter, '(B)', 'B) text' or the option's own text
    if letter is None:  # a gold that picks none: multiple choice would score it wrong against every letter
        return None
    head = lines[:start]
    if head and re.fullmatch(r"\s*(choices|options)\s*[:：]?\s*", head[-1], re.I):
        head.pop()
    return "\n".join(head).strip(), options, letter


def typed(question, answer):
    """A record's question, answer, type (and options): multiple choice when the question ends in lettered options and
    the answer picks one; a number when the answer holds exactly one (to_number: "55", "17^\\circ", "3.5 cm"); else
    text (LaTeX such as \\frac{1}{2} is compared as text: no symbolic checker is a dependency)."""
    mc = split_options(question, answer)
    if mc:  # the options move out: each dialect writes them back in its own layout (dialects.question_text, ...)
        return dict(question=mc[0], answer=mc[2], type="multiple_choice", options=mc[1])
    return dict(question=question, answer=answer, type="number" if S.to_number(answer) is not None else "text")


def rate(v):
    """A pass rate, or None: ViRL39K marks a rate it did not measure -1."""
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 else None


def one_or_list(paths):  # a record's image: one path, or a list for several (data.py reads both)
    return paths[0] if len(paths) == 1 else paths

# -----------------------------------------------------------------------------
# 3. the formats: a row (and ctx: "image" stores an image, "key" is file-row, "args") -> a record


def virl39k(row, ctx):
    """ViRL39K (39Krelease.parquet + images.zip): flat columns, images as a list of paths images/..., <image>
    placeholders in the question, the answer in \\boxed{}, the pass rates of two models (-1: not measured)."""
    qid, paths = text(row, "qid"), path_list(row, "image")  # (a text-only row has none)
    question, n = strip_placeholders(text(row, "question"))
    # one per image, if any: VL-Rethinker puts an image block at each (handle_placeholders), one in all without
    need(n in (0, len(paths)), "question", f"{n} <image> placeholders for {len(paths)} image(s)")
    raw = text(row, "answer")
    need("\\boxed{" in raw, "answer", f"no \\boxed{{}} in {raw[:60]!r}")  # the card: every answer is boxed
    answer = S.extract_answer(raw)  # the last \boxed{...} whose braces balance
    need(answer, "answer", f"an empty or unclosed \\boxed{{}} in {raw[:60]!r}")
    return dict(id=f"virl39k-{qid}", image=one_or_list([ctx["image"](p, "image") for p in paths]),  # qid: unique
                **typed(question, answer), qid=qid, category=row.get("category"), source=row.get("source"),
                pass_rate_32b=rate(row.get("PassRate_32BTrained")), pass_rate_7b=rate(row.get("PassRate_7BBase")))


DEEPEYES_SUFFIX = "\nThink first, call **image_zoom_in_tool** if needed"  # USER_PROMPT_V2's start (prompt.py)


def deepeyes(row, ctx):
    """DeepEyes-Datasets-47k (verl RL parquets): a chat `prompt` (system, user with <image>), `images` [{bytes, path}]
    (one), `reward_model` {ground_truth}, `extra_info` {question, index, ...}, `data_source` (the scorer)."""
    imgs = row.get("images")
    need(isinstance(imgs, list) and len(imgs) == 1, "images",
         f"{len(imgs) if isinstance(imgs, list) else 'no'} images; DeepEyes rows have one")
    gt = text(row.get("reward_model") or {}, "ground_truth", "reward_model.ground_truth")
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    q = extra.get("question") if isinstance(extra.get("question"), str) else ""  # the question its judge was given
    if not q.strip():  # the user turn, without the placeholder, DeepEyes' format instruction, ThinkLite's preamble
        users = [m.get("content") for m in row.get("prompt") or [] if isinstance(m, dict) and m.get("role") == "user"]
        q = strip_placeholders(users[-1] if users and isinstance(users[-1], str) else "")[0]
        q = q.split(DEEPEYES_SUFFIX)[0].rpartition("Question:\n")[2]  # ThinkLite: '<instructions>\nQuestion:\n<q>'
    need(q.strip(), "extra_info.question", "no question (and no user turn in 'prompt')")
    # extra_info.index, else the row's position; the id adds the file's stem: indices repeat across the three files
    index = ctx["n"] if extra.get("index") is None else extra["index"]
    return dict(id=f"deepeyes-{ctx['stem']}-{index}", image=ctx["image"](imgs[0], "images"), **typed(q.strip(), gt),
                data_source=row.get("data_source"), env_name=row.get("env_name"), ability=row.get("ability"),
                index=index)


# question_type -> ours: gcot.py scores numerical and regression alike, by MRA of the first number
VILASR_TYPES = {"multiple choice": "multiple_choice", "numerical": "mra", "regression": "mra", "free-form": "text"}


def vilasr_answer(a):  # ViLaSR's gold may be bare or <answer>-wrapped (its scorer extracts both sides)
    return (S.extract_answer(a) or a) if "<answer>" in a else a


def vilasr_rl(row, ctx):
    """ViLaSR-RL-40k (rl/vilasr_rl_data.jsonl): question, answer, image_path (a list; maze and vqa use the first),
    data_type, question_type (multiple choice / numerical / regression / free-form), options ("A. ..."), grid_size."""
    q, answer, paths = text(row, "question"), vilasr_answer(text(row, "answer")), path_list(row, "image_path")
    kind = row.get("data_type")
    need(kind in ("maze", "vqa", "video", "spatial_r1"), "data_type", f"{kind!r}: not maze, vqa, video, spatial_r1")
    qt = row.get("question_type")
    need(isinstance(qt, str) and qt.lower() in VILASR_TYPES, "question_type",  # lower-cased, as its TYPE_TEMPLATE key
         f"{qt!r} is none of {list(VILASR_TYPES)}")
    rec, opts = dict(question=q, answer=answer, type=VILASR_TYPES[qt.lower()]), row.get("options")
    if rec["type"] == "multiple_choice":  # their prompt: the options one per line, lettered ("A. chair")
        need(isinstance(opts, list) and all(isinstance(o, str) for o in opts), "options", "a multiple-choice row needs"
             " a list of options")
        opts = [o.strip() if OPTION.fullmatch(o) else f"{chr(65 + i)}. {o.strip()}" for i, o in enumerate(opts)]
        rec = typed(q + "\n" + "\n".join(opts), answer)  # split_options reads them back, letters off
        need(rec["type"] == "multiple_choice", "answer", f"{answer!r} is no letter of the options {opts}")
    elif rec["type"] == "mra":
        need(S.to_number(answer) is not None, "answer", f"{answer!r} is not a number ({qt})")
    paths = paths[:1] if kind in ("maze", "vqa") else paths  # their loader reads only the first of these
    return dict(id=str(row.get("id") or f"vilasr-{ctx['key']}"),
                image=one_or_list([ctx["image"](p, "image_path") for p in paths]),
                **rec, data_type=kind, question_type=qt, grid_size=row.get("grid_size"))


def vlm_r3_rl(row, ctx):
    """VLM-R3's RL list (data.zip): image_path (a string), question, answer (alternatives joined by /), source (MMK12:
    math; any other source is scored against each /-alternative, as their acc_verifier does)."""
    paths, q, answer = path_list(row, "image_path"), text(row, "question"), text(row, "answer")
    need(len(paths) == 1, "image_path", f"{len(paths)} paths; VLM-R3's rows have one")
    # MMK12's math_reward reads one answer (a / may be a fraction); the others' verifiers split on /
    alts = [a.strip() for a in answer.split("/") if a.strip()] if row.get("source") != "MMK12" else [answer]
    rec = typed(q, alts[0]) if len(alts) == 1 else dict(question=q, answer=alts, type="text")  # text: any one counts
    return dict(id=f"vlm_r3-{ctx['key']}", image=ctx["image"](paths[0], "image_path"), **rec,
                source=row.get("source"))


def textvqa(row, ctx):
    """TextVQA: lmms-lab/textvqa's parquet (image {bytes, path}) or the official JSON ({"data": [...]}, the image
    train_images/<image_id>.jpg beside it or in train_val_images.zip); answers: the ten human answers."""
    q, qid = text(row, "question"), row.get("question_id")
    need(isinstance(qid, int) and not isinstance(qid, bool), "question_id", "must be an integer")  # int32 / int
    answers = row.get("answers")
    need(isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers), "answers",
         "no answers (TextVQA's test split has none)")
    # the parquet's {bytes, path}, else the official layout's file (train_val_images.zip unzips to train_images/)
    img = row.get("image") or (f"train_images/{row['image_id']}.jpg" if isinstance(row.get("image_id"), str) else None)
    need(img, "image", "no image bytes and no image_id")
    # all ten answers, repeats kept: the VQA score counts the matches (min(1, matches / 3))
    return dict(id=f"textvqa-{qid}", image=ctx["image"](img, "image"), question=q, answer=answers, type="vqa",
                question_id=qid, image_id=row.get("image_id"))


# VLM-R3's crop request, {"bbox_2d": [x1, y1, x2, y2]}, sometimes inside a ```json fence; spaces allowed anywhere,
# the list's text captured whole (json.loads below reads it: a malformed number is that row's error, not a non-match)
CROP = re.compile(r'(?:```(?:json)?\s*)?\{\s*"bbox_2d"\s*:\s*\[([^\]]*)\]\s*\}(?:\s*```)?')


def vlir_crops(texts):
    """VLM-R3's segments -> [(text before its crop request, [x1, y1, x2, y2])] for all but the last, which answers."""
    crops = []
    for i, t in enumerate(texts[:-1]):
        m = list(CROP.finditer(t))  # the segment's last request is its crop
        need(m, f"response_list[{i}]", 'no crop request {"bbox_2d": [x1, y1, x2, y2]}')
        try:
            box = [float(v) for v in json.loads("[" + m[-1].group(1) + "]")]
        except (ValueError, TypeError):
            box = []
        need(len(box) == 4 and all(map(math.isfinite, box)), f"response_list[{i}]",
             f"the crop box must be 4 numbers, got [{m[-1].group(1)}]")
        crops.append((t[:m[-1].start()], box))  # the text before it; the request becomes our call
    need(S.extract_answer(texts[-1]), f"response_list[{len(texts) - 1}]", "the last segment has no <answer>")
    return crops


def vlir_lookagain(texts, crops, size, view_max_pixels, frame):
    """VLM-R3's segments as lookagain turns: each box (in VLM-R3's view of the image, `frame` = its min and max pixels)
    becomes a zoom_in in our view (view_max_pixels), each segment's text a closed <think>."""
    import dialects  # (dialects, tools import torch: only this rendering needs them)
    import tools as T
    W, H = size
    rh, rw = T.smart_resize(H, W, min_pixels=frame[0], max_pixels=frame[1])  # VLM-R3's view: its boxes' frame
    vh, vw = T.smart_resize(H, W, max_pixels=view_max_pixels)  # ours: what the SFT run shows

    def think(s):  # VLM-R3's one <think> spans all the segments; ours closes in each turn
        return "<think>" + s.replace("<think>", "").replace("</think>", "").strip() + "</think>"

    turns = []
    for before, (x1, y1, x2, y2) in crops:
        # VLM-R3's frame -> original pixels (x W/rw) -> our view (x vw/W): the original's size cancels out
        x1, x2 = (min(max(round(v * vw / rw), 0), vw) for v in (x1, x2))  # whole pixels, inside the view
        y1, y2 = (min(max(round(v * vh / rh), 0), vh) for v in (y1, y2))
        x1, y1 = min(x1, vw - 1), min(y1, vh - 1)  # a start on the far edge moves in: a pixel stays inside
        box = [x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)]  # a box thinner than a view pixel keeps 1 px
        turns.append(think(before) + dialects.render_call("zoom_in", {"image_index": 0, "bbox_2d": box}))
    last = texts[-1]
    # the last segment: its reasoning, then its answer alone (vlir_crops checked it has one: an <answer>, else a
    # \boxed{}, where the reasoning stops)
    at = next((i for i in (last.rfind("<answer>"), last.rfind("\\boxed{")) if i >= 0), len(last))
    return turns + [think(last[:at]) + f"<answer>{S.extract_answer(last)}</answer>"]


def vlm_r3_sft(row, ctx):
    """VLM-R3's SFT list (VLIR, dataset.zip): image_path, question, response_list (segments, each but the last ending
    in a bare {"bbox_2d": [...]} crop request in VLM-R3's view of the image), img_crop_list (unused: replay crops)."""
    paths, q, texts = path_list(row, "image_path"), text(row, "question"), row.get("response_list")
    need(len(paths) == 1, "image_path", f"{len(paths)} paths; VLM-R3's rows have one")
    need(isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts), "response_list",
         "must be a non-empty list of strings")
    crops, args = vlir_crops(texts), ctx["args"]
    gold = row.get("answer") or row.get("solution")  # VLIR may carry its ground truth ...
    gold = (S.extract_answer(gold) or gold) if isinstance(gold, str) else S.extract_answer(texts[-1])  # ... or not
    rec = dict(id=str(row.get("id") or f"vlm_r3-{ctx['key']}"), image=ctx["image"](paths[0], "image_path"),
               question=q, answer=gold, type="text")
    frame = (args.frame_min_pixels, args.frame_max_pixels)  # their sft_7b.sh: 3136..1605632 px, unless given
    if args.dialect == "lookagain":  # the budget kept is the view the boxes were rewritten in: sft.py checks it
        turns = vlir_lookagain(texts, crops, ctx["size"](rec["image"]), args.view_max_pixels, frame)
        return dict(rec, turns=turns, view_max_pixels=args.view_max_pixels)
    # native: sft.py replays the segments in dialect vlm_r3, its view at the budget the boxes were written in
    return dict(rec, dialect="vlm_r3", turns=texts, view_max_pixels=frame[1], view_min_pixels=frame[0])


VILASR_SCAFFOLD = [  # what ViLaSR's prompt adds around a question (eval/infer.py, dataset_multimodal.py)
    r"The index of the given image is \d+(?: \(width: \d+, height: \d+\))?\.\n?",
    r"These are frames from a video, numbered .*?Answer the quesntion with appropriate tools:\n",  # (sic)
    r"\nAnswer with the option's letter from the given choices directly\.",
    r"\nPlease answer the question using a single word or phrase \(e\.g\., 42 or 3\.14\)\."]


def vilasr_sft(row, ctx):
    """ViLaSR's cold-start and reflective sets (LLaMA-Factory sharegpt JSON): conversations [{role, content}] (system,
    then user / assistant turns; observations are user turns with the drawn image), images (every <image>, in order)."""
    conv, paths = row.get("conversations"), row.get("images")
    need(isinstance(conv, list) and conv and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 for m in conv), "conversations", "must be a list of {role, content}")
    system = conv[0]["content"] if conv[0].get("role") == "system" else ""  # optional, first (LLaMA-Factory)
    turns = conv[1:] if system else conv
    roles = [m.get("role") for m in turns]
    need(len(roles) >= 2 and roles == ["user", "assistant"] * (len(roles) // 2), "conversations",  # LLaMA-Factory
         "roles must alternate user, assistant, ending with assistant")
    need(isinstance(paths, list) and all(isinstance(p, str) and p for p in paths), "images", "must be a list of paths")
    first, said = turns[0]["content"], [m["content"] for m in turns[1::2]]
    n_q = first.count("<image>")  # the question's images; later ones are drawn (the replay draws them again)
    n_all = n_q + sum(m["content"].count("<image>") for m in turns[2::2])  # each <image> takes the next path
    need(n_q and n_all == len(paths), "images", f"{n_all} <image> placeholders ({n_q} in the question) for "
         f"{len(paths)} images")
    for i, t in enumerate(said[:-1]):  # every turn but the last draws (gcot.py's format)
        need("```json" in t, f"conversations[{2 * i + 1 + bool(system)}]", "an assistant turn before the last makes "
             "no Object Mapper / Path Tracer call (```json block)")
    answer = S.extract_answer(said[-1])
    need(answer, f"conversations[{len(conv) - 1}]", "the last assistant turn has no <answer>...</answer>")
    m = re.search(r"### Question:\n(.*?)\n\nBegin your reasoning", first, re.S)  # infer.py's question template
    q = strip_placeholders(m.group(1) if m else first)[0]
    for pattern in VILASR_SCAFFOLD:
        q = re.sub(pattern, "", q, flags=re.S)
    # the size its prompt states for image 1 (its system prompt's {width}, {height}): the frame of its coordinates
    frame = re.search(r"bottom-right corner is \((\d+), (\d+)\)", system) or re.search(
        r"\(width: (\d+), height: (\d+)\)", first)
    need(q.strip(), "conversations", "no question in the first user turn")
    return dict(id=str(row.get("id") or f"vilasr-{ctx['key']}"),
                image=one_or_list([ctx["image"](p, "images") for p in paths[:n_q]]), **typed(q.strip(), answer),
                dialect="vilasr", turns=said,
                view_max_pixels=ctx["args"].frame_max_pixels,  # the budget its images were shown at
                frame=[int(frame.group(1)), int(frame.group(2))] if frame else None, subset=ctx["stem"])


# FORMAT -> read: its reader; files: the data files it takes from a folder or archive ({split}: --split); columns: what
# it reads of a parquet; hub: what it downloads (None: not on the hub); frame: the pixel budget its transcripts'
# coordinates are in (SFT); pass_rate: --pass-rate-key's default; keeps: what a record keeps, for --help
FORMATS = {
    # the 32B rate by default: the card gives it for every row, the 7B's for half of them
    "virl39k": dict(read=virl39k, files=("*.parquet",), hub=("*.parquet", "*.zip"), pass_rate="pass_rate_32b",
                    columns=("qid", "question", "answer", "image", "category", "source", "PassRate_32BTrained",
                             "PassRate_7BBase"),
                    keeps="answer: the \\boxed{} content; options parsed when the letter picks one; qid, category, "
                          "source, pass_rate_32b, pass_rate_7b (-1: null)"),
    "deepeyes": dict(read=deepeyes, files=("*.parquet",), hub=("*.parquet",),
                     columns=("prompt", "images", "reward_model", "extra_info", "data_source", "env_name", "ability"),
                     keeps="answer: reward_model.ground_truth; question: extra_info.question; data_source (the scorer),"
                           " env_name (tools on/off), ability, index"),
    "vilasr_rl": dict(read=vilasr_rl, files=("vilasr_rl_data.json*",), hub=("rl*.zip",),
                      keeps="options (letters dropped), numerical / regression as mra, data_type, question_type, "
                            "grid_size; maze / vqa keep their first image, video / spatial_r1 all"),
    "vilasr_sft": dict(read=vilasr_sft, files=("cold_start/*.json", "reflective_rejection_sampling/*.json"),
                       hub=("cold_start*.zip", "reflective_rejection_sampling*.zip"), frame=1003520,  # 1280 x 28 x 28
                       keeps="dialect vilasr: its assistant turns as written (1-based Object Mapper / Path Tracer "
                             "JSON); the question images; options; frame (the stated W, H); subset (the file)"),
    "vlm_r3_sft": dict(read=vlm_r3_sft, files=("*.json", "*.jsonl"), hub=None, frame=1605632,  # 2048 x 28 x 28
                       keeps="dialect vlm_r3: response_list as written, view_max_pixels (its boxes' frame); or "
                             "--dialect lookagain: zoom_in calls in --view-max-pixels"),
    "vlm_r3_rl": dict(read=vlm_r3_rl, files=("*.json", "*.jsonl"), hub=None,
                      keeps="answer: its /-alternatives (MMK12: one, math); source"),
    "textvqa": dict(read=textvqa, files=("{split}-*.parquet", "*_{split}.json"), hub=("data/{split}-*.parquet",),
                    columns=("question", "question_id", "image_id", "answers", "image"),
                    keeps="answer: the ten human answers (type vqa); question_id, image_id"),
}

# -----------------------------------------------------------------------------
# 4. the run: rows -> records, images written once, filters, everything put in place at the end


def convert(args, stage):
    """Read every row of INPUT... as FORMAT; write stage/data.jsonl, stage/images/ (images not already in --out) and
    stage/skipped.tsv. -> (counts, skipped: [(field, message)]). A bad row: SystemExit naming it (or --skip-bad)."""
    spec, skipped, counts = FORMATS[args.format], [], Counter(rows=0, written=0, new=0, reused=0)

    def skip(reason, msg):
        if not args.skip_bad:
            raise SystemExit(msg)
        skipped.append((reason, msg))

    patterns = [p.format(split=args.split) for p in spec["files"]]
    hub = [p.format(split=args.split) for p in spec["hub"]] if spec["hub"] else None
    files, members = open_inputs(args.inputs, patterns, hub, skip)
    if not files:
        raise SystemExit(f"{args.format}: no data file ({', '.join(patterns)}) in {' '.join(args.inputs)}")
    extra = [os.path.abspath(d) for d in args.images or []]  # --images: folders searched after the data's own
    stored = {}  # image name -> its size, for this run

    def locate(path, f, field):
        """A row's image path -> its src: from the data file's folder up to its INPUT, then the path without its
        leading folders, then in --images; never outside them (a '..' is refused)."""
        parts = [p for p in re.split(r"[\\/]", path) if p not in ("", ".")]  # either separator, as zip_members
        need(parts and ".." not in parts, field, f"image path {path!r} leaves the dataset's folder")
        folders, d = [], os.path.dirname(f["path"])  # the data file's folder, then each parent up to its INPUT
        while True:
            folders.append(d)
            if d == f["root"] or os.path.dirname(d) == d:
                break
            d = os.path.dirname(d)
        for k in range(len(parts)):  # the whole path, then less of its head: a path written from another root
            for d in folders + extra:
                full = os.path.join(d, *parts[k:])
                if full in members:  # an archive's member, as if unzipped where the archive lies
                    return members[full]
                if os.path.isfile(full):
                    return full
        raise ValueError(field, f"image {path} not found (in {f['label']}'s folder and above, archives and --images)")

    def store(raw, field):
        """Image bytes -> images/<hash>.<ext>, written (to the stage) only if --out has no such file yet."""
        need(len(raw) <= MAX_IMAGE_BYTES, field, f"image of {len(raw)} bytes, over {MAX_IMAGE_BYTES}")
        try:
            im = Image.open(io.BytesIO(raw))  # reads the header only: size and format
            size, ext = im.size, EXT.get(im.format, (im.format or "img").lower())
        except Exception as e:  # PIL raises many kinds on bytes that are no image
            raise ValueError(field, f"cannot read image ({type(e).__name__}: {str(e)[:200]})") from None
        # named by content (96 bits): an image shared by rows, files or runs is one file, and a rerun writes none
        name = f"{hashlib.blake2b(raw, digest_size=12).hexdigest()}.{ext}"
        if name not in stored:
            if os.path.exists(os.path.join(args.out, "images", name)):  # these bytes, checked by an earlier run
                counts["reused"] += 1
            else:
                try:
                    D.open_image(im, draft=True)  # decodes whole: truncated, corrupt, over the size limits
                except ValueError as e:
                    raise ValueError(field, str(e)) from None
                with open(os.path.join(stage, "images", name), "wb") as fh:
                    fh.write(raw)
                counts["new"] += 1
            stored[name] = size
        return f"images/{name}"

    def image(value, field, f):
        if isinstance(value, dict) and value.get("bytes") is not None:  # a parquet {bytes, path} struct
            return store(value["bytes"], field)
        path = value.get("path") if isinstance(value, dict) else value
        need(isinstance(path, str) and path.strip(), field, "no image bytes and no path")
        src = locate(path, f, field)
        if not isinstance(src, str):
            # the size the archive states, checked before anything is unpacked (a zip bomb unpacks to much more)
            need(src[1].file_size <= MAX_IMAGE_BYTES, field, f"{path}: {src[1].file_size} bytes unpacked, too many")
        try:
            with open_src(src) as fh:
                raw = fh.read(MAX_IMAGE_BYTES + 1)  # one byte over is enough for store() to refuse it
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(field, f"cannot read {path} ({type(e).__name__}: {e})") from None
        return store(raw, field)

    out = open(os.path.join(stage, "data.jsonl"), "w")
    for f in files:
        if args.limit is not None and counts["written"] >= args.limit:
            break
        # lines: where --skip-bad collects bad JSONL lines (None: the first one raises, data.problem)
        stem, lines = os.path.splitext(os.path.basename(f["path"]))[0], [] if args.skip_bad else None
        try:
            total, rows = file_rows(f, spec.get("columns", ()), lines)
            for n, (where, row) in enumerate(tqdm(rows, total=total, desc=stem, unit=" rows", disable=None)):
                if args.limit is not None and counts["written"] >= args.limit:
                    break
                counts["rows"] += 1
                # what a reader may use: store an image, the size of one stored, names for ids a row lacks
                ctx = dict(image=lambda v, field: image(v, field, f), size=lambda rel: stored[os.path.basename(rel)],
                           stem=stem, n=n, key=f"{stem}-{n}", args=args)
                try:
                    need(isinstance(row, dict), "row", "must be an object")
                    rec = spec["read"](row, ctx)
                    D.validate(rec, where)  # the record as grpo.py / eval.py / sft.py will read it
                except ValueError as e:  # need()'s (field, message), or validate's "where: message"
                    field, msg = e.args if len(e.args) == 2 else ("record", str(e).removeprefix(f"{where}: "))
                    skip(re.split(r"[\[.]", field)[0], f"{where}: '{field}': {msg}")  # counted by the top field
                    continue
                why = left_out(rec, args)  # after validation: a bad row is reported even where a filter drops it
                if why:
                    counts[why] += 1
                    continue
                out.write(json.dumps(rec) + "\n")
                counts["written"] += 1
        except (ValueError, OSError, pa.ArrowException, zipfile.BadZipFile) as e:  # the file itself
            skip("file", str(e) if str(e).startswith(f["label"]) else f"{f['label']}: {e}")
        for msg in lines or []:
            skip("row", msg)
    out.close()
    if skipped:
        with open(os.path.join(stage, "skipped.tsv"), "w") as fh:
            fh.writelines(f"{r}\t{m}\n" for r, m in skipped)
    return counts, skipped


def left_out(rec, args):
    """Why the filters leave a record out ("left out: ..."), or None."""
    if args.max_pass_rate is not None or args.min_pass_rate is not None:
        key = args.pass_rate_key or FORMATS[args.format]["pass_rate"]
        lo = -math.inf if args.min_pass_rate is None else args.min_pass_rate
        hi = math.inf if args.max_pass_rate is None else args.max_pass_rate
        if not isinstance(rec.get(key), (int, float)) or not lo <= rec[key] <= hi:  # unmeasured (None): left out too
            return f"left out: {key} unknown or outside [{lo}, {hi}]"
    for o in args.only or []:
        k, _, vals = o.partition("=")
        if str(rec.get(k)) not in vals.split(","):  # compared as text: --only index=3 matches the number 3
            return f"left out: {k} not in {vals}"
    return None


def publish(stage, out):
    """The stage's images into out/images (each a rename), then data.jsonl and skipped.tsv over the old ones."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    for name in sorted(os.listdir(os.path.join(stage, "images"))):
        os.replace(os.path.join(stage, "images", name), os.path.join(out, "images", name))  # the stage is in out
    if os.path.exists(os.path.join(stage, "skipped.tsv")):
        os.replace(os.path.join(stage, "skipped.tsv"), os.path.join(out, "skipped.tsv"))
    elif os.path.exists(os.path.join(out, "skipped.tsv")):
        os.remove(os.path.join(out, "skipped.tsv"))  # an older run's list would mislead
    os.replace(os.path.join(stage, "data.jsonl"), os.path.join(out, "data.jsonl"))  # last: it names images in place


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="formats:\n" + "\n".join(f"  {k}: {v['keeps']}" for k, v in FORMATS.items()))
    # what to convert
    p.add_argument("format", choices=list(FORMATS), metavar="FORMAT", help=", ".join(FORMATS))
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, archives, folders, or the hub id")
    p.add_argument("--out", required=True, help="the folder: data.jsonl, images/, skipped.tsv")
    p.add_argument("--split", default="train", help="textvqa: which split's files a folder or hub id gives")
    p.add_argument("--images", action="append", help="another folder to look for images in (repeatable)")
    # what to keep
    p.add_argument("--max-pass-rate", type=float, default=None, help="keep records whose pass rate is at most this")
    p.add_argument("--min-pass-rate", type=float, default=None, help="... and at least this")
    p.add_argument("--pass-rate-key", default=None, help="the record field the pass-rate filters read "
                   "(virl39k: pass_rate_32b, or pass_rate_7b); a record without one is dropped")
    p.add_argument("--only", action="append", metavar="FIELD=V1,V2", help="keep records whose FIELD is one of these "
                   "(repeatable), e.g. data_source=vstar, category=Spatial Reasoning")
    p.add_argument("--limit", type=int, default=None, help="stop after writing N records")
    # SFT transcripts
    p.add_argument("--dialect", default="native", choices=["native", "lookagain"], help="native: the turns as the "
                   "method wrote them, replayed by its dialect; lookagain (vlm_r3_sft): rewritten as zoom_in calls")
    p.add_argument("--view-max-pixels", type=int, default=None, help="--dialect lookagain: the SFT run's view budget")
    p.add_argument("--frame-max-pixels", type=int, default=None, help="the budget the transcripts' coordinates are in "
                   "(default vlm_r3_sft 1605632, their sft_7b.sh; vilasr_sft 1003520, their cold-start config)")
    p.add_argument("--frame-min-pixels", type=int, default=3136)
    # bad input
    p.add_argument("--skip-bad", action="store_true", help="count, name (skipped.tsv) and skip bad rows and files")
    args = p.parse_args(argv)
    args.frame_max_pixels = args.frame_max_pixels or FORMATS[args.format].get("frame")  # the format's own budget
    if (args.max_pass_rate is not None or args.min_pass_rate is not None) and not (
            args.pass_rate_key or FORMATS[args.format].get("pass_rate")):
        p.error(f"{args.format} has no pass rate of its own: name the field with --pass-rate-key")
    if any("=" not in o for o in args.only or []):
        p.error("--only takes FIELD=V1,V2")
    if args.dialect == "lookagain" and (args.format != "vlm_r3_sft" or not args.view_max_pixels):
        p.error("--dialect lookagain is for vlm_r3_sft, with --view-max-pixels (the SFT run's view budget)")
    for k in ("limit", "view_max_pixels", "frame_max_pixels", "frame_min_pixels"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    return args


def main(argv=None):
    args = get_args(argv)
    # the stage inside --out: publish() moves files by rename, which needs the same filesystem
    created, stage = not os.path.isdir(args.out), os.path.join(args.out, ".partial")
    shutil.rmtree(stage, ignore_errors=True)  # what a killed run left behind
    os.makedirs(os.path.join(stage, "images"))
    done = False
    try:
        counts, skipped = convert(args, stage)
        publish(stage, args.out)
        done = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not done:
            shutil.rmtree(args.out, ignore_errors=True)  # a failed run leaves no trace
    print(f"{args.format}: {counts['rows']} rows read, {counts['written']} records -> "
          f"{os.path.join(args.out, 'data.jsonl')}; images: {counts['new']} written, {counts['reused']} already there")
    for why, n in counts.items():
        if why.startswith("left out"):
            print(f"  {why}: {n}")
    if skipped:
        by = Counter(field for field, _ in skipped)
        print(f"  skipped {len(skipped)} bad ({', '.join(f'{k} {v}' for k, v in sorted(by.items()))}), all in "
              f"{os.path.join(args.out, 'skipped.tsv')}:")
        print("\n".join("    " + m for _, m in skipped[:10]))
    return counts, skipped


if __name__ == "__main__":
    main()
