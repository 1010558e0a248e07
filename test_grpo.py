"""
test_grpo.py: advantages, the loss against TRL's formulas, the loop, rethinking (grpo.py).

    python -m pytest -q test_grpo.py
"""
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import common as C
import data as D
import grpo as G
import model as M
import rethink
import rewards as R
import tools as T
from conftest import GRPO_TINY, _master


def _ref_advantages(rewards, g, scale):
    """Group advantages written out from TRL's formula, in float64 with the statistics module."""
    import statistics
    out = []
    all_std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    for i in range(0, len(rewards), g):
        grp = rewards[i:i + g]
        mu, sd = sum(grp) / g, statistics.stdev(grp)
        for r in grp:
            out.append((r - mu) / ((sd if scale == "group" else all_std) + 1e-4) if scale != "none" else r - mu)
    return out


def _quantile(values, q):
    """Linear-interpolation quantile, as torch.quantile (and numpy's default)."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    return v[lo] + (pos - lo) * (v[min(lo + 1, len(v) - 1)] - v[lo])


def _ref_loss(logp, old, adv, mask, loss_type, el, eh, ref=None, beta=0.0, max_len=None, num_items=None,
              kl_ratio=False, delta=None, level="token", ent=None, rho=1.0):
    """Token by token in float64, from TRL's published GRPO loss: ratio per token or, level "sequence"
    (GSPO), exp of each sequence's mean log-ratio; min(ratio, delta) in the unclipped branch; the policy term
    only on tokens whose entropy is at least the (1 - rho) quantile of the trained tokens' (float32, as TRL);
    beta x k3, times the ratio with kl_ratio."""
    B, T_ = len(logp), len(logp[0])
    lr = [[logp[b][t] - old[b][t] for t in range(T_)] for b in range(B)]
    if level == "sequence":
        lr = [[sum(lr[b][t] * mask[b][t] for t in range(T_)) / max(sum(mask[b]), 1)] * T_ for b in range(B)]
    tau = _quantile([float(np.float32(ent[b][t])) for b in range(B) for t in range(T_) if mask[b][t]], 1 - rho) \
        if rho < 1 else None
    per = [[0.0] * T_ for _ in range(B)]
    for b in range(B):
        for t in range(T_):
            r = math.exp(lr[b][t])
            l = -min(min(r, delta if delta else r) * adv[b], min(max(r, 1 - el), 1 + eh) * adv[b])
            if tau is not None and ent[b][t] < tau:
                l = 0.0
            if beta:
                d = ref[b][t] - logp[b][t]
                l += beta * (math.exp(d) - d - 1) * (r if kl_ratio else 1.0)
            per[b][t] = l * mask[b][t]
    tok = sum(sum(m) for m in mask)
    if loss_type == "grpo":
        return sum(sum(per[b]) / max(sum(mask[b]), 1) for b in range(B)) / B
    if loss_type == "bnpo":
        return sum(map(sum, per)) / max(tok, 1)
    if loss_type == "dr_grpo":
        return sum(map(sum, per)) / (B * (max_len or T_))
    return sum(map(sum, per)) / (num_items if num_items is not None else tok)


def test_grpo_advantages_against_trl_formula():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(12, generator=g).tolist()
    rewards[4:8] = [0.5] * 4                                  # a group with zero variance
    for scale in ("group", "batch", "none"):
        got = G.advantages(rewards, 4, scale)
        assert torch.allclose(got.double(), torch.tensor(_ref_advantages(rewards, 4, scale), dtype=torch.float64),
                              atol=1e-5)
    assert torch.equal(G.advantages(rewards, 4, "group")[4:8], torch.zeros(4))
    # a saturated group of the CPU demo (vlm_r3: 1 + 0.5 + 0.5 + 0.1 each): exact zeros, not rounding dust / 1e-4
    for scale in ("group", "batch", "none"):
        assert torch.equal(G.advantages([2.1] * 8 + [0.6, 2.1] * 4, 8, scale)[:8], torch.zeros(8))
    # hand-worked: rewards (1, 0) -> mean 0.5, std sqrt(0.5) = 0.7071 -> +-0.5 / 0.7072 = +-0.7070
    assert G.advantages([1.0, 0.0], 2, "group").tolist() == pytest.approx([0.70700, -0.70700], abs=1e-4)


def test_grpo_policy_loss_every_type_against_trl_reference():
    g = torch.Generator().manual_seed(1)
    B, T_ = 5, 7
    logp = -torch.rand(B, T_, generator=g, dtype=torch.float64) * 3
    old = logp + (torch.rand(B, T_, generator=g, dtype=torch.float64) - 0.5)  # ratios from 0.6 to 1.65: both clips hit
    ref = logp + (torch.rand(B, T_, generator=g, dtype=torch.float64) - 0.5) * 0.2
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0, -1.5], dtype=torch.float64)
    mask = (torch.rand(B, T_, generator=g) > 0.3).double()
    mask[2] = 0                                               # a fully masked row
    ratio = torch.exp(logp - old)
    assert ((ratio > 1.28) & (adv[:, None] > 0) & (mask > 0)).any() and \
        ((ratio < 0.8) & (adv[:, None] < 0) & (mask > 0)).any()
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for beta, kl_ratio in ((0.0, True), (0.04, True), (0.04, False)):   # both KL forms
            kw = dict(ref_logp=ref if beta else None, beta=beta, max_completion_length=9, num_items=11.5)
            got = G.policy_loss(logp, old, adv, mask, lt, 0.2, 0.28, kl_ratio=kl_ratio, **kw)
            want = _ref_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), lt, 0.2, 0.28,
                             ref.tolist() if beta else None, beta, 9, 11.5, kl_ratio=kl_ratio)
            assert float(got) == pytest.approx(want, rel=1e-9), (lt, beta, kl_ratio)


def test_grpo_policy_loss_hand_worked_clipping():
    # one token: ratio e^0.4 = 1.4918; A = +1 -> clipped at 1.28 -> loss -1.28; A = -1 -> max(-1.4918, -1.28) -> 1.4918
    lp, old, m = torch.tensor([[0.4]]), torch.tensor([[0.0]]), torch.ones(1, 1)
    assert float(G.policy_loss(lp, old, torch.tensor([1.0]), m, "bnpo", 0.2, 0.28)) == pytest.approx(-1.28)
    assert float(G.policy_loss(lp, old, torch.tensor([-1.0]), m, "bnpo", 0.2, 0.28)) == pytest.approx(math.exp(0.4))


# A hand-made batch for the TRL check: B = 3 sequences, T = 4 positions (pads hold junk that must
# not leak), and what TRL 1.16.0's own GRPOTrainer._compute_loss returns on it (forward and accelerator mocked):
# (options, loss, d loss / d logp on the 9 trained tokens where recorded). eps 0.2 / 0.28, max_completion_length 8.
_TRL_MASK = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]
_TRL_OLD = [[-1.0, -2.0, -0.5, -1.5], [-0.7, -1.2, -3.0, 0.0], [-0.9, -0.4, 0.0, 0.0]]
_TRL_DLOG = [[0.0, 0.3, -0.1, 0.5], [-0.4, 0.1, 1.5, 0.7], [0.2, -0.3, -0.6, 0.9]]       # logp - old
_TRL_REF = [[-1.1, -1.8, -0.6, -1.0], [-0.9, -1.0, -2.0, -0.3], [-1.0, -0.8, -0.2, -0.1]]
_TRL_ENT = [[0.50, 2.00, 0.10, 1.20], [3.00, 0.30, 0.75, 9.00], [1.50, 0.05, 7.00, 8.00]]
_TRL_ADV = [1.0, -0.5, 0.7]
_TRL_CASES = [
    (dict(loss_type="grpo"), -0.24617001078934395, None),
    (dict(loss_type="bnpo"), -0.293884678779825, None),
    (dict(loss_type="dr_grpo"), -0.11020675454243438, None),
    (dict(), -0.293884678779825, None),
    (dict(eps_high=0.2), -0.274442242034034, None),
    (dict(delta=3.0), -0.3762007382430508,
     [-0.1111111111, 0, -0.1005374909, 0, 0, 0.0613983843, 0, -0.0949979923, -0.0576191949]),
    (dict(loss_type="grpo", delta=3.0), -0.32848607025256976, None),
    (dict(loss_type="grpo", is_level="sequence"), -0.3703981549807409,
     [-0.0992705181] * 4 + [0.0828791499] * 3 + [-0.1109767662] * 2),
    (dict(is_level="sequence"), -0.42877433492094735, None),
    (dict(loss_type="grpo", is_level="sequence", eps_low=3e-4, eps_high=4e-4), -0.3067827494432882, None),
    (dict(beta=0.04), -0.2913855448974879,
     [-0.1106666667, 0.0005999372, -0.1005374909, 0, -0.00059584, 0.0609071973, 0.2589420352, -0.0933694553,
      -0.0572899424]),
    (dict(beta=0.04, kl_ratio=False), -0.29304719073210034,
     [-0.1106881663, 0.0004229448, -0.1005374909, 0, -0.0009840123, 0.060930958, 0.2507314788, -0.0938460733,
      -0.0571962501]),
    (dict(loss_type="grpo", is_level="sequence", beta=0.04), -0.36918768542498426,
     [-0.0988830402, -0.0988830402, -0.0992609138, -0.0992609138, 0.0817053514, 0.0824760071, 0.0857821575,
      -0.109188394, -0.1102285266]),
    (dict(top_entropy_quantile=0.5), -0.08601526617145407, [0, 0, 0, 0, 0, 0, 0.2489827261, -0.0949979923, 0]),
    (dict(top_entropy_quantile=0.2), -0.09777777777777778, [0] * 9),
    (dict(top_entropy_quantile=0.0), 0.044444444444444446, [0] * 9),
    (dict(top_entropy_quantile=0.5, beta=0.04), -0.08351613228911695,
     [0.0004444444, 0.0005999372, 0, 0, -0.00059584, -0.0004911871, 0.2589420352, -0.0933694553, 0.0003292525]),
]


def test_grpo_loss_options_against_trl_on_a_hand_made_batch():
    # every loss option (two-sided/dual clip, GSPO, both KL forms, top-entropy tokens) in float64: the loss
    # equals the formula written out (_ref_loss) and TRL's own; the gradient equals the written-out formula's
    # central differences and TRL's (rounded to 1e-10), and is 0 on the pads
    f64 = dict(dtype=torch.float64)
    old, mask, ref, ent = (torch.tensor(x, **f64) for x in (_TRL_OLD, _TRL_MASK, _TRL_REF, _TRL_ENT))
    logp, adv = old + torch.tensor(_TRL_DLOG, **f64), torch.tensor(_TRL_ADV, **f64)
    trained = [(b, t) for b in range(3) for t in range(4) if _TRL_MASK[b][t]]
    for opts, trl_loss, trl_grad in _TRL_CASES:
        kw = dict(dict(loss_type="dapo", eps_low=0.2, eps_high=0.28, beta=0.0, kl_ratio=True, delta=None,
                       is_level="token", top_entropy_quantile=1.0), **opts)
        lp = logp.clone().requires_grad_()
        loss = G.policy_loss(lp, old, adv, mask, ref_logp=ref, max_completion_length=8, entropy=ent, **kw)
        grad, = torch.autograd.grad(loss, lp)
        loss = loss.detach()

        def written_out(x):
            return _ref_loss(x, _TRL_OLD, _TRL_ADV, _TRL_MASK, kw["loss_type"], kw["eps_low"], kw["eps_high"], _TRL_REF,
                             kw["beta"], 8, None, kw["kl_ratio"], kw["delta"], kw["is_level"], _TRL_ENT,
                             kw["top_entropy_quantile"])
        assert float(loss) == pytest.approx(written_out(logp.tolist()), rel=1e-12, abs=1e-15), opts
        assert float(loss) == pytest.approx(trl_loss, abs=1e-12), opts
        for b, t in trained:
            up, down = logp.tolist(), logp.tolist()
            up[b][t] += 1e-6
            down[b][t] -= 1e-6
            assert float(grad[b, t]) == pytest.approx((written_out(up) - written_out(down)) / 2e-6, abs=1e-8), \
                (opts, b, t)
        if trl_grad is not None:
            assert [float(grad[b, t]) for b, t in trained] == pytest.approx(trl_grad, abs=2e-10), opts
        assert torch.all(grad[mask == 0] == 0)


def test_grpo_fused_grpo_loss_equals_the_loss_written_out(policy):
    # update() sums token_loss x loss_weights inside the fused kernel, chunk by chunk, with the gradient
    # formed in the forward pass; the loss and every parameter's gradient must equal policy_loss (checked
    # against TRL's formulas above) on token_logprobs' plain log-probs. Off-policy and on-policy rows, KL on.
    eps = [T.new_episode(policy, r, max_turns=1, max_turn_tokens=10) for r in D.synthetic(3, seed=5)]
    for i, ep in enumerate(eps):
        T.seed_episode(ep, "cpu", 30 + i)
    T.rollout(policy, eps)
    seqs, masks = [e["seq"] for e in eps], [e["mask"] for e in eps]
    imgs = [T.episode_images(policy, e) for e in eps]
    params = [p for p in policy.model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        lp0, m = M.token_logprobs(policy, seqs, imgs, masks)
    old = (lp0 + 0.5 * (torch.rand(lp0.shape, generator=g) - 0.5)) * m    # ratios 0.78 to 1.28
    ref = (lp0 + 0.2 * (torch.rand(lp0.shape, generator=g) - 0.5)) * m
    A = torch.tensor([1.0, -0.7, 0.4])
    on_policy = torch.tensor([False, True, False])
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo"):
        logp, m = M.token_logprobs(policy, seqs, imgs, masks)
        o = torch.where(on_policy[:, None], logp.detach(), old)
        want = G.policy_loss(logp, o, A, m, lt, 0.2, 0.28, ref, 0.04, max_completion_length=40, num_items=7.5)
        want_grads = torch.autograd.grad(want, params)
        w = G.loss_weights(m, lt, 40, 7.5)

        def per_token(lp, b, t):
            return G.token_loss(lp, torch.where(on_policy[b], lp.detach(), old[b, t]), A[b], eps_low=0.2, eps_high=0.28,
                                ref_logp=ref[b, t], beta=0.04) * w[b, t]
        got, logp2, _ = M.token_logprobs(policy, seqs, imgs, masks, token_loss=per_token)
        got_grads = torch.autograd.grad(got, params)
        assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-7), lt
        assert torch.allclose(logp2, logp.detach(), atol=1e-6)
        for a, b in zip(got_grads, want_grads):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), lt


class _StepGrads:
    """An optimizer that records each step's gradients and moves nothing."""
    def __init__(self, params):
        self.params, self.steps = params, []

    def step(self):
        self.steps.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def _text_samples(policy, prompt_lens, old_noise=0.7, seed=0):
    """Hand-made text-only samples: a prompt, 4 sampled tokens, a 3-token observation (not trained), 3 more
    sampled tokens; advantages of both signs; stored old log-probs = logp + uniform noise (ratios e^-0.7 to
    e^0.7, so every clip bites), except the second sample, which is on-policy (old None)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 2000, (n + 10,), generator=g).tolist() for n in prompt_lens]
    masks = [[0] * n + [1] * 4 + [0] * 3 + [1] * 3 for n in prompt_lens]
    with torch.no_grad():
        lp, m = M.token_logprobs(policy, seqs, [[] for _ in seqs], masks)
    old = lp + old_noise * (2 * torch.rand(lp.shape, generator=g) - 1) * m
    advs = [1.0, -0.7, 0.4, -1.2, 0.9][:len(seqs)]
    return [dict(seq=s, mask=mk, images=[], adv=a, group=(0, 0, i), old=None if i == 1 else old[i, -len(s):])
            for i, (s, mk, a) in enumerate(zip(seqs, masks, advs))]


def _update_grads(policy, samples, flags, ref=None):
    """grpo.update on `samples` with these flags -> (its metrics, each optimizer step's gradients); no KL term
    unless the flags give --beta (and `ref`)."""
    args = G.get_args(GRPO_TINY + ["--grad-clip", "1e9", "--beta", "0"] + flags)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    opt = _StepGrads(params)
    opt.zero_grad()
    return G.update(policy, ref, opt, samples, args, 1, samples[0]), opt.steps, args, params


def test_grpo_update_every_loss_option_equals_the_loss_written_out(policy):
    # grpo.update (fused kernel for the per-token options, plain mode for GSPO and the entropy quantile;
    # micro-batches; mini-batches over passes) gives, at every optimizer step, the gradient of policy_loss
    # (checked against the float64 formula and TRL above) on that step's samples, with the step's normaliser
    ref = C.load_policy("tiny", seed=1, device="cpu")
    samples = _text_samples(policy, [5, 9, 3, 7])
    assert G.get_args(GRPO_TINY).kl_ratio                      # TRL's default: the KL term times the ratio
    cases = [["--delta", "1.5", "--beta", "0.04", "--micro-batch", "3"],
             ["--loss-type", "dr_grpo", "--dual-clip", "1.5", "--beta", "0.04", "--no-kl-ratio", "--micro-batch", "3"],
             ["--is-level", "sequence", "--beta", "0.04", "--micro-batch", "16"],
             ["--loss-type", "grpo", "--top-entropy-quantile", "0.3", "--micro-batch", "16"],
             ["--mini-batches", "2", "--ppo-epochs", "2", "--micro-batch", "16"]]
    for flags in cases:
        up, steps, args, params = _update_grads(policy, samples, flags, ref=ref if "--beta" in flags else None)
        K = args.mini_batches
        assert up is not None and len(steps) == K * args.ppo_epochs, flags
        parts = [samples[:2], samples[2:]] if K == 2 else [samples]
        n_tok = sum(sum(s["mask"]) for s in samples)
        for k, got in enumerate(steps):
            part = parts[k % K]                                    # every pass replays the same parts, in order
            seqs, masks = [s["seq"] for s in part], [s["mask"] for s in part]
            logp, m, ent = M.token_logprobs(policy, seqs, [[] for _ in part], masks, entropy=True)
            old = M.left_pad([s["old"] if s["old"] is not None else [] for s in part], logp.shape[1], "cpu")
            old = torch.where(torch.tensor([s["old"] is None for s in part])[:, None], logp.detach(), old)
            A = torch.tensor([s["adv"] for s in part])
            ref_lp = M.token_logprobs(ref, seqs, [[] for _ in part], masks)[0].detach() if args.beta else None

            def loss(**o):
                kw = dict(dict(kl_ratio=args.kl_ratio, delta=args.delta, is_level=args.is_level, entropy=ent,
                               top_entropy_quantile=args.top_entropy_quantile), **o)
                return G.policy_loss(logp, old, A, m, args.loss_type, 0.2, 0.28, ref_lp, args.beta,
                                     max_completion_length=24, num_items=n_tok / K, **kw)
            want = loss()
            # the batch exercises the option: without it the loss differs
            plain = loss(delta=None, is_level="token", top_entropy_quantile=1.0, kl_ratio=not args.kl_ratio)
            assert K > 1 or abs(plain.item() - want.item()) > 1e-5, flags
            want_grads = torch.autograd.grad(want, params, allow_unused=True)
            for a, b in zip(got, want_grads):
                b = torch.zeros_like(a) if b is None else b
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (flags, k)
        for key in ("clip_frac", "clip_low", "clip_high"):
            assert 0 <= up[key] <= 1
        assert up["clip_frac"] == pytest.approx(up["clip_low"] + up["clip_high"])
        if K == 1 and args.ppo_epochs == 1:  # one optimizer step: every micro-batch saw the policy before it
            seqs, masks = [s["seq"] for s in samples], [s["mask"] for s in samples]
            with torch.no_grad():
                lp, m = (t.double() for t in M.token_logprobs(policy, seqs, [[] for _ in seqs], masks))
            old = M.left_pad([s["old"] if s["old"] is not None else [] for s in samples], lp.shape[1], "cpu").double()
            old = torch.where(torch.tensor([s["old"] is None for s in samples])[:, None], lp, old)
            # the logged KLs, written out in float64: k3 = e^d - d - 1 per trained token, d = other - logp
            assert up["kl_old"] == pytest.approx(float(((old - lp).exp() - (old - lp) - 1).mul(m).sum() / m.sum()),
                                                 rel=1e-4), flags
            if args.beta:
                with torch.no_grad():
                    r = M.token_logprobs(ref, seqs, [[] for _ in seqs], masks)[0].double()
                assert up["kl_ref"] == pytest.approx(float(((r - lp).exp() - (r - lp) - 1).mul(m).sum() / m.sum()),
                                                     rel=1e-4), flags
            else:
                assert "kl_ref" not in up  # no reference, nothing to log


def test_grpo_aux_nll_on_positive_samples_that_rethink(policy):
    # VL-Rethinker: loss = policy loss + 0.05 x the token-mean NLL of the samples with A > 0 that rethink (here
    # samples 0 and 2, marked by make_samples), through the fused path and the plain one (GSPO); one
    # micro-batch (their NLL is a mean per micro-batch, averaged over the accumulation steps)
    samples = _text_samples(policy, [5, 9, 3, 7])
    for s, flag in zip(samples, (True, False, True, False)):
        s["nll"] = flag
    for extra in ([], ["--is-level", "sequence"]):
        up, steps, args, params = _update_grads(policy, samples, ["--aux-nll", "0.05", "--micro-batch", "16"] + extra)
        seqs, masks = [s["seq"] for s in samples], [s["mask"] for s in samples]
        logp, m = M.token_logprobs(policy, seqs, [[] for _ in samples], masks)
        old = M.left_pad([s["old"] if s["old"] is not None else [] for s in samples], logp.shape[1], "cpu")
        old = torch.where(torch.tensor([s["old"] is None for s in samples])[:, None], logp.detach(), old)
        sel = m * torch.tensor([1.0, 0.0, 1.0, 0.0])[:, None]
        n_tok = sum(sum(s["mask"]) for s in samples)
        want = G.policy_loss(logp, old, torch.tensor([s["adv"] for s in samples]), m, "dapo", 0.2, 0.28,
                             num_items=n_tok, is_level=args.is_level) - 0.05 * (logp * sel).sum() / sel.sum()
        for a, b in zip(steps[0], torch.autograd.grad(want, params, allow_unused=True)):
            assert torch.allclose(a, torch.zeros_like(a) if b is None else b, rtol=1e-4, atol=1e-6), extra
    # make_samples marks them: positive advantage and a self-reflection or a forced trigger
    eps = [_answered(policy, "red"), _answered(policy, "red"), _answered(policy, "blue")]
    T.advance(policy, eps[0], M.ids(policy, ""), reason="stop")
    eps[0]["turns"][0] = "<think>Wait, is it red?</think><answer>red</answer>"
    args = G.get_args(GRPO_TINY + ["--group-size", "3", "--scale-rewards", "none"])
    got = G.make_samples(policy, [eps], [[(1.0, {}), (1.0, {}), (0.0, {})]], args, 0, 0)
    assert [s["nll"] for s in got] == [True, False, False]  # advantages 1/3, 1/3, -2/3; only the first reflects


def test_grpo_reference_sync_mixes_in_the_policy(policy):
    ref = C.load_policy("tiny", seed=1, device="cpu")
    r0 = {n: p.detach().clone() for n, p in ref.model.named_parameters()}
    G.sync_reference(ref, policy, 0.9)
    for (n, r), (_, p) in zip(ref.model.named_parameters(), policy.model.named_parameters()):
        assert torch.allclose(r, 0.1 * r0[n] + 0.9 * p, atol=1e-6), n


def test_grpo_dr_grpo_divides_by_the_sampled_token_budget(policy):
    # Dr. GRPO's constant is the run's --max-tokens (24 here) whatever the prompt and the micro-batching:
    # on-policy (ratio 1) every trained token's loss is -A, so the loss is -sum_i A_i n_i / (B x 24) behind a
    # 1-token and a 100-token prompt alike, over micro-batches of 3 + 1
    for n in (1, 100):
        samples = [dict(s, old=None) for s in _text_samples(policy, [n] * 4)]
        up, steps, _, _ = _update_grads(policy, samples, ["--loss-type", "dr_grpo"])
        want = -sum(s["adv"] * sum(s["mask"]) for s in samples) / (4 * 24)
        assert up["loss"] == pytest.approx(want, rel=1e-6), n


def test_grpo_gradient_only_through_sampled_tokens():
    g = torch.Generator().manual_seed(2)
    logp = (-torch.rand(3, 6, generator=g)).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(3, 6, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 0, 1], [0, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.float)
    adv = torch.tensor([1.0, -1.0, 0.5])
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo"):
        loss = G.policy_loss(logp, old, adv, mask, lt)
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.all(grad[mask == 0] == 0) and torch.all(grad[mask == 1] != 0)
        poked = logp.detach().clone()
        poked[mask == 0] += 5.0                               # change only masked positions
        assert float(G.policy_loss(poked, old, adv, mask, lt)) == pytest.approx(loss.item(), abs=1e-7)


def _weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def test_grpo_two_steps_change_the_weights(tmp_path, policy):
    G.main(GRPO_TINY + ["--steps", "2", "--out", str(tmp_path)])
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for k in ("reward", "accuracy", "tool_use", "failed_calls", "nonzero_groups", "clip_frac", "kl_old", "entropy",
              "grad_norm", "lr", "tokens_per_s", "time_rollout", "time_scoring", "time_update", "turns", "images",
              "self_waits"):
        assert k in rows[0], k
    # the peak memory so far (CPU: resident set), against the kernel's own count of this process's peak
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 2**20
    assert 0.1 < rows[0]["peak_mem_gb"] <= rows[1]["peak_mem_gb"] <= hwm + 1e-6
    assert rows[0]["nonzero_groups"] > 0 and not rows[0]["skipped"]
    after, before = (C.load_policy(str(tmp_path), device="cpu").model.state_dict(),
                     C.load_policy("tiny", seed=0).model.state_dict())
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_grpo_reads_the_next_steps_images_ahead_and_passes_on_their_errors(tmp_path, monkeypatch):
    """read_images runs in a background thread one step ahead; a record whose image cannot be read there
    stops the run with load_images' own error (naming the record), not a hang or a silent skip."""
    import threading
    seen, read = [], D.load_images

    def load_images(record):
        seen.append((record["id"], threading.current_thread() is threading.main_thread()))
        if len(seen) == 3:  # the first prompt of step 2
            raise FileNotFoundError(f"record {record['id']}: image gone.png not found")
        return read(record)
    monkeypatch.setattr(D, "load_images", load_images)
    with pytest.raises(FileNotFoundError, match=r"record syn0-\d+: image gone.png not found"):
        G.main(GRPO_TINY + ["--steps", "3", "--out", str(tmp_path)])
    assert len(seen) >= 3 and not any(main for _, main in seen)
    assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [1]


def test_grpo_resume_equals_straight_run(tmp_path):
    """With SSR: its replay store travels in trainer.pt, which loads with weights_only=True."""
    a, b = tmp_path / "a", tmp_path / "b"
    G.main(GRPO_TINY + ["--ssr", "--steps", "4", "--save-every", "2", "--out", str(a)])
    store = torch.load(a / "step2" / "trainer.pt", weights_only=True)["store"]
    assert store["capacity"] == 2 and len(store["items"]) > 0 and "seq" in store["items"][0]
    G.main(GRPO_TINY + ["--ssr", "--steps", "4", "--save-every", "2", "--resume", str(a / "step2"), "--out", str(b)])
    wa, wb = _master(a / "step4"), _master(b / "step4")  # fp32: the final folders' bf16 weights would hide a drift
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    ra = [json.loads(l) for l in open(a / "metrics.jsonl")][2:]
    rb = [json.loads(l) for l in open(b / "metrics.jsonl")]
    timing = {"tokens_per_s", "time_rollout", "time_scoring", "time_update", "peak_mem_gb"}  # measurements
    for x, y in zip(ra, rb):
        for k in x:
            if k not in timing:
                assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6) if isinstance(x[k], float) else x[k] == y[k], k


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_grpo_torchrun_two_processes_equal_one(tmp_path, scale):
    """Data parallel (replicas, gradients averaged) and FSDP2 (sharded) on 2 CPU processes, each against
    one process on the same global batch: same weights after a step, same metrics. --scale-rewards batch
    (the std over every rank's rewards) on the data-parallel run only, to keep the test short."""
    args = GRPO_TINY + ["--steps", "1", "--save-every", "1", "--scale-rewards", scale]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    def run(name, launcher, extra=()):
        r = subprocess.run([*launcher, "grpo.py", *args, *extra, "--out", str(tmp_path / name)], env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        return _master(tmp_path / name / "step1"), json.loads(open(tmp_path / name / "metrics.jsonl").readline())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    w1, r1 = run("one", [sys.executable])
    for name, extra in (("ddp", ()), ("fsdp", ("--fsdp",)))[:2 if scale == "group" else 1]:
        w2, r2 = run(name, torchrun, extra)
        # Adam's first step is ~lr * g / |g|: an element whose gradient is rounding noise (summed in another
        # order over 2 ranks) can move differently by up to lr. Allow 1e-4 (lr / 10) there, 1e-6 elsewhere.
        diff = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
        assert diff.max() < 1e-4 and (diff > 1e-6).float().mean() < 1e-4, (name, diff.max(), (diff > 1e-6).sum())
        assert r1["reward"] == pytest.approx(r2["reward"]) and \
            r1["loss"] == pytest.approx(r2["loss"], rel=1e-4, abs=1e-6)
        assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-4), name


