"""
kernel.py: the fused log-prob kernel (docs/methods.md). Per-token log-probs of sampled tokens, optionally their entropy
and a per-token loss with its gradient, through the output layer without ever holding the [N, V] logits: chunked PyTorch
everywhere, Triton row kernels on CUDA. Used by model.token_logprobs in training, measured by bench.py.
"""
import functools
import os

import torch

# -----------------------------------------------------------------------------
# For N tokens with last hidden states h [N, H], the output embedding W [V, H], the sampled tokens y [N] and a
# sampling temperature tau, GRPO needs, for every token t,
#
#     z    = h W^T                           [N, V]  the logits (never held whole)
#     x    = z / tau                         [N, V]
#     lse  = log sum_v exp(x[t, v])          [N]     logsumexp
#     logp = x[t, y_t] - lse                 [N]     the log-prob of the sampled token
#     p    = exp(x[t] - lse)                 [N, V]  softmax(x[t])
#     ent  = -sum_v p log p                  [N]     the entropy of p
#
# and, for an upstream gradient g = dL/dlogp [N], the gradients
#
#     dz = g (onehot(y) - p) / tau           [N, V]  (d logp / dx = onehot - p, dx / dz = 1 / tau)
#     dh = dz W                              [N, H]
#     dW = dz^T h                            [V, H]
#
# In fp32 the logits alone are N x V x 4 bytes: 10 GB for N = 16k tokens and Qwen's V = 151,936, and a naive
# log_softmax + gather holds two or three such tensors. Here the tokens go in chunks of `rows`: a GEMM (torch.mm:
# cuBLAS or the CPU BLAS) forms one [rows, V] logits buffer, reduced row by row (online max and sum of exponentials
# over blocks of V, target logit, entropy); the backward overwrites it in place by dz, and two GEMMs give dh, dW.
#
# FLOPs (multiply-add = 2): three GEMMs of 2 N H V each: the 6 N H V floor, which a naive version pays too. Two modes:
# - plain (default): the forward returns logp; g is unknown until the backward, and dz needs the softmax, so the
#   backward recomputes the logits chunk by chunk: 8 N H V in all. No store smaller than the logits avoids this:
#   dW = sum_t g_t (onehot_t - p_t) h_t^T needs every row of (onehot - p), scaled by a g that only exists later.
# - fused loss (`loss_fn=`): when the loss is a sum of per-token terms whose gradient in logp_t is known with logp_t
#   (GRPO's clipped ratio and KL terms: advantages, old and reference log-probs are fixed before the forward), the
#   forward forms each chunk's g, then dz, and accumulates dh and dW: 6 N H V, no recomputation; the backward only
#   scales them by the loss's scalar upstream gradient. Used in training: grpo.update (PPO-clip, KL), sft.py (NLL).
_CPU_BUDGET_BYTES = 256 * 2**20   # a [rows, V] fp32 logits buffer on CPU; the PyTorch path adds 1-2 scratches as big
_GPU_BUDGET_CAP = 2**30           # at most 1 GiB on CUDA: GEMMs of ~1-2k rows are already efficient
_BLOCK_V = 4096                   # Triton: columns of a row handled per loop step


