"""
benchmarks.py: every benchmark eval.py runs, in one table (BENCHMARKS: name -> its loader, the record type whose scorer
in scorers.SCORERS scores it, the aggregation it reports, its default split), the loaders (a benchmark as published ->
lookagain records, plus `category` and `source`: file and row) and the aggregation rules. Read top to bottom:
  1. loaders of the first six  V*, HR-Bench, TextVQA, DocVQA, MathVista, ScienceQA-IMG (local files, nothing downloaded)
  2. aggregation               micro, HR-Bench's rotations
  3. the table                 BENCHMARKS; load(bench, path, ...) and aggregate(items, bench, value)
"""
import base64
import csv
import hashlib
import os
import random
import re
from collections import defaultdict
from functools import partial

import data as D

# -----------------------------------------------------------------------------
# 1. loaders of the first six

def _vstar_record(key, img, question, options, correct, shuffle_seed, category, where, ann):
    """One V* record: options shuffled by (shuffle_seed, key) (V* puts the answer first); bbox around all targets."""
    order = list(range(len(options)))
    random.Random(f"{shuffle_seed}:{key}").shuffle(order)  # str seeds hash with sha512: stable across runs
    r = dict(id=f"vstar-{key.replace('/', '-')}", image=img, question=question, answer=chr(65 + order.index(correct)),
             type="multiple_choice", options=[options[k] for k in order], category=category, source=where)
    boxes = ann.get("bbox") if isinstance(ann, dict) else None
    boxes = [b for b in (boxes if isinstance(boxes, list) else []) if D.is_box(b) and b[2] > 0 and b[3] > 0]
    if boxes:
        r["bbox"] = [min(b[0] for b in boxes), min(b[1] for b in boxes),
                     max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)]
    return r


VSTAR_CATEGORIES = ("direct_attributes", "relative_position")


def load_vstar(path, o, bad=None):
    """V*: its folder (direct_attributes/, relative_position/: <name>.jpg, <name>.json {"question", "options" (correct
    first), "bbox": [[x, y, w, h]]}) or test_questions.jsonl ({"image", "category", "label", "text" with "(A) ..."})."""
    shuffle_seed = o["shuffle_seed"]
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
                ann = D.read_json(where)
            except ValueError as e:
                D.problem(bad, str(e))
                continue
            imgs = [f for f in files if os.path.splitext(f)[0] == stem and not f.endswith(".json")]
            ann = ann if isinstance(ann, dict) else {}
            opts = ann.get("options")
            if not imgs:
                D.problem(bad, f"{where}: no image {stem}.* next to it", FileNotFoundError)
            elif not isinstance(ann.get("question"), str) or not (isinstance(opts, list) and len(opts) >= 2):
                D.problem(bad, f"{where}: needs an object with a 'question' and at least two 'options'")
            elif D.checked_image(os.path.join(folder, imgs[0]), where, bad):
                out.append(_vstar_record(f"{cat}/{stem}", os.path.join(folder, imgs[0]), ann["question"],
                                         [str(x) for x in opts], 0, shuffle_seed, cat, where, ann))
    return out


def _load_vstar_jsonl(path, shuffle_seed, bad):
    folder, out = os.path.dirname(os.path.abspath(path)), []
    for where, q in D.jsonl_rows(path, bad):
        if not isinstance(q, dict) or not all(isinstance(q.get(k), str) for k in ("image", "text", "label")):
            D.problem(bad, f"{where}: needs 'image', 'text' and 'label' strings")
            continue
        label, rel, options, question = q["label"].strip().upper(), q["image"], [], []
        for s in q["text"].split("\n"):
            m = re.match(r"\s*\(([A-Z])\)\s*(.*)", s)
            if m:
                options.append(m.group(2).strip())
            elif not options and s.strip() and not s.lower().startswith("answer with"):
                question.append(s.strip())
        if len(options) < 2 or len(label) != 1 or not "A" <= label <= chr(64 + len(options)):
            D.problem(bad, f"{where}: label {label!r} is not one of the {len(options)} '(A) ...' options in 'text'")
            continue
        img = D.checked_image(os.path.join(folder, rel), where, bad)
        if img is None:
            continue
        side = os.path.splitext(img)[0] + ".json"  # the per-image JSON, when present, has the target boxes
        try:
            ann = D.read_json(side) if os.path.isfile(side) else None
        except ValueError as e:
            D.problem(bad, str(e))
            continue
        stem = os.path.splitext(rel)[0]
        out.append(_vstar_record(stem, img, " ".join(question), options, ord(label) - 65, shuffle_seed,
                                 q.get("category") or os.path.dirname(stem), where, ann))
    return out


HRBENCH_COLUMNS = ("index", "question", "A", "B", "answer", "category", "cycle_category", "image")


