"""
test_qwen3.py: Qwen3-VL (dense and MoE) and Qwen3.5, each a 2-layer random model with Qwen's vocabulary in a hub
snapshot.

    python -m pytest -q test_qwen3.py
"""
import json
import os
import re
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
import sft
import tools as T
from conftest import (CFG, DIALECT_CASES, SMALL_RUN, TINY_CFG, _check_replay, _dump, _master, _replayed,
                      assert_positions_match_transformers, bf16_logits, blank_episode, cache_repo,
                      cached_equals_uncached, go_offline, qwen_vocab, scripted_zooms, zoom_episodes)


# The published config.json fields (Qwen/Qwen3-VL-8B-Instruct's as copied in NVIDIA TensorRT-LLM's Qwen3-VL test,
# -30B-A3B-Instruct's as copied in a Rust port's test; Qwen3.5-9B's from transformers' Qwen3.5 config and public ports)
# at narrow widths with the real head_dim, M-RoPE sections, patch size and DeepStack; Qwen3's BPE and its 26 added
# tokens (the wheel's: Qwen3-VL's). Qwen3.5's own 248k vocabulary is not on this machine: its snapshot has Qwen3's BPE
# and Qwen3's special-token ids (lookagain looks every special token up by name).


QWEN3_VL_8B_CONFIG = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655, "model_type": "qwen3_vl",
    "text_config": {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
                    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
                    "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 262144,
                    "model_type": "qwen3_vl_text", "num_attention_heads": 32, "num_hidden_layers": 36,
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
                    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
                    "rope_theta": 5000000, "tie_word_embeddings": False, "use_cache": True, "vocab_size": 151936},
    "tie_word_embeddings": False, "transformers_version": "4.57.0.dev0", "video_token_id": 151656,
    "vision_config": {"deepstack_visual_indexes": [8, 16, 24], "depth": 27, "hidden_act": "gelu_pytorch_tanh",
                      "hidden_size": 1152, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4304,
                      "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304,
                      "out_hidden_size": 4096, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "vision_end_token_id": 151653, "vision_start_token_id": 151652}
QWEN3_VL_MOE_CONFIG = dict(
    QWEN3_VL_8B_CONFIG, architectures=["Qwen3VLMoeForConditionalGeneration"], model_type="qwen3_vl_moe",
    text_config=dict(QWEN3_VL_8B_CONFIG["text_config"], decoder_sparse_step=1, hidden_size=2048, intermediate_size=6144,
                     mlp_only_layers=[], model_type="qwen3_vl_moe_text", moe_intermediate_size=768, norm_topk_prob=True,
                     num_experts=128, num_experts_per_tok=8, num_hidden_layers=48, num_key_value_heads=4),
    vision_config=dict(QWEN3_VL_8B_CONFIG["vision_config"], model_type="qwen3_vl_moe", out_hidden_size=2048))
# Qwen/Qwen3-VL-2B-Instruct's: where it differs from the 8B's, its published values (as OpenVINO GenAI's Qwen3-VL
# test, sglang-jax's default vision config and a Rust port's test copy them; sglang#18024 and vllm#33036: tied, no
# lm_head.weight in the checkpoint): text 2048 wide, MLP 6144, 28 layers, 16 query heads, the output layer
# tied to the embedding; vision 24 blocks of 1024, MLP 4096, into 2048, DeepStack from blocks 5, 11, 17. The rest is
# the 8B's, as published for the 2B too: 8 K/V heads of head_dim 128, vocab 151936, rope theta 5e6, interleaved M-RoPE
# [24, 20, 20], 16 vision heads, 16 px patches, 2304 position embeddings.
QWEN3_VL_2B_CONFIG = dict(
    QWEN3_VL_8B_CONFIG, tie_word_embeddings=True,
    text_config=dict(QWEN3_VL_8B_CONFIG["text_config"], hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                     num_attention_heads=16, tie_word_embeddings=True),
    vision_config=dict(QWEN3_VL_8B_CONFIG["vision_config"], depth=24, hidden_size=1024, intermediate_size=4096,
                       out_hidden_size=2048, deepstack_visual_indexes=[5, 11, 17]))
# the test snapshot: those widths at 2 decoder layers and 3 vision blocks (the fewest that keep three DeepStack taps:
# every block tapped), 554M parameters, 311M of them the tied embedding
QWEN3_VL_2B_2LAYER = dict(
    QWEN3_VL_2B_CONFIG, text_config=dict(QWEN3_VL_2B_CONFIG["text_config"], num_hidden_layers=2),
    vision_config=dict(QWEN3_VL_2B_CONFIG["vision_config"], depth=3, deepstack_visual_indexes=[0, 1, 2]))
QWEN3_5_CONFIG = {  # every 4th layer full attention: here layer 1 of 2, so both kinds run
    "architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5", "image_token_id": 151655,
    "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
    "text_config": {"model_type": "qwen3_5_text", "vocab_size": 151936, "hidden_size": 256, "intermediate_size": 512,
                    "num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"],
                    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 256, "linear_num_key_heads": 2,
                    "linear_num_value_heads": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                    "linear_conv_kernel_dim": 4, "max_position_embeddings": 262144, "rms_norm_eps": 1e-06,
                    "eos_token_id": 151645,
                    "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10],
                                        "partial_rotary_factor": 0.25, "rope_theta": 10000000, "rope_type": "default"}},
    "vision_config": {"model_type": "qwen3_5", "depth": 4, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                      "out_hidden_size": 256, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "num_position_embeddings": 2304}}
