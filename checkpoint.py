"""
checkpoint.py: a training run's checkpoints. Every --save-every steps sft.py and grpo.py write <out>/step<N>/, a
Hugging Face folder (bf16 weights, config, tokenizer: transformers and vLLM load it) plus the trainer state to resume
from (fp32 master weights, optimizer, step, RNG, what the trainer adds); after the last step the final model goes into
<out> itself. A checkpoint is written aside (<out>/step<N>.tmp/), then marked whole (MARKER, written last, lists every
file with its size), then moved into place: a run killed mid-save never leaves a folder that looks whole, and
`--resume auto` takes the newest whole one.
"""
import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

import model as M

# -----------------------------------------------------------------------------
# resuming


def load_state(folder, rank, sharded, steps):
    """The trainer state of a checkpoint (fp32 master weights, optimizer, step, RNG, what the trainer adds), read
    with weights_only (tensors and plain containers, never code: a checkpoint may come from anyone)."""
    # sharded: each rank its own optimizer shard (resumed on as many ranks); else one file, rank 0's
    path = os.path.join(folder, f"trainer_rank{rank}.pt" if sharded else "trainer.pt")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # torch.load raises many kinds for a damaged file (RuntimeError, EOFError...)
        raise SystemExit(f"--resume: {path} is damaged ({type(e).__name__}: {str(e)[:200]})") from None
    if state["step"] >= steps:  # nothing left to train: said now, before the model loads
        raise SystemExit(f"--steps {steps}: {folder} is at step {state['step']} already")
    return state


