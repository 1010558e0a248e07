"""
sft.py: supervised cold start on interleaved trajectories (VLM-R3's VLIR step, ViLaSR's cold start), and
ViLaSR's reflective rejection sampling that makes the data of the next SFT round.

CPU demo (tiny model, synthetic demonstrations; saves runs/sft, where `python grpo.py` starts):
    python sft.py
Its demonstrations (tasks.py) are imperfect on purpose: on one of the nine places they mostly answer without zooming
(--demo-lazy), on three they mostly zoom on the whole cell, where decoys crowd the square (--demo-loose). SFT copies the
habits; GRPO's reward is what teaches it to look closely. Another synthetic task: --data synthetic:<task> (its own
demonstrator; --tools none: answers without looking), e.g. from the demo's checkpoint, README's mechanism commands:
    python sft.py --model runs/sft --data synthetic:boxes --steps 400 --out runs/boxes-draw-sft
1 GPU (cold start of Qwen2.5-VL-3B on VLM-R3's VLIR data, with its SFT settings: --recipe vlm_r3; convert.py makes
vlir/data.jsonl from their dataset.zip in VLM-R3's own dialect, crops as {"bbox_2d": ...} in their frame):
    python convert.py vlm_r3_sft dataset.zip --out vlir
    python sft.py --recipe vlm_r3 --model Qwen/Qwen2.5-VL-3B-Instruct --data vlir/data.jsonl --batch-size 2 \
        --grad-accum 8 --steps 500 --grad-ckpt --out runs/sft-3b
8 GPUs (data parallel, each rank replaying and training on its share; on CPU: --nproc_per_node=2 --device cpu):
    torchrun --standalone --nproc_per_node=8 sft.py --recipe vlm_r3 --model Qwen/Qwen2.5-VL-3B-Instruct \
        --data vlir/data.jsonl --batch-size 2 --grad-accum 2 --steps 500 --grad-ckpt --out runs/sft-3b
Reflective rejection sampling from a cold-start model, then a second SFT round on what it kept:
    python sft.py --reflect --model runs/sft --data synthetic --n-items 200 --samples 4 --to runs/reflect.jsonl
    python sft.py --model runs/sft --data runs/reflect.jsonl --steps 40 --out runs/sft2

A trajectory JSONL line is a lookagain record (data.py) plus the assistant turns, tool calls inside them:
    {"id": "q1", "image": "images/q1.png", "question": "What colour is the square at the top left?", "answer": "red",
     "type": "text", "bbox": [137.3, 136.0, 161.3, 160.0], "turns": ["<think>Zoom in on the top left.</think>\\n
        <tool_call>\\n{\"name\": \"zoom_in\", \"arguments\": {\"image_index\": 0, \"bbox_2d\": [14, 14, 22, 22]}}
        \\n</tool_call>", "<think>I see the square.</think><answer>red</answer>"]}
Only the turns are stored: replayed through tools.py (new_episode, then advance per turn), a trajectory trains on
exactly the images a rollout would have seen, and is rejected (file and line named) if a call fails or its answer
disagrees with the record. Only the assistant tokens (the episode's mask) carry loss, each turn's <|im_end|> too.
"""
import argparse
import math
import os
import time
from collections import Counter

import numpy as np
import torch

import checkpoint
import common as C
import data as D
import model as M
import rewards as R
import tasks
import tools as T
import view as V

# ---- trajectories: the JSONL format, and replaying one through the environment


def load_trajectories(path):
    """A trajectory JSONL -> [(record, turns, "file:line")]; a bad line or record: ValueError naming file:line."""
    # turns leave the record: what remains is a plain data.py record, which the replay and the scorer read
    items = [(r, r.pop("turns", None), where) for r, (where, _) in zip(D.load_jsonl(path), D.jsonl_rows(path))]
    for _, turns, where in items:
        if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
            raise ValueError(f"{where}: 'turns' must be a non-empty list of strings (the assistant turns)")
    return items


