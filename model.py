"""
model.py: the policy. Loading a Qwen2.5-VL, Qwen3-VL or Qwen3.5 (families.py: what differs between them) and
saving it in the published layout, turning episodes into model inputs, batched sampling of the next assistant
turn, and per-token log-probs of sampled tokens (through kernel.py's fused kernel).

    policy = common.load_policy("tiny")                 # random ~2M-param Qwen2.5-VL, built locally
    policy = common.load_policy("Qwen/Qwen2.5-VL-3B-Instruct")   # or Qwen/Qwen3-VL-8B-Instruct, a local folder,
                                                                 # a lookagain checkpoint

A sequence, everywhere in lookagain, is the token ids of one whole conversation, each image inline as
`<|vision_start|>` + n x `<|image_pad|>` + `<|vision_end|>` (n = grid_t*grid_h*grid_w / merge^2), with a
parallel list of the encoded images (pixel patches + grid). Sampled ids go in as sampled, never re-tokenised.
"""
import json
import os
import shutil
from collections import Counter
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AttentionInterface, AutoTokenizer, DynamicCache, PreTrainedTokenizerFast,
                          Qwen2VLImageProcessorPil)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from families import FAMILIES, QWEN3_5_9B, QWEN3_VL_8B, QWEN3_VL_30B_A3B, QWEN25_VL_3B, published_files
from kernel import fused_logprobs

# Qwen2.5's special tokens, in Qwen's order. The tiny tokenizer carries them too so that every code path
# (chat layout, image placeholders, stop tokens) is the same for `tiny` and for the real models.
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
           "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
ADDED = ["<tool_call>", "</tool_call>"]  # added (not special) tokens in Qwen2.5, as here
# tiny only: the reasoning tags as single tokens make the tiny model's job (and its sequences) shorter
TINY_ADDED = ["<think>", "</think>", "<answer>", "</answer>", "<tool_response>", "</tool_response>"]

# -----------------------------------------------------------------------------
# loading


def tiny_tokenizer(corpus, vocab_size=2048):
    """A byte-level BPE tokenizer (any unicode string round-trips) with Qwen's special tokens, trained
    deterministically on `corpus` (common.tiny_corpus: the environment's own text, so sequences stay short)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # all 256 byte symbols in the base vocabulary, so a character the corpus never had still encodes (as bytes)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    # eos and pad as in Qwen2.5-VL-*-Instruct's tokenizer_config.json
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})  # after the BPE ids, as Qwen's (151643 on)
    tok.add_tokens(ADDED + TINY_ADDED)  # never split; kept by decode(skip_special_tokens=True)
    return tok


def tiny_config(tok, vision=None, text=None, family="qwen2_5_vl", tie=True):
    """A model of `family` with its real architecture (Qwen2.5-VL: windowed ViT, 2x2 patch merger, M-RoPE decoder)
    at toy width (families.py: ~2.5M parameters, most of them the embedding). vision, text: fields to override
    (the published widths: RANDOM); tie: the output layer is the input embedding."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    base = FAMILIES[family]["tiny"]
    # token ids by name (the tiny vocabulary numbers them differently); bos and eos as Qwen2.5-VL's config.json
    return FAMILIES[family]["config"](
        vision_config=dict(base["vision"], **(vision or {})),
        text_config={**base["text"], "vocab_size": len(tok), "bos_token_id": ids["<|endoftext|>"],
                     "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"], **(text or {})},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie)


QWEN_MIN_PIXELS = 56 * 56  # Qwen2-VL's smallest image: 2 x 2 merged tokens of 28 x 28 px

# the models built here, random weights and the tiny tokenizer: name -> tiny_config's overrides (family, widths).
# random-*: the published widths and depth (families.py), for speed and memory at the real size, nothing downloaded.
RANDOM = {"tiny": None, "random-3b": QWEN25_VL_3B, "random-qwen3vl-8b": QWEN3_VL_8B,
          "random-qwen3vl-30b-a3b": QWEN3_VL_30B_A3B, "random-qwen3.5-9b": QWEN3_5_9B}


