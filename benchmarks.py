"""
benchmarks.py: every benchmark eval.py runs, in one table (BENCHMARKS: name -> its loader, the record type whose scorer
in scorers.SCORERS scores it, the aggregation it reports, its default split), the loaders (a benchmark as published ->
lookagain records, plus `category` and `source`: file and row) and the aggregation rules. Read top to bottom:
  1. loaders of the first six  V*, HR-Bench, TextVQA, DocVQA, MathVista, ScienceQA-IMG (local files, nothing downloaded)
  2. the seeds' benchmarks     MMMU, MMMU-Pro, MathVerse, MathVision, EMMA, VSI-Bench, SPAR-Bench, MMSI-Bench,
                               MME-RealWorld, ViLaSR's evaluation set: published parquet / JSON / frames, read as is
  3. aggregation               micro, HR-Bench's rotations, VSI's and SPAR's task means, MMMU-Pro's configs, ViLaSR's
                               files; replay_stream (MMMU's seeded random fallback, in its order)
  4. the table                 BENCHMARKS; load(bench, path, ...), rescore(items, records, bench), aggregate(...)
A record's images are placed where its question puts them: placeholders become the literal <image>, one per image, in
the order the record lists them (place_images); the benchmark's own instruction, when it has one, is kept apart in
"instruction" (a dialect's prompt may use it); options written into the question are kept in "choices" for scoring.
"""
import ast
import base64
import csv
import hashlib
import os
import random
import re
from collections import defaultdict
from functools import partial

import data as D
import scorers as S

# -----------------------------------------------------------------------------
# 1. loaders of the first six

def _vstar_record(key, img, question, options, correct, shuffle_seed, category, where, ann):
    """One V* record: options shuffled by (shuffle_seed, key) (V* puts the answer first; a negative seed keeps its
    order, as DeepEyes' published 90.1 was measured at 6c5e796); bbox around all targets."""
    order = list(range(len(options)))
    if shuffle_seed >= 0:
        # seeded per item: its order does not depend on which others are loaded; str seeds hash with sha512, so it is
        # stable across runs (hash() of a str is not)
        random.Random(f"{shuffle_seed}:{key}").shuffle(order)
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
    """HR-Bench 4K/8K TSV: index, question, A-D, answer (letter), category, cycle_category (option rotation: each
    question is there in 4 rotations, so nothing is shuffled), image (base64 JPEG, or as in VLMEvalKit the index of
    the row with it), decoded when needed: no 8K image stays decoded."""
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
# 2. loaders of the seeds' headline benchmarks: parquet (read by row group), JSON, frames folders


def _files(path, ext, split=None):
    """path itself, or a folder's files ending in ext (recursively, sorted), those whose name starts with the split
    if any does (validation-00000-of-00001.parquet)."""
    path = D.resolve_data(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    found = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(ext))
    mine = [f for f in found if split and os.path.basename(f).startswith(split)]
    if not (mine or found):
        raise FileNotFoundError(f"{path}: no *{ext} file in it")
    return mine or found


def place_images(text, images, pattern):
    """text with each placeholder (pattern: group 1 the image's number) that names an image of the item replaced by
    the literal <image>, and the images in the order the placeholders name them (repeats kept); placeholders naming
    no image stay as text (MathVision's <image2>: a part of its one picture); no placeholder: every image, in order."""
    order = []

    def sub(m):
        k = int(m.group(1))
        if images.get(k) is None:
            return m.group()
        order.append(images[k])
        return "<image>"
    text = re.sub(pattern, sub, text)
    return text, order or [im for im in images.values() if im is not None]


def _literal(v, where):
    """A Python-literal list (MMMU's options, a list gold) read with ast.literal_eval, never eval."""
    if not isinstance(v, str) or not v.strip().startswith("["):
        return v
    try:
        return [str(x) for x in ast.literal_eval(v)]
    except (ValueError, SyntaxError):
        raise ValueError(f"{where}: {v[:40]!r} is not a Python list literal") from None


