"""
eval.py: the evaluation harness. A benchmark (benchmarks.load) through training's rollout loop, with or without
tools; each benchmark's own aggregation, pass@k / avg@k, tool statistics, where the model looked, hard-example mining.

CPU demo, `python eval.py`: runs/grpo (else runs/sft, else tiny) on 200 held-out synthetic items, zoom_in vs tools off.
Runs side by side (each with the tools it was trained with), and their GRPO metrics by blocks of 5 steps:
    python eval.py --runs runs/sft runs/grpo runs/ssr --metrics zero_groups,accuracy --out runs/ssr-eval
1 CPU, a quick look:
    python eval.py --model tiny --data synthetic --limit 8 --out runs/ev
1 GPU (V* on Qwen2.5-VL-7B, with the tools-off baseline measured at the same pixel budget):
    python eval.py --model Qwen/Qwen2.5-VL-7B-Instruct --bench vstar --data vstar_bench --baseline \
        --view-max-pixels 1003520 --crop-max-pixels 1003520 --max-turn-tokens 1024 --max-tokens 4096 --out runs/ev-vstar
8 GPUs (HR-Bench 8K, 8 samples per item: pass@k and avg@k):
    torchrun --standalone --nproc_per_node=8 eval.py --model runs/r3 --bench hrbench --data hr_bench_8k.tsv \
        --samples 8 --out runs/ev-hr8k
--recipe vlm_r3 | vl_rethinker | vilasr | groundlight | deepeyes: a method's evaluation settings (pixel budgets,
sampling, limits; docs/recipes.md); else pixel budgets are the model processor's (Qwen2.5-VL: 3136 to 12845056 px).
Hard-example mining (Groundlight's, TextVQA without tools; commands in docs/recipes.md): --samples 8 --keep-below 0.5
--write-subset hard.jsonl writes the items the model gets wrong, as lookagain JSONL for grpo.py --data.
--force-wait: VL-Rethinker's "Wait" continuation at evaluation (rethink.py); two more rows: its oracle upper bound (a
continuation counts only where it is right, as theirs) and the honest score (the continuation's answer replaces).

--out gets results.md (the table printed), results.json (every setting: model, pixel budgets, tools, prompts, seeds,
sampling, limits; the aggregates), items.jsonl (per item and setting: prediction, score, turns, calls, stop, coverage),
results.png, and view.html: what the model did, item by item (view.py; the images it saw in images/).
One question: python eval.py --model runs/grpo --image photo.jpg --question "..." prints the conversation as it goes.

Determinism (common.run_episodes): fixed batches (--batch-size), a generator per sample seeded by (seed, item, sample):
shards compute an unsharded run's batches, padding included; items.jsonl is bit-identical at any world size, greedy too.
"""
import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter

import torch

import benchmarks as B
import common as C
import data as D
import dialects
import model as M
import rethink
import rewards as R
import tasks
import tools as T
import view as V

METRIC = {"vqa": "VQA accuracy", "anls": "ANLS"}  # by record type (TextVQA, DocVQA); else accuracy

# -----------------------------------------------------------------------------
# aggregation: each benchmark's own rule, pass@k, where the model looked


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n = {n}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)  # 1 - P(k of the n, drawn unreplaced, all fail)


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def aggregate(items, bench=None, value=lambda it: it["pass_rate"]):
    """(overall, {category: score}) of a per-item value, by the benchmark's own rule (its row of benchmarks.BENCHMARKS:
    HR-Bench's rotations, VSI-Bench's and SPAR-Bench's means over tasks, ...; micro for a benchmark without one)."""
    return B.aggregate(items, bench, value)


COVERAGE_BINS = ("no zoom", "zoom missed gt", "gt <50% in zoom", "gt 50-99% in zoom", "gt all in zoom")


def coverage_bin(t):
    """A trajectory's bin by the share of the item's bbox inside its best successful zoom (rewards.coverage)."""
    s = t["coverage_inside"]
    # 1 - 1e-9: a box wholly inside the zoom may come out a rounding step below 1 (float arithmetic)
    return COVERAGE_BINS[0 if not t["n_zooms"] else 1 if s <= 0 else 2 if s < 0.5 else 3 if s < 1 - 1e-9 else 4]


