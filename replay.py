"""
replay.py: Selective Sample Replay (SSR, VL-Rethinker, arXiv 2504.08837) and the plain zero-group filter.

Why. GRPO's advantage is A_i = r_i - mean(r) over a group of G answers. When all G answers get the same reward
(all right on an easy question, all wrong on a hard one) every A_i is 0 and the group gives no gradient: "vanishing
advantages". As the policy improves more groups saturate (VL-Rethinker: useful groups fell from ~40% to <20% within
256 steps) and the update shrinks and gets noisy: log `nonzero_group_share` every step, the key diagnostic.

What SSR does, each step (one rollout -> one update):
  1. drop zero-advantage samples;
  2. draw the update from the rest with probability proportional to |A|^alpha (alpha = 1 in the paper), as in
     prioritized experience replay: samples far from their group's mean (a group's lone right answer) teach most;
  3. when the step has fewer useful samples than the fixed update size, fill the rest from a bounded store
     of recent non-zero-advantage samples (oldest evicted first), drawn with probability proportional to
     |A| + 1e-4. Replayed samples keep their old log-probs: the PPO ratio and clip handle the policy's drift.
`drop_zero_groups` is the plain alternative (DAPO-style filtering without resampling or replay).

Sampling follows VL-Rethinker's `NaiveReplayBuffer.active_sampling` (openrlhf/trainer/ppo_utils/replay_buffer.py):
current samples are drawn WITH replacement, min(size, n_current) draws; the fill takes the whole store once per full
pass while more is needed than the store holds, then draws the remainder WITH replacement; this step's samples join
the store before drawing, as in their code (extend_first=False: after, so the fill never replays them). Differences:
zero means |A| <= eps (they test A == 0 exactly), and the update always has `size` samples.

Usage (in grpo.py):
    store = new_store(capacity=size)            # VL-Rethinker: half a rollout buffer for both
    batch = ssr(samples, store, size, alpha=1.0, rng=rng)  # [] (nothing useful, nothing stored): skip the update
A sample is a plain dict with "adv" (float) and "group" (hashable); other keys ride along untouched.
"""
import numpy as np
import torch


def new_store(capacity):
    """Plain lists, numbers and tensors only, so a checkpoint holding the store loads with weights_only=True."""
    if capacity <= 0:
        raise ValueError(f"replay store capacity must be > 0, got {capacity}")
    return {"items": [], "capacity": int(capacity)}


def nonzero(samples, eps=1e-6):
    # eps, not == 0: a group mean like (0.1 + 0.1 + 0.1) / 3 leaves rounding dust in "zero" advantages
    return [s for s in samples if abs(float(s["adv"])) > eps]


def drop_zero_groups(samples, eps=1e-6):
    """Drop every group whose advantages are all ~zero; keep useful groups whole."""
    # a useful group stays whole (DAPO filters prompts, not samples): a member at the group mean keeps its A = 0
    useful = {s["group"] for s in nonzero(samples, eps)}
    return [s for s in samples if s["group"] in useful]


def nonzero_group_share(samples, eps=1e-6):
    """Share of groups with at least one non-zero advantage (0.0 for no samples)."""
    groups = {s["group"] for s in samples}
    return len({s["group"] for s in nonzero(samples, eps)}) / len(groups) if groups else 0.0


def _cpu(x):
    # the store outlives the step: keep no GPU memory and no autograd graph alive through it
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu(v) for v in x)
    return x


def _draw(items, weights, k, rng):
    p = np.asarray(weights, dtype=np.float64)
    # with replacement, as VL-Rethinker's np.random.choice: a strong sample can come up more than once
    idx = rng.choice(len(items), size=k, replace=True, p=p / p.sum())
    return [items[i] for i in idx]


def _extend(store, samples):
    # the newest `capacity` kept, oldest evicted first: VL-Rethinker's deque(maxlen=...)
    store["items"] = (store["items"] + [_cpu(s) for s in samples])[-store["capacity"]:]


def ssr(samples, store, size, alpha=1.0, rng=None, extend_first=True):
    """`size` samples as shallow copies with "replayed" set, current first (not shuffled); [] if nothing is usable."""
    if size <= 0:
        raise ValueError(f"SSR update size must be > 0, got {size}")
    if alpha < 0:
        raise ValueError(f"SSR alpha must be >= 0, got {alpha}")
    rng = np.random.default_rng() if rng is None else rng
    cur = nonzero(samples)  # step 1: the zero-advantage samples go
    if extend_first:  # VL-Rethinker's order: the fill below may draw this step's samples again
        _extend(store, cur)
    old = list(store["items"])  # what the fill draws from: a snapshot, before an extend after the draws
    if not cur and not old:
        return []
    batch = []
    if cur:
        # step 2: |A|^alpha, prioritized replay's weights (a group's lone right answer is drawn most); min(size,
        # n_current) draws (VL-Rethinker: min(half a rollout, n_current)), and on an empty store the whole update
        # comes from the current samples (with repeats)
        k = min(size, len(cur)) if old else size
        # (|A| / max |A|)^alpha: the same law, but a large alpha neither underflows every weight to 0 (|A| 1e-3,
        # alpha 200) nor overflows one to inf (|A| 10, alpha 400), which would leave no probabilities to draw by
        top = max(abs(float(s["adv"])) for s in cur)
        weights = [(abs(float(s["adv"])) / top) ** alpha for s in cur]
        batch = [dict(s, replayed=False) for s in _draw(cur, weights, k, rng)]
    need = size - len(batch)
    if need > 0:
        # step 3: whole passes over the store while it is smaller than what is missing, (need - 1) // len(old) of
        # them, which leaves 1 to len(old) to draw; + 1e-4 keeps every sample reachable (VL-Rethinker's weights
        # are also x 0.8, which normalising cancels)
        fill = old * ((need - 1) // len(old))
        fill += _draw(old, [abs(float(s["adv"])) + 1e-4 for s in old], need - len(fill), rng)
        batch += [dict(s, replayed=True) for s in fill]  # shallow copies: the stored sample itself is never marked
    if not extend_first:  # --ssr-extend after: only earlier steps' samples ever fill
        _extend(store, cur)
    return batch