def _rows(files, need, bad, make):
    """The records make(row, where, file) builds from every row of the parquet files (None: a row it counted bad)."""
    out = []
    for f in files:
        for where, row in D.parquet_rows(f, need, bad):
            try:
                r = make(row, where, f)
            except ValueError as e:
                D.problem(bad, str(e))
                continue
            if r is not None:
                out.append(dict(r, source=where))
    return out


def _letter_lines(options, fmt):
    return "".join(fmt.format(chr(65 + i), o) for i, o in enumerate(options))


MMMU_SUBJECTS = ("Accounting Agriculture Architecture_and_Engineering Art Art_Theory Basic_Medical_Science Biology "
                 "Chemistry Clinical_Medicine Computer_Science Design Diagnostics_and_Laboratory_Medicine Economics "
                 "Electronics Energy_and_Power Finance Geography History Literature Manage Marketing Materials Math "
                 "Mechanical_Engineering Music Pharmacy Physics Psychology Public_Health Sociology").split()


def _subject_order(f):  # MMMU's CAT_SHORT2LONG order: the order its evaluation consumes the random stream in
    sub = os.path.basename(os.path.dirname(f))
    return (MMMU_SUBJECTS.index(sub) if sub in MMMU_SUBJECTS else len(MMMU_SUBJECTS), f)


def load_mmmu(path, o, bad=None):
    """MMMU (validation, 900): <Subject>/validation-*.parquet, or one file; options a Python list literal, options
    appended as MMMU's prompt writes them ('(A) ...' lines), <image n> placed; subjects in MMMU's order."""
    def make(row, where, f):
        opts = _literal(row["options"], where) or []
        q = row["question"] + ("\n" + _letter_lines(opts, "({}) {}\n") if opts else "")
        q, imgs = place_images(q, {k: row.get(f"image_{k}") for k in range(1, 8)}, r"<image\s*(\d+)>")
        kind = "multiple-choice" if row["question_type"] == "multiple-choice" and opts else "open"
        return dict(id=row["id"], image=imgs, question=q, answer=_literal(row["answer"], where), type="mmmu",
                    choices=opts, question_type=kind, category="_".join(str(row["id"]).split("_")[1:-1]) or None,
                    instruction="Answer with the option's letter from the given choices directly." if kind ==
                    "multiple-choice" else "Answer the question using a single word or phrase.")
    files = sorted(_files(path, ".parquet", o["split"]), key=_subject_order)
    return _rows(files, ("id", "question", "options", "answer", "question_type", "image_1"), bad, make)


def load_mmmu_pro(path, o, bad=None):
    """MMMU-Pro (test, 1,730 per config): the config folders ('standard (10 options)', 'vision') or one file; category:
    the config (its name from the folder), options 'A. ...' lines, <image n> placed; vision: one screenshot."""
    def make(row, where, f):
        opts = _literal(row["options"], where) or []
        config = os.path.basename(os.path.dirname(f))
        if "question" in row and row.get("image_1") is not None:
            q, imgs = place_images(row["question"] + "\n" + _letter_lines(opts, "{}. {}\n").rstrip("\n"),
                                   {k: row.get(f"image_{k}") for k in range(1, 8)}, r"<image\s*(\d+)>")
        elif row.get("image") is not None:  # vision: the question and options are in the picture
            q, imgs = "Write out the multiple-choice question in the image and then solve it.", [row["image"]]
        else:
            raise ValueError(f"{where}: no image_1 (standard) or image (vision) column")
        # the id with its config: the published configs share their questions' ids (test_Art_1 in both), and
        # --replay and items.jsonl tell items apart by id
        return dict(id=f"{config}/{row['id']}", image=imgs, question=q, answer=row["answer"], type="mmmu_pro",
                    choices=opts, category=config, instruction="Answer the preceding multiple choice question. The "
                    "last line of your response should be of the following format: 'Answer: $LETTER' (without quotes) "
                    "where LETTER is one of options. Think step by step before answering.")
    files = [f for f in _files(path, ".parquet", o["split"]) if "(4 options)" not in f or "(4 options)" in path]
    # the 4-option config only when asked by name: MMMU-Pro's prompt code handles only 10 options and vision, the
    # two configs_mean averages
    return _rows(files, ("id", "options", "answer"), bad, make)


