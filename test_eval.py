"""
test_eval.py: aggregation, pass@k, where the model looked, mining, the harness (eval.py).

    python -m pytest -q test_eval.py
"""
import json
import os
import subprocess
import sys

import pytest

import common as C
import data as D
import eval as E
import model as M
import tools as T
from conftest import HERE, _img, _item


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
