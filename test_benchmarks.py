"""
test_benchmarks.py: the seeds' headline benchmarks, loaded as published, scored as their official code scores them.

    python -m pytest -q test_benchmarks.py
"""
import json
import math
import os
import random
from fractions import Fraction

import pytest

import benchmarks as B
import data as D
import eval as E
import mathscore as MS
import rewards as R
import scorers as S
from conftest import (EMMA_CASES, EMMA_OPTION_CASES, EMMA_ROW, MATHVERSE_ROW, MATHVISION_CASES, MATHVISION_ROW,
                      MME_CARS, MME_CASES, MME_CHOICES, MME_ITEM, MMMU_OPEN_CASES, MMMU_OPTS, MMMU_PRO_CASES,
                      MMMU_STREAM_CASES, MMSI_CASES, MMSI_ROW, P10, RETHINKER_CASES, RETHINKER_CUT, SPAR_CASES,
                      SPAR_ROW, VILASR_CASES, VILASR_ITEM, VSI_CASES, VSI_ROW, _img, _item, _mmmu_row, _parquet,
                      _struct)


# Every vector (the tables in conftest.py, which test_benchmarks_replay.py replays too) was worked out by hand from
# the official scorer's code (the research notes' tables); the quirks each one pins are named in docs/benchmarks.md.


@pytest.mark.parametrize("text,gold,want", RETHINKER_CASES)
def test_benchmarks_rethinker_handle_boxed(text, gold, want):
    """VL-Rethinker's handle_boxed (MathVerse's default scorer; --scorer rethinker elsewhere), <|im_end|> kept."""
    assert S.SCORERS["rethinker"](text, {"answer": gold})[0] == want


def test_benchmarks_rethinker_truncated_response_has_no_eos():
    # cut at the token limit there is no <|im_end|>, and 'Answer: 12' parses (Q4's other side)
    assert MS.rethinker_score(RETHINKER_CUT, {"answer": "12"}, eos="")[0] == 1 and MS.rethinker_score(RETHINKER_CUT,
        {"answer": "12"})[0] == 0


@pytest.mark.parametrize("text,gold,choices,want", MATHVISION_CASES)
def test_benchmarks_mathvision_evaluate(text, gold, choices, want):
    assert S.SCORERS["mathvision"](text, {"answer": gold, "choices": choices})[0] == want


@pytest.mark.parametrize("text,gold,want", EMMA_CASES)
def test_benchmarks_emma_fast_extract(text, gold, want):
    assert S.SCORERS["emma"](text, {"answer": gold})[0] == want


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


def test_benchmarks_mmmu_multiple_choice_with_the_seed_42_stream():
    rng = random.Random(42)
    assert [S.mmmu_choice(t, MMMU_OPTS, rng) for t, _ in MMMU_STREAM_CASES] == [w for _, w in MMMU_STREAM_CASES]
    rec = {"answer": "A", "choices": MMMU_OPTS, "question_type": "multiple-choice"}
    assert S.SCORERS["mmmu"]("", rec)[0] == 1  # alone: a fresh stream's first draw for 4 options is A


@pytest.mark.parametrize("text,gold,want", MMMU_OPEN_CASES)
def test_benchmarks_mmmu_open(text, gold, want):
    rec = {"answer": gold, "question_type": "open"}
    assert S.SCORERS["mmmu"](text, rec)[0] == want


@pytest.mark.parametrize("text,want", MMMU_PRO_CASES)
def test_benchmarks_mmmu_pro_parser(text, want):
    class Asked:  # a stream that says it was asked
        def choice(self, letters):
            return None
    assert S.mmmu_choice(text, P10, Asked(), pro=True) == want


@pytest.mark.parametrize("text,gold,want", VSI_CASES)
def test_benchmarks_vsi_first_token_and_float64_mra(text, gold, want):
    rec = {"answer": gold, "choices": ["A. left", "B. right"] if gold.isalpha() else None}
    assert S.SCORERS["vsi"](text, rec)[0] == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("text,gold,task,want", SPAR_CASES)
def test_benchmarks_spar_by_task(text, gold, task, want):
    assert S.SCORERS["spar"](text, {"answer": gold, "category": task})[0] == pytest.approx(want, abs=1e-12)


def test_benchmarks_spar_empty_output_fix_is_an_option():
    assert S.SCORERS["spar"]("", {"answer": "B", "category": "obj_spatial_relation_oo", "fix": True})[0] == 0


@pytest.mark.parametrize("text,gold,want", MMSI_CASES)
def test_benchmarks_mmsi_backticks_then_word_boundary_letter(text, gold, want):
    assert S.SCORERS["mmsi"](text, {"answer": gold})[0] == want


@pytest.mark.parametrize("text,gold,kind,want", VILASR_CASES)
def test_benchmarks_vilasr_reward_fn(text, gold, kind, want):
    got = S.SCORERS["vilasr"](text, {"answer": gold, "problem_type": kind})[0]
    assert got == (want if kind != "vci" else pytest.approx(want, abs=1e-6))  # float32 values compared exactly


def test_benchmarks_vilasr_training_mra_is_strict():
    assert S.mra32(15, 10, strict=True) == 0.0 and S.mra32(15, 10) == pytest.approx(0.1, abs=1e-7)
    assert S.mra32(13, 10, strict=True) == pytest.approx(0.4, abs=1e-7)


@pytest.mark.parametrize("text,gold,want", MME_CASES)
def test_benchmarks_mme_realworld_extract_characters_regex(text, gold, want):
    assert S.SCORERS["mme_realworld"](text, {"answer": gold, "choices": MME_CHOICES})[0] == want


def test_benchmarks_mme_realworld_quirks_and_fix():
    assert S.SCORERS["mme_realworld"]("d", {"answer": "D", "choices": MME_CARS})[1] == "extracted 'A'"
    assert S.SCORERS["mme_realworld"]("Best answer: D", {"answer": "D", "choices": MME_CHOICES, "fix": True})[0] == 1


# loaders: fixtures in each benchmark's published layout, written here (nothing downloaded)


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