def _json_items(path):
    js = D.read_json(path)
    return list(js.values()) if isinstance(js, dict) else js if isinstance(js, list) else []


def _image_at(root, rel, where, bad):
    return D.checked_image(os.path.join(root, rel), where, bad) if isinstance(rel, str) and rel else None


def load_mathverse(path, o, bad=None):
    """MathVerse (testmini, 788 x 5 versions): testmini.parquet (images inside), or testmini.json with images/ in
    --images or next to it; category: the problem version; scored by VL-Rethinker's rule (no judge:
    docs/benchmarks.md)."""
    def make(row, where, f):
        img = row["image"] if callable(row["image"]) else _image_at(o["images"] or os.path.dirname(f), row["image"],
                                                                    where, bad)
        if img is None:
            return None
        # Vision Only has an empty question (it is in the picture): its query_wo (the official "w/o" input) then
        return dict(id=f"mathverse-{row['sample_index']}", image=[img], question=row["question"] or row["query_wo"],
                    answer=str(row["answer"]), type="rethinker", category=row["problem_version"],
                    question_type=row.get("question_type"),
                    instruction="Please reason step by step, and put your final answer within \\boxed{}.")
    need = ("sample_index", "problem_version", "question", "image", "answer", "query_wo")
    files = _files(path, ".parquet", o["split"]) if not path.endswith(".json") else [path]
    if files[0].endswith(".json"):
        out = []
        for n, row in enumerate(_json_items(files[0])):
            where = f"{files[0]}: item {n}"
            if not isinstance(row, dict) or any(k not in row for k in need):
                D.problem(bad, f"{where}: needs {', '.join(need)}")
            elif (r := make(row, where, files[0])) is not None:
                out.append(dict(r, source=where))
        return out
    return _rows(files, need, bad, make)


def load_mathvision(path, o, bad=None):
    """MathVision (test 3,040 / testmini 304): data/<split>-*.parquet; decoded_image (else the image path under
    --images or the file's folder), options '(A) ...' lines unless they are just A-E (the official prompt)."""
    def make(row, where, f):
        img = row.get("decoded_image") or _image_at(o["images"] or os.path.dirname(os.path.dirname(f)), row["image"],
                                                    where, bad)
        if img is None:
            return None
        opts = [str(x) for x in row.get("options") or []]
        # options just A-E: the choices are drawn in the picture, and the official prompt lists none
        q = row["question"] + ("\n" + _letter_lines(opts, "({}) {}\n") if opts and opts != list("ABCDE") else "")
        q, imgs = place_images(q, {1: img}, r"<image(\d+)>")
        return dict(id=f"mathvision-{row['id']}", image=imgs, question=q, answer=str(row["answer"]), type="mathvision",
                    choices=opts, category=row.get("subject"), level=row.get("level"),
                    instruction='Please solve the problem and put your answer in one "\\boxed{}". If it is a multiple '
                                'choice question, only one letter is allowed in the "\\boxed{}".')
    return _rows(_files(path, ".parquet", o["split"]), ("id", "question", "options", "image", "answer"), bad, make)