def restore(policy, opt, state, folder):
    """Put a loaded trainer state back: master weights, optimizer, RNG. Pops them; what the trainer added stays."""
    restore_master_weights(policy, state.pop("model", None))  # sharded: only trainer_rank0.pt has them
    try:
        opt.load_state_dict(state.pop("optimizer"))
    except ValueError as e:  # e.g. saved without --freeze-vision, resumed with it
        raise SystemExit(f"--resume {folder}: its optimizer does not fit this model's flags ({e})") from None
    # the global generators as they were after the checkpoint's step (the rollouts draw from per-episode
    # generators seeded by seed, step and episode, tools.seed_episode: nothing to restore for them)
    rng = state.pop("rng")
    torch.set_rng_state(rng["torch"])
    # the key array was saved as a list (weights_only loads no numpy arrays): back to uint32
    np.random.set_state((rng["numpy"][0], np.array(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
    random.setstate(rng["python"])


def restore_master_weights(policy, weights):
    """Load the trainer state's fp32 weights (rank 0's if sharded): resuming from the Hugging Face bf16 would drift."""
    if policy.sharded:
        # every rank calls it (a collective); rank 0 holds the full tensors and broadcasts, each rank keeps its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(policy.model, weights or {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    elif weights is not None:
        policy.model.load_state_dict(weights)


# -----------------------------------------------------------------------------
# saving


def save(args, policy, opt, step, rank, **state):
    """After 0-based `step`: every --save-every steps <out>/step<N> to resume from, a Hugging Face folder (bf16)
    plus the trainer state (fp32 master weights, optimizer, step, RNG, `state`; weights_only-loadable); after the
    last step the final model (Hugging Face folder only) in <out>. Called on every rank: a sharded model is
    gathered to rank 0, each rank saves its optimizer shard (resume on as many)."""
    n = step + 1  # steps done: the folder's name, and the step a resumed run starts at
    resumable = bool(args.save_every) and n % args.save_every == 0
    if not (resumable or n == args.steps):
        return
    weights = policy.model.state_dict()  # the fp32 master weights (model.load with train=True)
    if policy.sharded:
        # a collective: every rank takes part in gathering the shards; with cpu_offload only rank 0 receives the
        # full tensors (in CPU memory: a 7B's fp32 weights would crowd the GPU), the others an empty dict
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        weights = get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if resumable:
        np_rng = np.random.get_state()  # (name, uint32 array, ints, float): the array as a list, for weights_only
        trainer = dict(state, optimizer=opt.state_dict(), step=n,
                       rng=dict(torch=torch.get_rng_state(), numpy=(np_rng[0], np_rng[1].tolist(), *np_rng[2:]),
                                python=random.getstate()))
        if rank == 0:  # on the CPU: torch.load would put CUDA tensors back on the GPU they were saved from
            trainer["model"] = {k: w.detach().cpu() for k, w in weights.items()}
        _save_aside(args.out, os.path.join(args.out, f"step{n}"), n, rank, policy, weights, trainer)
    if n == args.steps:  # the final model: a Hugging Face folder only (step<N> holds what resumes)
        _save_aside(args.out, args.out, n, rank, policy, weights, None)


def _save_aside(out, path, n, rank, policy, weights, trainer):
    """Write a checkpoint into <out>/step<n>.tmp, then mark it whole and move it to `path`."""
    tmp = os.path.join(out, f"step{n}.tmp")
    barrier = dist.barrier if dist.is_initialized() else (lambda: None)
    if rank == 0:  # a leftover of a save killed midway is cleared first
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()  # no rank writes into tmp before it exists afresh
    if rank == 0:
        M.save(policy, tmp, state_dict=weights)
    # a data-parallel run's ranks hold the same optimizer state: rank 0's file is all of it
    if trainer is not None and (policy.sharded or rank == 0):
        torch.save(trainer, os.path.join(tmp, f"trainer_rank{rank}.pt" if policy.sharded else "trainer.pt"))
    barrier()  # every rank's file is written before the marker lists them
    if rank == 0:
        _publish(tmp, path, n)
    barrier()  # no rank goes on (or exits) before the checkpoint is in place


# -----------------------------------------------------------------------------
# markers: which folders are whole checkpoints


# A checkpoint is whole when its folder has MARKER, written last and listing every file with its size. A folder
# without it (a save that never finished) is never resumed from; a file of another size is named as damaged.
MARKER = "checkpoint.json"


def _write_marker(folder, step, files):
    with open(os.path.join(folder, MARKER + ".tmp"), "w") as f:
        json.dump(dict(step=step, files=files), f)
    # a rename within a folder is atomic (POSIX): a reader sees no marker or the whole one, never half
    os.replace(os.path.join(folder, MARKER + ".tmp"), os.path.join(folder, MARKER))


def _unmark(folder):
    if os.path.exists(os.path.join(folder, MARKER)):
        os.remove(os.path.join(folder, MARKER))


def _publish(tmp, path, step):
    """Mark `tmp` whole, then make it `path`: a step folder by a rename; <out> itself (which holds more than the
    checkpoint) file by file, unmarked meanwhile, while tmp stays whole."""
    files = {f: os.path.getsize(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
    _write_marker(tmp, step, files)  # from here tmp is a whole checkpoint that --resume auto finds
    if os.path.abspath(path) != os.path.abspath(os.path.dirname(tmp)):  # a step folder
        shutil.rmtree(path, ignore_errors=True)  # (a step<N> an earlier run left: forget_after unmarked it)
        os.rename(tmp, path)
        return
    # <out> itself: unmarked before its first file changes, so a kill midway leaves it unmarked, never a mix of
    # two saves marked whole
    _unmark(path)
    for f in files:
        # each file under a temporary name, then renamed over the old one: no file is ever half written
        src, dst = os.path.join(tmp, f), os.path.join(path, f + ".tmp")
        try:  # a hard link costs no copy (a 7B checkpoint is 15 GB); a copy where links are not allowed
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        os.replace(dst, os.path.join(path, f))
    _write_marker(path, step, files)
    shutil.rmtree(tmp)  # (what was linked stays in <out>)


def _marker(folder):
    """The folder's marker ({"step": N, "files": {name: size}}), or None where it has none (or a torn one)."""
    try:
        with open(os.path.join(folder, MARKER)) as f:
            m = json.load(f)
        return m if isinstance(m["step"], int) and isinstance(m["files"], dict) else None
    except (OSError, ValueError, KeyError, TypeError):  # missing, not JSON, or JSON of another shape
        return None


def checkpoint_problem(path):
    """Why `path` is not a whole checkpoint, or None when it is."""
    if not os.path.isdir(path):
        return f"{path}: no such folder"
    m = _marker(path)
    if m is None:
        return f"{path} is not a whole checkpoint (no {MARKER}: its save never finished); --resume auto finds one"
    if not any(f.startswith("trainer") for f in m["files"]):  # trainer.pt or trainer_rank<r>.pt
        return (f"{path} holds a final model only (no trainer state): a run resumes from its <out>/step<N> "
                f"checkpoints (--save-every)")
    for name, size in m["files"].items():  # sizes, not hashes: cheap on a 15 GB folder, and catch a truncated copy
        p = os.path.join(path, name)
        if not os.path.isfile(p) or os.path.getsize(p) != size:
            got = f"{os.path.getsize(p)} bytes" if os.path.isfile(p) else "missing"
            return f"{p} is damaged ({got}; it was written with {size} bytes)"
    return None


def checkpoints(out):
    """[(step, folder)] of the folders in <out> (and <out> itself) marked as checkpoints, by step."""
    # step<N>/, step<N>.tmp/ (whole once marked) and <out> itself, which holds the final model
    dirs = [out] + [os.path.join(out, d) for d in os.listdir(out) if d.startswith("step")] if os.path.isdir(out) else []
    return sorted((m["step"], d) for d, m in ((d, _marker(d)) for d in dirs) if m)


def find_checkpoint(out, log=print):
    """--resume auto: the newest whole checkpoint in <out> (step<N>/, a finished step<N>.tmp/, <out>), else None."""
    for step, path in reversed(checkpoints(out)):  # newest first; a damaged one gives way to the one before
        problem = checkpoint_problem(path)
        if problem is None:
            log(f"--resume auto: {path} (step {step})")
            return path
        log(f"--resume auto: skipping {problem}")
    log(f"--resume auto: no checkpoint in {out}: a new run")
    return None


def forget_after(out, step):
    """A run restarted at `step` in <out>: the checkpoints past it are not this run's, so they are never resumed."""
    for n, folder in checkpoints(out):
        if n > step:  # unmarked, not deleted: a save of that step replaces it
            _unmark(folder)
