"""
test_model.py: model inputs, sampling, log-probs, loading and checkpoints (model.py).

    python -m pytest -q test_model.py
"""
import numpy as np
import pytest
import torch

import common as C
import data as D
import dialects
import model as M
import tools as T
from conftest import assert_positions_match_transformers, bf16_logits, scripted_zooms, zoom_episodes


def test_model_mrope_positions_match_transformers(policy):
    eps = [T.new_episode(policy, r) for r in D.synthetic(2, seed=1)]
    T.advance(policy, eps[0], M.ids(policy, '<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, '
                                            '"bbox_2d": [0, 0, 50, 60]}}</tool_call>'), reason="stop")
    assert_positions_match_transformers(policy, eps)


def test_model_image_tokens_and_pixel_split(policy):
    ep = T.new_episode(policy, D.synthetic(1, seed=2)[0], view_max_pixels=168 * 112)
    T.advance(policy, ep, M.ids(policy, '<tool_call>{"name": "zoom_in", "arguments": {"image_index": 0, '
                                        '"bbox_2d": [0, 0, 20, 100]}}</tool_call>'), reason="stop")
    encs = T.episode_images(policy, ep)
    assert len(encs) == 2
    batch = M.collate(policy, [ep["seq"]], [encs])
    # the vision tower's features per image equal that image's <|image_pad|> count
    with torch.no_grad():
        feats = policy.model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
    runs, seq, i = [], ep["seq"], 0
    while i < len(seq):
        if seq[i] == policy.image_pad:
            j = i
            while j < len(seq) and seq[j] == policy.image_pad:
                j += 1
            runs.append(j - i)
            i = j
        else:
            i += 1
    assert runs == [f.shape[0] for f in feats] == [e["n"] for e in encs]
    # pixel_values split by grid.prod(-1) gives each image back exactly its own patches
    parts = torch.split(batch["pixel_values"], batch["image_grid_thw"].prod(-1).tolist())
    for part, v in zip(parts, ep["images"]):
        alone = policy.improc(images=[v["img"]], do_resize=False, return_tensors="pt")["pixel_values"]
        assert torch.equal(part, alone)


def test_model_recomputed_logprobs_equal_sampling_logprobs(policy, monkeypatch):
    """The log-probs the sampler returns (from the cached engine: shared prompt, cache kept across tool turns)
    equal token_logprobs recomputed on the finished multi-turn sequences with their images, fp32, 1e-5."""
    scripted_zooms(monkeypatch, policy)
    eps = T.rollout(policy, zoom_episodes(policy), temperature=0.7)
    logp, mask = M.token_logprobs(policy, [e["seq"] for e in eps], [T.episode_images(policy, e) for e in eps],
                                  [e["mask"] for e in eps], temperature=0.7)
    L = logp.shape[1]
    for b, ep in enumerate(eps):
        sampled = torch.tensor(ep["logp"]).isfinite() & torch.tensor(ep["mask"]).bool()  # NaN: the scripted calls
        got = logp[b, L - len(ep["seq"]):][sampled]
        assert torch.allclose(got, torch.tensor(ep["logp"])[sampled], atol=1e-5, rtol=0)
        assert mask[b].sum() == sum(ep["mask"]) and len(ep["images"]) == 4


def test_model_stop_strings_found_across_tokens(policy):
    """A stop string is found however many tokens it spans (the row stops at the token that completes it,
    nothing after it is kept), and only the first one counts."""
    ep = T.new_episode(policy, D.synthetic(1, seed=3)[0])
    for seed in range(100):  # a seed whose 40 random tokens hold no <|im_end|> or vision token
        gen = lambda: torch.Generator().manual_seed(seed)
        (ids, _, reason, _), = M.sample(policy, [ep["seq"]], [T.episode_images(policy, ep)], max_new_tokens=40,
                                        stops=None, generators=[gen()])
        if reason == "length":
            break
    assert reason == "length"
    texts = [policy.tok.decode(ids[:k]) for k in range(len(ids) + 1)]
    for a, b in ((5, 7), (10, 31), (20, 21)):  # a stop string spanning tokens a..b-1 (up to 21 tokens)
        stop = texts[b][len(texts[a]) + 1:]     # starting inside token a
        want = next(k for k in range(len(ids) + 1) if stop in texts[k])  # the first prefix holding it
        (got, _, r, _), = M.sample(policy, [ep["seq"]], [T.episode_images(policy, ep)], max_new_tokens=40,
                                   stops=[("never there", stop)], generators=[gen()])
        assert stop and got == ids[:want] and r == "stop"