# Qwen/Qwen3-VL-8B-Instruct's preprocessor_config.json (and Qwen3.5's: the same processor)
QWEN3_PREPROCESSOR = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
                      "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                      "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
                      "image_processor_type": "Qwen2VLImageProcessorFast"}
# Qwen/Qwen3-VL-8B-Instruct's chat template, as shipped in Qwen/Qwen3-VL-8B-Instruct-GGUF (5292 bytes, its SHA-256
# as TensorSharp's test pins it: checked below); its two lines over 120 characters are cut into adjacent raw
# strings, which Python joins
QWEN3_VL_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with """ \
r"""function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within """ \
r"""<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": """ \
r"""<args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
QWEN3_REPO, QWEN3_MOE_REPO, QWEN35_REPO = ("test-org/Qwen3-VL-8B-2layer", "test-org/Qwen3-VL-30B-A3B-2layer",
                                           "test-org/Qwen3.5-9B-2layer")
QWEN3_2B_REPO = "test-org/Qwen3-VL-2B-2layer"  # the published widths


def small3(config, **text):
    """A Qwen3-VL config at narrow width, 2 decoder layers and 4 vision blocks (the DeepStack taps: blocks 1-3)."""
    return dict(config, text_config=dict(config["text_config"], hidden_size=256, intermediate_size=512,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **text),
                vision_config=dict(config["vision_config"], depth=4, hidden_size=64, intermediate_size=128, num_heads=2,
                                   out_hidden_size=256, deepstack_visual_indexes=[1, 2, 3]))


def qwen3_files():
    """A Qwen3 snapshot's tokenizer and preprocessor files (cache_repo's keywords)."""
    tc = json.load(open(os.path.join(qwen_vocab(), "tokenizer_config.json")))
    tc = {k: v for k, v in tc.items() if k != "chat_template"} | {"model_max_length": 262144}  # Qwen3-VL's 256k
    return dict(added=None, tokenizer_config=tc, preprocessor=QWEN3_PREPROCESSOR)


@pytest.fixture(scope="module")
def qwen3_cache(tmp_path_factory):
    """A hub cache holding the three: (cache, {repo: snapshot})."""
    cache = tmp_path_factory.mktemp("hub3")
    files = qwen3_files()
    moe = small3(QWEN3_VL_MOE_CONFIG, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
    return cache, {QWEN3_REPO: cache_repo(cache, QWEN3_REPO, config=small3(QWEN3_VL_8B_CONFIG),
                                          chat_template=QWEN3_VL_TEMPLATE, **files),
                   QWEN3_MOE_REPO: cache_repo(cache, QWEN3_MOE_REPO, config=moe, chat_template=QWEN3_VL_TEMPLATE,
                                              **files),
                   QWEN35_REPO: cache_repo(cache, QWEN35_REPO, config=QWEN3_5_CONFIG, **files)}


@pytest.fixture(scope="module")
def qwen3(qwen3_cache):
    torch.set_num_threads(2)
    return C.load_policy(qwen3_cache[1][QWEN3_REPO], device="cpu")


@pytest.fixture(scope="module")
def qwen3_2b_snapshot(qwen3_cache):
    """QWEN3_2B_REPO in the same hub cache (written once, ~12 s: 554M random weights) -> its snapshot folder."""
    return cache_repo(qwen3_cache[0], QWEN3_2B_REPO, config=QWEN3_VL_2B_2LAYER, chat_template=QWEN3_VL_TEMPLATE,
                      **qwen3_files())


@pytest.fixture(scope="module")
def qwen3_2b(qwen3_2b_snapshot):
    torch.set_num_threads(2)
    return C.load_policy(qwen3_2b_snapshot, device="cpu")  # fp32: the comparisons below are exact or to 1e-5


@pytest.fixture(scope="module")
def qwen35(qwen3_cache):
    torch.set_num_threads(2)
    return C.load_policy(qwen3_cache[1][QWEN35_REPO], device="cpu")


# the published processor's smallest image, 256 x 256 px (64 merged tokens): images it keeps as they are
CFG3 = {**CFG, **{k: 65536 for k in ("view_min_pixels", "view_max_pixels", "crop_min_pixels", "crop_max_pixels")}}


def test_qwen3_random_models_have_the_published_widths(tmp_path):
    """--model random-qwen3vl-8b / -30b-a3b: the published config's widths and depth, built on the meta device (8.77B
    parameters, as Qwen3-VL-8B-Instruct is listed); 16 px patches, so 32 px resize units. A folder of another model
    type is named as such."""
    from transformers import Qwen3VLForConditionalGeneration
    tok = M.tiny_tokenizer(C.tiny_corpus())
    for name, pub in (("random-qwen3vl-8b", QWEN3_VL_8B_CONFIG), ("random-qwen3vl-30b-a3b", QWEN3_VL_MOE_CONFIG)):
        cfg = M.tiny_config(tok, **M.RANDOM[name])
        text, vision, want = cfg.text_config, cfg.vision_config, pub["text_config"]
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "max_position_embeddings", "rms_norm_eps", "vocab_size", "moe_intermediate_size",
                  "num_experts", "num_experts_per_tok", "decoder_sparse_step"):
            assert getattr(text, k, None) == want.get(k), (name, k)
        assert text.rope_parameters["rope_theta"] == want["rope_theta"] and cfg.tie_word_embeddings is False
        assert {k: text.rope_parameters[k] for k in ("mrope_section", "mrope_interleaved")} == \
            {k: want["rope_scaling"][k] for k in ("mrope_section", "mrope_interleaved")}
        for k in ("deepstack_visual_indexes", "depth", "hidden_size", "intermediate_size", "num_heads",
                  "out_hidden_size", "num_position_embeddings", "patch_size", "spatial_merge_size",
                  "temporal_patch_size"):
            assert getattr(vision, k) == pub["vision_config"][k], (name, k)
    with torch.device("meta"):
        n = sum(p.numel() for p in Qwen3VLForConditionalGeneration(M.tiny_config(tok, **M.RANDOM["random-qwen3vl-8b"]))
                .parameters())
    assert abs(n - 8.77e9) < 0.005e9, n
    improc = M.image_processor(None, M.FAMILIES["qwen3_vl"])
    assert (improc.patch_size * improc.merge_size, improc.size["shortest_edge"], improc.size["longest_edge"]) == \
        (32, 64 * 64, 128 * 128)
    _dump(tmp_path / "config.json", {"model_type": "llava"})
    with pytest.raises(SystemExit, match="model_type 'llava' is not a family lookagain runs"):
        C.load_policy(str(tmp_path))


# Qwen/Qwen3.5-9B's published config.json fields (as a public test copies its text and vision parts, with the total_size
# of the checkpoint's index: 19,306,216,416 bytes; mtp_num_hidden_layers 1), by where transformers keeps them
QWEN3_5_9B_TEXT = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=16,
                       num_key_value_heads=4, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
                       linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, vocab_size=248320,
                       rms_norm_eps=1e-6, layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 8)
QWEN3_5_9B_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, num_position_embeddings=2304,
                         out_hidden_size=4096, patch_size=16, spatial_merge_size=2, temporal_patch_size=2)


def test_qwen3_5_random_9b_has_the_published_widths():
    """--model random-qwen3.5-9b: the published config's widths, depth and rotary (a quarter of head_dim 256, M-RoPE
    [11, 11, 10] interleaved, theta 1e7), untied, built on the meta device: the parameters the published checkpoint
    holds, less the multi-token-prediction layer transformers does not build."""
    tok = M.tiny_tokenizer(C.tiny_corpus())
    cfg = M.tiny_config(tok, **M.RANDOM["random-qwen3.5-9b"])
    for k, v in QWEN3_5_9B_TEXT.items():
        assert getattr(cfg.text_config, k) == v, k
    for k, v in QWEN3_5_9B_VISION.items():
        assert getattr(cfg.vision_config, k) == v, k
    rope = cfg.text_config.rope_parameters
    assert {k: rope[k] for k in ("mrope_section", "mrope_interleaved", "partial_rotary_factor", "rope_theta")} == \
        dict(mrope_section=[11, 11, 10], mrope_interleaved=True, partial_rotary_factor=0.25, rope_theta=1e7)
    assert cfg.tie_word_embeddings is False
    with torch.device("meta"):
        n = sum(p.numel() for p in M.FAMILIES["qwen3_5"]["cls"](cfg).parameters())
    # the checkpoint's 19,306,216,416 bytes at 2 a parameter, less its MTP layer (counted by hand: one full-attention
    # layer, q_proj 4096 x 8192 with its output gate, k_proj and v_proj 4096 x 1024, o_proj 4096 x 4096, q/k norms
    # 256 each, MLP 3 x 4096 x 12288, 2 norms of 4096; its fc 8192 x 4096 and 3 norms of 4096: 243,290,624); the
    # 3,840 left over would be 24 x (32 + 128): each linear-attention layer's A_log and norm stored in fp32
    assert abs(n - (19_306_216_416 // 2 - 243_290_624)) <= 3840, n


def test_qwen3_zoom_arithmetic_in_32_px_units():
    """The tools resize in the family's unit: smart_resize at factor 32 is transformers' own Qwen2-VL rule, and a
    zoom on a Qwen3-VL is cut and sized in 32 px units (hand-worked below)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    for h, w in ((240, 400), (33, 2000), (900, 901), (64, 64), (1000, 31)):
        assert T.smart_resize(h, w, 32, 4096, 128 * 128) == smart_resize(h, w, 32, 4096, 128 * 128), (h, w)
    ep = blank_episode(factor=32)  # a 500x400 view of a 1000x800 original: 2 original px per view px
    v = T.zoom_in(ep, 0, [10, 10, 12, 12], ep["cfg"])  # 4x4 original px, grown to 32 around their centre (22, 22)
    assert v["box"] == pytest.approx((6, 6, 38, 38))
    # 100x60 view px = 200x120 original px, 3% of the image: zoomed 2x to 400x240, over the 12544 px budget:
    # beta = sqrt(400 * 240 / 12544) = 2.766, 240 / beta = 86.8 -> 64 (floor to 32s), 400 / beta = 144.6 -> 128
    v = T.zoom_in(ep, 0, [100, 100, 200, 160], ep["cfg"])
    assert v["box"] == pytest.approx((200, 200, 400, 320)) and v["img"].size == (128, 64)
    assert T.zoom_in(ep, 0, [100, 100, 200, 160], TINY_CFG)["img"].size == (140, 84)  # Qwen2.5-VL's 28s: 3 x 5


