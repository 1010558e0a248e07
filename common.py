"""
common.py: the plumbing sft.py, grpo.py and eval.py share, and nothing more (no script imports another; not run as a
script). Top to bottom: 1. flags (the shared ones, --recipe, all ranges checked before anything loads); 2. processes
(torchrun, print0, sums and gathers over ranks); 3. the policy (load_policy) and run_episodes (a dataset rolled out over
ranks: eval.py, sft.py --reflect, grpo.py --eval-every); 4. the training skeleton of sft.py and grpo.py (start_run,
set_lr, log_metrics; checkpoint.save writes its checkpoints aside and marks them whole last, and --resume auto
finds the newest whole one).
"""
import argparse
import json
import math
import operator
import os
import resource

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import data as D
import dialects
import model as M
import tasks
import tools as T
import view as V
from recipes import RECIPES

DEMO_SFT, DEMO_GRPO = "runs/sft", "runs/grpo"  # where the CPU demo's `python sft.py` and `python grpo.py` save

# -----------------------------------------------------------------------------
# 1. flags


def add_common_flags(p, model="tiny", out="runs/x", steps=10):
    """The flags sft.py, grpo.py and eval.py share."""
    # what to run on
    p.add_argument("--model", default=model, help="'tiny', 'random-3b' (random-qwen3vl-8b, ...: model.RANDOM), a hub "
                   "id (Qwen2.5-VL, Qwen3-VL, Qwen3.5), or a checkpoint folder")
    p.add_argument("--data", default="synthetic", help="'synthetic' (the CPU demo's task), 'synthetic:<task>' "
                   "(tasks.TASKS: glance, boxes) or a lookagain JSONL path")
    p.add_argument("--out", default=out, help="the run folder")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--seed", type=int, default=0)
    # the environment: the tools, then the episode's settings (tools.add_episode_flags)
    p.add_argument("--tools", help="comma-separated: zoom_in,zoom_point,draw_box,draw_line, or none "
                   "(default: the synthetic task's, tasks.TASKS; zoom_in for a JSONL file)")
    T.add_episode_flags(p)
    # the model
    p.add_argument("--grad-ckpt", action="store_true")  # recompute activations in backward: a 7B's memory for time
    p.add_argument("--freeze-vision", action="store_true")  # the ViT and its merger (recipes.py)
    # each paper's settings in one flag (RECIPES); an explicit flag wins
    p.add_argument("--recipe", choices=list(RECIPES), help="a method's settings, as its released code runs it")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")
    return p


def add_optim_flags(p, lr, warmup, schedule):
    """AdamW and its schedule: the flags sft.py and grpo.py share (with their own defaults)."""
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--lr-min-ratio", type=float, default=0.0, help="the cosine schedule ends at this share of --lr")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--adam-betas", type=betas, default=(0.9, 0.95), help="beta1,beta2")  # nanoGPT's; recipes set theirs
    p.add_argument("--warmup", type=float, default=warmup, help="warmup steps, or a share of --steps when below 1")
    p.add_argument("--schedule", default=schedule, choices=["cosine", "constant"])
    p.add_argument("--grad-clip", type=float, default=1.0)


def betas(s):
    b = tuple(float(x) for x in s.split(","))
    if len(b) != 2 or not all(0 <= x < 1 for x in b):  # beta 1 would stop the moving average (and 1 - beta^t = 0)
        raise argparse.ArgumentTypeError(f"{s!r}: two numbers in [0, 1), e.g. 0.9,0.999")
    return b