def resolve(name):
    """--model -> the folder to load: None for a model built here (RANDOM), a local folder as it is, else a hub id
    (hub_snapshot)."""
    if name in RANDOM or os.path.isdir(name):
        return None if name in RANDOM else name
    # config, weights, tokenizer (vocab.json, merges.txt) and chat template: no .bin or .pth copies of the weights
    return hub_snapshot(name, f"--model {name}: not {' or '.join(RANDOM)}, no such folder",
                        patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"])


def hub_snapshot(name, said, repo_type="model", patterns=None, error=SystemExit):
    """A hub id -> its snapshot folder: the Hugging Face cache (offline) first, else downloaded (`patterns` of it)
    unless HF_HUB_OFFLINE is set. Anything else: `error` with one line, `said` (what `name` is not) and why."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError
    try:
        return snapshot_download(name, repo_type=repo_type, local_files_only=True)  # the cache only, never the network
    except HFValidationError:
        raise error(f"{said}, and not a hub id (org/name)") from None
    except OSError:  # not in the cache; the message below if it cannot be downloaded either
        why = f"HF_HUB_OFFLINE is set; cache {constants.HF_HUB_CACHE}"
    if not constants.HF_HUB_OFFLINE:
        try:
            return snapshot_download(name, repo_type=repo_type, allow_patterns=patterns)
        except OSError as e:
            why = f"and cannot be downloaded: {type(e).__name__}"
    raise error(f"{said}, and not in the Hugging Face cache ({why})")


def image_processor(folder, family):
    """The family's image processor (Qwen2-VL's, with the family's patch), with its pixel budget for one image: a
    folder's (Qwen2.5-VL's is 3136 to 12845056 px, Qwen3-VL's 65536 to 16777216), or for a model built here (folder
    None) 2 x 2 to 4 x 4 merged tokens (Qwen2.5-VL: 56 x 56 to 112 x 112 px; Qwen3-VL: 64 x 64 to 128 x 128)."""
    if folder is None:
        f = 2 * family["patch"]  # the resize factor: a merged token is 2 x 2 patches
        return Qwen2VLImageProcessorPil(patch_size=family["patch"], min_pixels=(2 * f) ** 2, max_pixels=(4 * f) ** 2,
                                        image_mean=family["mean"], image_std=family["std"])
    return Qwen2VLImageProcessorPil.from_pretrained(folder)


def family_of(name, folder, arch=None):
    """--model's family (families.py): a model built here, its overrides' (arch, else RANDOM's); a folder, its
    config.json's model_type (one line saying why if that is not a family here)."""
    if folder is None:
        return FAMILIES[(arch or RANDOM[name] or {}).get("family", "qwen2_5_vl")]
    try:
        kind = json.load(open(os.path.join(folder, "config.json"))).get("model_type")
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model {name}: no readable config.json ({type(e).__name__})") from None
    if kind not in FAMILIES:
        raise SystemExit(f"--model {name}: model_type {kind!r} is not a family lookagain runs ({', '.join(FAMILIES)})")
    return FAMILIES[kind]


SDPA = AttentionInterface()["sdpa"]  # transformers' own, kept for every other case


def grouped_sdpa(module, q, k, v, attention_mask, **kw):
    """transformers' sdpa attention, except in a forward without gradients on CPU with a mask (sampling a
    padded batch, old log-probs): transformers then copies K and V heads / kv_heads times (3x in tiny, 8x in
    the 3B), while torch's CPU kernel takes them grouped and gives the same values. Training keeps
    transformers' path (the grouped backward sums its gradients in another order).
    q [B, heads, Lq, D]; k, v [B, kv_heads, Lk, D]; mask [B, 1, Lq, Lk]."""
    if torch.is_grad_enabled() or q.device.type != "cpu" or attention_mask is None:
        return SDPA(module, q, k, v, attention_mask, **kw)
    # the mask holds causality and padding (transformers passes is_causal only without one); no dropout: Qwen's
    # attention_dropout is 0
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=kw.get("scaling"), enable_gqa=True)
    return o.transpose(1, 2).contiguous(), None  # [B, Lq, heads, D], as transformers' attention functions return


AttentionInterface.register("grouped_sdpa", grouped_sdpa)
# transformers builds the mask by the implementation's name: sdpa's, so grouped_sdpa gets the same [B, 1, Lq, Lk]
AttentionMaskInterface.register("grouped_sdpa", sdpa_mask)