def processor_ids(policy, messages, images, template, **kw):
    """What Qwen3VLProcessor makes of a conversation (processing_qwen3_vl.py; its video processor needs torchvision,
    so it is done here as it does it): transformers renders the chat template, each <|image_pad|> is repeated
    grid_t * grid_h * grid_w / merge^2 times, the grid being the folder's image processor's for the image as given
    (its own resize rule and budget), and the text is tokenized whole."""
    import transformers
    text = policy.tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kw)
    improc = transformers.Qwen2VLImageProcessorPil.from_pretrained(policy.folder)
    parts = text.split("<|image_pad|>")
    assert len(parts) == len(images) + 1
    n = [improc.get_number_of_image_patches(im.height, im.width, {}) // improc.merge_size ** 2 for im in images]
    text = "".join(p + "<|image_pad|>" * k for p, k in zip(parts, n + [0]))
    return policy.tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("which", ["qwen3", "qwen3_2b"])
def test_qwen3_tool_episode_is_the_processors_chat_template(which, request):
    """A whole tool episode as lookagain writes it (an SFT demonstration replayed), and prompts with 1 to 3 images,
    are token for token what the published Qwen3-VL chat template and processor make of the same conversation (at
    narrow widths, and at the 2B's)."""
    import hashlib
    qwen3 = request.getfixturevalue(which)
    assert hashlib.sha256(QWEN3_VL_TEMPLATE.encode()).hexdigest() == \
        "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"
    assert qwen3.family == "qwen3_vl" and qwen3.factor == 32 and M.ids(qwen3, "<think>") == [151667]
    rec = D.synthetic(1, seed=3)[0]
    call = {"image_index": 0, "bbox_2d": [10, 12, 40, 44]}
    turns = ["<think>Zoom in.</think>" + dialects.render_call("zoom_in", call),
             f"<think>I see it.</think><answer>{rec['answer']}</answer>"]
    ep, err = sft.rebuild(qwen3, rec, turns, ["zoom_in"], CFG3)
    (w, h), n = ep["images"][1]["img"].size, [e["n"] for e in T.episode_images(qwen3, ep)]
    assert err is None and (w, h, n) == (256, 288, [64, 72])  # Qwen's rule: min = max = 65536 px, ceiled to 32s
    image, text = {"type": "image"}, lambda s: {"type": "text", "text": s}
    messages = [{"role": "system", "content": dialects.system_prompt({"zoom_in": T.TOOLS["zoom_in"]})},
                {"role": "user", "content": [image, text(rec["question"])]},
                {"role": "assistant", "content": "<think>Zoom in.</think>",
                 "tool_calls": [{"type": "function", "function": {"name": "zoom_in", "arguments": call}}]},
                {"role": "tool", "content": [image, text(f"Image 1 ({w}x{h}), from image 0.")]},
                {"role": "assistant", "content": turns[1]}]
    want = processor_ids(qwen3, messages, [v["img"] for v in ep["images"]], QWEN3_VL_TEMPLATE)
    assert ep["seq"] == want[:-1] and qwen3.tok.decode(want[-1:]) == "\n"  # the template's "\n" after the last turn
    for k in (1, 2, 3):
        imgs = [Image.new("RGB", (256, 256 + 32 * i), (40 * i, 90, 200)) for i in range(k)]
        messages = [{"role": "system", "content": "S"}, {"role": "user", "content": [image] * k + [text("Q?")]}]
        ours = [dict(role="system", parts=["S"], closed=True),
                dict(role="user", parts=list(range(k)) + ["Q?"], closed=True),
                dict(role="assistant", parts=[], closed=False)]
        assert M.render(qwen3, ours, [M.encode_image(qwen3, im) for im in imgs])[0] == \
            processor_ids(qwen3, messages, imgs, QWEN3_VL_TEMPLATE, add_generation_prompt=True)


def test_qwen3_5_turns_are_its_chat_template(qwen35):
    """Qwen3.5's layout: Qwen/Qwen3.5-9B's chat template (its published Jinja, written out here as text) opens every
    assistant turn with <think> (the generation prompt `<|im_start|>assistant\n<think>\n`), and a turn it re-renders
    is `<think>\n` + reasoning + `\n</think>\n\n` + answer: what a Qwen3.5 samples after that header."""
    assert qwen35.family == "qwen3_5" and not qwen35.kv_turns and qwen35.factor == 32
    rec = D.synthetic(1, seed=3)[0]
    call = dialects.render_call("zoom_in", {"image_index": 0, "bbox_2d": [10, 12, 40, 44]}).lstrip("\n")
    turns = ["I zoom.\n</think>\n\n" + call, f"I see it.\n</think>\n\n<answer>{rec['answer']}</answer>"]
    ep, err = sft.rebuild(qwen35, rec, turns, ["zoom_in"], CFG3)
    assert err is None
    pad = lambda n: "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"  # n = (w / 32) * (h / 32)
    # 256 x 256 px, then the zoom at 256 x 288 (test_qwen3_tool_episode_...): 64 and 72 tokens
    system = dialects.system_prompt({"zoom_in": T.TOOLS["zoom_in"]})
    text = ("<|im_start|>system\n" + system + "<|im_end|>\n<|im_start|>user\n" + pad(64) +
            rec["question"] + "<|im_end|>\n<|im_start|>assistant\n<think>\n" + turns[0] + "<|im_end|>\n"
            "<|im_start|>user\n<tool_response>\n" + pad(72) + "Image 1 (256x288), from image 0.\n</tool_response>"
            "<|im_end|>\n<|im_start|>assistant\n<think>\n" + turns[1] + "<|im_end|>")
    assert ep["seq"] == qwen35.tok(text, add_special_tokens=False)["input_ids"]


def scripted_episodes(policy, cfg=None):
    """Three episodes with one, two and three images (zooms written as the assistant's turns: trained tokens), at
    budgets the family admits (Qwen2.5-VL's 112 x 112 px; the 32 px families' 256 x 256)."""
    cfg = cfg or (CFG if policy.factor == 28 else CFG3)
    eps = [T.new_episode(policy, r, **cfg) for r in D.synthetic(3, seed=5)]
    for ep, boxes in zip(eps, ([], [[0, 0, 50, 60]], [[0, 0, 50, 60], [10, 10, 40, 30]])):
        for k, b in enumerate(boxes):
            call = dialects.render_call("zoom_in", {"image_index": k, "bbox_2d": b})
            T.advance(policy, ep, M.ids(policy, "<think>z</think>" + call), reason="stop")
    assert [len(ep["images"]) for ep in eps] == [1, 2, 3]
    return eps


FIXTURE = {QWEN3_REPO: "qwen3", QWEN3_2B_REPO: "qwen3_2b", QWEN35_REPO: "qwen35"}  # the repos loaded once


@pytest.mark.parametrize("repo", [QWEN3_REPO, QWEN3_2B_REPO, QWEN3_MOE_REPO, QWEN35_REPO, "qwen3_5_moe"])
def test_qwen3_positions_and_logprobs_are_transformers(repo, qwen3_cache, request):
    """Each family (Qwen3.5-MoE: a toy one, the tiny tokenizer; Qwen3-VL at the 2B's widths too), 1 to 3 images in
    multi-turn episodes, left-padded in a batch: the M-RoPE positions equal transformers' get_rope_index (Qwen3-VL's,
    Qwen3.5's), and token_logprobs (the fused kernel on the output layer) equals log_softmax of the model's logits."""
    policy = request.getfixturevalue(FIXTURE[repo]) if repo in FIXTURE else \
        C.load_policy("tiny", device="cpu", arch=dict(family=repo)) if repo == "qwen3_5_moe" else \
        C.load_policy(qwen3_cache[1][repo], device="cpu")
    eps = scripted_episodes(policy)
    assert_positions_match_transformers(policy, eps)
    seqs, imgs = [e["seq"] for e in eps], [T.episode_images(policy, e) for e in eps]
    logp, mask = M.token_logprobs(policy, seqs, imgs, [e["mask"] for e in eps], temperature=0.7)
    batch = M.collate(policy, seqs, imgs)
    K = mask.shape[1] - int(mask.any(0).long().argmax()) + 1  # the logits from the one before the first trained token
    with torch.no_grad():
        ref = torch.log_softmax(policy.model(**batch, logits_to_keep=K).logits[:, :-1].float() / 0.7, -1)
    ref = ref.gather(-1, batch["input_ids"][:, 1 - K:, None])[..., 0]                       # [B, K - 1]
    m = mask[:, 1 - K:].bool()
    assert m.sum() > 30 and torch.allclose(logp[:, 1 - K:][m], ref[m], atol=1e-5, rtol=0)


# the 2B: sampled only (per-episode generators: tokens and log-probs), three episodes with one zoom each, in 256 x 256
# px views and zooms (64 tokens an image), as its uncached path prefills every image again every turn (~25 s)
@pytest.mark.parametrize("which,kw", [("qwen3", {}), ("qwen3_2b", dict(
    calls=1, modes=(False,), groups=((0, 2), (6, 1)), view_max_pixels=65536, crop_max_pixels=65536))])
def test_qwen3_cached_rollout_equals_uncached(which, kw, request, monkeypatch):
    """The rollout engine on Qwen3-VL (DeepStack features added at each new image, interleaved M-RoPE, head_dim 128;
    narrow, and at the 2B's widths): each row's cache kept across tool turns samples what prefilling every turn whole
    samples (test_tools_cached_...)."""
    cached_equals_uncached(request.getfixturevalue(which), monkeypatch, stop="e", **kw)


def test_qwen3_5_samples_without_a_cache_across_turns(qwen35, monkeypatch):
    """Qwen3.5 (linear-attention state: families.py) prefills each turn whole and keeps no cache across turns, and its
    decoding (finished rows leave the batch's K/V and recurrent state) samples the log-probs that token_logprobs
    recomputes on the finished multi-turn trajectories."""
    scripted_zooms(monkeypatch, qwen35, stop="e")
    eps = T.rollout(qwen35, zoom_episodes(qwen35, groups=((0, 2), (1, 1))), temperature=0.7)
    outs = M.sample(qwen35, [eps[0]["seq"]], [T.episode_images(qwen35, eps[0])], caches=[None], max_new_tokens=2)
    assert outs[0][3] is None
    logp, _ = M.token_logprobs(qwen35, [e["seq"] for e in eps], [T.episode_images(qwen35, e) for e in eps],
                               [e["mask"] for e in eps], temperature=0.7)
    for b, ep in enumerate(eps):
        sampled = torch.tensor(ep["logp"]).isfinite() & torch.tensor(ep["mask"]).bool()  # NaN: the scripted calls
        assert torch.allclose(logp[b, logp.shape[1] - len(ep["seq"]):][sampled], torch.tensor(ep["logp"])[sampled],
                              atol=1e-5, rtol=0)
    assert len({len(ep["seq"]) for ep in eps}) > 1 and max(len(ep["images"]) for ep in eps) > 1


def published_tensor_names_qwen3(layers, blocks, taps, tied=False):
    """Qwen/Qwen3-VL-8B-Instruct's tensor names (transformers 4.57's layout, as public quantisation configs and
    ports list them), for so many layers, vision blocks and DeepStack taps; tied (the 2B, 4B): no lm_head.weight."""
    names = {"lm_head.weight", "model.language_model.embed_tokens.weight", "model.language_model.norm.weight",
             "model.visual.patch_embed.proj.weight", "model.visual.patch_embed.proj.bias",
             "model.visual.pos_embed.weight"}
    names |= {f"model.language_model.layers.{i}.{n}.weight" for i in range(layers) for n in (
        "input_layernorm", "post_attention_layernorm", "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj",
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm",
        "self_attn.k_norm")}
    names |= {f"model.visual.blocks.{i}.{n}.{w}" for i in range(blocks) for w in ("weight", "bias") for n in (
        "attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2", "norm1", "norm2")}
    mergers = ["merger"] + [f"deepstack_merger_list.{j}" for j in range(taps)]
    names |= {f"model.visual.{m}.{n}.{w}" for m in mergers for n in ("norm", "linear_fc1", "linear_fc2")
              for w in ("weight", "bias")}
    return names - {"lm_head.weight"} if tied else names


@pytest.mark.parametrize("repo", [QWEN3_REPO, QWEN3_2B_REPO, QWEN3_MOE_REPO, QWEN35_REPO])
def test_qwen3_checkpoints_reload_exactly(repo, qwen3_cache, request, tmp_path):
    """model.save on each family: transformers reloads it with the logits of the policy's weights rounded to bf16 (a
    forward with images and explicit M-RoPE positions), and load() with the same image processor. Qwen3-VL's is the
    published folder layout (config.json field for field and in order, preprocessor, tensor names; the 2B's with
    its output layer tied: stored once); Qwen3-VL-MoE's and Qwen3.5's are transformers' own (docs/models.md)."""
    import transformers
    from safetensors import safe_open
    policy = request.getfixturevalue(FIXTURE[repo]) if repo in FIXTURE else \
        C.load_policy(qwen3_cache[1][repo], device="cpu")
    M.save(policy, str(tmp_path))
    if repo in (QWEN3_REPO, QWEN3_2B_REPO):
        written = json.load(open(tmp_path / "config.json"))
        want = json.load(open(os.path.join(policy.folder, "config.json")))
        assert list(written) == list(want) and list(written["text_config"]) == list(want["text_config"])
        assert {k: v for k, v in written.items() if k != "transformers_version"} == \
            {k: v for k, v in want.items() if k != "transformers_version"}
        assert json.load(open(tmp_path / "preprocessor_config.json")) == QWEN3_PREPROCESSOR
        assert json.load(open(tmp_path / "chat_template.json"))["chat_template"] == QWEN3_VL_TEMPLATE
        with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
            tied = repo == QWEN3_2B_REPO
            assert set(f.keys()) == published_tensor_names_qwen3(2, 3 if tied else 4, 3, tied)
    ep = scripted_episodes(policy)[1]
    # the last 64 positions' logits (the zoom's image tokens, the text after it: every layer's output feeds them),
    # [1, 64, 151936]; all 486 would be 8 s more at the 2B's widths
    batch = dict(M.collate(policy, [ep["seq"]], [T.episode_images(policy, ep)]), logits_to_keep=64)
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(str(tmp_path), dtype=torch.float32)
    with torch.no_grad():
        logits = reloaded(**batch).logits
        assert logits.shape[1] == 64 and torch.equal(logits, bf16_logits(policy, **batch))
    assert (reloaded.lm_head.weight is reloaded.model.language_model.embed_tokens.weight) == (repo == QWEN3_2B_REPO)
    del reloaded
    if repo != QWEN3_MOE_REPO:  # (saved as Qwen3.5's is)
        again = C.load_policy(str(tmp_path), device="cpu")
        assert (again.family, again.improc.size, again.improc.image_mean) == (policy.family, policy.improc.size,
                                                                            policy.improc.image_mean)


@pytest.mark.parametrize("repos", [(QWEN3_REPO, QWEN3_MOE_REPO, QWEN35_REPO), (QWEN3_2B_REPO,)])
def test_qwen3_grpo_and_sft_steps_on_hub_ids(repos, qwen3_cache, request, tmp_path, two_threads, monkeypatch):
    """grpo.py on each family by hub id (offline cache), sft.py on the first (Qwen3-VL, narrow or at the 2B's
    widths): one step each; run.json records the family, its 32 px unit and the processor's budget (its 65536 px
    minimum: smaller flags are refused)."""
    if QWEN3_2B_REPO in repos:
        request.getfixturevalue("qwen3_2b_snapshot")  # (written into the cache)
    go_offline(monkeypatch, qwen3_cache[0])
    budget = ["--view-max-pixels", "65536", "--crop-max-pixels", "65536"]
    for repo in repos:
        run = ["--model", repo] + SMALL_RUN[2:] + budget
        G.main(run + ["--steps", "1", "--prompts", "1", "--group-size", "2", "--lr", "1e-6",
                      "--out", str(tmp_path / repo)])
    sft.main(["--model", repos[0]] + SMALL_RUN[2:4] + budget + ["--max-turn-tokens", "96", "--n-items", "2",
                                                                "--batch-size", "2", "--steps", "1", "--lr", "1e-6",
                                                                "--out", str(tmp_path / "sft")])
    family = {QWEN3_REPO: "qwen3_vl", QWEN3_2B_REPO: "qwen3_vl", QWEN3_MOE_REPO: "qwen3_vl_moe", QWEN35_REPO: "qwen3_5"}
    for out in repos + ("sft",):
        cfg = json.load(open(tmp_path / out / "run.json"))["episode"]
        assert (cfg["family"], cfg["factor"], cfg["view_min_pixels"], cfg["view_max_pixels"]) == \
            (family.get(out, "qwen3_vl"), 32, 65536, 65536)
        assert json.loads(open(tmp_path / out / "metrics.jsonl").readline())["step"] == 1
    if QWEN3_REPO in repos:  # (the same check at any width: the narrow model's load is the cheap one)
        with pytest.raises(SystemExit, match="--view-max-pixels 12544: below the model's minimum of 65536"):
            G.main(["--model", QWEN3_REPO] + SMALL_RUN[2:] + ["--view-max-pixels", "12544",
                                                              "--out", str(tmp_path / "x")])


def test_qwen3_eval_and_bench_on_a_snapshot_folder(qwen3_cache, qwen3, tmp_path, two_threads, monkeypatch, capsys):
    """eval.py on a Qwen3-VL folder scores synthetic items and results.json names the family and its budget; bench.py
    --rollout on it defaults to the model's minimum budget (65536 px; its 112 x 112 default is below it), and its
    paths, transformers' generate among them, sample the same tokens; a recipe's budget below the minimum (VLM-R3's
    eval: 32 x 784 px, Qwen2.5-VL's units) is refused with the flags that fix it (docs/models.md)."""
    import bench
    folder = qwen3_cache[1][QWEN3_REPO]
    E.main(["--model", folder] + SMALL_RUN[2:] + ["--data", "synthetic", "--limit", "2", "--view-max-pixels", "65536",
                                                  "--crop-max-pixels", "65536", "--out", str(tmp_path)])
    res = json.load(open(tmp_path / "results.json"))
    assert (res["settings"]["family"], res["settings"]["pixels"]["view_min_pixels"]) == ("qwen3_vl", 65536)
    (run,) = res["runs"].values()
    items = [json.loads(line) for line in open(tmp_path / "items.jsonl")]
    assert (run["items"], run["skipped"]) == (2, 0) and [it["score"] in (0.0, 1.0) for it in items] == [True, True]
    monkeypatch.setattr(sys, "argv", ["bench.py", "--rollout", "--model", folder, "--device", "cpu", "--prompts", "1",
                                      "--group", "2", "--max-new", "4", "--reps", "1"])
    bench.main()
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("| single turn", "| multi-turn"))]
    assert "images of <= 65536 px" in out and [r[1] for r in rows] == ["generate", "uncached", "engine"] + \
        ["uncached", "engine"] and {r[-1] for r in rows} == {"2/2 |"}, out
    with pytest.raises(SystemExit, match=re.escape(
            "--view-min-pixels 25088, --crop-min-pixels 25088: below the model's minimum of 65536 px; pass "
            "--view-min-pixels 65536 --crop-min-pixels 65536")):
        C.episode_cfg(E.get_args(["--model", folder, "--recipe", "vlm_r3"]), qwen3)


