"""
families.py: the model families lookagain runs and what differs between them, said once. model.py reads FAMILIES
(keyed by a checkpoint's config.json model_type); the rollout, the trainers and the tools never ask which family
they run: they read what model.load put on the policy (its image processor's patch factor, its chat header, whether
its cache is kept across tool turns).

    qwen2_5_vl    Qwen2.5-VL 3B/7B/32B/72B, the four methods' own
    qwen3_vl      Qwen3-VL 2B/4B/8B/32B (dense): 16 px patches merged 2x2 (32 px units), DeepStack vision features
    qwen3_vl_moe  Qwen3-VL 30B-A3B/235B-A22B: Qwen3-VL with mixture-of-experts MLPs
    qwen3_5       Qwen3.5 0.8B-27B: natively multimodal, 3 of 4 decoder layers linear attention (gated DeltaNet)
    qwen3_5_moe   Qwen3.5 35B-A3B/122B-A10B/397B-A17B: Qwen3.5 with mixture-of-experts MLPs

Where they agree it is said here too: the special tokens have the same names in all (looked up by name, never by id);
the chat layout of a system, user and tool-response turn and of a JSON tool call is Qwen2.5's in all three chat
templates (Qwen3.5's own template writes tool calls as XML: lookagain keeps the JSON call its system prompt asks for);
an image's M-RoPE positions follow one rule (Qwen3-VL's rope index differs from Qwen2.5-VL's only for video).
"""
import transformers as tf

# Qwen2-VL's image normalisation (OpenAI CLIP's), kept by Qwen2.5-VL; Qwen3-VL and Qwen3.5 use 0.5
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _rope(theta, section, **kw):
    # M-RoPE is the default rotary embedding with its head_dim / 2 frequencies split into (t, h, w) sections
    return dict(rope_type="default", rope_theta=theta, mrope_section=section, **kw)


# a random model of each family at toy width (model.tiny_config; --model tiny is Qwen2.5-VL's): ~2-3M parameters,
# most of them the embedding. head_dim 32; M-RoPE's 16 frequencies split as each family splits its own.
# The merger projects the ViT's 2x2 merged tokens to the decoder's width (out_hidden_size = hidden_size, 192).
# 6 query heads share 2 K/V heads (grouped-query attention, 3 per K/V head: the "3x" of model.grouped_sdpa).
_TINY_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, spatial_merge_size=2,
                    temporal_patch_size=2, out_hidden_size=192)
_TINY_TEXT = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=8192)
# Qwen3-VL: the published 48 x 48 = 2304 learned position embeddings of its ViT, and DeepStack taking features from
# both tiny blocks (the 8B: blocks 8, 16, 24) into the decoder's first layers; M-RoPE [6, 5, 5] as the 8B's [24, 20, 20]
_QWEN3_VL = dict(vision=dict(_TINY_VISION, patch_size=16, num_position_embeddings=2304,
                             deepstack_visual_indexes=[0, 1]),
                 text=dict(_TINY_TEXT, head_dim=32, rope_parameters=_rope(5e6, [6, 5, 5], mrope_interleaved=True)))
# Qwen3.5: of the 4 layers, 3 gated DeltaNet (linear attention) and the 4th full attention, as its default layer_types;
# 2 value heads per key head as the 9B's 32 / 16; rotary on a quarter of head_dim 64: 8 frequencies, [3, 3, 2] as the
# 9B's [11, 11, 10]
_QWEN3_5 = dict(vision=dict(_TINY_VISION, patch_size=16, num_position_embeddings=2304),
                text=dict(_TINY_TEXT, num_attention_heads=2, num_key_value_heads=1, head_dim=64, linear_num_key_heads=2,
                          linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
                          rope_parameters=_rope(1e7, [3, 3, 2], mrope_interleaved=True, partial_rotary_factor=0.25)))
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)  # (the 30B-A3B: 128 experts, 8 a token)

