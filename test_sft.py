"""
test_sft.py: replayed trajectories, demonstrations, reflective rejection sampling, training (sft.py).

    python -m pytest -q test_sft.py
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common as C
import data as D
import dialects
import model as M
import sft
import tasks
import tools as T
from conftest import CFG, _master


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
    sft.main(["--n-items", "4", "--batch-size", "2", "--steps", "20", "--lr", "3e-3", "--warmup", "4",
              "--schedule", "constant", "--out", str(out), "--device", "cpu"])
    rows = [json.loads(s) for s in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 21))
    # the mean of the last four steps (batches of 2 of the 4 items alternate, each with its own loss): halved
    assert np.mean([r["loss"] for r in rows[-4:]]) < 0.5 * rows[0]["loss"], [r["loss"] for r in rows]
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