def summarize(items, bench=None, samples=1):
    """Aggregates of a list of items (evaluate's second output). Skipped items (an "error") count apart."""
    ok = [it for it in items if "error" not in it]
    acc, per_cat = aggregate(ok, bench)  # of each item's pass_rate: its mean score over its samples
    s = dict(metric=METRIC.get(next((it.get("type") for it in ok), None), "accuracy"),
             accuracy=acc, per_category=per_cat, items=len(ok), skipped=len(items) - len(ok))
    if samples > 1:  # avg@k is `accuracy` (mean score over samples); pass@k counts score >= 0.5 as correct
        s["pass@k"] = {str(k): aggregate(ok, bench, lambda it, k=k: pass_at_k(samples, it["n_correct"], k))[0]
                       for k in sorted({k for k in (1, 2, 4, 8, 16, 32, 64, samples) if k <= samples})}  # 2^i, and n
        s["avg@k"] = acc
    ts = [t for it in ok for t in [it] + it.get("other_samples", [])]  # every sample: the item holds sample 0
    # accuracy with and without a successful tool call, per sample: does looking again go with right answers?
    used, unused = [t for t in ts if t["used_tool"]], [t for t in ts if not t["used_tool"]]
    calls = sum(t["n_calls"] for t in ts)
    s.update(tool_use=_mean(t["used_tool"] for t in ts), calls_per_item=_mean(t["n_calls"] for t in ts),
             failed_calls_per_item=_mean(t["n_failed"] for t in ts),
             failed_call_share=sum(t["n_failed"] for t in ts) / calls if calls else None,
             acc_with_tool_use=_mean(t["score"] for t in used), n_with_tool_use=len(used),
             acc_without_tool_use=_mean(t["score"] for t in unused), n_without_tool_use=len(unused),
             tokens_per_item=_mean(t["n_sampled"] for t in ts), wait_rate=_mean(t["n_waits"] > 0 for t in ts),
             stops=dict(Counter(t["stop"] for t in ts)))
    fw = [t["force_wait"] for t in ts if "force_wait" in t]
    if fw and len(fw) == len(ts):  # --force-wait (force_wait_scores): each score by the benchmark's own rule
        def by(k):
            return lambda it: _mean(t["force_wait"][k] for t in [it] + it.get("other_samples", []))
        s["force_wait"] = dict(oracle_upper_bound=aggregate(ok, bench, by("oracle"))[0],
                               continuation_replaces=aggregate(ok, bench, by("replaces"))[0],
                               continued=sum(f["continued"] for f in fw), kept_by_oracle=sum(f["kept"] for f in fw))
    # where the model looked (VLM-R3's accuracy-by-localisation): samples of items with a ground-truth bbox only
    located = [t for t in ts if t.get("coverage_inside") is not None]
    if located:
        zoomed = [t for t in located if t["n_zooms"]]  # the means are over samples that zoomed; the bins take all
        s["coverage"] = dict(
            mean_iou=_mean(t["coverage_iou"] for t in zoomed), mean_inside=_mean(t["coverage_inside"] for t in zoomed),
            bins={b: dict(n=len(g), accuracy=_mean(t["score"] for t in g))
                  for b in COVERAGE_BINS for g in [[t for t in located if coverage_bin(t) == b]]})
    return s

# -----------------------------------------------------------------------------
# evaluation: every item scored (the rollouts: common.run_episodes), then aggregated


def score_episode(ep, record):
    """One finished episode -> what items.jsonl keeps of it. Scored by rewards.accuracy on the turns."""
    text = "".join(ep["turns"])
    extract = ep["dialect"]["answer"]  # the answer as the dialect's own harness reads it
    # a response cut at a limit (its last call at the token cap, though lookagain reads a cut \boxed{} as an answer;
    # or the episode at its budget) never wrote <|im_end|>, which VL-Rethinker's scorer reads in the decoded text
    cut = ep["truncated"] or ep["cut"]
    score, why = (R.accuracy(text, record, extract, cut) if record.get("answer") is not None
                  else (None, "no answer given: not scored"))
    pred = V.prediction(text, record, extract)  # what the page and items.jsonl show as the answer
    calls = ep["calls"]
    cov_iou, cov_inside = R.coverage(T.trajectory(ep), record)  # (None, None) without a bbox in the record
    return dict(prediction=pred, score=score, why=why, turns=ep["turns"], calls=calls, stop=ep["stop"],
                n_calls=len(calls), n_failed=sum(not c["ok"] for c in calls), n_sampled=ep["n_sampled"],
                n_waits=R.rethinker_waits(text),  # VL-Rethinker's count: 'wait,', 'wait a', 'alternatively'
                used_tool=any(c["ok"] for c in calls), n_zooms=sum(c["ok"] and c["zoom"] for c in calls),
                coverage_iou=cov_iou, coverage_inside=cov_inside)


