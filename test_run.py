"""
test_run.py: the training-run skeleton and the layout of the code (common.py).

    python -m pytest -q test_run.py
"""
import argparse
import io
import json
import math
import os

import pytest
import torch

import checkpoint
import common as C
import data as D
import dialects
import eval as E
import grpo as G
import model as M
import rewards as R
import sft
import tools as T
from conftest import GRPO_TINY, HERE, _config, _master
from recipes import RECIPES


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
    core = {f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and not f.startswith("test_")
            and f != "conftest.py"}
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


def test_run_recipes_set_each_papers_settings(capsys):
    """--recipe resolves to the values of each method's released code, written out here from docs/methods.md (and the
    files docs/recipes.md's table names), one script at a time; a flag given explicitly wins."""
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


def test_run_model_from_an_unsaved_run_says_so(tmp_path):
    """--model runs/sft while sft.py still trains (run.json written, no model yet), or after a save was stopped:
    one line saying so, not transformers' complaint about a missing preprocessor_config.json."""
    run = tmp_path / "sft"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "config.json").write_text('{"model_type": "qwen2_5_vl"}')  # a save stopped midway
    with pytest.raises(SystemExit, match="its run has not saved a whole model yet"):
        C.load_policy(str(run))
    (run / checkpoint.MARKER).write_text('{"step": 3, "files": {}}')  # marked whole: the check lets it through
    (run / "config.json").unlink()
    with pytest.raises(SystemExit, match="no readable config.json"):
        C.load_policy(str(run))