@pytest.mark.parametrize("p, T_, k, top_p, min_p, keep", [
    ([.4, .3, .15, .1, .05], 1.0, 0, 0.8, 0.3, [1, 1, 1, 0, 0]),   # top-p before min-p (vLLM's order: [1, 1, 0, 0, 0])
    ([.4, .3, .15, .1, .05], 2.0, 0, 1.0, 0.3, [1, 1, 1, 1, 1]),   # min-p after temperature: (p_i / p_max)^(1/T) >= 0.3
    ([.4, .3, .15, .1, .05], 0.5, 0, 1.0, 0.3, [1, 1, 0, 0, 0]),
    ([.4, .25, .25, .05, .05], 1.0, 2, 1.0, 0.0, [1, 1, 1, 0, 0]),  # top-k keeps the ties with the k-th
    ([.4, .3, .15, .1, .05], 1.0, 2, 0.5, 0.0, [1, 0, 0, 0, 0]),    # top-p on what top-k left: 0.3/0.7 < 0.5
])
def test_model_sampling_filters_match_the_distribution_written_out(p, T_, k, top_p, min_p, keep):
    """draw() samples from softmax(logits / T) restricted to the tokens the filters keep (hand-worked above),
    renormalised, written out in float64; the log-prob it returns is the unfiltered log softmax(logits / T)."""
    logits = torch.tensor(p, dtype=torch.float64).log().float()
    q = np.array(p, dtype=np.float64) ** (1 / T_) * np.array(keep)   # softmax(log p / T) on the support, unnormalised
    q /= q.sum()
    n = 20000
    torch.manual_seed(0)
    tok, lp = M.draw(logits.expand(n, -1), T_, k, top_p, min_p)
    gens = [torch.Generator().manual_seed(i) for i in range(n)]     # and with a generator per row
    tok2, _ = M.draw(logits.expand(n, -1), T_, k, top_p, min_p, generators=gens)
    for t in (tok, tok2):
        freq = np.bincount(t.numpy(), minlength=len(p)) / n
        assert set(np.flatnonzero(freq)) == set(np.flatnonzero(q))   # the support exactly
        assert np.all(np.abs(freq - q) <= 5 * np.sqrt(q * (1 - q) / n) + 1e-12), (freq, q)
    full = np.log(np.array(p) ** (1 / T_) / (np.array(p) ** (1 / T_)).sum())
    assert np.allclose(lp.numpy(), full[tok.numpy()], atol=1e-6)


def test_model_same_seed_same_model():
    a, b = C.load_policy("tiny", seed=5), C.load_policy("tiny", seed=5)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n
    assert a.tok.get_vocab() == b.tok.get_vocab()
    c = C.load_policy("tiny", seed=6)
    assert not torch.equal(a.model.lm_head.weight, c.model.lm_head.weight)


def test_model_tokenizer_special_tokens_and_roundtrip(policy):
    for t in M.SPECIAL + M.ADDED:
        assert len(M.ids(policy, t)) == 1, t
    s = 'héllo 😀 <tool_call>{"a": [1, 2]}</tool_call>'
    assert policy.tok.decode(M.ids(policy, s)) == s


def test_model_toy_prompt_is_the_tools_signatures_and_its_frame_words_one_token(policy):
    # a toy model's system prompt, written out by hand, and the chat frame's role words one token each (no leading
    # space: they follow <|im_start|>), so that the demo's sequences stay short
    assert dialects.system_prompt({"zoom_in": T.TOOLS["zoom_in"]}, compact=True) == \
        "Tools: zoom_in(image_index, bbox_2d)."
    assert dialects.system_prompt({}, compact=True) == "No tools."
    assert policy.toy
    for role in ("system", "user", "assistant"):
        assert len(M.ids(policy, role)) == 1 and len(M.ids(policy, f"<|im_start|>{role}\n")) == 3, role


def test_model_checkpoint_roundtrip(policy, tmp_path):
    M.save(policy, str(tmp_path))
    p2 = C.load_policy(str(tmp_path), device="cpu")
    x = torch.tensor([M.ids(policy, "<|im_start|>user\nWhat colour?")])
    with torch.no_grad():  # bf16 weights in the folder: exactly the policy's, rounded to bf16
        assert torch.equal(bf16_logits(policy, input_ids=x), p2.model(input_ids=x).logits)
    assert p2.tok.get_vocab() == policy.tok.get_vocab() and \
        (p2.improc.size["shortest_edge"], p2.improc.size["longest_edge"]) == (56 * 56, 112 * 112)
    with pytest.raises(SystemExit, match="no such folder"):
        C.load_policy(str(tmp_path / "nope"))
