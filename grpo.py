"""
grpo.py: the hand-written GRPO loop, with Selective Sample Replay, forced rethinking and torchrun.

How GRPO departs from PPO: there is no value network. For each prompt the policy samples a group of G trajectories
(here: multi-turn episodes with tool calls and the images they return), a rule scores each (rewards.py), and a
trajectory's advantage is its reward minus its group's mean (optionally divided by the group's std): the group is the
baseline. Every trained token of a trajectory gets its advantage; the loss is PPO's clipped surrogate per token,
plus a small KL penalty to the starting policy (DeepSeekMath's 0.04; the recipes set their papers', mostly 0),
averaged in one of four ways (loss_weights). Only sampled tokens are trained.

CPU demo (tiny model, synthetic task, starting from the SFT demo checkpoint runs/sft when present):
    python grpo.py
1 GPU (VLM-R3's R-GRPO on Qwen2.5-VL-3B, from a cold-start SFT checkpoint; --recipe sets every setting of the
method as its released code runs it, an explicit flag wins, --print-config shows them):
    python grpo.py --recipe vlm_r3 --model runs/sft-3b --data train.jsonl --grad-ckpt --out runs/r3
8 GPUs (VL-Rethinker on 7B; each GPU holds a replica, data parallel):
    torchrun --standalone --nproc_per_node=8 grpo.py --recipe vl_rethinker --model Qwen/Qwen2.5-VL-7B-Instruct \
        --data train.jsonl --grad-ckpt --out runs/rethinker
Without a recipe, pixel budgets default to the model's image processor's (a Qwen2.5-VL's: up to 12845056 px):
give the SFT run's --view-max-pixels/--crop-max-pixels so that RL trains on the views SFT did.
2 processes on CPU (what the tests check against 1 process):
    torchrun --standalone --nproc_per_node=2 grpo.py --model tiny --data synthetic --steps 1 --device cpu --out runs/y

One step (main): this rank's prompts -> G trajectories each through tools.rollout -> rewards (a rewards.py preset)
-> group advantages -> optional forced rethinking (rethink.py) and SSR (replay.py) -> PPO-clip updates over
mini-batches of micro-batches -> one JSONL line in <out>/metrics.jsonl. The run around it (flags, torchrun, load,
optimizer, resume, lr, metrics file) is common.py's and checkpoint.py's, shared with sft.py.
"""
import argparse
import json
import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import common as C
import data as D
import model as M
import replay
import rethink
import rewards as R
import tools as T
import view as V

# -----------------------------------------------------------------------------
# 1. advantages: the group is the baseline


def advantages(rewards, group_size, scale="group"):
    """rewards [B*G] in group order -> advantages [B*G]: r - mean(group), then divided by the std of the
    group (scale="group"), of the whole batch ("batch"), or not at all ("none", Dr. GRPO / VL-Rethinker).
    std with Bessel's correction, eps 1e-4, as TRL does."""
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)      # [B, G]
    # r - mean(r) as d - mean(d), d = r - its group's first reward: the same numbers, but a group of equal rewards gets
    # exact zeros (the float32 mean of eight 2.1s misses 2.1 by a rounding step, which the std division below would
    # blow up to an advantage of 1e-3: a saturated group that SSR and nonzero_groups would count as useful)
    d = r - r[:, :1]                                                            # [B, G]
    a = d - d.mean(1, keepdim=True)                                             # [B, G], each row sums to ~0
    if scale == "group":  # d's std is r's (a shift changes no spread); G = 1 would give Bessel's nan
        a = a / (d.std(1, keepdim=True) + 1e-4) if group_size > 1 else a
    elif scale == "batch":
        a = a / (r.std() + 1e-4) if r.numel() > 1 else a
    elif scale != "none":
        raise ValueError(f"--scale-rewards: unknown {scale!r}; use group, batch or none")
    return a.view(-1)  # [B*G], in the rewards' order


# -----------------------------------------------------------------------------
# 2. the loss, as TRL's GRPOTrainer computes it (the tests check both against TRL's formulas, term for term)


def k3(other_logp, logp):
    """The k3 estimate of KL(policy || other) per token: exp(d) - d - 1, d = other_logp - logp (logged: kl_old to the
    policy that sampled the tokens, how far the update moved; kl_ref to the reference, what --beta penalises)."""
    d = other_logp - logp
    return torch.exp(d) - d - 1