# The dialects' transcripts (conftest's DIALECT_CASES) on Qwen3-VL: item a's call worked out by hand at factor 32. The
# 1120 x 840 image in a 196608 px view: smart_resize's beta = sqrt(940800 / 196608) = 2.1875 exactly, 840 / 2.1875 =
# 384 = 12 x 32 and 1120 / 2.1875 = 512 = 16 x 32, so one scale, 2.1875 original px a view px (Qwen2.5-VL's 235200 px,
# 560 x 420, is no multiple of 32: 544 x 416, two scales). The view's least pixels 65536 (the shared flags' 3136 is
# below Qwen3-VL's minimum), and for VLM-R3 and Mini-o3 the crop's too (their recipes' 25088 and 40000 are below it).
# (region of the original, [w, h] returned):
QWEN3_DIALECT = {
    # [100, 50, 300, 200] x 2.1875 = 437.5 x 328.125 px, r = (200 / 512) * (150 / 384) = 0.152587890625 of the image:
    # zoomed x(2 - (r - 0.125) / 0.375) = x1.926432; int(842.81) = 842, int(632.11) = 632 -> round(26.31) = 26,
    # round(19.75) = 20 units
    "lookagain": ([218.75, 109.375, 656.25, 437.5], [832, 640]),
    # int(218.75), int(109.375), int(656.25) + 1, int(437.5) + 1: 439 x 329 px, r = 144431 / 940800 = 0.153519,
    # x1.923948: int(844.61) = 844, int(632.98) = 632 -> 26.375 and 19.75 units, rounded: 26, 20
    "vlm_r3": ([218, 109, 657, 438], [832, 640]),
    "deepeyes": ([200, 100, 600, 400], [384, 288]),  # 400 x 300 as cut: 12.5 -> 12 (banker's), 9.375 -> 9 units
    "vilasr": ([0, 0, 1120, 840], [512, 384]),  # drawn on the whole image, as shown
    "groundlight": ([360, 220, 760, 620], [1120, 1120]),  # the 400 px window at max(1120, 840, 400): 35 units
    # 280 x 210: 8.75 -> 9, 6.5625 -> 7 units, 288 x 224 = 64512 px under 65536: x sqrt(65536 / 58800) = x1.05573,
    # ceiled: 295.6 / 32 -> 10, 221.7 / 32 -> 7
    "mini_o3": ([280, 210, 560, 420], [320, 224]),
    # [0.2, 0.2, 0.6, 0.6] of 512 x 384, x 2.1875; 448 x 336 (14 and 10.5 -> 10 units: 143360 px) under its
    # 200704 px minimum: x sqrt(200704 / 150528) = x1.154701, ceiled: 517.3 / 32 -> 17, 388.0 / 32 -> 13
    "pixel_reasoner": ([224, 168, 672, 504], [544, 416]),
}