def load(name="tiny", seed=0, device=None, dtype=None, grad_ckpt=False, freeze_vision=False, train=False,
         corpus=None, arch=None):
    """-> policy: a namespace with .model .tok .improc .device and the special token ids. name: a model built
    here (RANDOM: "tiny", same seed -> same weights, its tokenizer trained on `corpus`; "random-*", drawn on
    `device`), a hub id, or a local folder (a lookagain checkpoint is a Hugging Face folder). arch: tiny_config's
    overrides (bench.py --layers). On GPU: bf16 weights for inference; for training fp32 master weights under
    bf16 autocast (an update of lr 1e-6 is far below bf16's 2^-8 resolution). fp32 on CPU unless `dtype` says."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = device.type == "cuda" and train and dtype is None  # fp32 weights, bf16 matmuls (forward below)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" and not train else torch.float32)
    folder = resolve(name)
    family = family_of(name, folder, arch)
    improc = image_processor(folder, family)
    if folder is None:
        if not corpus:
            raise ValueError("the tiny model's tokenizer needs a corpus: load it with common.load_policy")
        tok = tiny_tokenizer(corpus)
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)  # random-* on a GPU draw from its generator
        arch = arch or RANDOM[name]
        # tiny: drawn on the CPU, the same weights on every device; random-*: where they run (an 8B is 35 GB in fp32)
        with torch.device(device if arch else "cpu"):
            model = family["cls"](tiny_config(tok, **(arch or {})))
    else:
        tok = AutoTokenizer.from_pretrained(folder)
        model = family["cls"].from_pretrained(folder, dtype=dtype)  # read in its dtype: no fp32 copy for bf16
    model.set_attn_implementation("grouped_sdpa")  # (the vision tower passes no mask: transformers' sdpa there)
    model.to(device=device, dtype=dtype)
    if grad_ckpt:
        # non-reentrant, PyTorch's advice: the reentrant variant gives no parameter gradients to a block whose
        # inputs need none
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # a training forward keeps no KV cache (sample() asks for one explicitly)
    if freeze_vision:  # the ViT and its merger (VLM-R3's RL and SFT, ViLaSR's SFT: recipes.py)
        model.model.visual.requires_grad_(False)
    # the final norm's output is the last hidden state [B, L, H]; forward() reads it from here, so that the model
    # itself projects only the last position (logits_to_keep=1) and token_logprobs projects the trained ones
    captured = {}
    model.model.language_model.norm.register_forward_hook(lambda mod, inp, out: captured.__setitem__("h", out))
    sid = tok.convert_tokens_to_ids
    return SimpleNamespace(
        name=name, folder=folder, model=model, tok=tok, improc=improc, device=device, amp=amp, captured=captured,
        family=family["name"], header=family["header"], kv_turns=family["kv_turns"], published=family["published"],
        factor=improc.patch_size * improc.merge_size,  # the tools' resize unit: a merged token's side in pixels
        sharded=False, stats=Counter(),  # sample()'s work: prefill_tokens, decode_rows (rows x decode steps)
        # a toy model (the tiny demo) gets the compact system prompt: see tools.system_prompt
        toy=sum(p.numel() for p in model.parameters()) < 50e6,
        merge=model.config.vision_config.spatial_merge_size,
        image_pad=sid("<|image_pad|>"), vision_start=sid("<|vision_start|>"), vision_end=sid("<|vision_end|>"),
        pad=tok.pad_token_id if tok.pad_token_id is not None else sid("<|endoftext|>"),
        # a turn ends at <|im_end|> (Qwen's end of turn) or <|endoftext|>
        eos=[sid("<|im_end|>"), sid("<|endoftext|>")],
        # Qwen2.5-VL's chat template writes this system turn when a conversation has none (_chunks)
        default_system=family["default_system"],
        # vision placeholders the policy must never write: an <|image_pad|> with no image behind it would
        # break the next forward. Sampling one ends the turn (reason "invalid") without keeping it.
        forbidden={sid(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                                    "<|video_pad|>")})


# checkpoints, in the layout of the published folder (Qwen/Qwen2.5-VL-3B-Instruct's, Qwen/Qwen3-VL-8B-Instruct's:
# families.published_files): transformers 5 writes its own (a nested text_config without rope_scaling, a list of
# extra_special_tokens, the pixel budget as `size`), which transformers 4.5x and the vLLM releases on it misread (no
# M-RoPE section, a random untied output layer, a tokenizer error, a default pixel budget); the published fields are
# read by both. A family without a published layout here (families.py: published=False) is saved in transformers'.


def save(policy, path, state_dict=None):
    """A Hugging Face folder that transformers 4.5x and 5.x, vLLM and load() read: the weights of `state_dict`
    (default: the policy's) in bf16 with the published tensor names, and the published config, generation,
    tokenizer and preprocessor fields."""
    os.makedirs(path, exist_ok=True)
    model, tok, improc = policy.model, policy.tok, policy.improc
    c, t = model.config, model.config.text_config
    sd = model.state_dict() if state_dict is None else state_dict
    # bf16 on the CPU (fp32 master weights halved); a tied output layer is the input embedding: written once
    model.save_pretrained(path, state_dict={k: w.detach().to("cpu", torch.bfloat16) for k, w in sd.items()
                                            if not (c.tie_word_embeddings and k == "lm_head.weight")})
    tok.save_pretrained(path)  # tokenizer.json (and the chat template, if any); its config is rewritten below
    # lookagain's stop tokens, and no sampling defaults (vLLM would adopt Qwen's temperature 1e-6)
    files = {"generation_config.json": {"bos_token_id": t.bos_token_id, "pad_token_id": policy.pad,
                                        "eos_token_id": policy.eos, "transformers_version": transformers.__version__}}
    if policy.published:
        cls = json.load(open(os.path.join(path, "tokenizer_config.json")))["tokenizer_class"]
        added = sorted(tok.added_tokens_decoder.items())  # (id, AddedToken), by id as Qwen lists them
        files |= published_files(FAMILIES[policy.family], model, tok, improc)
        files["tokenizer_config.json"] = {
            "add_prefix_space": False,
            "added_tokens_decoder": {str(i): {k: getattr(a, k) for k in ("content", "lstrip", "normalized", "rstrip",
                                                                        "single_word", "special")} for i, a in added},
            # the list 4.5x reads (5.x's list-valued extra_special_tokens breaks it); Qwen's leaves <|endoftext|> out
            "additional_special_tokens": [a.content for _, a in added if a.special and a.content != "<|endoftext|>"],
            "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": tok.eos_token, "errors": "replace",
            # (the tiny tokenizer's is transformers' "unlimited" 1e30: the published value instead)
            "model_max_length": min(tok.model_max_length, FAMILIES[policy.family]["max_length"]),
            "pad_token": tok.pad_token, "split_special_tokens": False,
            # TokenizersBackend is transformers 5's name, which 4.5x cannot import
            "tokenizer_class": "PreTrainedTokenizerFast" if cls == "TokenizersBackend" else cls, "unk_token": None}
    else:
        improc.save_pretrained(path)
    for name, obj in files.items():  # over what save_pretrained wrote
        with open(os.path.join(path, name), "w") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
    if policy.folder and not os.path.samefile(policy.folder, path):  # the rest of a published folder, as loaded
        for f in ("vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja",
                  "video_preprocessor_config.json"):
            if os.path.isfile(os.path.join(policy.folder, f)):
                shutil.copy(os.path.join(policy.folder, f), path)

# -----------------------------------------------------------------------------
# the chat layout (Qwen2.5's, kept by Qwen3-VL's and Qwen3.5's templates; the family gives the assistant header):
# one prompt builder for sampling, SFT and evaluation


def ids(policy, text):
    return policy.tok.encode(text, add_special_tokens=False)  # the layout writes its special tokens itself


def encode_image(policy, img):
    """PIL image (already sized to multiples of policy.factor by tools.py: 28 px, 32 for Qwen3-VL and Qwen3.5) ->
    dict(pixels [n_patches, 3*2*p*p], grid [3] = (t, h, w) in p px patches (p = 14, or 16), n = number of
    <|image_pad|> tokens = t*h*w / merge^2)."""
    # no resize: tools.py chose the size, the frame the model's coordinates are read in; t = 1 (one frame, repeated
    # to the temporal patch of 2)
    out = policy.improc(images=[img], do_resize=False, return_tensors="pt")
    grid = out["image_grid_thw"][0]
    return dict(pixels=out["pixel_values"], grid=grid, n=int(grid.prod()) // policy.merge ** 2)


def image_ids(policy, enc):
    return [policy.vision_start] + [policy.image_pad] * enc["n"] + [policy.vision_end]


# A conversation is a list of messages, each dict(role, parts, closed). A part is text the harness wrote (str), an
# image (int: its index in the episode's images), or what the policy sampled (dict(ids, logps): kept as sampled, never
# re-tokenised). role None: parts written before any header (VL-Rethinker puts its image before the system turn). An
# open last message (closed False) is where sampling goes on. dialects.py decides the messages of each format; this
# is how the model's family lays them out (Qwen's ChatML: <|im_start|>role\n ... <|im_end|>\n).


def _chunks(policy, messages, trained_text=False):
    """The conversation in order, as ("text", str, trained), ("image", k) and ("sampled", part). Without a system
    message first, Qwen2.5-VL's chat template writes its default one (policy.default_system; Qwen3-VL's writes
    none), and so does this. A closed message ends in <|im_end|> (unless the policy sampled it) and, when another
    message follows, "\n". trained: the harness text inside an assistant message and its closing <|im_end|> (VLM-R3
    trains them), with trained_text."""
    first = next((m for m in messages if m["role"]), None)  # parts before any header stay before the default turn
    for i, m in enumerate(messages):
        train = trained_text and m["role"] == "assistant"
        if m is first and m["role"] != "system" and policy.default_system is not None:
            yield "text", f"<|im_start|>system\n{policy.default_system}<|im_end|>\n", False
        if m["role"]:  # (an assistant turn opens as the family's chat template opens it: Qwen3.5's with <think>)
            yield "text", policy.header if m["role"] == "assistant" else f"<|im_start|>{m['role']}\n", False
        for p in m["parts"]:
            if isinstance(p, str):
                yield "text", p, train
            else:
                yield ("image", p) if isinstance(p, int) else ("sampled", p)
        if m["closed"] and m["role"]:
            last = m["parts"][-1] if m["parts"] else None
            if not (isinstance(last, dict) and last["ids"] and last["ids"][-1] in policy.eos):  # not sampled
                yield "text", "<|im_end|>", train
            if i + 1 < len(messages):  # (nothing after the last <|im_end|>: a sampled turn ends there)
                yield "text", "\n", False


def render(policy, messages, images, trained_text=False, trained_eos=True):
    """A conversation -> (ids, mask, logps), one value each per token. images: the encoded images (each image part
    becomes <|vision_start|> + n x <|image_pad|> + <|vision_end|>). Harness text is tokenised in maximal runs, as a
    chat template's output is (BPE merges across the pieces of a run), so a prompt equals the processor's token for
    token. mask: 1 on sampled tokens (and trained harness text), 0 elsewhere, and 0 on a sampled end-of-turn token
    without trained_eos (ViLaSR's RL mask); logps: the sampler's, 0 elsewhere."""
    ids_, mask, logps, run = [], [], [], ["", False]  # run: harness text not yet tokenised, and whether it is trained

    def flush():  # a run ends at an image, a sampled part or a change of `trained`: BPE merges never cross those
        if run[0]:
            t = ids(policy, run[0])
            ids_.extend(t), mask.extend([int(run[1])] * len(t)), logps.extend([0.0] * len(t))
        run[:] = ["", False]
    for kind, *x in _chunks(policy, messages, trained_text):
        if kind == "text":
            if x[1] != run[1]:
                flush()
            run[0], run[1] = run[0] + x[0], x[1]
            continue
        flush()
        if kind == "image":
            t = image_ids(policy, images[x[0]])
            ids_.extend(t), mask.extend([0] * len(t)), logps.extend([0.0] * len(t))
        else:
            ids_.extend(x[0]["ids"]), logps.extend(x[0]["logps"])
            mask.extend([int(trained_eos or t not in policy.eos) for t in x[0]["ids"]])
    flush()
    return ids_, mask, logps


def chat_text(policy, messages):
    """The conversation as text, one <|image_pad|> per image (before the processor expands it): what a chat template
    prints, for a user to check a format against a released harness's own prompt (eval.py --print-prompt)."""
    out = []
    for kind, *x in _chunks(policy, messages):
        out.append(x[0] if kind == "text" else "<|vision_start|><|image_pad|><|vision_end|>" if kind == "image"
                   else policy.tok.decode(x[0]["ids"], skip_special_tokens=False))
    return "".join(out)


# -----------------------------------------------------------------------------
# batching: sequences -> model inputs


def mrope_positions(seq, grids, policy, start=0):
    """Qwen2.5-VL's 3-D rotary positions (t, h, w) for one sequence: text tokens count up by one on all three
    axes; an image's tokens sit on a grid (t0, h0 + row, w0 + col) from the running position, and the text
    after it resumes at max(position) + 1. seq: [L] ids, grids: [n_images, 3]; start: the first token's
    position (after what is cached). -> [3, L] long."""
    seq = torch.as_tensor(seq)
    pos = torch.empty(3, len(seq), dtype=torch.long)
    is_img = (seq == policy.image_pad).tolist()
    i, nxt, k = 0, start, 0
    while i < len(seq):
        # invariant: nxt is the position the next token gets, k the index of the next image's grid
        if not is_img[i]:  # a run of text tokens counts up by one (filled at once: one fill a token was ~5% of SFT)
            j = next((j for j in range(i, len(seq)) if is_img[j]), len(seq))
            pos[:, i:j] = torch.arange(nxt, nxt + j - i)
            nxt, i = nxt + j - i, j
            continue
        t, h, w = (int(g) for g in grids[k])
        h, w = h // policy.merge, w // policy.merge  # the grid counts patches; a token is merge x merge of them
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        pos[:, i:i + t * h * w] = torch.stack([tt, hh, ww]).reshape(3, -1) + nxt  # the t*h*w tokens, row-major
        # the text after it: the image's largest position + 1 (transformers' get_rope_index)
        nxt, i, k = nxt + max(t, h, w), i + t * h * w, k + 1
    return pos


def collate(policy, seqs, image_lists, starts=None):
    """Left-pad a batch. seqs: B lists of ids; image_lists: B lists of encoded images (in order of appearance);
    starts: B first positions (continuations; default 0). -> model inputs: input_ids, attention_mask [B, L];
    position_ids [3, B, L]; pixel_values [sum patches, D] and image_grid_thw [n_images, 3] concatenated row by
    row, so the model's split by grid.prod(-1) gives each image its own patches."""
    # left padding: every row's last token sits in column L - 1, so the last position's logits are each row's next
    # token, and what is sampled appends on the right of every row alike
    B, L = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((B, L), policy.pad, dtype=torch.long)
    attn = torch.zeros(B, L, dtype=torch.long)
    pos = torch.ones(3, B, L, dtype=torch.long)  # padding positions are never attended to
    pixels, grids = [], []
    for b, (s, imgs) in enumerate(zip(seqs, image_lists)):
        input_ids[b, L - len(s):] = torch.tensor(s)
        attn[b, L - len(s):] = 1
        g = torch.stack([e["grid"] for e in imgs]) if imgs else torch.zeros(0, 3, dtype=torch.long)
        pos[:, b, L - len(s):] = mrope_positions(s, g, policy, starts[b] if starts else 0)
        # rows in order, images in order within a row: the order of the <|image_pad|> runs in input_ids, which the
        # model fills with the image features one after the other
        pixels += [e["pixels"] for e in imgs]
        grids += [e["grid"] for e in imgs]
    d = policy.device
    batch = dict(input_ids=input_ids.to(d), attention_mask=attn.to(d), position_ids=pos.to(d))
    if pixels:
        # under autocast the patch embedding's conv computes in bf16 anyway: the same values, half the bytes
        batch["pixel_values"] = torch.cat(pixels).to(d, torch.bfloat16 if policy.amp else policy.model.dtype)
        batch["image_grid_thw"] = torch.stack(grids).to(d)
    return batch


def forward(policy, batch, past=None, use_cache=False):
    """One pass through the whole model (so that FSDP's hooks gather the parameters), keeping only the
    last position's logits. -> hidden [B, L, H] (the decoder's output, captured at its final norm),
    the KV cache, and the last logits [B, V] (float32)."""
    with torch.autocast(policy.device.type, dtype=torch.bfloat16, enabled=policy.amp):
        # logits_to_keep=1: the output layer on the last position only, [B, 1, V], never [B, L, V]
        out = policy.model(**batch, past_key_values=past, use_cache=use_cache, logits_to_keep=1)
    # pop: the dict keeps no [B, L, H] hidden state alive between calls
    return policy.captured.pop("h"), out.past_key_values, out.logits[:, -1].float()  # fp32: draw's log_softmax


def shard(policy):
    """FSDP2: each decoder layer its own unit, gathered only while it runs; the rest (embeddings, vision tower,
    output layer) the root unit. For a 7B model, whose fp32 weights + Adam states (~130 GB) fit no GPU."""
    from torch.distributed.fsdp import fully_shard
    for layer in policy.model.model.language_model.layers:
        fully_shard(layer)
    fully_shard(policy.model)  # last: the root takes what the layers' units did not
    policy.sharded = True


def lockstep(policy):
    """Sharded ranks must run the same number of forward passes, whatever their own batches need."""
    return policy.sharded and dist.is_initialized()


def any_rank(flag, policy):
    t = torch.tensor([float(flag)], device=policy.device)  # on the model's device: NCCL reduces CUDA tensors only
    dist.all_reduce(t)  # the sum of 0/1 flags: > 0 when some rank has work
    return bool(t.item() > 0)


# -----------------------------------------------------------------------------
# sampling the next assistant turn, for many episodes at once
#
# A row's KV cache outlives the call (tools.rollout keeps it across an episode's tool turns), so a call
# prefills only what is new in a row: the prompt at the first turn (once for identical rows: a GRPO group),
# then the last sampled token, the tool's observation and its image. Between calls a row's cache is its own
# unpadded tensors; a call stacks them right-aligned and forwards each row's new tokens on top, right-aligned
# too (the attention mask has zeros in the middle; M-RoPE positions go on from the row's own next position).
# A finished row leaves the batch at once. Stop strings are sought in a rolling tail of each row's text.


def draw(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, greedy=False, generators=None):
    """The next token of each row and its log-prob, log softmax(logits / temperature): what training
    recomputes (the filters shape what is drawn, not the log-prob, as in TRL). The filters, in the order of
    transformers' generate, after the temperature: top-k (0: off; ties with the k-th kept), top-p (the
    likeliest tokens whose mass reaches top_p, of what top-k left), min-p (0: off; tokens with at least
    min_p x the top probability). logits [B, V] float32; generators: one per row (or None: the global
    RNG). -> tokens [B], logps [B]"""
    lp = torch.log_softmax(logits / temperature, dim=-1)                  # [B, V]
    if greedy:
        tok = lp.argmax(-1)
    else:
        probs = lp.exp()
        drop = torch.zeros_like(probs, dtype=torch.bool)                  # [B, V] the tokens filtered out
        if top_k:
            drop |= lp < lp.topk(min(top_k, lp.shape[-1]), -1).values[:, -1:]  # below the k-th largest [B, 1]
        if top_p < 1.0:  # sorted ascending, drop the tokens whose cumulative mass stays within 1 - top_p
            sp, si = probs.masked_fill(drop, 0).sort(-1)
            low = (sp / sp.sum(-1, keepdim=True)).cumsum(-1) <= 1 - top_p  # mass renormalised over top-k's tokens
            low[:, -1] = False                                            # the top token always stays
            drop |= low.scatter(-1, si, low)                              # back to vocabulary order
        if min_p:
            p = probs.masked_fill(drop, 0)
            drop |= p < min_p * p.amax(-1, keepdim=True)  # a ratio to the top: no renormalisation needed
        # inverse CDF: one uniform u per row, from the row's own generator (its draws then do not depend on
        # the batch); the token is the first whose cumulative mass passes u x the row's kept mass (float64:
        # no rounding at a 152k vocabulary). A filtered token adds no mass, so it is never the first to pass.
        # (torch.multinomial per row draws V exponentials and syncs three times: ~9x slower at B = 64.)
        u = (torch.rand(len(probs), 1, device=probs.device) if generators is None else
             torch.cat([torch.rand(1, 1, generator=g, device=probs.device) for g in generators]))
        cdf = probs.masked_fill(drop, 0).double().cumsum(-1)              # [B, V]
        if not torch.isfinite(cdf[:, -1]).all():
            raise FloatingPointError("sampling: the model's probabilities are not finite (NaN or inf logits)")
        # right=True: the first cdf strictly above u x mass, never a zero-mass token that repeats its predecessor's
        # cdf; the clamp guards against u x mass rounding up to the total
        tok = torch.searchsorted(cdf, u.double() * cdf[:, -1:], right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)
    return tok, lp.gather(-1, tok[:, None]).squeeze(-1)


def _stack(caches, device):
    """Rows' caches ((n, next position, [(K, V) [heads, n, head_dim] per layer]), or None) -> one
    DynamicCache [B, heads, Lc, head_dim], each row right-aligned, and its attention mask [B, Lc]."""
    have = [c for c in caches if c]
    if not have:
        return None, None
    B, Lc = len(caches), max(c[0] for c in have)
    attn = torch.zeros(B, Lc, dtype=torch.long, device=device)
    # full-attention K/V only: a family whose layers keep another state (Qwen3.5) keeps no cache between calls
    layers = [tuple(t.new_zeros(B, t.shape[0], Lc, t.shape[2]) for t in kv) for kv in have[0][2]]
    for b, c in enumerate(caches):
        if c:  # right-aligned, so that the new tokens' columns follow every row's past alike; a new row: all zeros
            attn[b, Lc - c[0]:] = 1
            for (K, V), (k, v) in zip(layers, c[2]):
                K[b, :, Lc - c[0]:], V[b, :, Lc - c[0]:] = k, v
    return DynamicCache(ddp_cache_data=layers), attn  # transformers' constructor from [(K, V) per layer]


def _row_cache(past, attn, i, nxt):
    """Row i of a batch cache as its own tensors, padding dropped: (n, next position, [(K, V)])."""
    # the attended columns only: K already carries its rotary position, so the gaps are nothing but padding
    cols = attn[i].nonzero().squeeze(1)
    return len(cols), int(nxt[i]), [(layer.keys[i][:, cols], layer.values[i][:, cols]) for layer in past.layers]


def _keep_rows(past, attn, idx):
    """The batch rows idx (repeats allowed) of the cache, in place, and of its mask, without the leading
    columns none of them uses (a linear-attention layer's state, Qwen3.5's, has no columns). -> the mask"""
    attn = attn[idx]
    start = int(attn.any(0).long().argmax())  # the first column a kept row attends to; the ones before are padding
    for layer in past.layers:
        # conv [B, channels, kernel], recurrent [B, heads, dk, dv]; [0]: transformers keys a layer's states by index
        if hasattr(layer, "recurrent_states"):
            layer.conv_states[0], layer.recurrent_states[0] = layer.conv_states[0][idx], layer.recurrent_states[0][idx]
        else:
            layer.keys, layer.values = layer.keys[idx, :, start:], layer.values[idx, :, start:]
    return attn[:, start:]


@torch.no_grad()
def sample(policy, seqs, image_lists, caches=None, max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0,
           min_p=0.0, greedy=False, stops=None, generators=None):
    """Sample one assistant turn per sequence (each ends with the assistant header, or is a turn to go on).
    A row stops at <|im_end|>/<|endoftext|>, at the first of its stop strings (stops: one tuple per row, or None),
    after max_new_tokens, or at a vision placeholder token (not kept): what the turn's text does with a stop string
    (keep it, cut it) is the caller's (tools.advance asks the dialect). caches: None (the uncached path: whole
    sequences prefilled, nothing kept) or per row None (new) or the cache this returned for it, its sequence grown
    only at the end since. generators: one per row (None: the global RNG), so results depend neither on batching
    nor on sharding. -> list of (new_ids, logps, reason, cache), reason in {"eos", "stop", "length", "invalid"},
    logps as draw()'s; cache: the row's sequence and new_ids but the last (not yet forwarded; all of them after
    "invalid", whose placeholder is not in new_ids), None when uncached."""
    B, keep = len(seqs), caches is not None and policy.kv_turns  # (a family whose cache cannot: whole turns)
    caches = caches if keep else [None] * B

    def standin():  # a sharded rank with no rows left runs as many forward passes as the others
        forward(policy, collate(policy, [[policy.pad]], [[]]))
    if B:  # identical rows (a GRPO group at its first turn: same ids, images and cache) are prefilled once
        keys = [(tuple(s), tuple(map(id, ims)), id(c)) if keep else b
                for b, (s, ims, c) in enumerate(zip(seqs, image_lists, caches))]
        first = {}  # key -> its first row, in order of first appearance
        for b, k in enumerate(keys):
            first.setdefault(k, b)
        u = list(first.values())  # the U unique rows
        blocks = [seqs[b][caches[b][0]:] if caches[b] else seqs[b] for b in u]       # what each row adds
        # a row's images are in order of appearance and only its last ones are in what it adds
        news = [image_lists[b][len(image_lists[b]) - blk.count(policy.vision_start):] for b, blk in zip(u, blocks)]
        batch = collate(policy, blocks, news, [caches[b][1] if caches[b] else 0 for b in u])  # positions go on
        past, attn = _stack([caches[b] for b in u], policy.device)
        if past is not None:  # [U, Lc + L]: pad, past, pad, new tokens per row
            batch["attention_mask"] = torch.cat([attn, batch["attention_mask"]], 1)
        policy.stats["prefill_tokens"] += sum(map(len, blocks))
        _, past, logits = forward(policy, batch, past, use_cache=True)              # logits [U, V]
        # nxt [U]: the position the next token gets, the last token's largest axis + 1 (mrope_positions' rule)
        attn, nxt = batch["attention_mask"], batch["position_ids"][:, :, -1].max(0).values + 1
        if len(u) < B:  # copy each unique row to the rows that share it
            pos = {k: i for i, k in enumerate(first)}
            idx = [pos[k] for k in keys]
            attn, logits, nxt = _keep_rows(past, attn, idx), logits[idx], nxt[idx]
    else:
        standin()
    caches = None  # (the batch cache holds them now)
    out, logps, reason, kept = [[] for _ in range(B)], [[] for _ in range(B)], [None] * B, [None] * B
    stops = stops or [()] * B
    # tails: the last `width` characters of each row's text, enough for a stop string to begin there and end in the
    # next token; pieces: each token's text, decoded once (a piece holding part of a multi-byte character decodes to
    # U+FFFD alone, harmless for the dialects' ASCII stop strings)
    tails, width, pieces = [""] * B, max((len(s) for ss in stops for s in ss), default=1) - 1, {}
    gens = generators or [None] * B
    # the rows of the batch: those still sampling; row i of past, attn, logits, tok and nxt is episode rows[i]
    rows = list(range(B))
    while True:
        if rows:
            tok, tlp = draw(logits, temperature, top_k, top_p, min_p, greedy, [gens[b] for b in rows])
            for b, t, lp in zip(rows, tok.tolist(), tlp.tolist()):
                if t in policy.forbidden:
                    reason[b] = "invalid"
                    continue  # not kept: its row leaves below, before the token could be forwarded
                out[b].append(t)
                logps[b].append(lp)
                if t not in pieces:
                    pieces[t] = policy.tok.decode([t])
                text = tails[b] + pieces[t]
                tails[b] = text[max(0, len(text) - width):]  # where a stop string ending later can begin
                if t in policy.eos:
                    reason[b] = "eos"
                elif any(s in text for s in stops[b]):
                    reason[b] = "stop"
                elif len(out[b]) >= max_new_tokens:
                    reason[b] = "length"
            going = [i for i, b in enumerate(rows) if reason[b] is None]
            if len(going) < len(rows):  # finished rows leave the batch, their cache kept for their next turn
                for i, b in enumerate(rows):
                    if keep and reason[b] is not None:
                        kept[b] = _row_cache(past, attn, i, nxt)
                attn = _keep_rows(past, attn, going)  # (the cache trimmed in place, its leading padding too)
                tok, nxt, rows = tok[going], nxt[going], [rows[i] for i in going]
        if not (any_rank(bool(rows), policy) if lockstep(policy) else rows):
            break
        if not rows:
            standin()
            continue
        attn = torch.cat([attn, attn.new_ones(len(rows), 1)], 1)  # [R, Lc + 1]: the token drawn goes in last
        policy.stats["decode_rows"] += len(rows)
        # one token per row [R, 1], its text position the same on all three M-RoPE axes [3, R, 1]
        _, past, logits = forward(policy, dict(input_ids=tok[:, None], attention_mask=attn,
                                               position_ids=nxt.view(1, -1, 1).expand(3, -1, 1)), past, use_cache=True)
        nxt = nxt + 1
    return list(zip(out, logps, reason, kept))


# -----------------------------------------------------------------------------
# log-probs of sampled tokens, for training


def left_pad(rows, L, device):
    """B lists of per-token values -> [B, L] float tensor, right-aligned like collate's left padding."""
    out = torch.zeros(len(rows), L, device=device)
    for b, r in enumerate(rows):
        out[b, L - len(r):] = torch.as_tensor(r, dtype=torch.float, device=device)
    return out


def token_logprobs(policy, seqs, image_lists, masks, temperature=1.0, entropy=False, token_loss=None):
    """Per-token log-probs of the trained tokens of whole trajectories, one forward pass; only the hidden states
    that predict a trained token go through the output layer (kernel.py): no [B, L, V] logits.
    masks: B lists of 0/1 (1 = a trained token: sampled, or harness text a dialect trains). -> logp [B, L]
    float32, mask [B, L] float (left-padded like collate), and entropy [B, L] when asked. token_loss: fn(lp [c],
    b [c], t [c]) -> the losses [c] of the trained tokens at rows b, positions t, fused into the kernel (the
    gradient is formed in the forward pass); the result is then (loss, logp, mask[, entropy]), loss
    differentiable, logp detached."""
    batch = collate(policy, seqs, image_lists)
    B, L = batch["input_ids"].shape
    m = left_pad(masks, L, policy.device)
    h, _, _ = forward(policy, batch)
    # hidden at position t predicts token t+1: shift the mask left by one to pick the predicting states
    pick = m[:, 1:].bool()                                                 # [B, L-1], N of them set
    hs = h[:, :-1][pick]                                                   # [N, H]
    targets = batch["input_ids"][:, 1:][pick]                              # [N]
    w = policy.model.lm_head.weight  # [V, H]: tied to the input embedding in small Qwens, separate in 7B
    w = w.to(torch.bfloat16) if policy.amp else w  # under autocast the GEMMs run in bf16; grads reach fp32 w
    # (explicitly: the kernel's torch.mm(out=...) is not an op autocast casts)
    loss_fn = None
    if token_loss is not None:
        bi, ti = pick.nonzero(as_tuple=True)   # the N trained tokens in hs's order: row b, position t + 1
        loss_fn = lambda lp, rows: token_loss(lp, bi[rows], ti[rows] + 1)
    res = fused_logprobs(hs.to(w.dtype), w, targets, temperature, entropy=entropy, loss_fn=loss_fn)
    res = res if isinstance(res, tuple) else (res,)  # (a bare logp when nothing else was asked)
    loss, res = (res[0], res[1:]) if loss_fn else (None, res)
    def spread(x):   # [N] -> [B, L], zero where no token is trained
        full = torch.zeros(B, L, device=policy.device)
        full[:, 1:][pick] = x
        return full
    out = (spread(res[0]), m) + ((spread(res[1]),) if entropy else ())
    return ((loss,) + out) if loss_fn else out