# cls: the transformers model; patch: the vision patch (x 2x2 merge = the resize factor) and mean/std: the image
# processor of a model built here (a folder brings its own); header: the assistant turn's opening, the chat
# template's generation prompt (Qwen3.5's opens a <think> block); kv_turns: the rollout keeps each row's cache across
# its tool turns (Qwen3.5's linear-attention state cannot take the padding that stacking rows' caches puts between a
# row's cached past and its new tokens: such a family prefills each turn whole; see docs/models.md); published:
# model.save writes the published folder layout (config, preprocessor) that transformers 4.5x and vLLM read, else
# transformers' own; max_length: the published tokenizer's model_max_length; tiny: a toy model's fields.
FAMILIES = {
    # tiny's ViT: windows of 112 px (8 patches of 14, the published window_size) with block 1 of 2 full attention (the
    # 3B: every 8th); its decoder's M-RoPE [4, 6, 6] as the 3B's [16, 24, 24]
    "qwen2_5_vl": dict(cls=tf.Qwen2_5_VLForConditionalGeneration, config=tf.Qwen2_5_VLConfig, patch=14, mean=CLIP_MEAN,
                       std=CLIP_STD, header="<|im_start|>assistant\n", kv_turns=True, published=True, max_length=131072,
                       default_system="You are a helpful assistant.",
                       tiny=dict(vision=dict(_TINY_VISION, patch_size=14, window_size=112, fullatt_block_indexes=[1]),
                                 text=dict(_TINY_TEXT, rope_parameters=_rope(10000.0, [4, 6, 6])))),
    "qwen3_vl": dict(cls=tf.Qwen3VLForConditionalGeneration, config=tf.Qwen3VLConfig, patch=16, mean=[0.5] * 3,
                     std=[0.5] * 3, header="<|im_start|>assistant\n", kv_turns=True, published=True, max_length=262144,
                     tiny=_QWEN3_VL),
    # published=False: the published MoE expert tensor layout was not at hand (docs/models.md)
    "qwen3_vl_moe": dict(cls=tf.Qwen3VLMoeForConditionalGeneration, config=tf.Qwen3VLMoeConfig, patch=16,
                         mean=[0.5] * 3, std=[0.5] * 3, header="<|im_start|>assistant\n", kv_turns=True,
                         published=False, max_length=262144,
                         tiny=dict(_QWEN3_VL, text=dict(_QWEN3_VL["text"], **_MOE))),
    "qwen3_5": dict(cls=tf.Qwen3_5ForConditionalGeneration, config=tf.Qwen3_5Config, patch=16, mean=[0.5] * 3,
                    std=[0.5] * 3, header="<|im_start|>assistant\n<think>\n", kv_turns=False, published=False,
                    max_length=262144, tiny=_QWEN3_5),
    "qwen3_5_moe": dict(cls=tf.Qwen3_5MoeForConditionalGeneration, config=tf.Qwen3_5MoeConfig, patch=16,
                        mean=[0.5] * 3, std=[0.5] * 3, header="<|im_start|>assistant\n<think>\n", kv_turns=False,
                        published=False, max_length=262144,
                        tiny=dict(_QWEN3_5, text=dict(_QWEN3_5["text"], shared_expert_intermediate_size=64, **_MOE))),
}
for _name, _fam in FAMILIES.items():
    _fam["name"] = _name  # a family carries its own key: model.save and published_files branch on it
    _fam.setdefault("default_system", None)  # Qwen3-VL's and Qwen3.5's chat templates write no system turn of their own

# -----------------------------------------------------------------------------
# the published widths: --model random-*: a model of these widths and depth with random weights and the tiny
# tokenizer, built here, so that speed and memory can be measured at the real size with nothing to download

# Qwen/Qwen2.5-VL-3B-Instruct's config.json
QWEN25_VL_3B = dict(
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, window_size=112,
                fullatt_block_indexes=[7, 15, 23, 31]),
    text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
              num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
              rope_parameters=_rope(1e6, [16, 24, 24])))
# Qwen/Qwen3-VL-8B-Instruct's config.json (as copied in NVIDIA TensorRT-LLM's Qwen3-VL test and a Swift test of
# HiDream-O1, both with the published transformers 4.57 layout): untied output layer
_QWEN3_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, num_position_embeddings=2304)
QWEN3_VL_8B = dict(
    family="qwen3_vl", tie=False,
    vision=dict(_QWEN3_VISION, out_hidden_size=4096, deepstack_visual_indexes=[8, 16, 24]),
    text=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
              num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
              rms_norm_eps=1e-6,
              rope_parameters=_rope(5e6, [24, 20, 20], mrope_interleaved=True)))
# Qwen/Qwen3-VL-30B-A3B-Instruct's config.json (as copied in a Rust port's test of it): 128 experts, 8 a token
QWEN3_VL_30B_A3B = dict(
    family="qwen3_vl_moe", tie=False, vision=dict(QWEN3_VL_8B["vision"], out_hidden_size=2048),
    text=dict(QWEN3_VL_8B["text"], hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
              num_key_value_heads=4, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
              decoder_sparse_step=1, mlp_only_layers=[]))
# Qwen/Qwen3.5-9B (transformers' Qwen3.5 config docstrings and public ports of it): 32 layers, every 4th full attention
QWEN3_5_9B = dict(
    family="qwen3_5", tie=False, vision=dict(_QWEN3_VISION, out_hidden_size=4096),
    text=dict(vocab_size=248320, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
              num_attention_heads=16, num_key_value_heads=4, head_dim=256, linear_num_key_heads=16,
              linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
              max_position_embeddings=262144, rms_norm_eps=1e-6,
              rope_parameters=_rope(1e7, [11, 11, 10], mrope_interleaved=True, partial_rotary_factor=0.25)))


# -----------------------------------------------------------------------------
# the published folder layout of a family (model.save): config.json and preprocessor_config.json