def chunk_rows(N, V, device):
    """Tokens per chunk: N split into as few equal chunks as keep one [rows, V] fp32 logits buffer within
    the budget (on CUDA 1/8 of the free memory, at most _GPU_BUDGET_CAP). At least 1, at most N."""
    cuda = torch.device(device).type == "cuda"
    budget = min(torch.cuda.mem_get_info(device)[0] // 8, _GPU_BUDGET_CAP) if cuda else _CPU_BUDGET_BYTES
    max_rows = max(1, budget // (V * 4))
    n_chunks = max(1, -(-N // max_rows))     # ceil(N / max_rows)
    return max(1, -(-N // n_chunks))          # equal chunks, rather than full ones and a small remainder


# ---- the per-row work in PyTorch (used off CUDA); each function mirrors one Triton kernel below ----

def _torch_row_stats(z, targets, inv_tau, want_ent):
    """z [c, V] logits chunk (left unchanged), targets [c] -> lse, logp, ent (or None), each [c] fp32."""
    x = z.float() * inv_tau                              # [c, V] fp32 scratch: z / tau
    logit_t = x.gather(1, targets[:, None]).squeeze(1)   # [c] target logits
    m = x.amax(dim=1, keepdim=True)                      # [c, 1] row max, so exp() cannot overflow
    xm = x.sub_(m)                                       # [c, V] x - m <= 0, in place
    e = xm.exp() if want_ent else xm.exp_()              # [c, V] exp(x - m); the entropy needs x - m too
    s = e.sum(dim=1)                                     # [c]
    lse = m.squeeze(1) + s.log()
    # the entropy -sum p log p with p = e / s: log s - sum_v p_v (x_v - m), as a batched dot product
    ent = s.log() - torch.bmm(e[:, None, :], xm[:, :, None]).view(-1) / s if want_ent else None
    return lse, logit_t - lse, ent


def _torch_dz_(z, targets, lse, g, inv_tau):
    """Overwrite the logits chunk z [c, V] in place with dz = g (onehot - softmax(z / tau)) / tau."""
    x = z.float()                    # z itself when z is fp32; a fp32 copy (written back below) otherwise
    p = x.mul_(inv_tau).sub_(lse[:, None]).exp_()        # [c, V] softmax, from the saved logsumexp
    gt = (g * inv_tau)[:, None]                          # [c, 1]
    p.mul_(-gt).scatter_add_(1, targets[:, None], gt)    # -g p / tau everywhere, + g / tau at the target
    if p.data_ptr() != z.data_ptr():
        z.copy_(p)


# ---- the per-row work in Triton (CUDA, or CPU under TRITON_INTERPRET=1) ----

@functools.cache
def _triton_kernels():
    """Import Triton and define the kernels on first use: neither Triton nor TRITON_INTERPRET=1 is needed at import."""
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def row_stats_kernel(z_ptr, stride_z, tgt_ptr, lse_ptr, logp_ptr, ent_ptr, V, inv_tau,
                         WANT_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
        # one program per row; one pass over the V logits of the row in blocks of BLOCK_V
        row = tl.program_id(0).to(tl.int64)   # int64: row * stride can exceed 2^31
        z_row = z_ptr + row * stride_z
        m = -1e30   # running max of x = z / tau (finite, so that (m - m_new) * s below is 0, not nan)
        s = 0.0     # running sum of exp(x - m)
        t = 0.0     # running sum of exp(x - m) * (x - m), for the entropy
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V  # the last block may run past V
            x = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_tau
            m_new = tl.maximum(m, tl.max(x, axis=0))
            rescale = tl.exp(m - m_new)   # the old sums were relative to the old max
            e = tl.exp(x - m_new)         # 0 on masked columns
            if WANT_ENT:  # moving the old terms from (x - m) to (x - m_new) adds (m - m_new) to each
                t = rescale * (t + (m - m_new) * s) + tl.sum(e * tl.where(mask, x - m_new, 0.0), axis=0)
            s = s * rescale + tl.sum(e, axis=0)
            m = m_new
        lse = m + tl.log(s)
        x_t = tl.load(z_row + tl.load(tgt_ptr + row)).to(tl.float32) * inv_tau
        tl.store(lse_ptr + row, lse)
        tl.store(logp_ptr + row, x_t - lse)
        if WANT_ENT:  # -sum p log p = log s - sum_v p_v (x_v - m); relative to the max, so no cancellation
            tl.store(ent_ptr + row, tl.log(s) - t / s)

    @triton.jit
    def dz_kernel(z_ptr, stride_z, tgt_ptr, lse_ptr, g_ptr, V, inv_tau, BLOCK_V: tl.constexpr):
        # one program per row: z[row, :] <- g (onehot - exp(z / tau - lse)) / tau, in place
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_z
        lse = tl.load(lse_ptr + row)
        gt = tl.load(g_ptr + row) * inv_tau
        tgt = tl.load(tgt_ptr + row)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_tau
            dz = gt * (tl.where(cols == tgt, 1.0, 0.0) - tl.exp(x - lse))
            tl.store(z_row + cols, dz.to(z_ptr.dtype.element_ty), mask=mask)

    return row_stats_kernel, dz_kernel


def _triton_row_stats(z, targets, inv_tau, want_ent):
    """Same contract as _torch_row_stats, by the Triton kernel."""
    row_stats_kernel, _ = _triton_kernels()
    c, V = z.shape
    lse, logp, ent = (torch.empty(c, device=z.device, dtype=torch.float32) for _ in range(3))
    row_stats_kernel[(c,)](z, z.stride(0), targets, lse, logp, ent, V, inv_tau,
                           WANT_ENT=want_ent, BLOCK_V=min(_BLOCK_V, triton.next_power_of_2(V)), num_warps=8)
    return lse, logp, (ent if want_ent else None)   # (ent is left unwritten without WANT_ENT)


def _triton_dz_(z, targets, lse, g, inv_tau):
    """Same contract as _torch_dz_, by the Triton kernel."""
    _, dz_kernel = _triton_kernels()
    c, V = z.shape
    dz_kernel[(c,)](z, z.stride(0), targets, lse.contiguous(), g.float().contiguous(), V, inv_tau,
                    BLOCK_V=min(_BLOCK_V, triton.next_power_of_2(V)), num_warps=8)


def _triton_available():
    try:
        return _triton_kernels() is not None
    except Exception:   # not installed, or installed without a usable backend
        return False


# ---- the chunk loops ----

def _chunks(N, rows):  # (start, end) of each chunk of rows
    return [(s, min(s + rows, N)) for s in range(0, N, rows)]


def _add_grads(dz, h_c, weight, dh, dW, s, e):
    """The two backward GEMMs for one chunk: dh[s:e] = dz W and dW += dz^T h_c."""
    if dh is not None:
        torch.mm(dz, weight, out=dh[s:e])    # [c, V] @ [V, H]
    if dW is not None:
        dW.addmm_(dz.t(), h_c)                # [V, c] @ [c, H], accumulated in W's dtype


def _forward(hidden, weight, targets, tau, want_ent, rows, impl, loss_fn=None, need_dh=False, need_dW=False):
    """Chunked forward -> logp, lse, ent or None [N], loss or None, and the loss's dh, dW if need_dh/need_dW."""
    N, V, inv_tau = hidden.shape[0], weight.shape[0], 1.0 / tau
    row_stats, dz_ = (_triton_row_stats, _triton_dz_) if impl == "triton" else (_torch_row_stats, _torch_dz_)
    f32 = dict(device=hidden.device, dtype=torch.float32)
    logp, lse = torch.empty(N, **f32), torch.empty(N, **f32)
    ent = torch.empty(N, **f32) if want_ent else None
    loss = torch.zeros((), **f32) if loss_fn is not None else None
    dh = hidden.new_empty(hidden.shape) if need_dh else None    # contiguous, whatever hidden's layout
    dW = weight.new_zeros(weight.shape) if need_dW else None
    buf = hidden.new_empty(min(rows, N), V)            # the one [rows, V] logits buffer, reused by every chunk
    for s, e in _chunks(N, rows):
        z = torch.mm(hidden[s:e], weight.t(), out=buf[: e - s])   # [c, V] logits
        lse[s:e], logp[s:e], ent_c = row_stats(z, targets[s:e], inv_tau, want_ent)
        if want_ent:
            ent[s:e] = ent_c
        if loss_fn is None:
            continue
        if not (need_dh or need_dW):  # no gradient wanted (no_grad, or nothing requires one): the value only
            loss += loss_fn(logp[s:e], slice(s, e)).sum()
            continue
        # fused loss: g = dL/dlogp for this chunk, by autograd through the caller's per-token loss
        with torch.enable_grad():
            lp = logp[s:e].detach().requires_grad_()
            loss_c = loss_fn(lp, slice(s, e)).sum()
            g, = torch.autograd.grad(loss_c, lp)       # [c]; the chunk's own terms only: the loss is a sum
        loss += loss_c.detach()
        dz_(z, targets[s:e], lse[s:e], g, inv_tau)     # z <- dz, in place
        _add_grads(z, hidden[s:e], weight, dh, dW, s, e)
    return logp, lse, ent, loss, dh, dW


def _backward(hidden, weight, targets, lse, g, tau, rows, impl, need_dh, need_dW):
    """Plain-mode backward: recompute each logits chunk, overwrite it with dz, two GEMMs."""
    N, V = hidden.shape[0], weight.shape[0]
    dz_ = _triton_dz_ if impl == "triton" else _torch_dz_
    dh = hidden.new_empty(hidden.shape) if need_dh else None
    dW = weight.new_zeros(weight.shape) if need_dW else None
    buf = hidden.new_empty(min(rows, N), V)
    for s, e in _chunks(N, rows):
        z = torch.mm(hidden[s:e], weight.t(), out=buf[: e - s])   # recomputed logits (2 c H V FLOPs)
        dz_(z, targets[s:e], lse[s:e], g[s:e], 1.0 / tau)
        _add_grads(z, hidden[s:e], weight, dh, dW, s, e)
    return dh, dW


class FusedLogProbs(torch.autograd.Function):
    """-> (logp, ent or None, loss or None); differentiable: logp in plain mode, loss in fused-loss mode."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, tau, want_ent, loss_fn, rows, impl):
        fused = loss_fn is not None
        # only the gradients an input needs: a frozen output layer costs no [V, H] dW and no third GEMM
        logp, lse, ent, loss, dh, dW = _forward(hidden, weight, targets, tau, want_ent, rows, impl, loss_fn,
                                                ctx.needs_input_grad[0] and fused, ctx.needs_input_grad[1] and fused)
        if fused:
            ctx.grads = (dh, dW)   # the gradients of loss, formed chunk by chunk above
            ctx.mark_non_differentiable(logp)
        else:
            ctx.save_for_backward(hidden, weight, targets, lse)   # lse [N]: rebuilds the softmax of recomputed logits
            ctx.config = (tau, rows, impl)
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return logp, ent, loss

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_loss):
        if hasattr(ctx, "grads"):
            dh, dW = ctx.grads
            if dh is None and dW is None:
                raise RuntimeError("fused_logprobs(loss_fn=...): backward can only run once")
            ctx.grads = (None, None)   # scaled in place below, so they must not be reused
            for grad in (dh, dW):  # d(loss)/d(input) x the upstream gradient: the caller's scale
                if grad is not None:
                    grad.mul_(g_loss.to(grad.dtype))
        else:
            hidden, weight, targets, lse = ctx.saved_tensors
            tau, rows, impl = ctx.config
            dh, dW = _backward(hidden, weight, targets, lse, g_logp.float(), tau, rows, impl, *ctx.needs_input_grad[:2])
        return dh, dW, None, None, None, None, None, None   # one per forward input: only hidden and weight


def fused_logprobs(hidden, weight, targets, temperature=1.0, entropy=False, *,
                   loss_fn=None, chunk_size=None, impl="auto"):
    """Log-probs of `targets` under softmax(hidden @ weight.T / temperature), one chunk of logits at a time.
    hidden [N, H] and weight [V, H] (same dtype: fp32 or bf16), targets [N] int64 in [0, V). Returns logp [N] fp32,
    differentiable in hidden and weight, or (logp, ent) with entropy=True, ent detached (for logging). Under no_grad, or
    if neither input requires grad, nothing is kept for a backward (old-policy and reference log-probs).
    loss_fn(logp_chunk [c], rows: slice) -> per-token losses [c]: the fused-loss mode. rows indexes the caller's
        advantages, old log-probs, masks; the loss is the sum of the terms (divide by the global token count,
        not the chunk's). Returns (loss, logp) or (loss, logp, ent): loss a differentiable scalar, logp detached.
    chunk_size: tokens per chunk (default chunk_rows). impl: "auto" (Triton on CUDA when importable, else
        PyTorch), "torch", or "triton" (on CPU tensors only with TRITON_INTERPRET=1 set before Triton's first use)."""
    assert hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1], \
        "hidden [N, H], weight [V, H]"
    assert hidden.dtype == weight.dtype, "hidden and weight must have the same dtype"
    assert targets.shape == hidden.shape[:1], "targets [N]"
    if impl == "auto":
        impl = "triton" if hidden.is_cuda and _triton_available() else "torch"
    if impl == "triton" and not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1, set before Triton is used")
    assert impl in ("torch", "triton"), impl
    N, V = hidden.shape[0], weight.shape[0]
    rows = max(1, min(N, chunk_size or chunk_rows(N, V, hidden.device)))
    targets = targets.long()   # gather's and the kernels' index dtype
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        logp, ent, loss = FusedLogProbs.apply(hidden, weight, targets, float(temperature), entropy, loss_fn, rows, impl)
    else:   # forward only: no autograd graph, no saved tensors
        logp, _, ent, loss, _, _ = _forward(hidden, weight, targets, float(temperature), entropy, rows, impl, loss_fn)
    out = ((loss,) if loss_fn is not None else ()) + ((logp, ent) if entropy else (logp,))
    return out if len(out) > 1 else out[0]