def load_hrbench(path, o, bad=None):
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
                            opened[key] = partial(D.open_bytes, base64.b64decode(s, validate=True))
                            D.open_image(opened[key], draft=True)
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
            D.problem(bad, f"{where}: {img}")
        elif not row["question"] or len(options) < 2 or len(answer) != 1 or not "A" <= answer <= chr(64 + len(options)):
            D.problem(bad, f"{where}: needs a question, options A-D and an answer letter (got {answer!r})")
        else:
            out.append(dict(id=f"{stem}-{row['index']}", image=img, question=row["question"], answer=answer,
                            type="multiple_choice", options=options, category=row["category"],
                            cycle_category=row["cycle_category"], source=where))
    return out


def _load_answer_list(path, bad, name, kind, image_of, id_key):
    """TextVQA and DocVQA share a layout: {"data": [{"question", <image>, "answers": [...], <id>}]}."""
    js = D.read_json(path)
    if not isinstance(js, dict) or not isinstance(js.get("data"), list):
        raise ValueError(f"{path}: expected an object with a 'data' list (the official {name} layout)")
    out = []
    for n, q in enumerate(js["data"]):
        where = f"{path}: data[{n}]"
        img = image_of(q) if isinstance(q, dict) else None
        if img is None or not isinstance(q.get("question"), str):
            D.problem(bad, f"{where}: needs a 'question' and its image")
        elif not (isinstance(q.get("answers"), list) and q["answers"]
                  and all(isinstance(a, str) for a in q["answers"])):
            D.problem(bad, f"{where}: no 'answers' ({name}'s test split has none: evaluate on val)")
        elif D.checked_image(img, where, bad):
            out.append(dict(id=f"{name.lower()}-{q.get(id_key, n)}", image=img, question=q["question"],
                            answer=q["answers"], type=kind, source=where))
    return out


def load_textvqa(path, o, bad=None):
    """TextVQA (VQA accuracy): <image_id>.jpg in --images, else in train_images/ next to the JSON, else its folder."""
    root = os.path.join(os.path.dirname(os.path.abspath(path)), "train_images")
    root = o["images"] or (root if os.path.isdir(root) else os.path.dirname(root))
    return _load_answer_list(path, bad, "TextVQA", "vqa", lambda q: os.path.join(root, f"{q['image_id']}.jpg")
                             if "image_id" in q else None, "question_id")


def load_docvqa(path, o, bad=None):
    """DocVQA (ANLS): "image": "documents/x.png", relative to --images, else to the JSON's folder."""
    root = o["images"] or os.path.dirname(os.path.abspath(path))
    return _load_answer_list(path, bad, "DocVQA", "anls", lambda q: os.path.join(root, q["image"])
                             if isinstance(q.get("image"), str) else None, "questionId")


def load_mathvista(path, o, bad=None):
    """MathVista testmini: {pid: {"question", "image", "choices", "unit", "precision", "answer", ...}} or a list."""
    js = D.read_json(path)
    problems = list(js.items()) if isinstance(js, dict) else list(enumerate(js)) if isinstance(js, list) else None
    if problems is None:
        raise ValueError(f"{path}: expected MathVista's {{pid: problem}} object or a list of problems")
    root = o["images"] or os.path.dirname(os.path.abspath(path))
    out = []
    for key, p in problems:
        pid = str(p.get("pid", key)) if isinstance(p, dict) else str(key)
        where = f"{path}: pid {pid}"
        if not isinstance(p, dict) or not isinstance(p.get("question"), str) or not isinstance(p.get("image"), str):
            D.problem(bad, f"{where}: needs 'question' and 'image'")
        elif p.get("answer") in (None, ""):
            D.problem(bad, f"{where}: no 'answer' (MathVista's test split has none: evaluate on testmini)")
        elif p.get("choices") and not isinstance(p["choices"], list):  # a string would become one option a letter
            D.problem(bad, f"{where}: 'choices' must be a list, got {str(p['choices'])[:40]!r}")
        elif not isinstance(p.get("metadata") or {}, dict):
            D.problem(bad, f"{where}: 'metadata' must be an object, got {str(p['metadata'])[:40]!r}")
        elif D.checked_image(os.path.join(root, p["image"]), where, bad):
            q = p["question"] + (f" (Unit: {p['unit']})" if p.get("unit") else "")
            r = dict(id=f"mathvista-{pid}", image=os.path.join(root, p["image"]), question=q, answer=str(p["answer"]),
                     type="mathvista", answer_type=p.get("answer_type"), precision=p.get("precision"),
                     question_type=p.get("question_type"), category=(p.get("metadata") or {}).get("category"),
                     source=where)
            if p.get("choices"):
                r["options"] = [str(c) for c in p["choices"]]
            out.append(r)
    return out


