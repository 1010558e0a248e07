"""
test_tasks.py: the synthetic tasks' generators and ground truth, demonstrators, the demo commands (tasks.py).

    python -m pytest -q test_tasks.py
"""
import json
import os
import re
import shlex
import shutil

import numpy as np
import pytest
import torch

import data as D
import eval as E
import grpo as G
import rewards as R
import sft
import tasks
import tools as T
from conftest import CFG


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


# README's commands, read from README itself (so they stay true): the CPU demo (its first line), then each mechanism
# after it ("Each mechanism at work": a "# name: ..." comment, then the command, continued with "\"); runs/ is a
# temporary folder here and each script runs at a tiny size (TINY, appended: a flag given later wins). Every command
# must run end to end in seconds.
def readme_commands():
    text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read()
    demo = re.search(r"&& (python sft\.py && python grpo\.py && python eval\.py) +#", text).group(1)
    block = text.split("## Each mechanism at work")[1].split("```bash\n")[1].split("```")[0]
    commands, name, part = {}, None, ""
    for line in block.splitlines():
        if line.startswith("# "):
            name = line[2:].split()[0]
            continue
        part += line.rstrip("\\") + " "
        if not line.endswith("\\"):
            commands[name], part = " ".join(part.split()), ""
    return demo, commands


DEMO, MECHANISMS = readme_commands()
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


def test_tasks_readme_shows_every_mechanism():
    """README's "Each mechanism at work" has one command for each mechanism the issue names, and each command ends in
    an eval.py that writes its table to a folder of its own."""
    assert DEMO == "python sft.py && python grpo.py && python eval.py"
    assert set(MECHANISMS) == {"drawing", "keypoint", "ssr", "rethink", "region"}
    outs = [shlex.split(c)[-1] for c in MECHANISMS.values()]
    assert all(c.split("&&")[-1].split()[1] == "eval.py" for c in MECHANISMS.values()) and len(set(outs)) == 5


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