def token_loss(logp, old_logp, adv, *, eps_low, eps_high, ref_logp=None, beta=0.0, kl_ratio=True, delta=None,
               log_ratio=None, keep=1.0):
    """The loss of each trained token, elementwise (adv broadcasts against logp):

        ratio = exp(logp - old_logp)                         (GSPO: exp(log_ratio), one per sequence)
        loss  = -min(min(ratio, delta) * adv, clip(ratio, 1 - eps_low, 1 + eps_high) * adv) * keep
                + beta * k3 * (ratio if kl_ratio else 1),    k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1

    The clip is PPO's, asymmetric (DAPO's clip-higher: eps_high > eps_low lets unlikely tokens rise); `delta` caps
    the ratio in the unclipped branch (TRL's two-sided clip, dual-clip PPO's c when delta >= 1 + eps_high), so a
    negative advantage cannot push a huge ratio without bound. k3 is the low-variance, always positive estimator of
    KL(policy || reference); TRL multiplies it by the ratio (use_bias_correction_kl) since the tokens were sampled
    from the old policy. keep: 1, or the top-entropy mask (top_entropy_mask)."""
    ratio = torch.exp(logp - old_logp if log_ratio is None else log_ratio)  # [B, T]; GSPO: [B, 1], broadcast
    capped = ratio if delta is None else torch.clamp(ratio, max=delta)
    # the min of the two branches is PPO's pessimistic bound: once a token's ratio has left the clip range in the
    # direction its advantage pushes, the clipped branch is the smaller and carries no gradient; minus: we minimise
    per_tok = -torch.min(capped * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv) * keep
    if beta != 0.0:
        kl = k3(ref_logp, logp)
        per_tok = per_tok + beta * (kl * ratio if kl_ratio else kl)
    return per_tok


def loss_weights(mask, loss_type="dapo", max_completion_length=None, num_items=None, num_seqs=None):
    """TRL's four reductions as weights, loss = sum(per_tok * w). mask [B, T] -> w [B, T]. num_items (dapo): the
    global batch's trained tokens / world size (the gradient average over ranks is then the global token mean).
    num_seqs (dr_grpo): the sequences the constant counts (default: the rows of mask)."""
    m = mask if mask.is_floating_point() else mask.float()
    if loss_type == "grpo":     # mean over each sequence's tokens, then over sequences
        return m / m.sum(-1, keepdim=True).clamp(min=1) / m.shape[0]
    if loss_type == "bnpo":     # mean over the batch's tokens
        return m / m.sum().clamp(min=1)
    if loss_type == "dr_grpo":  # a constant: sequences x the longest allowed completion (update: --max-tokens)
        return m / ((num_seqs or m.shape[0]) * (max_completion_length or m.shape[1]))
    if loss_type == "dapo":     # mean over the global batch's tokens
        return m / (num_items if num_items is not None else m.sum().clamp(min=1))
    raise ValueError(f"--loss-type: unknown {loss_type!r}; use grpo, bnpo, dr_grpo or dapo")


def seq_log_ratio(logp, old_logp, mask):
    """GSPO's log importance ratio: each sequence's mean of logp - old_logp over its trained tokens. [B, T] -> [B, 1]"""
    return ((logp - old_logp) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)


def top_entropy_mask(entropy, mask, rho):
    """TRL's top_entropy_quantile: 1 on the trained tokens whose entropy is at least the (1 - rho) quantile
    (linear, of float32 values) of the trained tokens of this batch on every rank, 0 elsewhere. [B, T] -> [B, T]"""
    # every rank's trained-token entropies (on CPU: gather pickles them), so all ranks cut at one threshold
    vals = torch.cat(C.gather(entropy[mask > 0].float().cpu()))
    if not vals.numel():  # no trained token on any rank: torch.quantile of an empty tensor raises
        return torch.zeros_like(mask)
    return ((entropy >= torch.quantile(vals, 1 - rho).to(entropy.device)) & (mask > 0)).to(mask.dtype)


def policy_loss(logp, old_logp, advantages, mask, loss_type="dapo", eps_low=0.2, eps_high=0.28,
                ref_logp=None, beta=0.0, max_completion_length=None, num_items=None, kl_ratio=True, delta=None,
                is_level="token", entropy=None, top_entropy_quantile=1.0, weights=None):
    """The GRPO loss written out whole over [B, T] tensors: update()'s unfused path, and the tests' reference for
    the fused one (which forms the same sum inside the kernel).
    logp, old_logp, ref_logp, mask, entropy, weights (default: loss_weights'): [B, T]; advantages: [B] -> scalar.
    is_level "sequence": GSPO. top_entropy_quantile < 1: the policy term only on the top-entropy tokens."""
    m = mask.to(logp.dtype)  # [B, T] 0/1 in logp's dtype, for the weighted sums
    log_ratio = seq_log_ratio(logp, old_logp, m) if is_level == "sequence" else None
    keep = top_entropy_mask(entropy, m, top_entropy_quantile) if top_entropy_quantile < 1 else 1.0
    # advantages[:, None]: [B, 1], a trajectory's one advantage on each of its tokens
    per_tok = token_loss(logp, old_logp, advantages[:, None], eps_low=eps_low, eps_high=eps_high, ref_logp=ref_logp,
                         beta=beta, kl_ratio=kl_ratio, delta=delta, log_ratio=log_ratio, keep=keep)
    w = loss_weights(m, loss_type, max_completion_length, num_items) if weights is None else weights
    return (per_tok * w.to(per_tok.dtype)).sum()


# -----------------------------------------------------------------------------
# 3. from episodes to the samples an update trains on