def force_wait_scores(ep, record, first):
    """--force-wait: one sample's scores after VL-Rethinker's "Wait" continuation (rethink.eval_continuations).
    oracle, theirs (experience_maker.py:2018, 1303): the continuation replaces the first answer only if it is right,
    which only the gold answer can tell: an upper bound. replaces, the honest one: a continuation that passes the checks
    that do not read its answer (rethink.continuation_ok) replaces the first answer, right or wrong."""
    w = ep.get("wait")
    if w is None:  # not continued (no answer, or over half the budget): the first answer stands
        return dict(continued=False, kept=False, oracle=first, replaces=first)
    t, ok = score_episode(w, record), rethink.continuation_ok(w)
    kept = ok and t["score"] >= R.CORRECT
    return dict(continued=True, ok=ok, kept=kept, turns=w["turns"], prediction=t["prediction"], score=t["score"],
                oracle=t["score"] if kept else first, replaces=t["score"] if ok else first)


def evaluate(policy, records, tools, cfg, samples=1, greedy=True, temperature=1.0, top_p=1.0, seed=0,
             batch_size=16, desc="eval", bench=None, skip_bad=False, progress=True, top_k=0, min_p=0.0, scripts=None,
             view_dir=None, view_originals=True, force_wait=False):
    """Roll out every record `samples` times (common.run_episodes; tools=[]: tools off; cfg: common.episode_cfg), score,
    aggregate -> (summary, items[i]: records[i]'s result). skip_bad: a bad image or record skips its item (counted).
    scripts: {i: texts} replayed instead of sampled (--replay). view_dir: each item's first sample also saves its
    images there (view.save_images), named by desc and item, the originals by item alone (view_originals=False: a
    setting before this one saved them). force_wait: each answered sample also continued after "Wait" (--force-wait)."""
    t0 = time.time()

    def finish(ep, record):
        t = score_episode(ep, record)
        if force_wait and t["score"] is not None:
            t["force_wait"] = force_wait_scores(ep, record, t["score"])
        i, j = ep["item"]  # (item, sample), set by run_episodes
        if view_dir is not None and j == 0:  # while the episode is alive: its originals and every image it was shown
            t.update(V.save_images(ep, view_dir, f"{V.slug(desc)}-{i:05d}", f"item{i:05d}", view_originals))
        return t
    then = (lambda eps: rethink.eval_continuations(policy, eps, seed)) if force_wait else None
    done, errors = C.run_episodes(policy, records, tools, cfg, finish, samples, greedy, temperature,
                                  top_p, seed, batch_size, desc, skip_bad, progress, top_k, min_p, scripts, then)
    items = []
    for i, r in enumerate(records):
        item = dict(idx=i, id=r.get("id"), category=r.get("category"), question=r["question"],
                    options=r.get("options"), answer=r.get("answer"), bbox=r.get("bbox"), type=r.get("type"))
        if r.get("cycle_category") is not None:
            item["cycle_category"] = r["cycle_category"]
        if i in errors:
            item["error"] = errors[i]
        else:
            ss = [done[(i, j)] for j in range(samples)]  # score_episode's dict for each sample
            scores = [t["score"] for t in ss]
            # the item's row is its sample 0, plus its scores; pass_rate: avg@k's per-item value; n_correct: pass@k's c
            item.update(ss[0], scores=scores, pass_rate=sum(scores) / samples,
                        n_correct=sum(x >= R.CORRECT for x in scores))
            if samples > 1:
                item["other_samples"] = ss[1:]
        items.append(item)
    B.rescore(items, records, bench)  # MMMU's seeded fallback, drawn in its evaluation's order
    return dict(summarize(items, bench, samples), seconds=round(time.time() - t0, 2)), items

# -----------------------------------------------------------------------------
# outputs: the table, results.json, items.jsonl, the hard subset


def _pct(v):
    return "-" if v is None else f"{100 * v:.1f}"