def rebuild(policy, record, turns, tools, cfg):
    """Replay a trajectory in its dialect (the record's "dialect", else the run's): each turn handled exactly as if the
    model had written it in one call (tools.script_call: the dialect's stop rules; a turn that ends the model's turn
    gets <|im_end|>, so the model learns to close it), its calls run, their results shown as the dialect's rollout
    shows them. -> (episode, None), or (None, (reason, message)): a failed call, a limit hit, no or a wrong answer."""
    budget = record.get("view_max_pixels")  # written by convert.py: the view its boxes are drawn in
    if budget is not None and budget != cfg["view_max_pixels"]:
        raise ValueError(f"its boxes are in a {budget} px view but this run shows {cfg['view_max_pixels']} px: "
                         f"train with --view-max-pixels {budget}, or convert again at this run's budget")
    ep = T.new_episode(policy, record, tools, **dict(cfg, dialect=record.get("dialect") or cfg["dialect"]))
    ep["script"] = list(turns)  # script_call pops the next turn from it, as if the model had sampled it
    while ep["stop"] is None:
        k = len(turns) - len(ep["script"])  # the turn about to be replayed, 0-based (for the messages)
        call = T.script_call(policy, ep, cfg["max_turn_tokens"], close=True)
        if call is None:
            return None, ("no_answer", f"the turns end before the episode does (after turn {k - 1})")
        if call[2] == "length":  # a rollout would have cut this turn
            return None, ("limit", f"turn {k} has over --max-turn-tokens {cfg['max_turn_tokens']} tokens")
        n_calls = len(ep["calls"])
        T.advance(policy, ep, *call)  # appends the turn, runs its tool call, shows the result: the rollout's own code
        if len(ep["calls"]) > n_calls and not ep["calls"][-1]["ok"]:
            return None, ("tool_error", f"turn {k}: the tool call failed ({ep['calls'][-1]['error']})")
    if ep["script"]:  # the environment ended the episode (a turn or image cap, a stop rule) before the turns did
        return None, ("limit" if ep["truncated"] else "early_stop", f"turn {len(turns) - len(ep['script']) - 1}: the "
                      f"episode stopped ({ep['stop']}) with {len(ep['script'])} turn(s) left")
    if ep["stop"] != "answer":
        return None, ("no_answer", f"the last turn gives no answer (episode stop: {ep['stop']})")
    acc, why = R.accuracy(ep["turns"][-1], record, ep["dialect"]["answer"])
    if acc < R.CORRECT:  # SFT on a wrong answer would teach it; the record's answer is the judge
        return None, ("wrong_answer",
                      f"the final answer disagrees with the record ({why}; record: {record['answer']!r})")
    return ep, None


def prepare(policy, items, tools, cfg, rank=0, world=1, enc_budget=2**30):
    """Replay this rank's share once -> (kept: [dict(seq, mask, views)], rejected: every rank's [(reason, "where:
    message")]). views stay encoded (24 bytes a pixel) while this rank's fit in `enc_budget`, then PIL (3 bytes)."""
    kept, rejected = [], []
    for record, turns, where in C.progress_bar(items[rank::world], desc="replaying", unit="trajectory", leave=False):
        try:
            record = {**record, "image": D.load_images(record)}  # read (or draw) the images once
            turns = turns(record) if callable(turns) else turns   # a demonstration is made from its record
            ep, err = rebuild(policy, record, turns, tools, cfg)
        except (ValueError, FileNotFoundError) as e:  # a record the scorer or the image loader cannot use
            raise SystemExit(f"{where}: {e}") from None
        if err:
            rejected.append((err[0], f"{where}: {err[1]}"))
        else:
            encs = T.episode_images(policy, ep)
            # encoded views spare a re-encode every epoch but take 8x PIL's memory (24 bytes a pixel): keep them
            # while they fit, then keep PIL images and encode them again per batch (train())
            enc_budget -= sum(e["pixels"].nbytes for e in encs)
            views = encs if enc_budget >= 0 else [v["img"] for v in ep["images"]]
            # SFT trains the end of each turn even where a dialect's RL mask does not (ViLaSR's: its cold start,
            # LLaMA-Factory's qwen2_vl template, trains "<|im_end|>\n" after each assistant turn)
            mask = ep["mask"] if ep["dialect"]["trained_eos"] else M.render(policy, ep["messages"], encs,
                                                                          ep["dialect"]["trained_text"])[1]
            # seq: the token ids; mask: 1 on the tokens that carry loss (the assistant's); views: one per image
            kept.append(dict(seq=ep["seq"], mask=mask, views=views))
    return kept, [r for part in C.gather(rejected) for r in part]  # every rank reports the same rejections


