"""
Three benchmarks, each printing a table: the fused log-prob kernel (1.), the rollout engine (2., --rollout) and the
data converter (3., --convert).

1. Forward + backward of per-token log-probs logp = log_softmax(hidden @ weight.T)[targets] (the loss L =
sum_t g_t logp_t, g fixed random), for time and peak memory. Run exactly (defaults per device: see the flags):
`python bench.py --device cpu --threads 2` (CPU, 2 cores, ~10 min), `python bench.py --device cuda` (one GPU),
or `python bench.py --quick` (a smoke test, seconds). Implementations:
  naive          logits = hidden @ weight.T (then .float()), log_softmax, gather; autograd backward
  chunked        fused_logprobs(impl="torch"): chunked PyTorch, logits recomputed in backward (8 N H V)
  chunked+loss   the same with the loss fused in (loss_fn=): gradient formed in forward (6 N H V)
  triton, triton+loss   the Triton row kernels instead (CUDA only)
Each (implementation, N) runs --rounds times in fresh subprocesses (its own peak memory), implementations taking
turns (a load change hits all alike): a warm-up on 8 tokens (code loading, Triton compilation), then --reps runs at
full size. "extra": the first run's peak memory (max_memory_allocated or VmHWM) beyond prior use and the gradients.

2. The rollout engine (model.sample through tools.rollout) against transformers' generate and the uncached
path (tools.rollout(reuse_cache=False): every turn's whole conversation prefilled again):
  CPU (the SFT demo checkpoint runs/sft when present, else tiny): python bench.py --rollout --threads 2
  one GPU (random weights): python bench.py --rollout --model random-3b --device cuda --max-new 512 --pixels 200704
--prompts P x --group G episodes, --reps rounds taking turns, the fastest kept. Single turn, greedy: generate
(same prompts, stop strings, max new tokens), uncached, engine; multi-turn with zoom_in (the demo's limits),
T = 1, per-episode seeds: uncached, engine. Per token the trajectories keep: tokens prefilled (prefill/token),
rows forwarded by decode steps (rows/token: 1 when none decodes padding); same tokens: rows as the setting's first.

3. convert.py on generated parquets of images (TextVQA's layout: distinct 640 x 480 noise JPEGs of ~270 KB as
{bytes, path} structs, row groups of 100 rows), one of each --gb size, run as a subprocess (no script imports
another) twice: the first run writes every image, the second finds them all written. Rows/s and the run's peak
resident memory (its own rusage), which stays flat with the file's size (read by row group):
  python bench.py --convert                 (0.25 and 2 GB in runs/bench-convert, deleted after; ~10 min on 2 cores)
"""

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

import common as C
import model as M
import tasks
import tools as T
from kernel import fused_logprobs


def make_step(impl, hidden, weight, targets, g):
    """A function doing one forward + backward of L = sum_t g_t logp_t for the given implementation."""
    kind = "triton" if impl.startswith("triton") else "torch"  # the same chunking, two kernels
    if impl in ("chunked", "triton"):
        return lambda: fused_logprobs(hidden, weight, targets, impl=kind).backward(g)
    if impl in ("chunked+loss", "triton+loss"):  # the same L, as per-token terms of the chunk's rows: [0] is the loss
        return lambda: fused_logprobs(hidden, weight, targets, impl=kind,
                                      loss_fn=lambda lp, rows: lp * g[rows])[0].backward()
    if impl != "naive":
        raise ValueError(impl)

    def step():
        logits = (hidden @ weight.T).float()                             # [N, V]
        logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)  # [N]
        del logits  # freed before the backward (log_softmax keeps its output, not its input)
        logp.backward(g)  # dL/dlogp = g: the loss L without forming it
    return step


def timed(fn, device):  # -> (seconds, what fn() returned), the device synchronised before and after
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