def parse_args(p, argv, script):
    """p.parse_args, then --recipe fills the flags the command line did not give; --print-config prints all, exits."""
    args = p.parse_args(argv)
    if args.recipe:
        # what the user typed, in any spelling argparse accepts (--temp for --temperature, --lr=1e-6): parse again
        # into a namespace that already holds a marker for every flag; argparse fills in defaults only for the
        # attributes a namespace lacks, so whatever is not the marker afterwards was given on the command line
        unset = object()
        # (not on an `append` flag, --image: argparse appends to what the namespace holds; no recipe sets one)
        marked = {a.dest: unset for a in p._actions if not isinstance(a, argparse._AppendAction)}
        typed = p.parse_args(argv, namespace=argparse.Namespace(**marked))
        recipe = RECIPES[args.recipe]
        # a recipe speaks its method's own format (dialects.py) where there is one
        own = dict(dialect=args.recipe) if args.recipe in dialects.DIALECTS else {}
        # later dicts win: the script's own settings (e.g. eval's sampling) over the method's shared ones
        for k, v in {**own, **recipe["all"], **recipe.get(script, {})}.items():
            if hasattr(args, k) and getattr(typed, k) is unset:  # hasattr: a setting of a flag this script lacks
                setattr(args, k, v)
    try:
        args.tools = args.tools or tasks.default_tools(args.data)  # a string still: each script parses it (parse_tools)
    except ValueError as e:  # an unknown synthetic:<task>
        raise SystemExit(f"--data: {e}") from None
    if args.print_config:
        print(json.dumps({k.replace("_", "-"): v for k, v in vars(args).items() if k != "print_config"}, indent=1))
        raise SystemExit(0)
    return args


# the allowed ranges of the number flags (those a script has), checked by check_flags
# 28 * 28: one unit of Qwen2.5-VL's resize (14 px patches merged 2 x 2); a smaller budget leaves no image
AT_LEAST = dict(steps=1, seed=0, view_max_pixels=28 * 28, crop_max_pixels=28 * 28, view_min_pixels=28 * 28,
                crop_min_pixels=28 * 28, zoom_window=1, max_turns=1,
                max_images=1, max_turn_tokens=1, max_tokens=1, lr=0, weight_decay=0, warmup=0, grad_clip=0,
                save_every=0, top_k=0, min_p=0, view_max_side=0, lr_min_ratio=0)


def check_flags(args, ge=None, gt=None, le=None):
    """One-line SystemExit, before anything loads, for a flag out of its range (ge: >=, added to AT_LEAST; gt: >;
    le: <=; each {dest: bound}), --device cuda without a GPU, a bad --resume (also resolves `auto`)."""
    # a script's own bounds override AT_LEAST's for the same flag
    for bounds, op, sign in (({**AT_LEAST, **(ge or {})}, operator.ge, ">="), (gt or {}, operator.gt, ">"),
                             (le or {}, operator.le, "<=")):
        for k, b in bounds.items():
            v = getattr(args, k, None)  # None: a flag the script does not have, or an optional one left unset
            if v is not None and not op(v, b):  # NaN fails every comparison, so it is caught too
                raise SystemExit(f"--{k.replace('_', '-')} must be {sign} {b}, got {v}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here (use --device cpu)")
    if getattr(args, "resume", None):
        args.resume = checkpoint.find_checkpoint(args.out, print0) if args.resume == "auto" else args.resume
        problem = checkpoint.checkpoint_problem(args.resume) if args.resume else None
        if problem:
            raise SystemExit(f"--resume: {problem}")


def add_filter_flags(p):
    """The sampler's filters after the temperature, in transformers' order (model.draw)."""
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="then among the likeliest with this mass (1: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="then drop tokens below min-p x top probability (0: off)")


def filters(args):  # the keyword arguments of tools.rollout and common.run_episodes
    return dict(top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)


def parse_tools(s):
    tools = [] if s in ("none", "") else s.split(",")  # []: no tools, the model answers at first look
    unknown = [t for t in tools if t not in T.TOOLS]
    if unknown:
        raise SystemExit(f"--tools: unknown tool(s) {unknown}; available: {', '.join(T.TOOLS)}, or none")
    return tools


def episode_cfg(args, policy_or_improc):
    """The episode's settings (tools.DEFAULTS' keys) from the flags, the resize unit and the pixel budgets they leave
    open from the model's image processor (tools.settings), and the model family they are of (run.json records them).
    A budget below the model's minimum: one line, SystemExit."""
    improc = getattr(policy_or_improc, "improc", policy_or_improc)  # a policy, or a bare image processor
    try:
        cfg = T.settings(improc, **{k: getattr(args, k) for k in T.DEFAULTS})
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return dict(cfg, family=getattr(policy_or_improc, "family", None))

# -----------------------------------------------------------------------------
# 2. processes