def load_emma(path, o, bad=None):
    """EMMA / EMMA-mini (2,788 / 400): <Subject>/test-*.parquet or one file; options 'A: ...' lines (EMMA's prompt),
    <image_n> placed; category: the subject."""
    def make(row, where, f):
        opts = [str(x) for x in row.get("options") or []]
        q = "\n".join(x for x in (row.get("context"), row["question"]) if x)
        q, imgs = place_images(q + ("\n" + _letter_lines(opts, "{}: {}\n").rstrip("\n") if opts else ""),
                               {k: row.get(f"image_{k}") for k in range(1, 6)}, r"<image_(\d+)>")
        if not imgs:
            raise ValueError(f"{where}: no image")
        return dict(id=f"emma-{row['pid']}", image=imgs, question=q, answer=str(row["answer"]), type="emma",
                    choices=opts, category=row.get("subject"), task=row.get("task"),
                    instruction="Answer with the option's letter from the given choices and put the letter in one "
                                '"\\boxed{}". ' if opts else 'Answer the question using a single word or phrase and '
                                'put the answer in one "\\boxed{}". ')
    return _rows(_files(path, ".parquet", o["split"]), ("pid", "question", "answer", "image_1"), bad, make)


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def load_vsibench(path, o, bad=None):
    """VSI-Bench (5,130): its parquet and a folder of each scene's frames, --images/<dataset>/<scene_name>/*.jpg
    (default frames/ next to the parquet; docs/benchmarks.md: the ffmpeg line), --frames of them sampled as the
    reference does."""
    def make(row, where, f):
        folder = os.path.join(o["images"] or os.path.join(os.path.dirname(f), "frames"), row["dataset"],
                              row["scene_name"])
        if not os.path.isdir(folder):
            return D.problem(bad, f"{where}: no frames folder {folder}", FileNotFoundError)
        frames = sorted(os.path.join(folder, x) for x in os.listdir(folder) if x.lower().endswith(IMAGE_EXTS))
        try:
            frames = D.sample_frames(frames, o["frames"])
        except ValueError as e:
            raise ValueError(f"{where}: scene {row['scene_name']}: {e}") from None
        if not all(D.checked_image(x, where, bad) for x in frames):
            return None
        opts = [str(x) for x in row.get("options") or []]
        q = "These are frames of a video.\n" + row["question"] + ("\nOptions:\n" + "\n".join(opts) if opts else "")
        return dict(id=f"vsi-{row['id']}", image=frames, question=q, answer=str(row["ground_truth"]), type="vsi",
                    choices=opts or None, category=row["question_type"],
                    instruction="Answer with the option's letter from the given choices directly." if opts else
                    "Please answer the question using a single word or phrase.")
    need = ("id", "dataset", "scene_name", "question_type", "question", "ground_truth", "options")
    return _rows(_files(path, ".parquet", o["split"]), need, bad, make)


def _spatial(name, kind, images, extra=()):
    """SPAR-Bench and MMSI-Bench: a parquet row is (id, the images column, question with its options, answer, the
    task column): the record as it is, category the task."""
    def load(path, o, bad=None):
        def make(row, where, f):
            imgs = row[images] if isinstance(row[images], list) else [row[images]]
            if not imgs or not all(callable(x) for x in imgs):
                raise ValueError(f"{where}: no image in {images!r}")
            return dict(id=f"{name}-{row['id']}", image=imgs, question=row["question"], answer=str(row["answer"]),
                        type=name, category=row[kind], **{k: row.get(k) for k in extra})
        return _rows(_files(path, ".parquet", o["split"]), ("id", images, "question", "answer", kind), bad, make)
    return load


SPAR_SENTENCES = ("Your answer can only include one of options A, B, C or D.",  # ViLaSR's infer.py removes these
                  "Answer using a single number and nothing else.")
SPAR_BOX_NOTE = ("The values represent the bounding box coordinates normalized to a 0-1000 scale, with the top-left "
                 "corner as the origin of the image.")  # infer.py's post_prompt for two SPAR tasks