def _rss_kib(field):  # a line of /proc/self/status in KiB (VmRSS: now, VmHWM: the peak), Linux only
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def run_one(impl, N, H, V, dtype, device, reps):
    """Runs in a child process: a warm-up, then `reps` full-size runs; returns their times and the memory."""
    torch.manual_seed(0)  # every implementation gets the same inputs
    hidden = torch.randn(N, H, device=device).to(getattr(torch, dtype)).requires_grad_()      # [N, H]
    weight = (0.02 * torch.randn(V, H, device=device)).to(hidden.dtype).requires_grad_()  # [V, H], GPT-2's init scale
    targets = torch.randint(0, V, (N,), device=device)
    g = torch.randn(N, device=device)
    grad_bytes = (N * H + V * H) * hidden.element_size()   # dh [N, H] + dW [V, H]
    cuda = device == "cuda"

    # warm-up on 8 tokens with the full weight (same V, so the same Triton specialisation)
    make_step(impl, hidden[:8].detach().requires_grad_(), weight, targets[:8], g[:8])()
    weight.grad = None  # else the timed run would add into it, and base would already hold the dW it allocates
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()  # inputs and weight: what the step finds in use
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # resets VmHWM (peak resident memory) to the current resident memory
        base = _rss_kib("VmRSS") * 1024

    step = make_step(impl, hidden, weight, targets, g)
    times = []
    for i in range(reps):
        times.append(timed(step, device)[0])
        if i == 0:  # the first run's peak (the later runs repeat the same allocations)
            peak = (torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024) - base
        hidden.grad = weight.grad = None  # each run allocates its gradients afresh, as a training step does
    # extra: what the implementation needs beyond the two gradients any implementation must return
    return dict(impl=impl, N=N, times=times, extra=peak - grad_bytes)