def load_scienceqa(path, o, bad=None):
    """ScienceQA-IMG: problems.json {pid: {"question", "choices", "answer": index, "hint", "image", "subject", "split"}}
    and images/<split>/<pid>/ next to it (or --images); only `split`'s with an image; category: subject (paper's)."""
    js = D.read_json(path)
    if not isinstance(js, dict):
        raise ValueError(f"{path}: expected ScienceQA's {{pid: problem}} object")
    root, split = o["images"] or os.path.join(os.path.dirname(os.path.abspath(path)), "images"), o["split"]
    out = []
    for pid, p in js.items():
        if not isinstance(p, dict) or p.get("split") != split or not p.get("image"):
            continue
        where = f"{path}: pid {pid}"
        choices, ans = p.get("choices"), p.get("answer")
        if not isinstance(p.get("question"), str) or not isinstance(choices, list) or len(choices) < 2:
            D.problem(bad, f"{where}: needs 'question' and at least two 'choices'")
        elif isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(choices):
            D.problem(bad, f"{where}: 'answer' must be the index of a choice, got {ans!r}")
        elif not isinstance(p["image"], str):
            D.problem(bad, f"{where}: 'image' must be a file name, got {str(p['image'])[:40]!r}")
        else:
            img = D.checked_image(os.path.join(root, split, str(pid), p["image"]), where, bad)
            if img:
                q = (f"Context: {p['hint']}\n" if p.get("hint") else "") + p["question"]
                out.append(dict(id=f"scienceqa-{pid}", image=img, question=q, answer=chr(65 + ans),
                                type="multiple_choice", options=[str(c) for c in choices],
                                category=p.get("subject"), source=where))
    return out


# -----------------------------------------------------------------------------
# 2. aggregation: (items, value) -> (overall, {category: score}); value(item) is the per-item score (pass rate, pass@k)


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _categories(items):
    return sorted({it["category"] for it in items if it.get("category") is not None})


def micro(items, value):
    """The mean over items (V*'s overall, and most benchmarks'), and per category."""
    return _mean(value(it) for it in items), {c: _mean(value(it) for it in items if it.get("category") == c)
                                              for c in _categories(items)}


def rotations(items, value):
    """HR-Bench (its official evaluate()): the mean per rotation (cycle_category), then over rotations; per category
    the same within the category."""
    cycles = defaultdict(list)
    for it in items:
        cycles[it.get("cycle_category")].append(it)
    per = {c: _mean(v for v in (_mean(value(it) for it in g if it.get("category") == c) for g in cycles.values())
                    if v is not None) for c in _categories(items)}
    return _mean(_mean(value(it) for it in g) for g in cycles.values()), per

# -----------------------------------------------------------------------------
# 3. the table: name -> load(path, o, bad) (o: images, split, shuffle_seed, frames), the scorer's record type (the
#    loader's records carry it), aggregate(items, value), the default split, and what the reported overall is


BENCHMARKS = {
    "vstar": dict(load=load_vstar, type="multiple_choice", aggregate=micro, overall="micro, 2 categories"),
    "hrbench": dict(load=load_hrbench, type="multiple_choice", aggregate=rotations,
                    overall="mean over the option rotations"),
    "textvqa": dict(load=load_textvqa, type="vqa", aggregate=micro, overall="micro VQA accuracy"),
    "docvqa": dict(load=load_docvqa, type="anls", aggregate=micro, overall="micro ANLS"),
    "mathvista": dict(load=load_mathvista, type="mathvista", aggregate=micro, overall="micro"),
    "scienceqa": dict(load=load_scienceqa, type="multiple_choice", aggregate=micro, split="test",
                      overall="micro, per subject"),
    "jsonl": dict(load=lambda path, o, bad: D.load_jsonl(path, bad), type=None, aggregate=micro, overall="micro"),
}


def load(bench, path, images=None, split=None, shuffle_seed=0, frames=None, bad=None):
    """--bench's records, validated as JSONL's are (a precision that is no number, a box of inf); bad: see
    data.problem(). split and frames: the benchmark's defaults (the table's) unless given."""
    if bench not in BENCHMARKS:
        raise ValueError(f"unknown --bench {bench!r}; known: {', '.join(BENCHMARKS)}")
    b = BENCHMARKS[bench]
    o = dict(images=images, split=split or b.get("split"), shuffle_seed=shuffle_seed, frames=frames or b.get("frames"))
    out = []
    for r in b["load"](path, o, bad):
        try:
            D.validate(r, r.get("source", r.get("id")))
            out.append(r)
        except ValueError as e:
            D.problem(bad, str(e))
    return out


def aggregate(items, bench=None, value=lambda it: it["pass_rate"]):
    """(overall, {category: score}) of a per-item value by the benchmark's rule (micro if it has none)."""
    if not items:
        return None, {}
    return BENCHMARKS.get(bench, BENCHMARKS["jsonl"])["aggregate"](items, value)