def report_rejected(rejected, n_total, path=None):
    if not rejected:
        return
    C.print0(f"rejected {len(rejected)} of {n_total} trajectories: "
             + ", ".join(f"{k} {v}" for k, v in Counter(r for r, _ in rejected).most_common()))
    C.print0("\n".join("  " + msg for _, msg in rejected[:5]))
    if path and int(os.environ.get("RANK", 0)) == 0:
        with open(path, "w") as f:
            f.writelines(f"{r}\t{m}\n" for r, m in rejected)
        C.print0(f"  (all of them in {path})")


# ---- reflective rejection sampling (ViLaSR)


def reflective(calls):
    """Did the trajectory revise its own looking? ViLaSR's test for drawings: a label drawn twice, elsewhere.
    For zooms: a later zoom's region overlaps an earlier one's and differs, 0 < IoU < 1 (inside it counts)."""
    zooms, drawn = [], {}
    for c in [c for c in calls if c.get("ok")]:  # a failed call revised nothing
        if c["zoom"]:  # region: in original pixels, so zooms on zooms compare with each other
            if any(0 < R.iou(c["region"], z) < 1 for z in zooms):
                return True
            zooms.append(c["region"])
        elif "ops" in T.TOOLS[c["name"]]:  # a drawing: its operations' coordinates, by label
            for op in c["arguments"][T.TOOLS[c["name"]]["ops"]]:
                xy = [op[k] for k in sorted(op) if k != "label"]  # its coordinates, in a fixed order of keys
                if op["label"] and drawn.setdefault(op["label"], xy) != xy:
                    return True
    return False


def judge(traj, record):
    """ViLaSR's filter for one trajectory (tools.trajectory): None to keep it, else why not."""
    if traj["stop"] != "answer":
        return "no answer"
    if any(not c["ok"] for c in traj["calls"]):
        return "failed call"
    if R.accuracy(traj["turns"][-1], record)[0] < R.CORRECT:
        return "wrong answer"
    return None if reflective(traj["calls"]) else "not reflective"


def reflect(policy, records, tools, cfg, samples=4, temperature=1.0, seed=0, batch_size=32, **filters):
    """`samples` rollouts per record (common.run_episodes) -> (records + "turns" `judge` keeps, Counter of verdicts)."""
    def finish(ep, record):
        return judge(T.trajectory(ep), record), ep["turns"]
    done, _ = C.run_episodes(policy, records, tools, cfg, finish, samples, greedy=False, temperature=temperature,
                             seed=seed, batch_size=batch_size, desc="reflect", **filters)
    done = sorted(done.items())  # by (item, sample): the output file does not depend on the number of ranks
    kept = [{**records[i], "turns": turns} for (i, _), (why, turns) in done if why is None]
    return kept, Counter(why or "kept" for _, (why, _) in done)


# ---- training