def published_files(family, model, tok, improc):
    """-> {file name: fields} as Qwen publishes them for this family (transformers 5 writes its own layout)."""
    c, t, v = model.config, model.config.text_config, model.config.vision_config
    if family["name"] == "qwen2_5_vl":  # Qwen/Qwen2.5-VL-3B-Instruct's, in its order
        # in_chans and spatial_patch_size: Qwen2-VL's names, still in the published file, from transformers' fields
        vision = {k: getattr(v, {"in_chans": "in_channels", "spatial_patch_size": "patch_size"}.get(k, k)) for k in (
            "depth", "hidden_act", "hidden_size", "intermediate_size", "num_heads", "in_chans", "out_hidden_size",
            "patch_size", "spatial_merge_size", "spatial_patch_size", "window_size", "fullatt_block_indexes",
            "tokens_per_second", "temporal_patch_size")}
        config = {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": t.attention_dropout,
            "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
            "vision_start_token_id": c.vision_start_token_id, "vision_end_token_id": c.vision_end_token_id,
            "vision_token_id": tok.convert_tokens_to_ids("<|vision_pad|>"),
            "image_token_id": c.image_token_id, "video_token_id": c.video_token_id,
            **{k: getattr(t, k) for k in ("hidden_act", "hidden_size", "initializer_range", "intermediate_size",
                                          "max_position_embeddings", "max_window_layers")}, "model_type": "qwen2_5_vl",
            **{k: getattr(t, k) for k in ("num_attention_heads", "num_hidden_layers", "num_key_value_heads",
                                          "rms_norm_eps")},
            "rope_theta": t.rope_parameters["rope_theta"], "sliding_window": t.sliding_window or 32768,  # (not used)
            "tie_word_embeddings": c.tie_word_embeddings, "torch_dtype": "bfloat16",  # what model.save writes
            "transformers_version": tf.__version__, "use_cache": True, "use_sliding_window": False,
            "vision_config": vision,
            # where 4.5x and vLLM read M-RoPE's sections (transformers 5 keeps them in rope_parameters)
            "rope_scaling": {"type": "mrope", "mrope_section": t.rope_parameters["mrope_section"]},
            "vocab_size": t.vocab_size}
        # 4.5x reads min/max_pixels, not `size`
        pre = {"min_pixels": improc.size["shortest_edge"], "max_pixels": improc.size["longest_edge"]}
        kind = ("Qwen2VLImageProcessor", "Qwen2_5_VLProcessor")
    else:  # Qwen/Qwen3-VL-4B-Instruct's and -8B-Instruct's (transformers 4.57): keys sorted, text and vision nested
        text = {k: getattr(t, k) for k in ("attention_bias", "attention_dropout", "bos_token_id")}
        text |= {"dtype": "bfloat16", "eos_token_id": t.eos_token_id}
        text |= {k: getattr(t, k) for k in ("head_dim", "hidden_act", "hidden_size", "initializer_range",
                                            "intermediate_size", "max_position_embeddings")}
        text |= {"model_type": "qwen3_vl_text"} | {k: getattr(t, k) for k in (
            "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "rms_norm_eps")}
        rope = t.rope_parameters
        # M-RoPE in rope_scaling here too; interleaved: the t, h, w frequencies alternate rather than sit in blocks
        text |= {"rope_scaling": {"mrope_interleaved": True, "mrope_section": rope["mrope_section"],
                                  "rope_type": "default"},
                 "rope_theta": rope["rope_theta"], "tie_word_embeddings": c.tie_word_embeddings, "use_cache": True,
                 "vocab_size": t.vocab_size}
        vision = {k: getattr(v, k) for k in ("deepstack_visual_indexes", "depth", "hidden_act", "hidden_size",
                                             "in_channels", "initializer_range", "intermediate_size")}
        vision |= {"model_type": "qwen3_vl"} | {k: getattr(v, k) for k in (
            "num_heads", "num_position_embeddings", "out_hidden_size", "patch_size", "spatial_merge_size",
            "temporal_patch_size")}
        config = {"architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": c.image_token_id,
                  "model_type": "qwen3_vl", "text_config": text, "tie_word_embeddings": c.tie_word_embeddings,
                  "transformers_version": tf.__version__, "video_token_id": c.video_token_id, "vision_config": vision,
                  "vision_end_token_id": c.vision_end_token_id, "vision_start_token_id": c.vision_start_token_id}
        pre = {"size": {"longest_edge": improc.size["longest_edge"], "shortest_edge": improc.size["shortest_edge"]}}
        kind = ("Qwen2VLImageProcessorFast", "Qwen3VLProcessor")
    pre |= {k: getattr(improc, k) for k in ("patch_size", "temporal_patch_size", "merge_size")}
    pre |= {"image_mean": list(improc.image_mean), "image_std": list(improc.image_std)}
    pre |= ({"image_processor_type": kind[0], "processor_class": kind[1]} if family["name"] == "qwen2_5_vl" else
            {"processor_class": kind[1], "image_processor_type": kind[0]})  # each in its published order
    return {"config.json": config, "preprocessor_config.json": pre}
