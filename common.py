"""
common.py: the plumbing sft.py, grpo.py and eval.py share, and nothing more (no script imports another; not run as a
script). Top to bottom: 1. flags (the shared ones, --recipe, all ranges checked before anything loads); 2. processes
(torchrun, print0, sums and gathers over ranks); 3. the policy (load_policy) and run_episodes (a dataset rolled out over
ranks: eval.py, sft.py --reflect, grpo.py --eval-every); 4. the training skeleton of sft.py and grpo.py (start_run,
set_lr, log_metrics, save_run) and its checkpoints (written aside, marked whole last; --resume auto finds the newest).
"""
import argparse
import json
import math
import operator
import os
import random
import resource
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data as D
import model as M
import tools as T
import view as V

DEMO_SFT, DEMO_GRPO = "runs/sft", "runs/grpo"  # where the CPU demo's `python sft.py` and `python grpo.py` save

# -----------------------------------------------------------------------------
# 1. flags


def add_common_flags(p, model="tiny", out="runs/x", steps=10):
    """The flags sft.py, grpo.py and eval.py share."""
    # what to run on
    p.add_argument("--model", default=model, help="'tiny', 'random-3b', a hub id, or a checkpoint folder")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a lookagain JSONL path")
    p.add_argument("--out", default=out, help="the run folder")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--seed", type=int, default=0)
    # the environment
    p.add_argument("--tools", default="zoom_in", help="comma-separated: zoom_in,zoom_point,draw_box,draw_line, or none")
    p.add_argument("--view-max-pixels", type=int, help="first look's pixel budget (default: the image processor's)")
    p.add_argument("--crop-max-pixels", type=int, help="a zoom's pixel budget (default: the image processor's)")
    p.add_argument("--zoom-window", type=int, default=400, help="zoom_point's window, original pixels")
    p.add_argument("--max-turns", type=int, default=4)
    p.add_argument("--max-images", type=int, default=6)
    p.add_argument("--max-turn-tokens", type=int, default=96)
    p.add_argument("--max-tokens", type=int, default=256, help="sampled tokens per trajectory")
    # the methods' own variants of the environment (tools.DEFAULTS says what each does)
    p.add_argument("--view-max-side", type=int, default=0, help="resize each image to this long side first (0: off)")
    p.add_argument("--adaptive-zoom", action=argparse.BooleanOptionalAction, default=True, help="VLM-R3's 1-2x zoom factor")
    p.add_argument("--zoom-source", default="original", choices=["original", "view"], help="zoom_point cuts from")
    p.add_argument("--stop-on", type=stop_list, default=("repeat",), help="what ends an episode early, "
                   "comma-separated: repeat (a repeated call), error (a failed call), or none")
    p.add_argument("--final-answer-turn", action="store_true", help="the last allowed turn is told to answer")
    p.add_argument("--answer-format", default="tags", choices=["tags", "boxed"])
    # the model
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--freeze-vision", action="store_true")
    # each paper's settings in one flag (RECIPES); an explicit flag wins
    p.add_argument("--recipe", choices=list(RECIPES), help="a method's settings, as its released code runs it")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")
    return p


def add_optim_flags(p, lr, warmup, schedule):
    """AdamW and its schedule: the flags sft.py and grpo.py share (with their own defaults)."""
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--lr-min-ratio", type=float, default=0.0, help="the cosine schedule ends at this share of --lr")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--adam-betas", type=betas, default=(0.9, 0.95), help="beta1,beta2")
    p.add_argument("--warmup", type=float, default=warmup, help="warmup steps, or a share of --steps when below 1")
    p.add_argument("--schedule", default=schedule, choices=["cosine", "constant"])
    p.add_argument("--grad-clip", type=float, default=1.0)


def stop_list(s):
    stops = tuple(x for x in s.split(",") if x not in ("", "none"))
    if set(stops) - {"repeat", "error"}:
        raise argparse.ArgumentTypeError(f"{s!r}: a comma-separated list of repeat, error (or none)")
    return stops


