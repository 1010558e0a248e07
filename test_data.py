"""
test_data.py: records, the synthetic task, benchmark loaders (data.py).

    python -m pytest -q test_data.py
"""
import base64
import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import benchmarks as B
import data as D
import rewards as R
import tools as T
from conftest import TINY_CFG, _img


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


def test_data_grey_noise_is_numpys_clipped_normal_noise():
    # the in-place background against numpy's own formula (the pixels every synthetic item was drawn with)
    for seed in (0, 7, 2**31 - 1):
        want = np.random.default_rng(seed).normal(128, 10, (40, 40, 3)).clip(0, 255).astype(np.uint8)
        got = D.grey_noise(seed, 40)
        assert got.dtype == np.uint8 and np.array_equal(got, want)


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