def vilasr_question(stem, q, n):
    """The question as ViLaSR's infer.py writes it for each file (the dialect adds the image lines and its template):
    options joined on lines; VSI's frame preamble (its typo kept); SPAR and MMSI without SPAR's answer-format sentences,
    then a line with the 0-1000 note for position_matching and camera_motion_infer, else an empty one."""
    text = q["question"] + ("\n" + "\n".join(q["options"]) if q["problem_type"] == "multiple choice"
                            and q.get("options") is not None else "")
    if stem.startswith("vsi"):  # n frames, all of them shown (infer.py asserts the count is --max-frames)
        return (f"These are frames from a video, numbered from 1 to {n} in sequence. That is, the index of each image "
                f"is 1, 2, 3, ..., {n}.\n\nAnswer the quesntion with appropriate tools:\n{text}")
    if stem.startswith(("spar", "mmsi")):
        for sentence in SPAR_SENTENCES:
            text = text.replace(sentence, "")
        note = q.get("original_question_type") in ("position_matching", "camera_motion_infer")
        return text + "\n" + (SPAR_BOX_NOTE if note else "")
    return text  # maze, SpatialEval: as written


def load_vilasr(path, o, bad=None):
    """ViLaSR's evaluation JSON (maze.json, vsi_bench.json, spar_bench.json, mmsi_bench.json, SpatialEval_...): a list
    of {question, problem_type, options, image_path: [...], answer, original_question_type}; images under --images or
    the JSON's folder; category '<file>/<task>' (the aggregation follows each file's own script)."""
    out = []
    for f in _files(path, ".json"):
        stem, root = os.path.splitext(os.path.basename(f))[0], o["images"] or os.path.dirname(f)
        for n, q in enumerate(_json_items(f)):
            where = f"{f}: item {n}"
            if not isinstance(q, dict) or not all(k in q for k in ("question", "problem_type", "image_path", "answer")):
                D.problem(bad, f"{where}: needs question, problem_type, image_path and answer")
                continue
            paths = [os.path.join(root, p) for p in q["image_path"]] if isinstance(q["image_path"], list) else []
            try:
                paths = D.sample_frames(paths, o["frames"] or len(paths) or 1)
            except ValueError as e:
                D.problem(bad, f"{where}: {e}")
                continue
            if not all(D.checked_image(p, where, bad) for p in paths):
                continue
            out.append(dict(id=f"vilasr-{stem}-{n}", image=paths, question=vilasr_question(stem, q, len(paths)),
                            answer=str(q["answer"]), type="vilasr", problem_type=q["problem_type"], source=where,
                            category=f"{stem}/{q.get('original_question_type') or q['problem_type']}"))
    return out


def load_mme_realworld(path, o, bad=None):
    """MME-RealWorld (MME_RealWorld.json, or the CN file) with its images under --images or the JSON's folder;
    options as its prompt lists them; category 'Task/Subtask' (its script also reports per Category)."""
    out, f = [], _files(path, ".json")[0]
    root = o["images"] or os.path.dirname(f)
    need = ("Question_id", "Image", "Text", "Answer choices", "Ground truth", "Task", "Subtask")
    for n, q in enumerate(_json_items(f)):
        where = f"{f}: item {n}"
        if not isinstance(q, dict) or any(k not in q for k in need):
            D.problem(bad, f"{where}: needs {', '.join(need)}")
        elif (img := _image_at(root, q["Image"], where, bad)) is not None:
            choices = [str(c) for c in q["Answer choices"]]
            out.append(dict(id=f"mme-{q['Question_id']}", image=[img], answer=str(q["Ground truth"]),
                            question=q["Text"] + "\nThe choices are listed below:\n" + "\n".join(choices),
                            type="mme_realworld", choices=choices, category=f"{q['Task']}/{q['Subtask']}",
                            source=where, instruction="Select the best answer to the above multiple-choice question "
                            "based on the image. Respond with only the letter (A, B, C, D, or E) of the correct "
                            "option.\nThe best answer is:"))
    return out