def make_samples(policy, groups, scores, args, step, rank):
    """Episodes -> the dicts the update needs (CPU): token ids, trained mask, images, advantage."""
    # TRL gathers every rank's rewards first: a group's statistics are its own (groups never span ranks here)
    # and the "batch" std is over all ranks' rewards, so N processes give the advantages of one
    every = C.gather([s[0] for g in scores for s in g])  # [world][this rank's B*G rewards], group order
    # all ranks' advantages from this rank's first on (the loop below reads only its own B*G)
    adv = advantages(sum(every, []), args.group_size, args.scale_rewards)[sum(map(len, every[:rank])):]
    out, k = [], 0
    for gi, g in enumerate(groups):
        for ep in g:
            # --mask-truncated (Mini-o3): a trajectory cut by a limit trains no token, so it is neither rewarded nor
            # punished for a limit's cut; its reward still enters its group's mean above
            mask = ep["mask"] if not (args.mask_truncated and ep["truncated"]) else [0] * len(ep["mask"])
            # VL-Rethinker's auxiliary NLL trains positive-advantage samples that rethink ("wait", or a trigger)
            nll = float(adv[k]) > 0 and bool(ep["rethinks"] or R.rethinker_waits("".join(ep["turns"])))
            # seq: token ids [T]; mask: 0/1 [T]; images: the encoded views; group: the key replay.py groups
            # samples by; old: behaviour log-probs [T], filled when needed (None: on-policy, old = logp.detach())
            out.append(dict(seq=ep["seq"], mask=mask, images=T.episode_images(policy, ep), adv=float(adv[k]),
                            group=(step, rank, gi), old=None, nll=nll))
            k += 1
    return out


@torch.no_grad()
def fill_old_logprobs(policy, samples, args, filler):
    """Log-probs under the policy that generated the samples (forward only), kept with each sample so
    later epochs and replays measure the ratio against it."""
    for mb in micro_batches(policy, samples, args.micro_batch, filler):
        lp, m = M.token_logprobs(policy, [s["seq"] for s in mb], [s["images"] for s in mb],
                                 [s["mask"] for s in mb], args.temperature)  # lp: [B, L] left-padded
        for s, row in zip(mb, lp):
            # the row's last len(seq) positions undo the left padding; on CPU, as SSR's store and checkpoints keep them
            s["old"] = row[-len(s["seq"]):].cpu()


# -----------------------------------------------------------------------------
# 4. the update
#
# Two paths compute the same loss and gradient. The fused path (the default) hands token_loss to the log-prob kernel
# (model.token_logprobs(token_loss=...)): each chunk of tokens forms its log-probs, its loss and the gradient of the
# loss with respect to the chunk's logits in one pass, so the [N, V] logits are never held and the backward pass
# does not recompute them (6NHV FLOPs). The unfused path computes the log-probs [B, T] first and the loss over them
# (policy_loss), so the backward recomputes the logits (8NHV): it serves the options that need a statistic of a whole
# sequence or micro-batch before any token's loss is known (GSPO's sequence ratio, the entropy quantile).