def batch_at(lengths, batch_size, seed, j):
    """The j-th batch, bucketed by length (little padding): each epoch sorts by length, ties broken at random,
    cuts into batches and shuffles them. A function of (seed, j) only, so --resume needs no data state."""
    epoch, k = divmod(j, math.ceil(len(lengths) / batch_size))  # batch j is the k-th of pass `epoch`
    rng = np.random.default_rng([seed, epoch])  # one generator per pass: the same cut for every j of it
    idx = np.lexsort((rng.random(len(lengths)), lengths))  # by length, then by the random key
    batches = [idx[i:i + batch_size].tolist() for i in range(0, len(idx), batch_size)]
    return batches[rng.permutation(len(batches))[k]]  # shuffled: no run of long batches at the end of a pass


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_flags(p, model="tiny", out=C.DEMO_SFT, steps=2400)
    p.add_argument("--n-items", type=int, default=512,
                   help="synthetic items to make demonstrations of (or to sample, --reflect)")
    # the demonstrator's habits (tasks.py); a habit not given is the task's (TASKS[...]["habits"]), else its default
    p.add_argument("--demo-noise", type=int, help="jitter of each side of a demo's box, view pixels (2)")
    p.add_argument("--demo-correct", type=float, help="share of demos whose first zoom is off, then refined (0.1)")
    p.add_argument("--demo-lazy", type=float,
                   help="share of demos on lazy items (tasks.LAZY_PLACES) answered at first look")
    p.add_argument("--demo-loose", type=float, help="share of demos on tasks.LOOSE_PLACES that zoom on the whole cell")
    p.add_argument("--demo-wait", type=float, help="share of lazy demos that say 'Wait, let's double check.' and zoom")
    p.add_argument("--batch-size", type=int, default=8, help="trajectories per forward/backward, per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step, per process")
    C.add_optim_flags(p, lr=3e-3, warmup=10, schedule="cosine")  # the tiny demo's; --recipe sets a paper's
    p.add_argument("--save-every", type=int, default=0, help="also save <out>/step<N> every N steps")
    p.add_argument("--resume", default=None, help="a checkpoint folder to continue from, or auto: the newest in --out")
    V.add_report_flag(p)
    p.add_argument("--reflect", action="store_true",
                   help="reflective rejection sampling: roll out --model on --data, write --to")
    p.add_argument("--samples", type=int, default=4, help="--reflect: trajectories per item")
    p.add_argument("--temperature", type=float, default=1.0, help="--reflect: sampling temperature")
    C.add_filter_flags(p)
    p.add_argument("--to", default=None, metavar="OUT", help="output JSONL of --reflect")
    args = C.parse_args(p, argv, "sft")
    args.tools = C.parse_tools(args.tools)
    shares = ("demo_correct", "demo_lazy", "demo_loose", "demo_wait")  # probabilities: in [0, 1]
    C.check_flags(args, ge=dict(n_items=1, batch_size=1, grad_accum=1, samples=1, demo_noise=0,
                                **dict.fromkeys(shares, 0)),
                  gt=dict(temperature=0, top_p=0), le=dict(top_p=1, min_p=1, **dict.fromkeys(shares, 1)))
    return args