# -----------------------------------------------------------------------------
# 3. aggregation: (items, value) -> (overall, {category: score}); value(item) is the per-item score (pass rate, pass@k)


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
    the same within the category. With the 4 rotations whole (200 rows each) that is micro; not once rows are lost."""
    cycles = defaultdict(list)
    for it in items:
        cycles[it.get("cycle_category")].append(it)
    per = {c: _mean(v for v in (_mean(value(it) for it in g if it.get("category") == c) for g in cycles.values())
                    if v is not None) for c in _categories(items)}
    return _mean(_mean(value(it) for it in g) for g in cycles.values()), per


def _by(items, value, key=lambda it: it.get("category")):
    groups = defaultdict(list)
    for it in items:
        groups[key(it)].append(value(it))
    return {k: _mean(v) for k, v in groups.items()}


REL_DIRECTION = ("object_rel_direction_easy", "object_rel_direction_medium", "object_rel_direction_hard")


def vsi_tasks(items, value):
    """VSI-Bench (utils.py aggregate): the mean per question type, the three relative-direction levels' means averaged
    into one (not pooled: easy 60 of 100 right, medium 40 of 100, hard 40 of 200 give 0.4; pooled as ViLaSR's 0.35),
    then the unweighted mean over the 8 tasks."""
    per = _by(items, value)
    levels = [per.pop(k) for k in REL_DIRECTION if k in per]
    if levels:
        per["object_rel_direction"] = _mean(levels)
    return _mean(per.values()), dict(sorted(per.items()))


SPAR_LEVELS = {"Low": S.SPAR_NA, "Middle": ("position_matching", "camera_motion_infer"),
               "High": ("obj_spatial_relation_oo", "obj_spatial_relation_oc_mv", "obj_spatial_relation_oo_mv",
                        "spatial_imagination_oc", "spatial_imagination_oo", "spatial_imagination_oc_mv",
                        "spatial_imagination_oo_mv", "distance_infer_center_oo", "distance_infer_center_oo_mv")}


def spar_tasks(items, value):
    """SPAR-Bench (utils.py aggregate): the unweighted mean over tasks; Low / Middle / High the mean of their tasks'
    means, as logged (quirk: view_change_infer counts in the overall but in no level)."""
    per = _by(items, value)
    levels = {f"level {k}": _mean(per[t] for t in ts if t in per) for k, ts in SPAR_LEVELS.items()}
    return _mean(per.values()), dict(sorted(per.items()), **{k: v for k, v in levels.items() if v is not None})


def configs_mean(items, value):
    """MMMU-Pro: micro within a config; the paper's overall is the mean of its configs (standard 10 options, vision)."""
    per = _by(items, value)
    return _mean(per.values()), dict(sorted(per.items()))


def _base_type(it):  # ViLaSR pools VSI's three relative-direction levels
    return re.sub(r"_(easy|medium|hard)$", "", it["category"].split("/", 1)[1])


def vilasr_files(items, value):
    """ViLaSR's scripts, per file: VSI (cal_metric_vsibench: the three direction levels pooled, the mean over types),
    SPAR (cal_metric_sparbench: the mean over the types of its Low / Medium / High, view_change_infer in Medium), else
    micro (evaluate.py). Categories: each file's score and its types'; overall: the file's (several: their mean)."""
    files, per = defaultdict(list), {}
    for it in items:
        files[it["category"].split("/")[0]].append(it)
    for stem, group in files.items():
        types = _by(group, value, _base_type)
        if "vsi" in stem:
            score = _mean(types.values())
        elif "spar" in stem:
            known = {t for ts in SPAR_LEVELS.values() for t in ts} | {"view_change_infer"}
            score = _mean(v for t, v in types.items() if t in known)
        else:
            score = _mean(value(it) for it in group)
        per.update({stem: score, **{f"{stem}/{t}": v for t, v in types.items()}})
    return _mean(per[stem] for stem in files), dict(sorted(per.items()))


def replay_stream(items, records, score):
    """MMMU's parser falls back on random.choice from one stream seeded 42 at import, consumed in the order its
    evaluation reads the items (subjects in MMMU's order, the loader's order too). Each sample is scored again here
    in that order from one random.Random(42) (MMMU-Pro's fallback is unseeded: 42 here too), so the run's numbers are
    those its script would print for these outputs."""
    rng = random.Random(42)
    for it in items:
        if "error" in it:
            continue
        samples = [it] + it.get("other_samples", [])
        for t in samples:
            t["score"], t["why"] = score("".join(t["turns"]), records[it["idx"]], rng)
        it["scores"] = [t["score"] for t in samples]
        it["pass_rate"] = sum(it["scores"]) / len(samples)
        it["n_correct"] = sum(x >= 0.5 for x in it["scores"])

# -----------------------------------------------------------------------------
# 4. the table: name -> load(path, o, bad) (o: images, split, shuffle_seed, frames), the scorer's record type (the
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
    "mmmu": dict(load=load_mmmu, type="mmmu", aggregate=micro, split="validation", rescore=S.mmmu_score,
                 overall="micro over the 900, per subject"),
    "mmmu_pro": dict(load=load_mmmu_pro, type="mmmu_pro", aggregate=configs_mean, split="test",
                     rescore=S.mmmu_pro_score, overall="mean of standard (10 options) and vision"),
    "mathverse": dict(load=load_mathverse, type="rethinker", aggregate=micro, split="testmini",
                      overall="micro over the 5 versions' 3,940 (= their mean)"),
    "mathvision": dict(load=load_mathvision, type="mathvision", aggregate=micro, split="test",
                       overall="micro, per subject"),
    "emma": dict(load=load_emma, type="emma", aggregate=micro, split="test", overall="micro, per subject"),
    "vsibench": dict(load=load_vsibench, type="vsi", aggregate=vsi_tasks, split="test", frames=32,
                     overall="mean over 8 tasks (relative direction: mean of its 3 levels)"),
    "sparbench": dict(load=_spatial("spar", "task", "image", ("img_type", "format_type")), type="spar",
                      aggregate=spar_tasks, split="test", overall="mean over the 20 tasks"),
    "mmsi": dict(load=_spatial("mmsi", "question_type", "images"), type="mmsi", aggregate=micro, split="test",
                 overall="micro over the 1,000"),
    "mme_realworld": dict(load=load_mme_realworld, type="mme_realworld", aggregate=micro,
                          overall="micro over all questions, per Task/Subtask"),
    "vilasr": dict(load=load_vilasr, type="vilasr", aggregate=vilasr_files, overall="per file, its script's rule"),
    "jsonl": dict(load=lambda path, o, bad: D.load_jsonl(path, bad), type=None, aggregate=micro, overall="micro"),
}