def _answered(policy, answer, seed=9):
    ep = T.new_episode(policy, D.synthetic(1, seed=seed)[0])
    T.advance(policy, ep, M.ids(policy, f"<think>it is</think><answer>{answer}</answer>"), reason="stop")
    return ep


def test_grpo_rethink_cut_back_as_vl_rethinkers_code():
    # before the last "Wait", then the last "\\boxed" of what is left, then the first "answer", then at the last blank
    # line (stripped there only): experience_maker.py's _generate_vllm, worked by hand
    assert rethink.cut_back("I think B. Wait, maybe C.\n\nSo the answer is C") == "I think B. "
    assert rethink.cut_back("Step 1.\n\nStep 2: so \\boxed{3}") == "Step 1."
    assert rethink.cut_back("Step 1. Step 2: the Answer is 3") == "Step 1. Step 2: the "
    assert rethink.cut_back("So x = \\boxed{1}.\n\nWait, no.\n\nSo \\boxed{2}") == "So x = "  # the box before the Wait
    assert rethink.cut_back("<think>it is red</think><answer>red</answer>") == "<think>it is red</think>"
    assert rethink.cut_back("no marks at all") == "no marks at all"


def test_grpo_rethink_trains_trigger_and_continuation(policy):
    # the trained tokens of a rethought episode are: the kept part of the first response, the trigger, the
    # continuation (VL-Rethinker trains everything after the prompt: how the model learns to say "Wait")
    ep = _answered(policy, "red")
    before = list(ep["seq"])
    first = [t for t, m in zip(ep["seq"], ep["mask"]) if m]
    cut = rethink.rethink_episode(policy, ep, rethink.TRIGGER_WRONG, truncate=True)
    trig = M.ids(policy, rethink.TRIGGER_WRONG)
    assert cut["seq"][-len(trig):] == trig and cut["mask"][-len(trig):] == [1] * len(trig)
    assert policy.tok.decode([t for t, m in zip(cut["seq"], cut["mask"]) if m]) == \
        "<think>it is</think>" + rethink.TRIGGER_WRONG
    assert cut["stop"] is None and cut["rethinks"] == 1 and ep["seq"] == before  # the original is untouched
    T.advance(policy, cut, M.ids(policy, ", it is blue.</think><answer>blue</answer>"), reason="stop")
    trained = policy.tok.decode([t for t, m in zip(cut["seq"], cut["mask"]) if m])
    assert trained == "<think>it is</think>" + rethink.TRIGGER_WRONG + ", it is blue.</think><answer>blue</answer>"
    kept = rethink.rethink_episode(policy, ep, rethink.TRIGGERS[0], truncate=False)
    assert policy.tok.decode([t for t, m in zip(kept["seq"], kept["mask"]) if m]) == \
        policy.tok.decode(first) + "\n\nWait"