def setup(args):
    """Start torch.distributed under torchrun: NCCL for CUDA tensors, gloo for CPU ones (NCCL has no CPU
    collectives, and the metric sums and gathers reduce CPU values). -> (rank, world, device)"""
    # torchrun sets these; a plain `python x.py` is rank 0 of 1 and never starts torch.distributed
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))  # the GPU of this process on its node
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda":
        torch.cuda.set_device(local)  # before init: NCCL binds each rank to its current device
        dev = f"cuda:{local}"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if dev.startswith("cuda") else "gloo")
    return rank, world, torch.device(dev)


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:  # from the environment: callable before setup() and after teardown()
        print(*a, **k, flush=True)


def progress_bar(*a, quiet=False, **k):
    """A tqdm progress bar on rank 0 (unless quiet); tqdm's own TQDM_DISABLE=1 (any TQDM_* setting) still applies,
    as it does only where `disable` is not passed."""
    return tqdm(*a, **k, **({"disable": True} if quiet or int(os.environ.get("RANK", 0)) else {}))


def all_sum(x, device="cpu"):
    """Sum a float (or a list of floats) over ranks."""
    t = torch.tensor(x, dtype=torch.float64, device=device)  # float64: token counts stay exact past 2^24
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def gather(obj):
    """Every rank's `obj` (anything picklable), in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)  # pickles: for lists and dicts of any length, not for large tensors
    return parts


def mean_over_ranks(pairs):
    """{name: (sum, count)} of this rank -> {name: sum over ranks / count over ranks, None where no count}."""
    names = sorted(pairs)  # one order on every rank: the sums line up name for name
    totals = all_sum([float(pairs[n][0]) for n in names] + [float(pairs[n][1]) for n in names])  # one collective
    return {n: (s / c if c else None) for n, s, c in zip(names, totals, totals[len(names):])}

# -----------------------------------------------------------------------------
# 3. the policy


def tiny_corpus():
    """The tiny tokenizer's BPE text, written by the episode code so it cannot drift from what the model reads."""
    lines = [dialects.system_prompt({t: T.TOOLS[t] for t in ts}, compact)
             for ts in (list(T.TOOLS), ["zoom_in"], ["zoom_point"], ["draw_box", "draw_line"], [])
             for compact in (False, True)]
    # the texts a rollout shows or the demonstrations write: the BPE merges them into few tokens, short sequences
    lines += [dialects.RESULT.format(i=i, w=w, h=h, j=j) for i in range(10) for j in range(3)
              for w, h in [(112, 112), (224, 224), (56, 84)]]
    lines += [" ".join(str(n) for n in range(k, k + 50)) for k in range(0, 2000, 50)]
    lines += [f"{D.QUESTION.format(place=p)} <think>Zoom in on the {p}.</think><answer>{c}</answer>"
              for c in D.COLOURS for p in D.PLACES]
    lines += [dialects.render_call("zoom_in", {"image_index": i, "bbox_2d": [0, 0, 28, 28]}) for i in range(3)]
    lines += [dialects.render_call("zoom_point", {"image_index": i, "point_2d": [14, 14]}) for i in range(3)]
    lines += ["system", "user", "assistant"] * 8  # the chat frame's role words, each one token (no leading space)
    lines += ["Error: invalid JSON, unknown tool, missing argument, out of range, degenerate box.",
              "Wait, does it seem right? Wait, let's double check. Wait, there might be a mistake."]
    return (lines + tasks.corpus()) * 4


def load_policy(name="tiny", **kw):
    """model.load(name, ...), the one way scripts and tests load a policy."""
    if os.path.isfile(os.path.join(name, "run.json")) and checkpoint._marker(name) is None:  # a run of ours, unsaved
        raise SystemExit(f"--model {name}: its run has not saved a whole model yet (no {checkpoint.MARKER}: still "
                         f"training, or stopped before or while saving); wait for it, or take one of its step<N>")
    return M.load(name, corpus=tiny_corpus() if name in M.RANDOM else None, **kw)