def results_table(runs):
    """runs: {setting name: summary} -> a markdown table, one column per setting."""
    names = list(runs)
    rows = [("", names), ("---", ["---"] * len(names))]

    def row(label, f):
        rows.append((label, [f(runs[n]) for n in names]))
    first = runs[names[0]]  # the metric's name and the pass@k rows are the first setting's (all share them)
    row(first["metric"], lambda s: _pct(s["accuracy"]))
    for c in sorted({c for s in runs.values() for c in s["per_category"]}):
        row(f"  {c}", lambda s, c=c: _pct(s["per_category"].get(c)))
    for k in first.get("pass@k", {}):
        row(f"pass@{k}", lambda s, k=k: _pct(s.get("pass@k", {}).get(k)))
    if any("force_wait" in s for s in runs.values()):  # --force-wait: its oracle's row says it is an upper bound
        for label, k in (("force-wait (oracle upper bound)", "oracle_upper_bound"),
                         ("force-wait, continuation replaces", "continuation_replaces")):
            row(label, lambda s, k=k: _pct((s.get("force_wait") or {}).get(k)))
        row("force-wait: continued (kept by the oracle)", lambda s: "{continued} ({kept_by_oracle})".format(
            **s["force_wait"]) if "force_wait" in s else "-")
    row("items (skipped)", lambda s: f"{s['items']} ({s['skipped']})")
    row("tool use %", lambda s: _pct(s["tool_use"]))
    row("calls / item", lambda s: "-" if s["calls_per_item"] is None else f"{s['calls_per_item']:.2f}")
    row("failed calls / item", lambda s: "-" if s["calls_per_item"] is None else f"{s['failed_calls_per_item']:.2f}")
    row("sampled tokens / item", lambda s: "-" if s["tokens_per_item"] is None else f"{s['tokens_per_item']:.1f}")
    row("says 'wait' (self-reflects) %", lambda s: _pct(s["wait_rate"]))
    row("acc. with tool use (n)", lambda s: f"{_pct(s['acc_with_tool_use'])} ({s['n_with_tool_use']})")
    row("acc. without tool use (n)", lambda s: f"{_pct(s['acc_without_tool_use'])} ({s['n_without_tool_use']})")
    if any("coverage" in s for s in runs.values()):
        row("zoom IoU with gt, mean", lambda s: _pct((s.get("coverage") or {}).get("mean_iou")))
        for b in COVERAGE_BINS:
            row(f"acc. if {b} (n)", lambda s, b=b: (lambda d: f"{_pct(d['accuracy'])} ({d['n']})")(
                s["coverage"]["bins"][b]) if "coverage" in s else "-")
    row("stop reasons", lambda s: ", ".join(f"{k} {v}" for k, v in sorted(s["stops"].items())))
    row("seconds", lambda s: f"{s['seconds']:.0f}")
    return "\n".join(f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows)


STEP_METRICS = {  # --metrics: a value of each step of grpo.py's metrics.jsonl, name -> (its label, how to read it)
    "zero_groups": ("groups with all-zero advantages %", lambda r: 1 - r["nonzero_groups"]),
    "self_waits": ("samples that say 'wait' on their own %", lambda r: r.get("self_waits")),
    "accuracy": ("accuracy of the samples %", lambda r: r["accuracy"]),
    "tool_use": ("tool use of the samples %", lambda r: r["tool_use"]),
    "coverage_iou": ("zoom IoU with gt of the samples %", lambda r: r["coverage_iou"]),
}