def train(args):
    rank, world, device = C.setup(args)
    items = None
    if tasks.task_name(args.data) is None:  # a trajectory file is read and checked before the model is loaded
        try:
            items = load_trajectories(args.data)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"--data: {e}") from None
    policy, opt, state = C.start_run(args, rank, device)
    cfg = C.episode_cfg(args, policy)
    if items is None:  # the synthetic task's demonstrations, drawn in the view this model gets
        items = tasks.demonstrations(args.data, args.n_items, args.seed, args.tools, cfg["view_max_pixels"],
                                     noise=args.demo_noise, correct=args.demo_correct, lazy=args.demo_lazy,
                                     loose=args.demo_loose, wait=args.demo_wait)
    data, rejected = prepare(policy, items, args.tools, cfg, rank, world)  # this rank's share, replayed once
    report_rejected(rejected, len(items), os.path.join(args.out, "rejected.tsv"))
    n_kept = int(C.all_sum([len(data)])[0])
    if n_kept == 0:
        raise SystemExit(f"--data {args.data}: no usable trajectory left ({len(rejected)} rejected, reasons above)")
    if n_kept < world or C.all_sum([float(not data)])[0]:  # each rank trains on its own share: none may be empty
        raise SystemExit(f"--data {args.data}: {n_kept} usable trajectories cannot feed {world} processes")
    C.write_config(args, rank, world=world, episode=cfg, trajectories=n_kept, rejected=len(rejected))
    lengths = np.array([len(t["seq"]) for t in data])  # tokens per trajectory, for batch_at's length buckets
    C.print0(f"sft: {args.resume or args.model} on {args.data} ({n_kept} trajectories, mean length "
             f"{lengths.mean():.0f} tokens), {world} process(es) x {args.grad_accum} x {args.batch_size} per step")
    policy.model.train()
    bar = C.progress_bar(range(state["step"], args.steps), desc="sft", unit="step", initial=state["step"],
                         total=args.steps)
    for step in bar:
        t0 = time.time()
        lr = C.set_lr(opt, step, args)
        js = range(step * args.grad_accum, (step + 1) * args.grad_accum)  # this step's micro-batches
        # each rank draws from its own share with its own seed; the rank in the seed gives ranks different orders
        batches = [[data[i] for i in batch_at(lengths, args.batch_size, args.seed * 1000 + rank, j)] for j in js]
        # the loss is the mean over every trained token of the step (all ranks, all micro-batches): each rank
        # divides its sum by (global tokens / world), and the gradient average over ranks does the rest
        n_tok, n_seq = C.all_sum([float(sum(sum(t["mask"]) for b in batches for t in b)),
                                  float(sum(len(t["seq"]) for b in batches for t in b))])
        nll = 0.0  # this rank's summed NLL over its trained tokens, for the logged loss
        for b in batches:
            # a dict is a view encoded by prepare(); a PIL image (past its memory budget) is encoded now
            images = [[v if isinstance(v, dict) else M.encode_image(policy, v) for v in t["views"]] for t in b]
            # the NLL fused into the log-prob kernel (no [N, V] logits held); logp, m: [B, L], logp detached
            loss, logp, m = M.token_logprobs(policy, [t["seq"] for t in b], images, [t["mask"] for t in b],
                                             token_loss=lambda lp, i, j: -lp * world / n_tok)
            loss.backward()  # gradients add up in .grad over the step's micro-batches
            nll += -float((logp * m).sum())
        C.allreduce_grads(policy.model)  # the mean over ranks (with world / n_tok above: the global token mean)
        params = [p for g in opt.param_groups for p in g["params"]]
        # --grad-clip 0: no clipping, but the norm is still measured (and logged, and checked for inf / nan)
        gn = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf")))
        if math.isfinite(gn):  # the same on every rank: the gradients were averaged first
            opt.step()
        else:
            C.print0(f"step {step + 1}: non-finite gradient norm, update skipped")
        opt.zero_grad(set_to_none=True)
        dt = time.time() - t0
        # loss: the mean NLL per trained token over all ranks; tokens: trained ones; seq_tokens: all, prompts too
        row = dict(step=step + 1, loss=C.all_sum([nll])[0] / n_tok, tokens=int(n_tok), seq_tokens=int(n_seq),
                   lr=lr, grad_norm=gn, tokens_per_s=n_seq / dt, time=dt)
        C.log_metrics(args, rank, row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}")
        checkpoint.save(args, policy, opt, step, rank)  # only at --save-every steps and after the last
    report_rejected(rejected, len(items))  # again at the end, where it is seen
    C.print0(f"done: {args.out} (metrics in {args.out}/metrics.jsonl); GRPO starts from it with --model {args.out}")
    C.teardown()


def reflect_main(args):
    rank, world, device = C.setup(args)
    if not args.to:
        raise SystemExit("--reflect needs --to OUT.jsonl, where the kept trajectories go")
    records = C.dataset(args, "train", n=args.n_items)
    policy = C.load_policy(args.model, seed=args.seed, device=device)
    kept, counts = reflect(policy, records, args.tools, C.episode_cfg(args, policy), args.samples, args.temperature,
                           args.seed, **C.filters(args))
    if rank == 0:  # run_episodes returns every rank's results on every rank: one writer
        D.write_jsonl(kept, args.to)
    total = sum(counts.values())
    rejected = ", ".join(f"{k} {v}" for k, v in counts.most_common() if k != "kept") or "none"
    C.print0(f"reflect: kept {counts['kept']} of {total} trajectories ({args.samples} per item, {len(records)} items)"
             f" -> {args.to}; rejected: {rejected}")
    C.teardown()
    return kept, counts


def main(argv=None):
    args = get_args(argv)
    return reflect_main(args) if args.reflect else train(args)


if __name__ == "__main__":
    main()