def betas(s):
    b = tuple(float(x) for x in s.split(","))
    if len(b) != 2 or not all(0 <= x < 1 for x in b):
        raise argparse.ArgumentTypeError(f"{s!r}: two numbers in [0, 1), e.g. 0.9,0.999")
    return b


def parse_args(p, argv, script):
    """p.parse_args, then --recipe fills the flags the command line did not give; --print-config prints all, exits."""
    args = p.parse_args(argv)
    if args.recipe:
        typed = set(argv if argv is not None else sys.argv[1:])
        given = {a.dest for a in p._actions if any(s.split("=")[0] in a.option_strings for s in typed)}
        recipe = RECIPES[args.recipe]
        for k, v in {**recipe["all"], **recipe.get(script, {})}.items():
            if hasattr(args, k) and k not in given:
                setattr(args, k, v)
    if args.print_config:
        print(json.dumps({k.replace("_", "-"): v for k, v in vars(args).items() if k != "print_config"}, indent=1))
        raise SystemExit(0)
    return args


# Each paper's settings as its released code runs them (SPEC 2.5; README's recipe table names the file of
# each value): "all" for every script, then grpo.py's, sft.py's and eval.py's own. A flag given on the command
# line wins; a script takes the keys it has flags for. Pixel budgets in Qwen's units of 28 x 28 = 784 px.
RECIPES = {
    # justgogorunrun/VLM-R3: run_rgrpo_vllm.sh, src/r1-v/src/open_r1/rgrpo.py and trainer/vllm_rgrpo_trainer.py
    # (RL), qwen_vl_finetune/sft_7b.sh (SFT), src/eval/test_vstar_r3.py (eval)
    "vlm_r3": dict(
        all=dict(tools="zoom_in", view_max_pixels=4096 * 784, crop_max_pixels=1024 * 784, max_turns=8,
                 max_turn_tokens=2048, max_tokens=8 * 2048, freeze_vision=True),
        grpo=dict(preset="vlm_r3", group_size=5, prompts=8, lr=1e-6, schedule="constant", warmup=0, weight_decay=0.0,
                  adam_betas=(0.9, 0.999), grad_clip=1.0, eps_low=0.2, eps_high=0.28, beta=0.0, temperature=1.0,
                  top_p=1.0, loss_type="grpo", scale_rewards="group"),
        sft=dict(lr=2e-7, schedule="cosine", warmup=0.03, weight_decay=0.0, adam_betas=(0.9, 0.999), grad_clip=1.0,
                 view_max_pixels=2048 * 784, crop_max_pixels=2048 * 784, max_tokens=4096),
        eval=dict(view_max_pixels=8192 * 784, crop_max_pixels=4096 * 784, temperature=0.0)),
    # TIGER-AI-Lab/VL-Rethinker: scripts/train_vlm_multi.sh, openrlhf/trainer/ppo_utils/experience_maker.py,
    # replay_buffer.py, openrlhf/models/loss.py, openrlhf/cli/train_ppo_ray.py; eval: scripts/eval_vlm_new.sh
    "vl_rethinker": dict(
        all=dict(tools="none", view_max_pixels=1280 * 784, max_turn_tokens=2048, max_tokens=2048, answer_format="boxed"),
        grpo=dict(preset="vl_rethinker", group_size=8, prompts=512, mini_batches=8, lr=1e-6, schedule="cosine",
                  lr_min_ratio=0.5, warmup=0.03, weight_decay=0.0, adam_betas=(0.9, 0.95), grad_clip=1.0, eps_low=0.2,
                  eps_high=0.35, beta=0.0, temperature=1.0, top_p=0.95, top_k=40, loss_type="bnpo",
                  scale_rewards="none", ssr=True, ssr_extend="before", rethink=True, rethink_prob=0.65,
                  rethink_truncate=0.5, rethink_temperature=0.9, aux_nll=0.05),
        eval=dict(temperature=0.0)),
    # AntResearchNLP/ViLaSR: train/rl/train_grpo.sh, config_grpo.yaml, verl/workers/actor/config.py,
    # verl/workers/rollout/vllm_rollout/vllm_rollout_spmd_video.py, verl/utils/reward_score/gcot.py;
    # train/cold_start/*/config_cold_start.yaml (SFT); eval/infer.sh, eval/infer.py (eval)
    "vilasr": dict(
        all=dict(tools="draw_box,draw_line", view_max_pixels=256 * 784, max_turns=10, max_images=43,
                 max_turn_tokens=1024, max_tokens=13312, stop_on=("error",), final_answer_turn=True),
        grpo=dict(preset="vilasr", group_size=8, prompts=32, mini_batches=2, lr=1e-6, schedule="constant", warmup=0,
                  weight_decay=1e-2, adam_betas=(0.9, 0.999), grad_clip=1.0, eps_low=0.2, eps_high=0.3, delta=3.0,
                  beta=0.0, temperature=1.0, top_p=1.0, loss_type="grpo", scale_rewards="group"),
        sft=dict(lr=1e-5, schedule="cosine", warmup=0.1, weight_decay=0.0, adam_betas=(0.9, 0.999), grad_clip=1.0,
                 view_max_pixels=1280 * 784, freeze_vision=True, max_tokens=18432),
        eval=dict(view_max_pixels=448 * 784, temperature=0.75, top_p=0.9, max_turn_tokens=16384, max_images=45)),
    # groundlight/r1_vlm: src/r1_vlm/environments/tool_use_text_vqa_env/ (tool_use_text_vqa_train.py,
    # tool_use_text_vqa_env.py), src/r1_vlm/tools/zoom.py, datasets/text_vqa/text_vqa_tool_use_r1.py;
    # its TRL fork: trl/trainer/qwen_grpo_trainer.py, grpo_config.py, callbacks.py
    "groundlight": dict(
        all=dict(tools="zoom_point", view_max_side=1024, view_max_pixels=16384 * 784, crop_max_pixels=16384 * 784,
                 zoom_window=400, zoom_source="view", max_turns=2, max_images=2, max_turn_tokens=2048,
                 max_tokens=2048, final_answer_turn=True),
        grpo=dict(preset="groundlight", group_size=3, prompts=4, lr=1e-5, schedule="cosine", warmup=10,
                  weight_decay=0.0, adam_betas=(0.9, 0.98), grad_clip=1e-4, eps_low=0.2, eps_high=0.28, beta=1e-4,
                  ref_sync_every=64, ref_sync_alpha=0.9, temperature=1.0, top_p=1.0, loss_type="grpo",
                  scale_rewards="group"),
        eval=dict(temperature=0.1)),
    # Visual-Agent/DeepEyes: examples/agent/final_merged_v1v8_thinklite.sh, verl/trainer/config/ppo_trainer.yaml,
    # verl/utils/reward_score/vl_agent.py, verl/workers/agent/envs/mm_process_engine/visual_toolbox_v2.py
    "deepeyes": dict(
        all=dict(tools="zoom_in", view_max_pixels=16384 * 784, crop_max_pixels=16384 * 784, adaptive_zoom=False,
                 max_turns=5, max_turn_tokens=10240, max_tokens=20480),
        grpo=dict(preset="deepeyes", group_size=16, prompts=256, lr=1e-6, schedule="constant", warmup=0,
                  weight_decay=0.01, adam_betas=(0.9, 0.999), grad_clip=1.0, eps_low=0.2, eps_high=0.2, delta=3.0,
                  beta=0.0, temperature=1.0, top_p=1.0, loss_type="bnpo", scale_rewards="group"),
        eval=dict(temperature=0.0)),
}