def metrics_table(folders, names, every=5):
    """GRPO runs' metrics.jsonl side by side: each metric's mean over each `every` steps, a column per metric and run
    (a folder with no GRPO steps, e.g. an SFT run, has none)."""
    # a GRPO row is known by nonzero_groups (SFT's rows lack it); {folder: [row per step]}
    logs = {f: [r for r in C.read_metrics(os.path.join(f, "metrics.jsonl")) if "nonzero_groups" in r] for f in folders}
    cols = [(n, f) for n in names for f in folders if logs[f]]  # (metric, run): a column each
    if not cols:
        return "(no GRPO metrics in " + ", ".join(folders) + ")"
    rows = ["| steps | " + " | ".join(f"{STEP_METRICS[n][0]}, {f}" for n, f in cols) + " |",
            "| --- |" + " --- |" * len(cols)]
    last = max(len(v) for v in logs.values())
    for a in range(0, last, every):
        # a run shorter than the longest, or steps without the metric (None), give "-"
        cells = [_pct(_mean(v for v in map(STEP_METRICS[n][1], logs[f][a:a + every]) if v is not None))
                 for n, f in cols]
        rows.append(f"| {a + 1}-{min(a + every, last)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def run_tools(folder, default):
    """The tools a run folder was trained with (its run.json), else `default`."""
    path = os.path.join(folder, "run.json")
    return json.load(open(path)).get("tools", default) if os.path.isfile(path) else default


def write_subset(items, records, path, keep_below):
    """Hard-example mining: write the records with pass rate <= keep_below (write_jsonl) -> (kept, scored items)."""
    scored = [it for it in items if "error" not in it]
    # the records as loaded (not the items): grpo.py --data reads them as any lookagain JSONL
    keep = [records[it["idx"]] for it in scored if it["pass_rate"] <= keep_below]
    D.write_jsonl(keep, path)
    return len(keep), len(scored)


def load_replay(path, records):
    """--replay FILE (JSONL, a line per item: {"id": <the item's id>, "turns": [<text of model call 1>, ...]}) ->
    ({index of a record: its texts}, [ids of the records the file does not have]). A file that is not JSONL, a line
    without an id or with turns that are not strings, a file that names no item: one line, SystemExit."""
    texts = {}
    try:
        for where, row in D.jsonl_rows(path):
            if not isinstance(row, dict) or "id" not in row:
                raise SystemExit(f'{where}: a replay line is {{"id": <the item\'s id>, "turns": ["<text>", ...]}}')
            if not isinstance(row.get("turns"), list) or not all(isinstance(t, str) for t in row["turns"]):
                raise SystemExit(f"{where}: 'turns' must be a list of strings (the text of each model call)")
            texts[str(row["id"])] = row["turns"]
    except (ValueError, FileNotFoundError) as e:  # not a file, not UTF-8, a line that is not JSON
        raise SystemExit(f"--replay {e}") from None
    ids = [str(r.get("id")) for r in records]  # as strings: a number and its digits name one item
    twice = sorted({k for k in ids if ids.count(k) > 1} & set(texts))
    if twice:  # one line of the file for two items: which one did the model answer?
        raise SystemExit(f"--replay {path}: the data has several items with the id {twice[0]!r}: give them ids of "
                         f"their own to replay them")
    scripts = {i: texts[k] for i, k in enumerate(ids) if k in texts}
    if not scripts:
        raise SystemExit(f"--replay {path}: names no item of these {len(records)} (its ids: "
                         f"{', '.join(list(texts)[:3]) or 'none'}; the items': {', '.join(ids[:3])})")
    return scripts, [k for k in ids if k not in texts]


def _git_commit():  # results.json records the code that made it; None outside a git checkout
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a policy on a benchmark (see the docstring of eval.py).")
    C.add_common_flags(p, model="demo", out=None)
    p.add_argument("--bench", choices=B.BENCHMARKS, help="--data's benchmark (default: synthetic, or lookagain JSONL)")
    p.add_argument("--images", default=None, help="image folder of TextVQA, DocVQA, MathVista, ScienceQA if elsewhere")
    p.add_argument("--split", default=None, help="the benchmark's split (default: its own, see docs/benchmarks.md)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N items only")
    p.add_argument("--shuffle-seed", type=int, default=0, help="V*: seed of the option order (-1: V*'s own, the "
                   "answer first, as some published numbers were measured)")
    p.add_argument("--frames", type=int, default=None, help="frames sampled per video (VSI-Bench: 32, the reference's)")
    p.add_argument("--scorer", choices=R.TYPES, default=None,
                   help="score with another record type's scorer (rethinker: VL-Rethinker's, behind its numbers)")
    p.add_argument("--fix", action="store_true",
                   help="the official scorers' named fixes (docs/benchmarks.md; never the default)")
    p.add_argument("--skip-bad", action="store_true", help="count and skip bad rows and unreadable images")
    p.add_argument("--samples", type=int, default=1, help="samples per item: pass@k and avg@k for k <= samples")
    p.add_argument("--temperature", type=float, help="default: greedy with --samples 1, else 1.0; 0 forces greedy")
    C.add_filter_flags(p)
    p.add_argument("--batch-size", type=int, default=16, help="episodes per rollout call")
    p.add_argument("--baseline", action="store_true", help="also evaluate with tools off, side by side")
    p.add_argument("--runs", nargs="+", metavar="RUN", help="run folders (sft.py's, grpo.py's --out) side by side, "
                   "each with the tools it was trained with (its run.json); --baseline: the last one tools off too")
    p.add_argument("--metrics", default=None, help=f"comma-separated ({', '.join(STEP_METRICS)}): a table of the "
                   "runs' metrics.jsonl, the mean of each --every steps")
    p.add_argument("--every", type=int, default=5, help="--metrics: steps per row")
    p.add_argument("--force-wait", action="store_true", help="VL-Rethinker's force_append_wait_eval: each answered "
                   "response cut back (p 0.5), \"\\n\\nWait\" appended, continued; rows for its oracle upper bound "
                   "(kept only if right) and for the continuation's answer replacing the first")
    p.add_argument("--keep-below", type=float, default=None, help="--write-subset keeps items with pass rate <= this")
    p.add_argument("--write-subset", default=None, help="lookagain JSONL of the kept (hard) items")
    # checking a format and re-scoring transcripts without a GPU
    p.add_argument("--print-prompt", action="store_true",
                   help="print the exact text of the first model call for the first item, and exit")
    p.add_argument("--replay", default=None, metavar="FILE", help="take each model call's text from FILE (JSONL: "
                   '{"id": ..., "turns": ["<call 1>", ...]}) instead of sampling; items not in FILE are not scored')
    # one question: the conversation printed as it happens, and its page (--out default: runs/ask, else runs/eval)
    p.add_argument("--image", action="append", metavar="PATH", help="ask about this image (again for several)")
    p.add_argument("--question", help="the question about --image")
    p.add_argument("--answer", help="--question's answer, to score it (default: not scored)")
    args = C.parse_args(p, argv, "eval")
    # each check below stops the run before any model loads
    args.out = args.out or ("runs/ask" if args.question else "runs/eval")
    if (args.image is None) != (args.question is None):
        p.error("--image and --question go together")
    for path in args.image or []:
        if not os.path.isfile(path):
            p.error(f"--image {path}: no such file")
    if args.force_wait and args.question:
        p.error("--force-wait scores a benchmark's items: not with --question")
    if (args.keep_below is None) != (args.write_subset is None):
        p.error("--keep-below and --write-subset go together")
    if args.bench not in (None, "jsonl") and tasks.task_name(args.data):
        p.error(f"--bench {args.bench} needs --data: the benchmark's file or folder")
    args.metrics = args.metrics.split(",") if args.metrics else []
    if set(args.metrics) - set(STEP_METRICS):
        p.error(f"--metrics: unknown {sorted(set(args.metrics) - set(STEP_METRICS))}; known: {', '.join(STEP_METRICS)}")
    C.check_flags(args, ge=dict(limit=1, samples=1, batch_size=1, temperature=0, frames=1, every=1), gt=dict(top_p=0),
                  le=dict(top_p=1, min_p=1))
    if args.temperature is None:  # 0.0 stands for greedy from here on (main, ask)
        args.temperature = 0.0 if args.samples == 1 else 1.0
    if args.temperature == 0 and args.samples > 1:
        p.error("--samples > 1 needs sampling (--temperature > 0): greedy gives identical samples")
    return args


def ask(policy, args, tools, cfg):
    """--image/--question: one record from the flags, rolled out with each turn printed as it happens (its call and
    the size of the image returned), then the answer; <out>/items.jsonl and its page."""
    record = dict(id="question", image=args.image, question=args.question, answer=args.answer, type="text")
    try:
        ep = T.new_episode(policy, record, tools, **cfg)
    except (ValueError, FileNotFoundError) as e:  # an image that does not decode, or is too large
        raise SystemExit(f"error: {e}") from None
    for k, (path, im, v) in enumerate(zip(args.image, ep["originals"], ep["images"])):
        print(f"image {k}: {path}, {im.width}x{im.height} px, shown at {v['img'].width}x{v['img'].height}")
    print(f"--- user\n{dialects.question_text(record)}")
    greedy = args.temperature == 0
    if not greedy:  # seeded as run_episodes seeds item 0, sample 0
        T.seed_episode(ep, policy.device, args.seed, 0, 0)
    T.rollout(policy, [ep], temperature=args.temperature if not greedy else 1.0, greedy=greedy, **C.filters(args),
              on_turn=lambda e: print(V.turn_text(e), flush=True))
    item = dict(idx=0, id="question", question=args.question, answer=args.answer, type="text",
                **score_episode(ep, record), **V.save_images(ep, args.out, "question"))
    print(f"answer: {item['prediction']}" + (f" (score {item['score']}: {item['why']})" if args.answer else ""))
    with open(os.path.join(args.out, "items.jsonl"), "w") as f:
        f.write(json.dumps(dict(setting=args.tools, **item)) + "\n")
    print(f"-> {V.write_page(args.out)}")


def main(argv=None):
    args = get_args(argv)
    the_demo = args.model == "demo" and args.data == "synthetic" and not args.runs  # `python eval.py`: the demo
    args.baseline = args.baseline or the_demo
    rank, world, device = C.setup(args)
    tools = C.parse_tools(args.tools)
    found = [d for d in (C.DEMO_GRPO, C.DEMO_SFT) if os.path.isfile(os.path.join(d, "config.json"))]
    name = (found + ["tiny"])[0] if args.model == "demo" else args.model  # demo: runs/grpo, else runs/sft, else tiny
    if args.question:
        if world > 1:
            raise SystemExit("--question runs in one process (no torchrun)")
        policy = C.load_policy(name, seed=args.seed, device=device)
        return ask(policy, args, tools, C.episode_cfg(args, policy))
    bench = args.bench or (None if tasks.task_name(args.data) else "jsonl")
    bad = [] if args.skip_bad else None  # the loaders append the rows they skip; None: a bad row raises
    try:  # a synthetic task's held-out items are the same 200 whatever --seed (the seeds' tables compare)
        records = tasks.dataset(args.data, "test") if bench is None else B.load(
            bench, args.data, args.images, args.split, args.shuffle_seed, args.frames, args.scorer, args.fix, bad)
    except (ValueError, FileNotFoundError) as e:  # bad data: the message names file and row
        raise SystemExit(f"error: {e}" + ("" if args.skip_bad else "\n(--skip-bad counts and skips bad rows)"))
    records = records[:args.limit] if args.limit else records
    scripts, missing = load_replay(args.replay, records) if args.replay else (None, [])
    if scripts is not None:  # only the items the file has are scored; the rest are reported
        records = [records[i] for i in sorted(scripts)]
        scripts = {k: scripts[i] for k, i in enumerate(sorted(scripts))}  # re-keyed by the items' new indices
    if not records:
        raise SystemExit(f"{args.data}: no items to evaluate")
    # settings: (column label, model, tools); the demo's: SFT and GRPO with tools, GRPO with tools off (first look only)
    settings = [(args.tools if tools else "none", name, tools)]
    if args.baseline and tools:
        settings.append(("none", name, []))
    if the_demo and name == C.DEMO_GRPO and os.path.isdir(C.DEMO_SFT):
        settings = [("tools off (GRPO model)", name, []), (f"after SFT ({args.tools})", C.DEMO_SFT, tools),
                    (f"after GRPO ({args.tools})", name, tools)]
    if args.runs:  # runs side by side, each with its own tools; the tools-off column first
        settings = [(f"{run} ({','.join(ts) or 'none'})", run, ts)
                    for run in args.runs for ts in [run_tools(run, tools)]]
        settings = [(f"{args.runs[-1]} (tools off)", args.runs[-1], [])] * args.baseline + settings  # [] or one
        name = " vs ".join(args.runs)
    if not args.print_prompt:
        C.print0(f"evaluating {', '.join(sorted({s[1] for s in settings}))} on {bench or args.data} "
                 f"({len(records)} items) on {world} process(es), {device}")
    if len(settings) > 1:  # a synthetic item's image, drawn on demand, is drawn once for all settings (2.4 MB each)
        records = [dict(r, image=functools.cache(r["image"])) if callable(r["image"]) else r for r in records]
    greedy = args.temperature == 0
    runs, all_items, policies = {}, {}, {}  # by setting label: summary, items; by model name: the loaded policy
    for label, model_name, ts in settings:
        if model_name not in policies:
            policies[model_name] = C.load_policy(model_name, seed=args.seed, device=device)
        policy = policies[model_name]  # a model in two settings (tools on and off) loads once
        cfg = C.episode_cfg(args, policy)  # the pixel budgets: the flags', else this model's processor's
        first_prompt = M.chat_text(policy, T.new_episode(policy, records[0], ts, **cfg)["messages"])
        if args.print_prompt:  # what the first model call sees, as a chat template prints it
            print(first_prompt)
            raise SystemExit(0)
        if device.type == "cpu" and sum(p.numel() for p in policy.model.parameters()) < 50e6:
            torch.set_num_threads(1)  # a toy model's matmuls are too small to split: more threads only wait
        summary, items = evaluate(policy, records, ts, cfg, samples=args.samples, greedy=greedy, seed=args.seed,
                                  temperature=args.temperature if not greedy else 1.0, **C.filters(args),
                                  batch_size=args.batch_size, desc=label, bench=bench, skip_bad=args.skip_bad,
                                  scripts=scripts, view_dir=args.out, view_originals=label == settings[0][0],
                                  force_wait=args.force_wait)
        # skipped: the items run_episodes skipped plus the rows B.load dropped before any rollout
        runs[label] = dict(summary, skipped=summary["skipped"] + len(bad or []), tools=ts, model=model_name,
                           dialect=cfg["dialect"], first_prompt=first_prompt, missing=len(missing),
                           pixels={k: v for k, v in cfg.items() if k.endswith("pixels")})
        all_items[label] = items
    if rank == 0:  # run_episodes gave every rank every result: one writer
        os.makedirs(args.out, exist_ok=True)
        table = (f"{name} on {f'{bench} ({args.data})' if bench else args.data}, {len(records)} items, "
                 f"{'greedy' if greedy else f'{args.samples} samples at T={args.temperature}'}"
                 f"{'' if greedy else f', top-k {args.top_k}, top-p {args.top_p}, min-p {args.min_p}'}, "
                 f"view {cfg['view_max_pixels']} px, zoom {cfg['crop_max_pixels']} px, seed {args.seed}\n\n"
                 + results_table(runs))
        if args.metrics:
            table += "\n\n" + metrics_table(args.runs or [name], args.metrics, args.every)
        subset = None
        if args.write_subset:
            # mined on the first setting's results: the table's first column
            kept, of = write_subset(all_items[next(iter(runs))], records, args.write_subset, args.keep_below)
            subset = dict(path=args.write_subset, keep_below=args.keep_below, kept=kept, of=of,
                          setting=next(iter(runs)))
            table += f"\n\nhard subset: kept {kept} of {of} items (pass rate <= {args.keep_below}): {args.write_subset}"
        settings_out = dict(
            model=args.model, model_loaded=name, bench=bench or "synthetic", data=args.data, images=args.images,
            split=args.split, limit=args.limit, n_items=len(records), seed=args.seed, shuffle_seed=args.shuffle_seed,
            samples=args.samples, greedy=greedy, temperature=None if greedy else args.temperature, **C.filters(args),
            batch_size=args.batch_size, world_size=world, device=str(device), dtype=str(policy.model.dtype),
            family=policy.family,
            pixels=dict({k: v for k, v in cfg.items() if k.endswith("pixels")}, zoom_window=cfg["zoom_window"]),
            limits={k: cfg[k] for k in ("max_turns", "max_images", "max_turn_tokens", "max_tokens")},
            dialect=cfg["dialect"], skipped_rows=bad or [], skip_bad=args.skip_bad, replay=args.replay,
            not_in_replay=missing,
            versions=dict(torch=torch.__version__, python=sys.version.split()[0],
                          transformers=__import__("transformers").__version__), git_commit=_git_commit(),
            flags={k: v for k, v in vars(args).items() if k != "print_config"})  # every flag, --recipe's included
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(dict(settings=settings_out, runs=runs, subset=subset), f, indent=2)
        with open(os.path.join(args.out, "items.jsonl"), "w") as f:
            f.writelines(json.dumps(dict(setting=label, **it)) + "\n" for label, items in all_items.items()
                         for it in items)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(table + "\n")
        print(table)
        if bad:
            print(f"skipped {len(bad)} bad row(s) while loading; listed in results.json")
        if missing:
            print(f"not scored: {len(missing)} item(s) that {args.replay} does not have ({', '.join(missing[:3])}"
                  f"{', ...' if len(missing) > 3 else ''})")
        V.plot_results(args.out)
        V.write_page(args.out)
        print(f"-> {args.out}/results.md, results.json, items.jsonl, results.png; what the model did: "
              f"{args.out}/view.html")
    C.teardown()


if __name__ == "__main__":
    main()