def dataset(args, split="train", n=None):
    """--data's records: a bad file, record or image stops the run here, before any step, with its file and line."""
    try:
        return tasks.dataset(args.data, split, n=n, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--data: {e}") from None


def run_episodes(policy, records, tools, cfg, finish, samples=1, greedy=True, temperature=1.0, top_p=1.0,
                 seed=0, batch_size=16, desc="rollout", skip_bad=False, progress=True, top_k=0, min_p=0.0,
                 scripts=None, then=None):
    """Roll out every record `samples` times (tools=[]: off), each episode reduced by finish(episode, record) to a
    small picklable result; sample j of item i draws from its own generator, seeded from (seed, i, j). Episodes
    (i, j), in order, are cut into fixed batches, batch b on rank b % world, so a sharded run returns an unsharded
    one's results bit for bit. A record whose image cannot be read or that finish() rejects with ValueError raises
    ValueError naming it (skip_bad: goes to `errors`). scripts: {i: the texts of item i's model calls} to replay
    instead of sampling (eval.py --replay). then(episodes) -> more episodes, rolled out alike after each batch and
    before finish (eval.py --force-wait: continuations). -> ({(i, j): result}, {i: message}), on every rank."""
    if greedy and samples > 1:
        raise ValueError(f"samples={samples} with greedy decoding gives {samples} identical answers: sample instead")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    episodes = [(i, j) for i in range(len(records)) for j in range(samples)]
    # fixed batches, dealt round robin: a batch's padding (and so its numbers) does not depend on the world size
    batches = [episodes[b:b + batch_size] for b in range(0, len(episodes), batch_size)]
    mine = range(rank, len(batches), world)
    training = policy.model.training  # grpo.py --eval-every calls this mid-training: restored at the end
    policy.model.eval()
    done, errors = {}, {}  # {(i, j): finish's result}, {i: message}

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
            if i in errors:  # an item already skipped in an earlier batch (its other samples)
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
                if scripts is not None:
                    ep["script"] = list(scripts[i])
                eps.append((i, j, ep))
        sampling = dict(temperature=temperature, top_p=top_p, greedy=greedy, top_k=top_k, min_p=min_p,
                        scripted=scripts is not None)
        T.rollout(policy, [ep for _, _, ep in eps], **sampling)
        if then is not None:  # (called on every rank: sharded ranks roll out together, even an empty batch)
            T.rollout(policy, then([ep for _, _, ep in eps]), **sampling)
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
#       checkpoint.save(args, policy, opt, step, rank, **what else to resume)   # every --save-every, and at the end


def start_run(args, rank, device, shard=False):
    """The policy for training (from --resume if given; FSDP2-sharded with shard=True), AdamW over its trainable
    parameters, and a resumed run's optimizer, RNG and trainer state (checkpoint.py). A new run gets a fresh
    metrics.jsonl; a resumed one keeps the rows up to its step (reading as one run). -> (policy, optimizer, state)"""
    state = dict(step=0)
    if args.resume:  # the trainer state first: a damaged one is named before the model is loaded
        state = checkpoint.load_state(args.resume, rank, shard, args.steps)
    try:
        policy = load_policy(args.resume or args.model, seed=args.seed, device=device, grad_ckpt=args.grad_ckpt,
                             freeze_vision=args.freeze_vision, train=True)
    except Exception as e:  # a checkpoint whose files have the right sizes but wrong contents
        if not args.resume:
            raise
        raise SystemExit(f"--resume {args.resume}: its model files are damaged ({str(e)[:300]})") from None
    if shard:  # before the optimizer: it must hold the sharded parameters
        M.shard(policy)
    params = [p for p in policy.model.parameters() if p.requires_grad]  # --freeze-vision leaves the tower out
    opt = torch.optim.AdamW(params, lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay)
    if args.resume:
        checkpoint.restore(policy, opt, state, args.resume)
    os.makedirs(args.out, exist_ok=True)
    if rank == 0:
        checkpoint.forget_after(args.out, state["step"])  # so --resume auto cannot later pick a step of the old run
        path = os.path.join(args.out, "metrics.jsonl")
        rows = read_metrics(path) if state["step"] else []  # the rows after the resumed step are dropped: re-run
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
    warmup = round(args.warmup * args.steps) if args.warmup < 1 else args.warmup  # 0.03: 3% of --steps (warmup_ratio)
    cos = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))  # 1 -> 0 over the rest
    # step + 1: the first step already trains, at lr / warmup
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
