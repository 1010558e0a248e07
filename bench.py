"""
Two benchmarks, each printing a table: the fused log-prob kernel (below) and the rollout engine (--rollout).

1. The fused log-prob kernel: forward + backward of per-token log-probs
logp = log_softmax(hidden @ weight.T)[targets], against the naive path
(logits -> log_softmax -> gather), for time and peak memory.

Run exactly:
  CPU (2 cores, ~10 min): python bench.py --device cpu --threads 2
                          (CPU defaults: N = 4096, H = 1024, V = 151936, fp32, 3 rounds of 1 run)
  one GPU:                python bench.py --device cuda
                          (GPU defaults: N = 2048, 8192, 16384, H = 2048, V = 151936, bf16, 1 round of 5 runs)
  smoke test (seconds):   python bench.py --quick

Implementations ("fwd+bwd" of the same loss L = sum_t g_t logp_t, g fixed random):
  naive          logits = hidden @ weight.T (then .float()), log_softmax, gather; autograd backward
  chunked        fused_logprobs(impl="torch"): chunked PyTorch, logits recomputed in backward (8 N H V)
  chunked+loss   the same with the loss fused in (loss_fn=): gradient formed in forward (6 N H V)
  triton, triton+loss   the Triton row kernels instead (CUDA only)

Every (implementation, N) runs in fresh subprocesses, so peak memory is its own, --rounds times,
the implementations taking turns (on a shared machine a load change then hits all of them alike):
  CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus what was allocated before.
  CPU:  the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs) minus its
        resident memory before the call.
Reported: "extra" = that peak minus the two gradients (of hidden and weight) every implementation
must return. Each subprocess first warms up on 8 tokens (code loading, Triton compilation), then
runs once at full size (which gives the memory) and --reps - 1 more times. Time: the fastest of all
the full-size runs (the least disturbed). TFLOP/s counts the 6 N H V floor, whatever the
implementation actually computes.

2. The rollout engine (model.sample through tools.rollout) against transformers' generate and the uncached
path (every turn's whole conversation prefilled again: tools.rollout(reuse_cache=False)):
  CPU (the SFT demo checkpoint runs/sft when present, else tiny): python bench.py --rollout --threads 2
  one GPU (a random-weight Qwen2.5-VL-3B, tiny tokenizer):
      python bench.py --rollout --model random-3b --device cuda --max-new 512 --pixels 200704
--prompts P x --group G episodes (a GRPO step's groups), --reps rounds taking turns, the fastest kept.
Single turn, greedy: generate (same prompts, same stop strings and max new tokens), uncached, engine: the
same tokens (the table says how many rows agree with generate). Multi-turn with zoom_in (the demo's
episodes: its turn, image and token limits), sampled at T = 1 from per-episode seeds: uncached, engine.
tokens/s counts the tokens the trajectories keep; prefill/token: tokens prefilled per sampled token;
rows/token: rows forwarded by decode steps per sampled token (1 when no row decodes padding).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

import common as C
import data as D
import model as M
import tools as T
from kernel import fused_logprobs


def make_step(impl, hidden, weight, targets, g):
    """A function doing one forward + backward of L = sum_t g_t logp_t for the given implementation."""
    if impl == "naive":
        def step():
            logits = (hidden @ weight.T).float()                             # [N, V]
            logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
            del logits
            logp.backward(g)
    elif impl in ("chunked", "triton"):
        kind = "torch" if impl == "chunked" else "triton"
        def step():
            fused_logprobs(hidden, weight, targets, impl=kind).backward(g)
    elif impl in ("chunked+loss", "triton+loss"):
        kind = "torch" if impl == "chunked+loss" else "triton"
        def step():
            loss, _ = fused_logprobs(hidden, weight, targets, impl=kind, loss_fn=lambda lp, rows: lp * g[rows])
            loss.backward()
    else:
        raise ValueError(impl)
    return step


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def run_one(impl, N, H, V, dtype, device, reps):
    """Runs in a child process: a warm-up, then `reps` full-size runs; returns their times and the memory."""
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    hidden = torch.randn(N, H, device=device).to(dt).requires_grad_()
    weight = (0.02 * torch.randn(V, H, device=device)).to(dt).requires_grad_()
    targets = torch.randint(0, V, (N,), device=device)
    g = torch.randn(N, device=device)
    grad_bytes = (N * H + V * H) * hidden.element_size()   # dh [N, H] + dW [V, H]
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    # warm-up on 8 tokens with the full weight (same V, so the same Triton specialisation)
    make_step(impl, hidden[:8].detach().requires_grad_(), weight, targets[:8], g[:8])()
    weight.grad = None
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # resets VmHWM (peak resident memory) to the current resident memory
        base = _rss_kib("VmRSS") * 1024

    step = make_step(impl, hidden, weight, targets, g)
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        if i == 0:
            peak = (torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024) - base
        hidden.grad = weight.grad = None
    return dict(impl=impl, N=N, times=times, extra=peak - grad_bytes)


def rollout_bench(a, device):
    """The rollout table (see the docstring, 2.)."""
    name, arch = a.model or (C.DEMO_SFT if os.path.isdir(C.DEMO_SFT) else "tiny"), None
    if name == "random-3b":
        arch = dict(M.QWEN25_VL_3B, text=dict(M.QWEN25_VL_3B["text"], num_hidden_layers=a.layers))
    policy = C.load_policy(name, device=device, arch=arch)
    policy.model.eval()
    records = D.dataset("synthetic", "test")[:a.prompts]
    cfg = dict(C.episode_cfg(C.add_common_flags(argparse.ArgumentParser()).parse_args([]), policy),
               view_max_pixels=a.pixels, crop_max_pixels=a.pixels, max_turn_tokens=a.max_new)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def episodes(turns):
        eps = [ep for r in records for ep in T.new_group(policy, r, ["zoom_in"], a.group, **dict(cfg, max_turns=turns))]
        for k, ep in enumerate(eps):
            T.seed_episode(ep, device, 0, k)
        return eps

    def engine(turns, reuse):  # -> seconds, sampled tokens, prefilled tokens, decode rows, what was sampled, episodes
        eps = episodes(turns)
        policy.stats.clear()
        sync()
        t = time.perf_counter()
        T.rollout(policy, eps, greedy=turns == 1, reuse_cache=reuse)
        sync()
        dt, st = time.perf_counter() - t, policy.stats
        sampled = [[t for t, m in zip(ep["seq"], ep["mask"]) if m] for ep in eps]
        return dt, sum(map(len, sampled)), st["prefill_tokens"], st["decode_rows"], sampled, eps

    def generate(_turns, _reuse):
        eps = episodes(1)
        batch = M.collate(policy, [ep["seq"] for ep in eps], [T.episode_images(policy, ep) for ep in eps])
        del batch["position_ids"]  # generate computes M-RoPE itself, from where the image tokens are
        batch["mm_token_type_ids"] = (batch["input_ids"] == policy.image_pad).int()
        sync()
        t = time.perf_counter()
        out = policy.model.generate(**batch, max_new_tokens=a.max_new, do_sample=False, eos_token_id=policy.eos,
                                    pad_token_id=policy.pad, stop_strings=["</tool_call>", "</answer>"],
                                    tokenizer=policy.tok)
        sync()
        dt, new = time.perf_counter() - t, out[:, batch["input_ids"].shape[1]:].tolist()
        steps = len(new[0])  # every row decodes until the last one stops
        def end(r):  # a row ends at its first eos or stop string (then generate pads it, with an eos token)
            return next((i + 1 for i, x in enumerate(r) if x in policy.eos or
                         any(s in policy.tok.decode(r[:i + 1]) for s in ("</tool_call>", "</answer>"))), len(r))
        new = [r[:end(r)] for r in new]
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
    eps = best[("multi-turn", "engine")][5]
    print(f"# {name if arch is None else f'random Qwen2.5-VL-3B widths, {a.layers} layers'} on {device} "
          f"({torch.cuda.get_device_name() if device == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{policy.model.dtype}, {a.prompts} prompts x {a.group}, at most {a.max_new} new tokens a turn, images of "
          f"<= {a.pixels} px; multi-turn: {sum(len(ep['turns']) for ep in eps) / len(eps):.2f} turns and "
          f"{sum(len(ep['images']) for ep in eps) / len(eps):.2f} images a trajectory; best of {a.reps}")
    print("| setting | path | time s | tokens | tokens/s | speed | prefill/token | rows/token | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (setting, path), (dt, n, pre, rows, seqs, _) in best.items():
        base = best[(setting, "generate" if setting == "single turn" else "uncached")]
        same = sum(x == y for x, y in zip(seqs, base[4]))
        print(f"| {setting} | {path} | {dt:.2f} | {n} | {n / dt:.0f} | {base[0] / dt:.2f}x | {pre / n:.2f} | "
              f"{rows / n:.2f} | {same}/{len(seqs)} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--N", type=int, nargs="+", default=None, help="token counts (default: 2048 8192 16384 on cuda, 4096 on cpu)")
    p.add_argument("--H", type=int, default=None, help="hidden size (default: 2048 on cuda, 1024 on cpu)")
    p.add_argument("--V", type=int, default=151936)
    p.add_argument("--reps", type=int, default=None, help="full-size runs per subprocess (default: 5 on cuda, 1 on cpu)")
    p.add_argument("--rounds", type=int, default=None, help="subprocesses per (impl, N), taking turns (default: 1 on cuda, 3 on cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--impls", nargs="+", default=None, help="naive chunked chunked+loss triton triton+loss")
    p.add_argument("--quick", action="store_true", help="small sizes, a smoke test of this script")
    p.add_argument("--_one", nargs=2, default=None, help=argparse.SUPPRESS)  # internal: IMPL N, run in a child
    # the rollout benchmark
    p.add_argument("--rollout", action="store_true", help="benchmark the rollout engine instead (see 2. above)")
    p.add_argument("--model", default=None,
                   help="--rollout: tiny, random-3b, a hub id or a folder (default: runs/sft, else tiny)")
    p.add_argument("--layers", type=int, default=36, help="--rollout --model random-3b: decoder layers")
    p.add_argument("--prompts", type=int, default=8, help="--rollout: prompts, each in a group of --group episodes")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new", type=int, default=96, help="--rollout: new tokens a turn at most")
    p.add_argument("--pixels", type=int, default=112 * 112, help="--rollout: pixel budget of an image (view and zoom)")
    a = p.parse_args()

    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    dtype = a.dtype or ("bfloat16" if cuda else "float32")
    H = a.H or (2048 if cuda else 1024)
    Ns = a.N or ([2048, 8192, 16384] if cuda else [4096])
    reps = a.reps or (5 if cuda else 1)
    rounds = a.rounds or (1 if cuda else 3)
    V = a.V
    if a.quick:
        Ns, H, V, reps, rounds = [1024], 256, 32000, 1, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.rollout:
        a.reps = a.reps or 3
        return rollout_bench(a, device)

    if a._one is not None:   # child process: one measurement, printed as JSON
        print(json.dumps(run_one(a._one[0], int(a._one[1]), H, V, dtype, device, reps)))
        return

    impls = a.impls or (["naive", "chunked", "chunked+loss"] + (["triton", "triton+loss"] if cuda else []))
    name = torch.cuda.get_device_name() if cuda else f"CPU, {a.threads or torch.get_num_threads()} threads"
    print(f"# {name}, torch {torch.__version__}, dtype {dtype}, H = {H}, V = {V}, {rounds} round(s) x {reps} run(s)")
    print("# time: fastest full-size fwd+bwd; speed: naive's time / this time; TFLOP/s: 6 N H V / time;")
    print("# extra: peak memory beyond the two gradients (of hidden and weight)")
    print(f"{'N':>6} {'impl':>13} {'time ms':>10} {'speed':>6} {'TFLOP/s':>8} {'extra MiB':>10} {'vs naive':>8}  all times (s)")
    for N in Ns:
        results = {impl: None for impl in impls}
        for _ in range(rounds):
            for impl in impls:   # the implementations take turns
                cmd = [sys.executable, os.path.abspath(__file__), "--_one", impl, str(N), "--device", device,
                       "--dtype", dtype, "--H", str(H), "--V", str(V), "--reps", str(reps)]
                cmd += ["--threads", str(a.threads)] if a.threads else []
                cmd += ["--quick"] if a.quick else []
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"# {impl} at N = {N} failed: {out.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if results[impl] is None:
                    results[impl] = r
                else:
                    results[impl]["times"] += r["times"]
                    results[impl]["extra"] = max(results[impl]["extra"], r["extra"])
        naive = results.get("naive")
        for impl, r in results.items():
            if r is None:
                continue
            t = min(r["times"])
            speed = f"{min(naive['times']) / t:.2f}" if naive else "-"
            mem = f"{r['extra'] / naive['extra']:.3f}" if naive else "-"
            print(f"{N:>6} {impl:>13} {t * 1e3:>10.1f} {speed:>6} {6 * N * H * V / t / 1e12:>8.3f} "
                  f"{r['extra'] / 2**20:>10.0f} {mem:>8}  {' '.join(f'{x:.1f}' for x in r['times'])}", flush=True)


if __name__ == "__main__":
    main()