def load(bench, path, images=None, split=None, shuffle_seed=0, frames=None, scorer=None, fix=False, bad=None):
    """--bench's records, validated as JSONL's are (a precision that is no number, a box of inf); bad: see
    data.problem(). split and frames: the benchmark's defaults (the table's) unless given; scorer: another record
    type's scorer (--scorer rethinker: VL-Rethinker's numbers); fix: the scorers' named fixes (never the default)."""
    if bench not in BENCHMARKS:
        raise ValueError(f"unknown --bench {bench!r}; known: {', '.join(BENCHMARKS)}")
    b = BENCHMARKS[bench]
    o = dict(images=images, split=split or b.get("split"), shuffle_seed=shuffle_seed, frames=frames or b.get("frames"))
    out = []
    for r in b["load"](path, o, bad):
        r.update({"type": scorer} if scorer else {}, **({"fix": True} if fix else {}))
        try:
            D.validate(r, r.get("source", r.get("id")))
            out.append(r)
        except ValueError as e:
            D.problem(bad, str(e))
    return out


def rescore(items, records, bench):
    """Scores that depend on the whole run's order (the table's rescore: MMMU's seeded fallback), done again in it."""
    score = BENCHMARKS.get(bench, {}).get("rescore")
    if score is not None and all(r.get("type") == BENCHMARKS[bench]["type"] for r in records):
        replay_stream(items, records, score)


def aggregate(items, bench=None, value=lambda it: it["pass_rate"]):
    """(overall, {category: score}) of a per-item value by the benchmark's rule (micro if it has none)."""
    if not items:
        return None, {}
    return BENCHMARKS.get(bench, BENCHMARKS["jsonl"])["aggregate"](items, value)
