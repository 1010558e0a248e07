"""
test_benchmarks_replay.py: each benchmark end to end, as issue #30 asks.

    python -m pytest -q test_benchmarks_replay.py
"""
import json

import pytest

import eval as E
import model as M
from conftest import (EMMA_CASES, EMMA_OPTION_CASES, EMMA_ROW, EOS, MATHVERSE_ROW, MATHVISION_CASES, MATHVISION_ROW,
                      MME_CARS, MME_CASES, MME_CHOICES, MME_ITEM, MMMU_OPEN_CASES, MMMU_OPTS, MMMU_PRO_CASES,
                      MMMU_STREAM_CASES, MMSI_CASES, MMSI_ROW, P10, RETHINKER_CASES, RETHINKER_CUT, SPAR_CASES,
                      SPAR_ROW, VILASR_CASES, VILASR_ITEM, VSI_CASES, VSI_ROW, _img, _mmmu_row, _parquet, _struct)


# Per benchmark: a fixture in its published layout (the rows in conftest.py), the hand-worked vectors there (those
# test_benchmarks.py checks) as the model's outputs (one item each), eval.py --replay on the tiny model, tools off;
# each item's score must be its vector's, and the aggregate (overall, per category) is worked out by hand below from
# the vectors. The official scorer gets the episode's turns joined: a replayed text ends its call at the dialect's
# first stop string (lookagain's "</answer>", kept) or else at <|im_end|>, which the turn does not keep: a vector
# written with <|im_end|> at its end is a call that ended on it, and VL-Rethinker's scorer puts it back as its
# decoded tokens have it.


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