def update(policy, ref, opt, samples, args, world, filler):
    """PPO-clip on this step's samples: --ppo-epochs passes, each --mini-batches optimizer steps over consecutive
    mini-batches of them (main shuffled them), each step's gradient accumulated over micro-batches of at most
    --micro-batch sequences, then averaged over ranks. -> dict of update metrics (means over trained tokens), or None
    when the loss or the gradient was not finite (every rank then skips the step)."""
    K, n = args.mini_batches, len(samples)
    mini_batches = [samples[k * n // K:(k + 1) * n // K] for k in range(K)]  # sizes differ by at most one
    # dapo: an optimizer step's global trained tokens / world size; with several steps per rollout, the
    # average step's, as TRL (num_items_in_batch x gradient_accumulation_steps / steps_per_generation)
    num_items = C.all_sum(float(sum(sum(s["mask"]) for s in samples))) / world / K
    fused = args.is_level == "token" and args.top_entropy_quantile == 1  # see the block comment above
    # sums over the trained tokens of every pass, divided by their count at the end (loss: a sum of micro-batch losses)
    stats = dict(loss=0.0, tokens=0.0, clip_frac=0.0, clip_low=0.0, clip_high=0.0, kl_old=0.0, entropy=0.0)
    if ref is not None:
        stats["kl_ref"] = 0.0
    gn, bad = 0.0, 0  # the last step's gradient norm; micro-batches of this step with a non-finite loss
    for mini in mini_batches * args.ppo_epochs:  # each pass replays the same mini-batches in the same order, as TRL
        n_micro = max(1, math.ceil(len(mini) / args.micro_batch))
        # lockstep: top_entropy_mask gathers over ranks in every micro-batch, so every rank must run as many
        for micro in micro_batches(policy, mini, args.micro_batch, filler, lockstep=args.top_entropy_quantile < 1):
            seqs, images, masks = [s["seq"] for s in micro], [s["images"] for s in micro], [s["mask"] for s in micro]
            L, dev = max(len(q) for q in seqs), policy.device  # L: the padded length collate gives the batch
            # the stored behaviour log-probs [B, L]; a sample with none is on-policy: old = logp.detach()
            on_policy = torch.tensor([s["old"] is None for s in micro], device=dev)   # [B] bool
            old = M.left_pad([s["old"] if s["old"] is not None else [] for s in micro], L, dev)
            adv = torch.tensor([s["adv"] for s in micro], device=dev)                  # [B]
            ref_lp = None
            if ref is not None:
                with torch.no_grad():  # the reference is a fixed target: no graph
                    ref_lp, _ = M.token_logprobs(ref, seqs, images, masks, args.temperature)  # [B, L]
            # dr_grpo: sum / (this rank's sequences in the step x --max-tokens), the run's constant; over equal
            # micro-batches this is TRL's mean over micro-batches of sum / (micro-batch size x max_completion_length)
            mpad = M.left_pad(masks, L, dev)                                            # [B, L]
            w = loss_weights(mpad, args.loss_type, args.max_tokens, num_items, len(mini) or 1)  # [B, L]
            if args.loss_type in ("grpo", "bnpo"):
                w = w / n_micro  # gradient accumulation: the mean over micro-batches, as TRL does
            # --aux-nll (VL-Rethinker): + coef x the token-mean NLL of the micro-batch's selected samples
            sel = mpad * torch.tensor([float(s.get("nll", False)) for s in micro], device=dev)[:, None]  # [B, L]
            nll_w = args.aux_nll * sel / sel.sum().clamp(min=1) / n_micro                          # [B, L]
            clip = dict(eps_low=args.eps_low, eps_high=args.eps_high, kl_ratio=args.kl_ratio, delta=args.delta)
            if fused:
                def per_token(lp, b, t):  # policy_loss's terms for the trained tokens at rows b, positions t
                    # on-policy: old = lp.detach(), so the ratio is 1 in value and its gradient is that of lp
                    o = torch.where(on_policy[b], lp.detach(), old[b, t])
                    r = ref_lp[b, t] if ref_lp is not None else None
                    return token_loss(lp, o, adv[b], ref_logp=r, beta=args.beta, **clip) * w[b, t] - lp * nll_w[b, t]
                loss, logp, m, ent = M.token_logprobs(policy, seqs, images, masks, args.temperature,
                                                      entropy=True, token_loss=per_token)
            else:
                logp, m, ent = M.token_logprobs(policy, seqs, images, masks, args.temperature, entropy=True)
                loss = policy_loss(logp, torch.where(on_policy[:, None], logp.detach(), old), adv, m, args.loss_type,
                                   ref_logp=ref_lp, beta=args.beta, is_level=args.is_level, entropy=ent,
                                   top_entropy_quantile=args.top_entropy_quantile, weights=w, **clip)
                loss = loss - (logp * nll_w).sum()
                logp = logp.detach()  # the diagnostics below read values only
            bad += not bool(torch.isfinite(loss))
            loss.backward()  # gradients add up in .grad over the micro-batches of the step
            with torch.no_grad():  # diagnostics over trained tokens; clip fractions as TRL logs them
                old = torch.where(on_policy[:, None], logp, old)  # on-policy rows: ratio 1, never clipped
                ratio = torch.exp(seq_log_ratio(logp, old, m) if args.is_level == "sequence" else logp - old)
                # a token counts as clipped only where the clip binds: below the range with a negative advantage,
                # above it with a positive one (elsewhere the unclipped branch is the min and keeps its gradient)
                low = (ratio < 1 - args.eps_low) & (adv[:, None] < 0)
                high = (ratio > 1 + args.eps_high) & (adv[:, None] > 0)
                per_token_stats = dict(clip_frac=low | high, clip_low=low, clip_high=high, kl_old=k3(old, logp),
                                       entropy=ent, tokens=torch.ones_like(m))  # tokens x m: their count
                if ref_lp is not None:
                    per_token_stats["kl_ref"] = k3(ref_lp, logp)
                for k, v in per_token_stats.items():
                    stats[k] += float((v * m).sum())
                stats["loss"] += loss.item()
        if not policy.sharded:  # FSDP reduce-scatters its own gradients during backward
            C.allreduce_grads(policy.model)
        gn = torch.nn.utils.clip_grad_norm_(policy.model.parameters(), args.grad_clip)  # the norm before clipping
        gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)  # FSDP2's norm is a DTensor
        # decided together: every rank skips (one rank stepping alone would leave the replicas apart)
        if C.all_sum(float(bad)) > 0 or not math.isfinite(gn):
            opt.zero_grad(set_to_none=True)
            return None
        opt.step()
        opt.zero_grad(set_to_none=True)
    # the loss: the mean over the optimizer steps; the rest: means over this rank's trained tokens of every pass
    loss, t = stats.pop("loss") / (args.ppo_epochs * K), max(stats.pop("tokens"), 1.0)
    return dict(loss=loss, grad_norm=gn, **{k: v / t for k, v in stats.items()})


@torch.no_grad()
def sync_reference(ref, policy, alpha):
    """TRL's SyncRefModelCallback (Groundlight re-syncs every 64 steps with alpha 0.9): ref <- (1 - a) ref + a policy.
    Both are laid out alike (sharded alike under FSDP), so parameters pair up one to one."""
    for r, p in zip(ref.model.parameters(), policy.model.parameters()):
        r.mul_(1 - alpha).add_(p.detach().to(r.dtype), alpha=alpha)


# -----------------------------------------------------------------------------
# distributed padding: sharded ranks (FSDP) run a collective in every forward, so all must run as many


def micro_batches(policy, samples, size, filler, lockstep=False):
    """Micro-batches of `size` samples. Sharded ranks (with lockstep, any ranks: a collective per micro-batch)
    run the same number of passes: those with fewer pad with a copy of `filler` that trains no token."""
    mbs = [samples[i:i + size] for i in range(0, len(samples), size)]
    if M.lockstep(policy) or (lockstep and dist.is_initialized()):
        n = torch.tensor([len(mbs)], device=policy.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        # the filler runs the forward (and its collectives) but, with an all-zero mask, trains and logs no token
        mbs += [[dict(filler, mask=[0] * len(filler["mask"]), old=None, adv=0.0)]] * (int(n) - len(mbs))
    return mbs


# -----------------------------------------------------------------------------
# 5. the training loop


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_flags(p, model=None, out=C.DEMO_GRPO, steps=40)
    # rollouts
    p.add_argument("--prompts", type=int, default=8, help="prompts per step, over all ranks")
    p.add_argument("--group-size", type=int, default=8, help="G trajectories per prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    C.add_filter_flags(p)
    # rewards and advantages
    p.add_argument("--preset", default="vlm_r3", help=f"reward preset: {', '.join(R.PRESETS)}")
    p.add_argument("--weights", default=None, help='override reward weights, JSON: \'{"accuracy": 1, "length": 0}\'')
    p.add_argument("--scale-rewards", default="group", choices=["group", "batch", "none"])
    # selecting what to train on
    p.add_argument("--ssr", action="store_true", help="VL-Rethinker's Selective Sample Replay")
    p.add_argument("--ssr-alpha", type=float, default=1.0)
    p.add_argument("--ssr-extend", default="before", choices=["before", "after"],
                   help="add a step's samples to the replay store before drawing (VL-Rethinker's code) or after")
    p.add_argument("--update-size", type=int, default=None,
                   help="samples per update with SSR (default: half the rollout)")
    p.add_argument("--drop-zero", action="store_true", help="drop groups whose advantages are all zero")
    p.add_argument("--mask-truncated", action="store_true", help="no loss on trajectories cut by a limit (Mini-o3)")
    # forced rethinking
    p.add_argument("--rethink", action="store_true", help="VL-Rethinker's forced rethinking")
    p.add_argument("--rethink-prob", type=float, default=0.65, help="share of the candidates that are continued")
    p.add_argument("--rethink-truncate", type=float, default=0.5, help="probability of cutting the response back first")
    p.add_argument("--rethink-temperature", type=float, default=0.9, help="sampling temperature of the continuation")
    p.add_argument("--aux-nll", type=float, default=0.0,
                   help="VL-Rethinker's auxiliary NLL (0.05) on positive-advantage samples that rethink")
    # optimisation (docs/recipes.md: each loss flag's TRL name)
    p.add_argument("--loss-type", default="dapo", choices=["grpo", "bnpo", "dr_grpo", "dapo"],
                   help="dr_grpo's constant is --max-tokens, the sampled-token budget")
    p.add_argument("--eps-low", type=float, default=0.2)
    p.add_argument("--eps-high", type=float, default=0.28)
    p.add_argument("--delta", "--dual-clip", type=float, default=None, help="cap the ratio in the unclipped branch "
                   "(TRL's two-sided clip; dual-clip PPO's c when >= 1 + eps-high, ViLaSR/EasyR1: 3)")
    p.add_argument("--is-level", default="token", choices=["token", "sequence"],
                   help="importance ratio per token, or per sequence (GSPO: exp of the mean log-ratio)")
    p.add_argument("--top-entropy-quantile", type=float, default=1.0,
                   help="policy loss only on the top share of a micro-batch's trained tokens by entropy (0.2: '80/20')")
    # 0.04: DeepSeekMath's GRPO; on the demo it keeps the zooms the reward does not speak to where SFT left them
    # (docs/demo.md); the recipes set their papers' (most 0: no reference loaded)
    p.add_argument("--beta", type=float, default=0.04, help="KL weight (k3) to the initial policy; 0: no reference")
    p.add_argument("--ref-sync-every", type=int, default=0,
                   help="every N steps move the reference to the policy (TRL's ref_model_sync_steps; Groundlight: 64)")
    p.add_argument("--ref-sync-alpha", type=float, default=0.9,
                   help="ref <- (1 - alpha) ref + alpha policy (TRL's mixup alpha)")
    p.add_argument("--kl-ratio", action=argparse.BooleanOptionalAction, default=True,
                   help="the KL term times the importance ratio (TRL's use_bias_correction_kl); --no-kl-ratio: k3")
    p.add_argument("--ppo-epochs", type=int, default=1, help="passes over each rollout")
    p.add_argument("--mini-batches", type=int, default=1,
                   help="optimizer steps per pass: the rollout's samples, shuffled (seeded), cut into this many")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward")
    C.add_optim_flags(p, lr=5e-4, warmup=5, schedule="constant")
    p.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (7B: weights + Adam > one GPU)")
    # evaluation, checkpoints
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", default=None, help="a checkpoint folder to continue from, or auto: the newest in --out")
    p.add_argument("--max-nan", type=int, default=5, help="stop after this many non-finite losses in a row")
    # what the run shows: sampled rollouts on <out>/view.html, curves.png, a logger
    p.add_argument("--view-every", type=int, default=10, help="every N steps save some rollouts for the page (0: off)")
    p.add_argument("--view-groups", type=int, default=2, help="groups (prompts) of rank 0 saved per --view-every")
    V.add_report_flag(p)
    args = C.parse_args(p, argv, "grpo")
    if args.model is None:  # the CPU demo starts from the SFT demo's cold start when there is one
        args.model = C.DEMO_SFT if os.path.isdir(C.DEMO_SFT) else "tiny"
    args.tools = C.parse_tools(args.tools)
    # group_size >= 2: a group of one has advantage 0 and teaches nothing
    C.check_flags(args, ge=dict(prompts=1, group_size=2, micro_batch=1, ppo_epochs=1, mini_batches=1, update_size=1,
                                eval_every=0, eval_n=1, max_nan=1, ssr_alpha=0, rethink_prob=0, rethink_truncate=0,
                                eps_low=0, eps_high=0, beta=0, top_entropy_quantile=0, aux_nll=0, ref_sync_every=0,
                                ref_sync_alpha=0, view_every=0, view_groups=1),
                  gt=dict(temperature=0, top_p=0, delta=1, rethink_temperature=0),
                  le=dict(top_p=1, min_p=1, rethink_prob=1, rethink_truncate=1, top_entropy_quantile=1,
                          ref_sync_alpha=1))
    if args.preset not in R.PRESETS:
        raise SystemExit(f"--preset: unknown {args.preset!r}; known: {', '.join(R.PRESETS)}")
    try:
        args.weights = json.loads(args.weights) if args.weights else None
        # score an empty episode: a weight naming an unknown term fails now, not after the first rollout
        R.reward(dict(turns=[], calls=[], stop="answer"), dict(answer="x", type="text"), args.preset, args.weights)
    except ValueError as e:
        raise SystemExit(f"--weights: {e}")
    return args


def prompt_indices(n_records, step, n_prompts, rank, world, seed):
    """This rank's share of step `step`'s prompts as (global prompt number, record index): a seeded
    permutation per pass over the data, so the data order is a function of (seed, step) and --resume
    needs no data state."""
    per = n_prompts // world
    out = []
    for j in range(step * n_prompts + rank * per, step * n_prompts + (rank + 1) * per):
        epoch, k = divmod(j, n_records)  # prompt j is the k-th of pass `epoch` over the data
        # each pass its own order, seeded by (seed, epoch): every rank draws the same permutation
        out.append((j, int(np.random.default_rng([seed, epoch]).permutation(n_records)[k])))
    return out


def read_images(records, idx):
    """The step's prompts (idx: prompt_indices) -> (idx, their records with the images read, or for synthetic
    ones drawn). main() runs this one step ahead in a background thread: decoding (drawing) the next step's
    images, which PIL and numpy do without holding the GIL, overlaps this step's rollout and update."""
    return idx, [dict(records[i], image=D.load_images(records[i])) for _, i in idx]


def step_metrics(groups, scores, samples, batch, up):
    """Sums and counts of this rank's step, reduced over ranks by the caller. -> dict name -> (sum, count)"""
    eps = [ep for g in groups for ep in g]
    flat = [s for g in scores for s in g]  # (reward, {term: value}) per episode
    calls = [c for ep in eps for c in ep["calls"]]
    n = len(eps)
    m = {"reward": (sum(s[0] for s in flat), n), "accuracy": (sum(s[1]["accuracy"] for s in flat), n)}
    m.update({"r_" + k: (sum(s[1].get(k, 0.0) for s in flat), n) for k in flat[0][1]})
    per_episode = dict(tool_use=lambda ep: any(c["ok"] for c in ep["calls"]), calls=lambda ep: len(ep["calls"]),
                       turns=lambda ep: len(ep["turns"]), images=lambda ep: len(ep["images"]),
                       response_tokens=lambda ep: ep["n_sampled"], truncated=lambda ep: ep["truncated"],
                       answered=lambda ep: ep["stop"] == "answer")
    m.update({k: (sum(f(ep) for ep in eps), n) for k, f in per_episode.items()})
    m["failed_calls"] = (sum(not c["ok"] for c in calls), len(calls))
    m["nonzero_groups"] = (replay.nonzero_group_share(samples) * len(groups), len(groups))  # SSR's key diagnostic
    m["replayed"] = (sum(s.get("replayed", False) for s in batch), len(batch))
    # IoU of the best zoom with the record's ground-truth box, on the records that have one (None otherwise)
    cov = [c for c in (R.coverage(T.trajectory(ep), ep["record"])[0] for ep in eps) if c is not None]
    m["coverage_iou"] = (sum(cov), len(cov))
    for k, v in (up or {}).items():  # per rank: (v, 1) averages them over ranks
        m[k] = (v, 1)
    return m


def heldout_eval(policy, records, args, cfg):
    """--eval-every: greedy rollouts on the held-out records (sharded over ranks by common.run_episodes).
    -> {eval_accuracy, eval_tool_use, eval_calls_per_item}"""
    def finish(ep, record):
        score = R.accuracy("".join(ep["turns"]), record, ep["dialect"]["answer"], ep["truncated"] or ep["cut"])[0]
        return score, any(c["ok"] for c in ep["calls"]), len(ep["calls"])
    done, _ = C.run_episodes(policy, records, args.tools, cfg, finish, seed=args.seed, desc="eval", progress=False)
    acc, used, calls = (sum(v) / len(done) for v in zip(*done.values()))  # done: {(i, 0): finish's triple}
    return dict(eval_accuracy=acc, eval_tool_use=used, eval_calls_per_item=calls)


def main(argv=None):
    args = get_args(argv)
    rank, world, device = C.setup(args)
    # everything a user can get wrong is checked before any work starts
    if args.prompts % world:
        raise SystemExit(f"--prompts {args.prompts} does not divide by the world size {world}")
    if args.fsdp and args.eval_every:
        raise SystemExit("--eval-every is not supported with --fsdp: run eval.py on the saved checkpoint")
    n_roll = args.prompts // world * args.group_size  # this rank's trajectories per step
    update_size = args.update_size or max(1, n_roll // 2)  # SSR's samples per update: VL-Rethinker's half a rollout
    if args.rethink and args.preset != "vl_rethinker":
        C.print0(f"note: --rethink with preset {args.preset}: VL-Rethinker's reward is the vl_rethinker preset")
    records = C.dataset(args, "train")
    heldout = C.dataset(args, "test", n=args.eval_n) if args.eval_every else None

    ref = None
    if args.beta:  # the KL reference: the initial policy, frozen
        ref = C.load_policy(args.model, seed=args.seed, device=device)
        ref.model.requires_grad_(False).eval()
    policy, opt, state = C.start_run(args, rank, device, shard=args.fsdp)
    if args.fsdp and ref is not None:
        M.shard(ref)
    cfg = C.episode_cfg(args, policy)
    C.write_config(args, rank, world=world, episode=cfg)
    start, nan_run = state["step"], state.get("nan_run", 0)  # a resumed run goes on counting non-finite steps
    store = state.get("store", replay.new_store(update_size) if args.ssr else None)  # VL-Rethinker: half a rollout
    C.print0(f"grpo: {args.model} on {args.data} ({len(records)} prompts), {world} process(es), "
             f"{args.prompts} prompts x {args.group_size} per step, tools {args.tools}, preset {args.preset}")

    ahead = ThreadPoolExecutor(1)  # reads the next step's images while this step runs (read_images)

    def fetch(step):
        return ahead.submit(read_images, records,
                            prompt_indices(len(records), step, args.prompts, rank, world, args.seed))
    upcoming = fetch(start)
    metrics_path, curves = os.path.join(args.out, "metrics.jsonl"), os.path.join(args.out, "curves.png")
    if rank == 0:
        V.clear_rollouts(args.out, start)
    t_start = time.time()
    for step in C.progress_bar(range(start, args.steps), desc="grpo", unit="step", initial=start, total=args.steps):
        lr = C.set_lr(opt, step, args)
        # SSR and rethinking draw from per-step generators: a function of (seed, step, rank) only
        nprng = np.random.default_rng([args.seed, step, rank])
        pyrng = random.Random(f"{args.seed}-{step}-{rank}")
        t0 = time.time()
        # 1. rollouts: G episodes per prompt, all in one batched loop
        policy.model.eval()
        (idx, recs), upcoming = upcoming.result(), fetch(step + 1) if step + 1 < args.steps else None
        groups = [T.new_group(policy, r, args.tools, args.group_size, **cfg) for r in recs]  # [B][G] episodes
        for (j, _), g in zip(idx, groups):  # each trajectory's own seed: (seed, step, global prompt, member)
            for k, ep in enumerate(g):
                T.seed_episode(ep, device, args.seed, step, j, k)
        T.rollout(policy, [ep for g in groups for ep in g], args.temperature, max_turn_tokens=args.max_turn_tokens,
                  **C.filters(args))
        t1 = time.time()
        # the samples that reflect on their own ("wait", rewards.rethinker_waits), counted before forced rethinking
        self_waits = (sum(R.rethinker_waits("".join(ep["turns"])) > 0 for g in groups for ep in g), n_roll)  # (n, of)
        # 2. rewards (and forced rethinking, which rolls out again)
        # scores [B][G]: (reward, {term: value}); forced rethinking replaces an episode and its score in place
        scores = [[R.reward(T.trajectory(ep), ep["record"], args.preset, args.weights)[:2] for ep in g] for g in groups]
        n_rethink = rethink.forced_rethinking(
            policy, groups, scores, pyrng, score=lambda ep: R.reward(T.trajectory(ep), ep["record"], args.preset,
                                                                     args.weights)[:2],
            max_tokens=args.max_tokens, prob=args.rethink_prob, truncate=args.rethink_truncate,
            temperature=args.rethink_temperature, max_turn_tokens=args.max_turn_tokens,
            **C.filters(args)) if args.rethink else 0
        samples = make_samples(policy, groups, scores, args, step, rank)  # B*G dicts, group order
        # 3. what to train on: everything, the useful groups, or SSR's resampled batch
        if args.ssr:
            # a drawn sample may be replayed at a later step, from an older policy: its ratio needs the log-probs
            # of the policy that sampled it, taken now (zero-advantage samples are never drawn; samples[0]: filler)
            fill_old_logprobs(policy, replay.nonzero(samples), args, samples[0])
            batch = replay.ssr(samples, store, update_size, args.ssr_alpha, rng=nprng,
                               extend_first=args.ssr_extend == "before")
        elif args.drop_zero:
            batch = replay.drop_zero_groups(samples)
        else:
            batch = samples
        # once, before the first step: the steps after it train off-policy and need the sampler's log-probs;
        # with a single step old = logp.detach() is exact and saves this forward pass
        if (args.ppo_epochs > 1 or args.mini_batches > 1) and not args.ssr:
            fill_old_logprobs(policy, batch, args, samples[0])
        if args.mini_batches > 1:  # mini-batches that mix the groups, not one prompt's G trajectories each
            batch = [batch[i] for i in nprng.permutation(len(batch))]
        t2 = time.time()
        # 4. the update
        policy.model.train()
        up = None
        if C.all_sum(float(len(batch))) > 0:  # decided over all ranks: update() runs collectives
            up = update(policy, ref, opt, batch, args, world, samples[0])
        t3 = time.time()
        nan_run = nan_run + 1 if up is None and batch else 0  # non-finite steps in a row (--max-nan)
        # 5. metrics: means over every rank's episodes (update stats: the mean over ranks), one JSONL line
        row = dict(step=step + 1, lr=lr, **C.mean_over_ranks(dict(step_metrics(groups, scores, samples, batch, up),
                                                                  self_waits=self_waits)))
        row.update(skipped=up is None, rethinks_kept=C.all_sum(float(n_rethink)),
                   tokens_per_s=C.all_sum(float(sum(ep["n_sampled"] for g in groups for ep in g))) / max(t1 - t0, 1e-9),
                   time_rollout=t1 - t0, time_scoring=t2 - t1, time_update=t3 - t2)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            row.update(heldout_eval(policy, heldout, args, cfg))
        # 6. every --view-every steps: a few groups for the page (and --report-to's table), the curves so far
        view = rank == 0 and args.view_every and (step + 1) % args.view_every == 0
        table = V.save_rollouts(args.out, step + 1, groups[:args.view_groups], [s["adv"] for s in samples],
                                args.preset, args.weights) if view else None
        C.log_metrics(args, rank, row, table)
        if view:
            V.plot_curves(metrics_path, curves)
            left = (time.time() - t_start) / (step + 1 - start) * (args.steps - step - 1)
            tqdm.write(f"step {step + 1}/{args.steps}, {tqdm.format_interval(left)} left: reward {row['reward']:.3f}, "
                       f"accuracy {row['accuracy']:.3f}, tool use {row['tool_use']:.2f} -> {V.write_page(args.out)}")
        if ref is not None and args.ref_sync_every and (step + 1) % args.ref_sync_every == 0:
            sync_reference(ref, policy, args.ref_sync_alpha)
        if nan_run >= args.max_nan:
            raise SystemExit(f"stopping: {nan_run} steps in a row had a non-finite loss or gradient (lr {lr:g})")
        checkpoint.save(args, policy, opt, step, rank, store=store, nan_run=nan_run)
    C.print0(f"done: {args.out} (metrics in {metrics_path})")
    if rank == 0 and V.plot_curves(metrics_path, curves):
        page = os.path.join(args.out, "view.html")
        print(f"curves: {curves}" + (f"; sampled rollouts: {page}" if os.path.isfile(page) else ""))
    C.teardown()


if __name__ == "__main__":
    main()