# the allowed ranges of the number flags (those a script has), checked by check_flags
AT_LEAST = dict(steps=1, seed=0, view_max_pixels=28 * 28, crop_max_pixels=28 * 28, zoom_window=1, max_turns=1,
                max_images=1, max_turn_tokens=1, max_tokens=1, lr=0, weight_decay=0, warmup=0, grad_clip=0,
                save_every=0, top_k=0, min_p=0, view_max_side=0, lr_min_ratio=0)


def check_flags(args, ge=None, gt=None, le=None):
    """One-line SystemExit, before anything loads, for a flag out of its range (ge: >=, added to AT_LEAST; gt: >;
    le: <=; each {dest: bound}), --device cuda without a GPU, a bad --resume (also resolves `auto`)."""
    for bounds, op, sign in (({**AT_LEAST, **(ge or {})}, operator.ge, ">="), (gt or {}, operator.gt, ">"),
                             (le or {}, operator.le, "<=")):
        for k, b in bounds.items():
            v = getattr(args, k, None)
            if v is not None and not op(v, b):  # NaN fails every comparison, so it is caught too
                raise SystemExit(f"--{k.replace('_', '-')} must be {sign} {b}, got {v}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here (use --device cpu)")
    if getattr(args, "resume", None):
        args.resume = find_checkpoint(args.out) if args.resume == "auto" else args.resume
        problem = checkpoint_problem(args.resume) if args.resume else None
        if problem:
            raise SystemExit(f"--resume: {problem}")


