"""
test_convert.py: the methods' released data, as published, -> lookagain JSONL (convert.py).

    python -m pytest -q test_convert.py
"""
import io
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import convert
import data as D
import grpo as G
import sft
from conftest import (CFG, GRPO_TINY, HERE, VILASR_OBS, VILASR_SAID, VILASR_SYSTEM, VLIR, image_bytes, write_files,
                      write_zip)


# Each fixture is written here in its published schema (data cards, the methods' loaders; docs/data.md: "Converting
# the released data"), quirks included; the values are made up. Records are compared with hand-written ones, each
# image by the bytes of its file; each converted file then runs one step of grpo.py (or sft.py) on the tiny model.


RED, BLUE, GREEN, GREY = (image_bytes(c) for c in ((200, 30, 30), (30, 60, 200), (30, 170, 40), (128, 128, 128)))
GREEN_JPG, GREY_JPG = image_bytes((30, 170, 40), fmt="JPEG"), image_bytes((128, 128, 128), fmt="JPEG")


def write_parquet(path, rows, schema=None, row_group_size=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(path), row_group_size=row_group_size)


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