def rollout_bench(a, device):
    # the demo's SFT checkpoint when there is one: it calls tools, so the multi-turn rows have turns to measure
    name, arch, label = a.model or (C.DEMO_SFT if os.path.isdir(C.DEMO_SFT) else "tiny"), None, None
    if M.RANDOM.get(name):  # random-*: the published widths with random weights, --layers decoder layers
        pub = M.RANDOM[name]
        arch = dict(pub, text=dict(pub["text"], num_hidden_layers=a.layers or pub["text"]["num_hidden_layers"]))
        label = f"{name} (published widths, random weights), {arch['text']['num_hidden_layers']} layers"
    policy = C.load_policy(name, device=device, arch=arch)
    policy.model.eval()  # no dropout: the paths must sample the same tokens
    records = tasks.dataset("synthetic", "test")[:a.prompts]  # the demo's generated items: nothing to download
    # the scripts' default episode (the demo's limits), with this run's pixel and token budgets: --pixels, else
    # 112 x 112 px or the model's minimum where that is more (a Qwen3-VL folder's processor: 65536 px)
    cfg = C.episode_cfg(C.add_common_flags(argparse.ArgumentParser()).parse_args([]), policy)
    pixels = a.pixels or max(112 * 112, cfg["view_min_pixels"])
    if pixels < cfg["view_min_pixels"]:
        raise SystemExit(f"--pixels {pixels}: below the model's minimum of {cfg['view_min_pixels']} px")
    cfg = dict(cfg, view_max_pixels=pixels, crop_max_pixels=pixels, max_turn_tokens=a.max_new)

    def episodes(turns):
        eps = [ep for r in records for ep in T.new_group(policy, r, ["zoom_in"], a.group, **dict(cfg, max_turns=turns))]
        for k, ep in enumerate(eps):  # a generator per episode: at T = 1 both paths draw the same tokens
            T.seed_episode(ep, device, 0, k)
        return eps

    def engine(turns, reuse):  # -> seconds, sampled tokens, prefilled tokens, decode rows, what was sampled, episodes
        eps = episodes(turns)
        policy.stats.clear()  # model.sample counts prefilled tokens and decode rows into it
        dt, _ = timed(lambda: T.rollout(policy, eps, greedy=turns == 1, reuse_cache=reuse), device)
        sampled = [[t for t, m in zip(ep["seq"], ep["mask"]) if m] for ep in eps]  # mask 1: what the model sampled
        return dt, sum(map(len, sampled)), policy.stats["prefill_tokens"], policy.stats["decode_rows"], sampled, eps

    def generate(_turns, _reuse):
        eps = episodes(1)
        batch = M.collate(policy, [ep["seq"] for ep in eps], [T.episode_images(policy, ep) for ep in eps])
        del batch["position_ids"]  # generate computes M-RoPE itself, from where the image tokens are
        # transformers 5's get_rope_index finds the image tokens by this mask (the processor's output has it)
        batch["mm_token_type_ids"] = (batch["input_ids"] == policy.image_pad).int()
        dt, out = timed(lambda: policy.model.generate(
            **batch, max_new_tokens=a.max_new, do_sample=False, eos_token_id=policy.eos, pad_token_id=policy.pad,
            stop_strings=["</tool_call>", "</answer>"], tokenizer=policy.tok), device)
        new = out[:, batch["input_ids"].shape[1]:].tolist()
        steps = len(new[0])  # every row decodes until the last one stops
        def end(r):  # a row ends at its first eos or stop string (then generate pads it, with an eos token)
            return next((i + 1 for i, x in enumerate(r) if x in policy.eos or
                         any(s in policy.tok.decode(r[:i + 1]) for s in ("</tool_call>", "</answer>"))), len(r))
        new = [r[:end(r)] for r in new]
        # prefilled: every prompt token; decode rows: every row at every step after the first, finished or not
        return dt, sum(map(len, new)), int(batch["attention_mask"].sum()), len(new) * (steps - 1), new, eps

    runs = [("single turn", "generate", generate, 1, None), ("single turn", "uncached", engine, 1, False),
            ("single turn", "engine", engine, 1, True), ("multi-turn", "uncached", engine, cfg["max_turns"], False),
            ("multi-turn", "engine", engine, cfg["max_turns"], True)]
    best = {}
    for r in range(a.reps + 1):  # round 0 warms up; then the paths take turns
        for setting, path, fn, turns, reuse in runs:
            res = fn(turns, reuse)
            if r and (best.get((setting, path)) is None or res[0] < best[(setting, path)][0]):
                best[(setting, path)] = res
    eps = best[("multi-turn", "engine")][5]  # for the header: how many turns and images a trajectory had
    print(f"# {label or name} on {device} "
          f"({torch.cuda.get_device_name() if device == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{policy.model.dtype}, {a.prompts} prompts x {a.group}, at most {a.max_new} new tokens a turn, images of "
          f"<= {pixels} px; multi-turn: {sum(len(ep['turns']) for ep in eps) / len(eps):.2f} turns and "
          f"{sum(len(ep['images']) for ep in eps) / len(eps):.2f} images a trajectory; best of {a.reps}")
    print("| setting | path | time s | tokens | tokens/s | speed | prefill/token | rows/token | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (setting, path), (dt, n, pre, rows, seqs, _) in best.items():
        base = best[(setting, "generate" if setting == "single turn" else "uncached")]  # the setting's first path
        same = sum(x == y for x, y in zip(seqs, base[4]))  # rows whose sampled tokens equal the first path's
        print(f"| {setting} | {path} | {dt:.2f} | {n} | {n / dt:.0f} | {base[0] / dt:.2f}x | {pre / n:.2f} | "
              f"{rows / n:.2f} | {same}/{len(seqs)} |")


def textvqa_parquet(path, gb, group=100):
    """A parquet in lmms-lab/textvqa's layout (the columns convert.py reads) of ~gb GB of distinct noise JPEGs,
    written row group by row group. -> (rows, bytes of images)"""
    # noise does not compress: a JPEG of it is ~270 KB, a photo's size, and the MB/s are a real dataset's
    base = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    # lmms-lab/textvqa's types for the columns convert.py reads (question_id int32, the image a {bytes, path} struct)
    schema = pa.schema([("image_id", pa.string()), ("question_id", pa.int32()), ("question", pa.string()),
                        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("answers", pa.list_(pa.string()))])
    n, size = 0, 0
    with pq.ParquetWriter(path, schema) as w:
        while size < gb * 2**30:  # whole row groups until the images reach gb GiB
            rows = []
            for _ in range(group):
                # each image its own (the base noise shifted by n, 640 x 480 shifts): convert.py names an image by its
                # hash and would write a repeated one once
                buf = io.BytesIO()
                Image.fromarray(np.roll(base, (n // 640, n % 640), axis=(0, 1))).save(buf, "JPEG", quality=90)
                rows.append(dict(image_id=f"{n:016x}", question_id=n, question="what is written here?",
                                 image=dict(bytes=buf.getvalue(), path=None), answers=["noise"] * 10))  # TextVQA: 10
                n, size = n + 1, size + len(buf.getvalue())
            w.write_table(pa.Table.from_pylist(rows, schema))
    return n, size


# convert.py as a script, then its own peak resident memory (VmHWM, KiB; the child's rusage would also count this
# process's memory, copied at the fork before the exec)
CONVERT_HWM = """import runpy, sys
sys.argv = ["convert.py"] + sys.argv[1:]
runpy.run_path("convert.py", run_name="__main__")
print("VmHWM", next(s.split()[1] for s in open("/proc/self/status") if s.startswith("VmHWM:")))"""


def convert_bench(a):
    work = os.path.abspath(a.work)
    print(f"# convert.py textvqa on generated parquets (row groups of 100 rows, ~270 KB JPEGs), {os.cpu_count()} CPUs")
    print("| parquet | rows | run | time s | rows/s | MB/s | images written | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for gb in a.gb:
        shutil.rmtree(work, ignore_errors=True)  # fresh per size: the first run must write every image
        os.makedirs(work)
        src = os.path.join(work, "train-00000-of-00001.parquet")  # a name textvqa's pattern {split}-*.parquet takes
        rows, size = textvqa_parquet(src, gb)
        for run in ("first", "again"):  # again: the same --out, its images all there (checked by name, not written)
            t = time.perf_counter()  # (cwd: CONVERT_HWM runs convert.py by its path, beside this file)
            r = subprocess.run([sys.executable, "-c", CONVERT_HWM, "textvqa", src, "--out", os.path.join(work, "out")],
                               capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
            dt = time.perf_counter() - t
            if r.returncode:
                raise SystemExit(f"convert.py failed: {r.stderr[-2000:]}")
            # convert.py's summary ("images: N written, M already there"), then CONVERT_HWM's last line
            written, hwm = r.stdout.split("images: ")[1].split(" written")[0], int(r.stdout.split("VmHWM")[-1])
            print(f"| {os.path.getsize(src) / 2**30:.2f} GB | {rows} | {run} | {dt:.1f} | {rows / dt:.0f} | "
                  f"{size / dt / 2**20:.0f} | {written} | {hwm / 1024:.0f} |", flush=True)
    shutil.rmtree(work, ignore_errors=True)  # GBs of parquet and images: not left behind


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--N", type=int, nargs="+", default=None,
                   help="token counts (default: 2048 8192 16384 on cuda, 4096 on cpu)")
    p.add_argument("--H", type=int, default=None, help="hidden size (default: 2048 on cuda, 1024 on cpu)")
    p.add_argument("--V", type=int, default=151936)
    p.add_argument("--reps", type=int, default=None,
                   help="full-size runs per subprocess (default: 5 on cuda, 1 on cpu)")
    p.add_argument("--rounds", type=int, default=None,
                   help="subprocesses per (impl, N), taking turns (default: 1 on cuda, 3 on cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--impls", nargs="+", default=None, help="naive chunked chunked+loss triton triton+loss")
    p.add_argument("--quick", action="store_true", help="small sizes, a smoke test of this script")
    p.add_argument("--_one", nargs=2, default=None, help=argparse.SUPPRESS)  # internal: IMPL N, run in a child
    p.add_argument("--rollout", action="store_true", help="benchmark the rollout engine instead (see 2. above)")
    p.add_argument("--model", help="--rollout: tiny, random-3b, random-qwen3vl-8b, ..., a hub id or a folder "
                                   "(default: runs/sft, else tiny)")
    p.add_argument("--layers", type=int,
                   help="--rollout --model random-*: decoder layers (default: the published depth)")
    p.add_argument("--prompts", type=int, default=8, help="--rollout: prompts, each in a group of --group episodes")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new", type=int, default=96, help="--rollout: new tokens a turn at most")
    p.add_argument("--pixels", type=int, help="--rollout: pixel budget of an image, view and zoom (default: 112 x 112, "
                   "or the model's minimum where that is more)")
    p.add_argument("--convert", action="store_true", help="benchmark convert.py instead (see 3. above)")
    p.add_argument("--gb", type=float, nargs="+", default=[0.25, 2.0], help="--convert: parquet sizes")
    p.add_argument("--work", default="runs/bench-convert", help="--convert: where the parquet and output go")
    a = p.parse_args()
    if a.convert:  # convert.py only: no device, no model
        return convert_bench(a)

    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    dtype = a.dtype or ("bfloat16" if cuda else "float32")
    Ns, H, reps, rounds = ([2048, 8192, 16384], 2048, 5, 1) if cuda else ([4096], 1024, 1, 3)  # the defaults
    Ns, H, V, reps, rounds = a.N or Ns, a.H or H, a.V, a.reps or reps, a.rounds or rounds
    if a.quick:  # small enough for seconds on a CPU
        Ns, H, V, reps, rounds = [1024], 256, 32000, 1, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.rollout:
        a.reps = a.reps or 3  # here: rounds of the paths taking turns, the fastest kept
        return rollout_bench(a, device)

    if a._one is not None:   # child process: one measurement, printed as JSON
        print(json.dumps(run_one(a._one[0], int(a._one[1]), H, V, dtype, device, reps)))
        return

    impls = a.impls or (["naive", "chunked", "chunked+loss"] + (["triton", "triton+loss"] if cuda else []))
    name = torch.cuda.get_device_name() if cuda else f"CPU, {a.threads or torch.get_num_threads()} threads"
    print(f"# {name}, torch {torch.__version__}, dtype {dtype}, H = {H}, V = {V}, {rounds} round(s) x {reps} run(s)")
    print("# time: fastest full-size fwd+bwd; speed: naive's time / this time; TFLOP/s: 6 N H V / time;")
    print("# extra: peak memory beyond the two gradients (of hidden and weight)")
    print(f"{'N':>6} {'impl':>13} {'time ms':>10} {'speed':>6} {'TFLOP/s':>8} {'extra MiB':>10} {'vs naive':>8}  "
          "all times (s)")
    # each measurement in a fresh interpreter: its peak memory its own, no allocator cache left by another
    child = [sys.executable, os.path.abspath(__file__), "--device", device, "--dtype", dtype, "--H", str(H),
             "--V", str(V), "--reps", str(reps)] + (["--threads", str(a.threads)] if a.threads else [])
    for N in Ns:
        times, extra = {impl: [] for impl in impls}, {}  # over the rounds
        for _ in range(rounds):
            for impl in impls:   # the implementations take turns
                out = subprocess.run(child + ["--_one", impl, str(N)], capture_output=True, text=True)
                if out.returncode != 0:  # (out of memory: naive at a large N) the others still run
                    print(f"# {impl} at N = {N} failed: {out.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])  # the child's last line (above it: warnings)
                times[impl] += r["times"]
                extra[impl] = max(extra.get(impl, r["extra"]), r["extra"])  # the fastest time, the largest memory
        naive = times.get("naive")
        for impl, ts in [(impl, ts) for impl, ts in times.items() if ts]:  # those that ran
            t = min(ts)
            speed, mem = (f"{min(naive) / t:.2f}", f"{extra[impl] / extra['naive']:.3f}") if naive else ("-", "-")
            # 6 N H V: the forward's logits and the backward's two products (dh, dW), 2 N H V flops each
            print(f"{N:>6} {impl:>13} {t * 1e3:>10.1f} {speed:>6} {6 * N * H * V / t / 1e12:>8.3f} "
                  f"{extra[impl] / 2**20:>10.0f} {mem:>8}  {' '.join(f'{x:.1f}' for x in ts)}", flush=True)


if __name__ == "__main__":
    main()