def add_filter_flags(p):
    """The sampler's filters after the temperature, in transformers' order (model.draw)."""
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="then among the likeliest with this mass (1: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="then drop tokens below min-p x top probability (0: off)")


def filters(args):
    return dict(top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)


def parse_tools(s):
    tools = [] if s in ("none", "") else s.split(",")
    unknown = [t for t in tools if t not in T.TOOLS]
    if unknown:
        raise SystemExit(f"--tools: unknown tool(s) {unknown}; available: {', '.join(T.TOOLS)}, or none")
    return tools


def pixel_budgets(args, improc):
    """The first look's and a zoom's pixel budgets: the flags' (or --recipe's), else the image processor's (a real
    Qwen's 3136 to 12845056 px; tiny: 112 x 112), never below 56 x 56 px."""
    lo = max(M.QWEN_MIN_PIXELS, improc.size["shortest_edge"])
    hi = max(lo, improc.size["longest_edge"])
    for flag in ("view_max_pixels", "crop_max_pixels"):
        v = getattr(args, flag)
        if v is not None and v < lo:
            raise SystemExit(f"--{flag.replace('_', '-')} {v}: below the model's minimum of {lo} px (Qwen's 56 x 56)")
    return dict(view_min_pixels=lo, view_max_pixels=args.view_max_pixels or hi, crop_min_pixels=lo,
                crop_max_pixels=args.crop_max_pixels or hi)


def episode_cfg(args, policy):
    """The episode's settings (tools.DEFAULTS' keys) from the flags and the loaded policy's pixel budget."""
    flags = ("zoom_window", "max_turns", "max_images", "max_turn_tokens", "max_tokens", "view_max_side",
             "adaptive_zoom", "zoom_source", "stop_on", "final_answer_turn", "answer_format")
    return dict(pixel_budgets(args, policy.improc), **{k: getattr(args, k) for k in flags})

# -----------------------------------------------------------------------------
# 2. processes


def setup(args):
    """Start torch.distributed under torchrun: NCCL for CUDA tensors, gloo for CPU ones (NCCL has no CPU
    collectives, and the metric sums and gathers reduce CPU values). -> (rank, world, device)"""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda":
        torch.cuda.set_device(local)
        dev = f"cuda:{local}"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if dev.startswith("cuda") else "gloo")
    return rank, world, torch.device(dev)


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def progress_bar(*a, quiet=False, **k):
    """A tqdm progress bar on rank 0 (unless quiet); tqdm's own TQDM_DISABLE=1 (any TQDM_* setting) still applies,
    as it does only where `disable` is not passed."""
    return tqdm(*a, **k, **({"disable": True} if quiet or int(os.environ.get("RANK", 0)) else {}))