@pytest.mark.parametrize("dialect", list(DIALECT_CASES))
def test_qwen3_every_dialect_replayed(dialect, qwen3_cache, tmp_path, two_threads):
    """test_qwen_every_dialect_replayed_with_qwens_vocabulary's transcripts through a Qwen3-VL folder (Qwen3's BPE,
    32 px units): the same calls parse, answers score, malformed calls fail; the regions and sizes are Qwen3-VL's."""
    low = ["--crop-min-pixels", "65536"] if dialect in ("vlm_r3", "mini_o3") else []
    extra = ([] if dialect == "lookagain" else ["--recipe", dialect]) + ["--view-max-pixels", "196608",
                                                                         "--view-min-pixels", "65536"] + low
    items, _ = _replayed(tmp_path, qwen3_cache[1][QWEN3_REPO], dialect, extra)
    _check_replay(items, dialect, *QWEN3_DIALECT[dialect])


def test_qwen3_fsdp2_on_two_processes_equals_one(qwen3_cache, tmp_path):
    """grpo.py --fsdp on a Qwen3-VL folder, 2 CPU processes (FSDP2 units: model.language_model.layers, as for
    Qwen2.5-VL), against 1 process on the same global batch: the same fp32 weights after a step, the same loss."""
    import subprocess
    folder = qwen3_cache[1][QWEN3_REPO]
    args = ["--model", folder] + SMALL_RUN[2:] + ["--view-max-pixels", "65536", "--crop-max-pixels", "65536",
                                                  "--steps", "1", "--prompts", "2", "--group-size", "2", "--lr", "1e-3",
                                                  "--warmup", "1", "--save-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    here = os.path.dirname(os.path.abspath(__file__))

    def run(name, launcher, extra=()):
        r = subprocess.run([*launcher, "grpo.py", *args, *extra, "--out", str(tmp_path / name)], env=env, cwd=here,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        return _master(tmp_path / name / "step1"), json.loads(open(tmp_path / name / "metrics.jsonl").readline())
    w1, r1 = run("one", [sys.executable])
    w2, r2 = run("fsdp", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                 ["--fsdp"])
    assert w1.keys() == w2.keys() and (tmp_path / "fsdp" / "step1" / "trainer_rank1.pt").exists()  # sharded Adam
    # Adam's first step is ~lr * g / |g|: an element whose gradient is rounding noise (summed in another order over
    # 2 ranks) can move by up to lr; allow lr / 10 there, 1e-6 elsewhere (test_grpo's two-process test)
    diff = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
    assert diff.max() < 1e-4 and (diff > 1e-6).float().mean() < 1e-4, (diff.max(), (diff > 1e-6).sum())
    assert r1["reward"] == pytest.approx(r2["reward"]) and r1["loss"] == pytest.approx(r2["loss"], rel=1e-4, abs=1e-6)