def test_grpo_rethink_counts_only_the_sampled_tokens_it_keeps(policy):
    # a turn that ended on its sampled end-of-turn token: the rethought copy drops that token (and, cut
    # before the answer, the answer), and n_sampled drops by all it cut: it counts the sampled tokens kept
    # (the trigger is trained but not sampled)
    ep = T.new_episode(policy, D.synthetic(1, seed=9)[0])
    T.advance(policy, ep, M.ids(policy, "<think>it is</think><answer>red</answer><|im_end|>"), reason="eos")
    assert ep["seq"][-1] in policy.eos and ep["n_sampled"] == sum(ep["mask"])
    n_trig = len(M.ids(policy, rethink.TRIGGERS[1]))
    for truncate in (False, True):
        new = rethink.rethink_episode(policy, ep, rethink.TRIGGERS[1], truncate=truncate)
        assert new["n_sampled"] == sum(new["mask"]) - n_trig < ep["n_sampled"], truncate


def test_grpo_rethink_trigger_probabilities():
    # "Wait" 0.2, "does it seem right?" 0.3, and 0.5 the one that follows the first answer's correctness
    rng, n = random.Random(0), 20000
    for correct, third in ((True, rethink.TRIGGER_RIGHT), (False, rethink.TRIGGER_WRONG)):
        got = Counter(rethink.pick_trigger(correct, rng) for _ in range(n))
        assert set(got) == {rethink.TRIGGERS[0], rethink.TRIGGERS[1], third}
        for trig, p in ((rethink.TRIGGERS[0], 0.2), (rethink.TRIGGERS[1], 0.3), (third, 0.5)):
            assert abs(got[trig] / n - p) < 4 * math.sqrt(p * (1 - p) / n), (trig, got[trig])