def all_sum(x, device="cpu"):
    """Sum a float (or a list of floats) over ranks."""
    t = torch.tensor(x, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def gather(obj):
    """Every rank's `obj` (anything picklable), in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def mean_over_ranks(pairs):
    """{name: (sum, count)} of this rank -> {name: sum over ranks / count over ranks, None where no count}."""
    names = sorted(pairs)
    totals = all_sum([float(pairs[n][0]) for n in names] + [float(pairs[n][1]) for n in names])  # one collective
    return {n: (s / c if c else None) for n, s, c in zip(names, totals, totals[len(names):])}

# -----------------------------------------------------------------------------
# 3. the policy


def tiny_corpus():
    """The tiny tokenizer's BPE text, written by the episode code so it cannot drift from what the model reads."""
    lines = [T.system_prompt(ts, compact) for ts in (list(T.TOOLS), ["zoom_in"], ["zoom_point"],
                                                     ["draw_box", "draw_line"], []) for compact in (False, True)]
    lines += [T.RESULT.format(i=i, w=w, h=h, j=j) for i in range(10) for j in range(3)
              for w, h in [(112, 112), (224, 224), (56, 84)]]
    lines += [" ".join(str(n) for n in range(k, k + 50)) for k in range(0, 2000, 50)]
    lines += [f"{D.QUESTION.format(place=p)} <think>Zoom in on the {p}.</think><answer>{c}</answer>"
              for c in D.COLOURS for p in D.PLACES]
    lines += [T.render_call("zoom_in", {"image_index": i, "bbox_2d": [0, 0, 28, 28]}) for i in range(3)]
    lines += [T.render_call("zoom_point", {"image_index": i, "point_2d": [14, 14]}) for i in range(3)]
    lines += ["Error: invalid JSON, unknown tool, missing argument, out of range, degenerate box.",
              "Wait, does it seem right? Wait, let's double check. Wait, there might be a mistake."]
    return lines * 4


def load_policy(name="tiny", **kw):
    """model.load(name, ...), the one way scripts and tests load a policy."""
    return M.load(name, corpus=tiny_corpus() if name in M.RANDOM else None, **kw)


def dataset(args, split="train", n=None):
    """--data's records: a bad file, record or image stops the run here, before any step, with its file and line."""
    try:
        return D.dataset(args.data, split, n=n, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--data: {e}") from None


def run_episodes(policy, records, tools, cfg, finish, samples=1, greedy=True, temperature=1.0, top_p=1.0,
                 seed=0, batch_size=16, desc="rollout", skip_bad=False, progress=True, top_k=0, min_p=0.0):
    """Roll out every record `samples` times (tools=[]: off), each episode reduced by finish(episode, record) to a
    small picklable result; sample j of item i draws from its own generator, seeded from (seed, i, j). Episodes
    (i, j), in order, are cut into fixed batches, batch b on rank b % world, so a sharded run returns an unsharded
    one's results bit for bit. A record whose image cannot be read or that finish() rejects with ValueError raises
    ValueError naming it (skip_bad: goes to `errors`). -> ({(i, j): result}, {i: message}), on every rank."""
    if greedy and samples > 1:
        raise ValueError(f"samples={samples} with greedy decoding gives {samples} identical answers: sample instead")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    episodes = [(i, j) for i in range(len(records)) for j in range(samples)]
    batches = [episodes[b:b + batch_size] for b in range(0, len(episodes), batch_size)]
    mine = range(rank, len(batches), world)
    training = policy.model.training
    policy.model.eval()
    done, errors = {}, {}

    def bad(i, e):
        msg = f"{records[i].get('source', records[i].get('id'))}: {e}"
        if not skip_bad:
            raise ValueError(msg) from None
        errors[i] = msg
    bar = progress_bar(total=sum(len(batches[b]) for b in mine), desc=desc, unit="episode",
                       quiet=rank != 0 or not progress)
    for b in mine:
        eps = []
        for i in dict.fromkeys(i for i, _ in batches[b]):  # the items of this batch, in order
            js = [j for ii, j in batches[b] if ii == i]
            if i in errors:
                continue
            try:  # an item's samples share one loaded and encoded image
                group = T.new_group(policy, records[i], tools, len(js), **cfg)
            except (OSError, ValueError) as e:  # an unreadable image (data.load_images says which)
                bad(i, e)
                continue
            for j, ep in zip(js, group):
                ep["item"] = (i, j)  # finish() may name what it saves by it (eval.py's images)
                if not greedy:
                    T.seed_episode(ep, policy.device, seed, i, j)
                eps.append((i, j, ep))
        T.rollout(policy, [ep for _, _, ep in eps], temperature=temperature, top_p=top_p, greedy=greedy, top_k=top_k,
                  min_p=min_p)
        for i, j, ep in eps:
            try:
                done[(i, j)] = finish(ep, records[i])
            except ValueError as e:  # a malformed record (e.g. an answer that is none of the options)
                bad(i, e)
        bar.update(len(batches[b]))
    bar.close()
    policy.model.train(training)
    if world > 1:  # merge on every rank (gloo on CPU, NCCL on GPU), so every rank returns the same result
        parts = gather((done, errors))
        done, errors = ({k: v for part in parts for k, v in part[n].items()} for n in (0, 1))
    return done, errors

# -----------------------------------------------------------------------------
# 4. the training-run skeleton (sft.py and grpo.py)
#   policy, opt, state = start_run(args, rank, device)     # state: {"step": 0} or the resumed trainer state
#   for step in range(state["step"], args.steps):
#       lr = set_lr(opt, step, args)
#       ... the step ...
#       log_metrics(args, rank, row)
#       save_run(args, policy, opt, step, rank, **what else to resume)


def start_run(args, rank, device, shard=False):
    """The policy for training (from --resume if given; FSDP2-sharded with shard=True), AdamW over its trainable
    parameters, and a resumed run's optimizer, RNG and trainer state. A new run gets a fresh metrics.jsonl; a
    resumed one keeps the rows up to its step (reading as one run). -> (policy, optimizer, state with "step")"""
    state = dict(step=0)
    if args.resume:  # the trainer state first: a damaged one is named before the model is loaded
        path = os.path.join(args.resume, f"trainer_rank{rank}.pt" if shard else "trainer.pt")
        try:  # weights_only: tensors and plain containers, never code (a checkpoint may come from anyone)
            state = torch.load(path, weights_only=True)
        except Exception as e:  # torch.load raises many kinds for a damaged file (RuntimeError, EOFError...)
            raise SystemExit(f"--resume: {path} is damaged ({type(e).__name__}: {str(e)[:200]})") from None
        if state["step"] >= args.steps:
            raise SystemExit(f"--steps {args.steps}: {args.resume} is at step {state['step']} already")
    try:
        policy = load_policy(args.resume or args.model, seed=args.seed, device=device, grad_ckpt=args.grad_ckpt,
                             freeze_vision=args.freeze_vision, train=True)
    except Exception as e:  # a checkpoint whose files have the right sizes but wrong contents
        if not args.resume:
            raise
        raise SystemExit(f"--resume {args.resume}: its model files are damaged ({str(e)[:300]})") from None
    if shard:  # before the optimizer: it must hold the sharded parameters
        M.shard(policy)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay)
    if args.resume:
        restore_master_weights(policy, state.pop("model", None))
        try:
            opt.load_state_dict(state.pop("optimizer"))
        except ValueError as e:  # e.g. saved without --freeze-vision, resumed with it
            raise SystemExit(f"--resume {args.resume}: its optimizer does not fit this model's flags ({e})") from None
        rng = state.pop("rng")
        torch.set_rng_state(rng["torch"])
        np.random.set_state((rng["numpy"][0], np.array(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
        random.setstate(rng["python"])
    os.makedirs(args.out, exist_ok=True)
    if rank == 0:  # checkpoints in <out> past this run's start are not this run's: never resumed from
        for p in checkpoints(args.out):
            if p[0] > state["step"]:
                _unmark(p[1])
        path = os.path.join(args.out, "metrics.jsonl")
        rows = read_metrics(path) if state["step"] else []
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= state["step"])
    return policy, opt, state


def read_metrics(path):
    """The rows of a metrics.jsonl ([] if there is none), skipping a line torn by a kill."""
    rows = []
    for line in open(path) if os.path.exists(path) else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def write_config(args, rank, **extra):
    """Every flag and what the run adds as <out>/run.json (the checkpoint's own config.json is left alone)."""
    if rank == 0:
        with open(os.path.join(args.out, "run.json"), "w") as f:
            json.dump({**vars(args), **extra}, f, indent=1)


def set_lr(opt, step, args):
    """Linear warmup (--warmup), then constant or cosine from --lr down to --lr-min-ratio x --lr."""
    warmup = round(args.warmup * args.steps) if args.warmup < 1 else args.warmup
    cos = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))
    lr = (args.lr * (step + 1) / warmup if step < warmup else args.lr if args.schedule == "constant"
          else args.lr * (args.lr_min_ratio + (1 - args.lr_min_ratio) * cos))
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def allreduce_grads(model):
    """Data parallel by hand: average every gradient over ranks (DDP minus the bucketing and backward overlap)."""
    if not dist.is_initialized():
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:  # a rank with nothing to train on still joins every collective
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)


def peak_memory_gb():
    """This process's peak memory so far, GiB: what torch allocated on its GPU, or (CPU) its peak resident set."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux counts it in KiB


def log_metrics(args, rank, row, table=None):
    """One line per step in <out>/metrics.jsonl, with the largest peak memory of any rank (so every rank calls), and
    the same to --report-to (view.report) with `table`, sampled completions, if any."""
    row = dict(row, peak_mem_gb=max(gather(peak_memory_gb())))
    if rank == 0:
        with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        V.report(args, row, table)


def restore_master_weights(policy, weights):
    """Load the trainer state's fp32 weights (rank 0's if sharded): resuming from the Hugging Face bf16 would drift."""
    if policy.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(policy.model, weights or {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    elif weights is not None:
        policy.model.load_state_dict(weights)


def save_run(args, policy, opt, step, rank, **state):
    """After 0-based `step`: every --save-every steps <out>/step<N> to resume from, a Hugging Face folder (bf16)
    plus the trainer state (fp32 master weights, optimizer, step, RNG, `state`; weights_only-loadable); after the
    last step the final model (Hugging Face folder only) in <out>. Called on every rank: a sharded model is
    gathered to rank 0, each rank saves its optimizer shard (resume on as many)."""
    n = step + 1
    resumable = bool(args.save_every) and n % args.save_every == 0
    if not (resumable or n == args.steps):
        return
    weights = policy.model.state_dict()
    if policy.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        weights = get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if resumable:
        np_rng = np.random.get_state()  # (name, uint32 array, ints, float): the array as a list, for weights_only
        trainer = dict(state, optimizer=opt.state_dict(), step=n,
                       rng=dict(torch=torch.get_rng_state(), numpy=(np_rng[0], np_rng[1].tolist(), *np_rng[2:]),
                                python=random.getstate()))
        if rank == 0:
            trainer["model"] = {k: w.detach().cpu() for k, w in weights.items()}
        _save_aside(args.out, os.path.join(args.out, f"step{n}"), n, rank, policy, weights, trainer)
    if n == args.steps:
        _save_aside(args.out, args.out, n, rank, policy, weights, None)


def _save_aside(out, path, n, rank, policy, weights, trainer):
    """Write a checkpoint into <out>/step<n>.tmp, then mark it whole and move it to `path`."""
    tmp = os.path.join(out, f"step{n}.tmp")
    barrier = dist.barrier if dist.is_initialized() else (lambda: None)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    if rank == 0:
        M.save(policy, tmp, state_dict=weights)
    if trainer is not None and (policy.sharded or rank == 0):
        torch.save(trainer, os.path.join(tmp, f"trainer_rank{rank}.pt" if policy.sharded else "trainer.pt"))
    barrier()
    if rank == 0:
        _publish(tmp, path, n)
    barrier()


# A checkpoint is whole when its folder has MARKER, written last and listing every file with its size. A folder
# without it (a save that never finished) is never resumed from; a file of another size is named as damaged.
MARKER = "checkpoint.json"


def _write_marker(folder, step, files):
    with open(os.path.join(folder, MARKER + ".tmp"), "w") as f:
        json.dump(dict(step=step, files=files), f)
    os.replace(os.path.join(folder, MARKER + ".tmp"), os.path.join(folder, MARKER))


def _unmark(folder):
    if os.path.exists(os.path.join(folder, MARKER)):
        os.remove(os.path.join(folder, MARKER))


def _publish(tmp, path, step):
    """Mark `tmp` whole, then make it `path`: a step folder by a rename; <out> itself (which holds more than the
    checkpoint) file by file, unmarked meanwhile, while tmp stays whole."""
    files = {f: os.path.getsize(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
    _write_marker(tmp, step, files)
    if os.path.abspath(path) != os.path.abspath(os.path.dirname(tmp)):
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
        return
    _unmark(path)
    for f in files:
        src, dst = os.path.join(tmp, f), os.path.join(path, f + ".tmp")
        try:  # a hard link costs no copy (a 7B checkpoint is 15 GB); a copy where links are not allowed
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        os.replace(dst, os.path.join(path, f))
    _write_marker(path, step, files)
    shutil.rmtree(tmp)


def _marker(folder):
    """The folder's marker ({"step": N, "files": {name: size}}), or None where it has none (or a torn one)."""
    try:
        with open(os.path.join(folder, MARKER)) as f:
            m = json.load(f)
        return m if isinstance(m["step"], int) and isinstance(m["files"], dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checkpoint_problem(path):
    """Why `path` is not a whole checkpoint, or None when it is."""
    if not os.path.isdir(path):
        return f"{path}: no such folder"
    m = _marker(path)
    if m is None:
        return f"{path} is not a whole checkpoint (no {MARKER}: its save never finished); --resume auto finds one"
    if not any(f.startswith("trainer") for f in m["files"]):
        return (f"{path} holds a final model only (no trainer state): a run resumes from its <out>/step<N> "
                f"checkpoints (--save-every)")
    for name, size in m["files"].items():
        p = os.path.join(path, name)
        if not os.path.isfile(p) or os.path.getsize(p) != size:
            got = f"{os.path.getsize(p)} bytes" if os.path.isfile(p) else "missing"
            return f"{p} is damaged ({got}; it was written with {size} bytes)"
    return None


def checkpoints(out):
    """[(step, folder)] of the folders in <out> (and <out> itself) marked as checkpoints, by step."""
    dirs = [out] + [os.path.join(out, d) for d in os.listdir(out) if d.startswith("step")] if os.path.isdir(out) else []
    return sorted((m["step"], d) for d, m in ((d, _marker(d)) for d in dirs) if m)


def find_checkpoint(out):
    """--resume auto: the newest whole checkpoint in <out> (step<N>/, a finished step<N>.tmp/, <out>), else None."""
    for step, path in reversed(checkpoints(out)):
        problem = checkpoint_problem(path)
        if problem is None:
            print0(f"--resume auto: {path} (step {step})")
            return path
        print0(f"--resume auto: skipping {problem}")
    print0(f"--resume auto: no checkpoint in {out}: a new run")
    return None