def test_grpo_forced_rethinking_filters_as_vl_rethinkers_code(policy, monkeypatch):
    # group 0: 4 wrong answers (a hard group): all candidates. Continuations: members 0, 1, 2 answer right with
    # 40 new tokens, member 3 wrong. Kept: the first 2 right ones (at most 2 per group).
    # group 1: 3 of 4 right (accuracy 0.75 > 0.7): its wrong member is skipped; the right ones are candidates,
    # and their continuations: one too short (<= 30 new tokens), one with 4 more waits (5 with the trigger), one
    # fine -> 1 kept. A response over half the token budget is never a candidate.
    rec = D.synthetic(1, seed=9)[0]
    right, wrong = rec["answer"], "nope"
    groups = [[_answered(policy, wrong) for _ in range(4)],
              [_answered(policy, a) for a in (right, right, right, wrong)]]
    long = _answered(policy, right)
    long["n_sampled"] = 200
    groups[1].append(long)
    scores = [[R.reward(T.trajectory(ep), ep["record"], "vl_rethinker")[:2] for ep in g] for g in groups]
    pad = " look again" * 8
    assert 30 < len(M.ids(policy, pad + "</think><answer>red</answer>")) < 128    # new tokens within the bounds
    answers = [right, right, right, wrong, right, right, right]                 # the 7 candidates, in order
    seen = []

    def scripted(policy_, eps, **kw):
        assert kw["temperature"] == 0.9
        for i, ep in enumerate(eps):
            seen.append(i)
            thought = pad if i != 5 else " ok"                       # member 1 of group 1: too short
            if i == 6:
                thought += " wait, wait a bit, alternatively, wait, "  # 4 more waits
            T.advance(policy_, ep, M.ids(policy_, f"{thought}</think><answer>{answers[i]}</answer>"), reason="stop")
    monkeypatch.setattr(G.T, "rollout", scripted)
    n = rethink.forced_rethinking(policy, groups, scores, random.Random(0), max_tokens=256, prob=1.0, truncate=1.0,
                                  temperature=0.9, max_turn_tokens=96, top_p=1.0, top_k=0, min_p=0.0,
                                  score=lambda ep: R.reward(T.trajectory(ep), ep["record"], "vl_rethinker")[:2])
    assert len(seen) == 7                                            # the skipped and the long ones never went on
    assert n == 3
    assert [ep["rethinks"] for ep in groups[0]] == [1, 1, 0, 0]
    assert [ep["rethinks"] for ep in groups[1]] == [1, 0, 0, 0, 0]
    assert scores[0][0][0] == pytest.approx(1.0)   # VL-Rethinker's code: a forced continuation gets the plain 1


def test_grpo_nan_loss_skips_the_step_then_stops(tmp_path, monkeypatch):
    real = G.token_loss
    calls = {"n": 0}

    def nan_sometimes(*a, **k):  # the first call's loss is NaN (so step 1's), the rest are fine
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 1 else loss
    monkeypatch.setattr(G, "token_loss", nan_sometimes)
    G.main(GRPO_TINY + ["--steps", "2", "--out", str(tmp_path / "a")])
    rows = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["skipped"] for r in rows] == [True, False]          # skipped and logged, then training goes on
    monkeypatch.setattr(G, "token_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(SystemExit, match="non-finite"):
        G.main(GRPO_TINY + ["--steps", "5", "--max-nan", "2", "--out", str(tmp_path / "b")])
    assert len(open(tmp_path / "b" / "metrics.jsonl").readlines()) == 2
