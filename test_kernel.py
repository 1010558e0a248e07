"""
test_kernel.py: the fused log-prob kernel (kernel.py).

    python -m pytest -q test_kernel.py
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from kernel import chunk_rows, fused_logprobs


def _rel(out, ref):
    """Relative error ||out - ref|| / ||ref||, in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


def _reference(hidden, weight, targets, T):
    """float64 log-probs and entropies: log_softmax(hidden @ weight.T / T).gather(...)."""
    logp_all = torch.log_softmax(hidden.double() @ weight.double().T / T, dim=-1)
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def _data(N, H, V, dtype=torch.float32, w_std=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = (w_std * torch.randn(V, H, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    upstream = torch.randn(N, generator=g)
    return hidden, weight, targets, upstream


def _reference_grads(hidden, weight, targets, T, upstream):
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    logp, _ = _reference(h64, w64, targets, T)
    return torch.autograd.grad((logp * upstream.double()).sum(), (h64, w64))


# (N, H, V, T, chunk_size, dtype, weight std, tolerance): N not a multiple of the chunk, V not a multiple
# of anything, T != 1, a chunk of 1 row, the automatic chunk size, bf16, and peaked softmaxes (w_std 1)
CASES = [
    (37, 16, 1000, 1.0, 8, torch.float32, 0.02, 1e-5),
    (50, 24, 777, 1.3, 1, torch.float32, 0.02, 1e-5),
    (64, 32, 5003, 0.7, None, torch.float32, 0.02, 1e-5),
    (45, 64, 1500, 0.5, 16, torch.float32, 1.0, 1e-5),
    (40, 32, 3001, 0.9, 16, torch.bfloat16, 0.02, 2e-2),
    (40, 64, 1200, 1.0, 7, torch.bfloat16, 1.0, 2e-2),
]


@pytest.mark.parametrize("N,H,V,T,chunk,dtype,w_std,tol", CASES)
def test_kernel_fused_logprobs_values_and_grads(N, H, V, T, chunk, dtype, w_std, tol):
    hidden, weight, targets, upstream = _data(N, H, V, dtype, w_std)
    logp = fused_logprobs(hidden, weight, targets, T, chunk_size=chunk, impl="torch")
    assert logp.dtype == torch.float32 and logp.shape == (N,)
    ref, _ = _reference(hidden, weight, targets, T)
    assert _rel(logp, ref) < tol
    dh, dW = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))
    ref_dh, ref_dW = _reference_grads(hidden, weight, targets, T, upstream)
    assert dh.dtype == dtype and dW.dtype == dtype
    assert _rel(dh, ref_dh) < 10 * tol
    assert _rel(dW, ref_dW) < 10 * tol


@pytest.mark.parametrize("w_std", [0.02, 1.0])
def test_kernel_fused_logprobs_entropy(w_std):
    hidden, weight, targets, upstream = _data(33, 48, 2000, w_std=w_std)
    logp, ent = fused_logprobs(hidden, weight, targets, 0.8, entropy=True, chunk_size=10, impl="torch")
    ref_logp, ref_ent = _reference(hidden, weight, targets, 0.8)
    assert _rel(logp, ref_logp) < 1e-5
    assert _rel(ent, ref_ent) < 1e-5
    assert not ent.requires_grad   # the entropy is detached; logp still carries the gradient
    dh, dW = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))
    ref_dh, ref_dW = _reference_grads(hidden, weight, targets, 0.8, upstream)
    assert _rel(dh, ref_dh) < 1e-4 and _rel(dW, ref_dW) < 1e-4


def test_kernel_fused_logprobs_one_input_requires_grad():
    hidden, weight, targets, upstream = _data(20, 16, 300)
    ref_dh, ref_dW = _reference_grads(hidden, weight, targets, 1.0, upstream)
    logp = fused_logprobs(hidden, weight.detach(), targets, chunk_size=6, impl="torch")
    dh, = torch.autograd.grad((logp * upstream).sum(), (hidden,))
    assert _rel(dh, ref_dh) < 1e-4
    logp = fused_logprobs(hidden.detach(), weight, targets, chunk_size=6, impl="torch")
    dW, = torch.autograd.grad((logp * upstream).sum(), (weight,))
    assert _rel(dW, ref_dW) < 1e-4


def test_kernel_fused_logprobs_noncontiguous_and_retain_graph():
    hidden, weight, targets, upstream = _data(24, 16, 700)
    hidden_t = hidden.detach().T.contiguous().T.requires_grad_()   # same values, column-major
    ref_dh, ref_dW = _reference_grads(hidden, weight, targets, 1.0, upstream)
    logp = fused_logprobs(hidden_t, weight, targets, chunk_size=5, impl="torch")
    dh, dW = torch.autograd.grad((logp * upstream).sum(), (hidden_t, weight))
    assert _rel(dh, ref_dh) < 1e-4 and _rel(dW, ref_dW) < 1e-4
    # fused loss: the gradients were formed in the forward and are handed over once
    loss, _ = fused_logprobs(hidden, weight, targets, loss_fn=lambda lp, rows: lp * upstream[rows], impl="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only run once"):
        loss.backward()


def test_kernel_fused_logprobs_forward_only():
    hidden, weight, targets, _ = _data(30, 16, 900)
    ref_logp, ref_ent = _reference(hidden, weight, targets, 1.2)
    with torch.no_grad():   # old-policy / reference log-probs
        logp, ent = fused_logprobs(hidden, weight, targets, 1.2, entropy=True, chunk_size=7, impl="torch")
    assert logp.grad_fn is None and not logp.requires_grad
    assert _rel(logp, ref_logp) < 1e-5 and _rel(ent, ref_ent) < 1e-5
    logp = fused_logprobs(hidden.detach(), weight.detach(), targets, 1.2, chunk_size=7, impl="torch")
    assert logp.grad_fn is None and _rel(logp, ref_logp) < 1e-5


def _grpo_token_loss(logp, old, ref, adv, weight, eps=0.2, beta=0.04):
    """A GRPO per-token loss: clipped ratio surrogate plus k3 KL, times a per-token weight (mask / count)."""
    ratio = torch.exp(logp - old)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    return weight * (-surrogate + beta * kl)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_kernel_fused_logprobs_loss_fn(dtype, tol):
    N, H, V, T = 41, 32, 1100, 0.9
    hidden, weight, targets, _ = _data(N, H, V, dtype)
    g = torch.Generator().manual_seed(1)
    ref_logp, _ = _reference(hidden, weight, targets, T)
    old = (ref_logp + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)).float()   # some ratios get clipped
    ref = (ref_logp + 0.1 * torch.randn(N, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(N, generator=g)
    mask = (torch.rand(N, generator=g) > 0.2).float()
    w = mask / mask.sum()   # normalised by the global token count, so the per-token terms just add up

    def loss_fn(lp, rows):
        return _grpo_token_loss(lp, old[rows], ref[rows], adv[rows], w[rows])

    loss, logp = fused_logprobs(hidden, weight, targets, T, loss_fn=loss_fn, chunk_size=9, impl="torch")
    assert not logp.requires_grad and _rel(logp, ref_logp) < tol
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    lp64, _ = _reference(h64, w64, targets, T)
    loss64 = _grpo_token_loss(lp64, old.double(), ref.double(), adv.double(), w.double()).sum()
    ref_dh, ref_dW = torch.autograd.grad(loss64, (h64, w64))
    assert _rel(loss, loss64) < tol
    dh, dW = torch.autograd.grad(3.0 * loss, (hidden, weight))   # the upstream scalar scales the gradients
    assert _rel(dh, 3 * ref_dh) < 10 * tol and _rel(dW, 3 * ref_dW) < 10 * tol
    with torch.no_grad():   # forward only: the loss value, no gradients formed
        loss_ng, _, ent = fused_logprobs(hidden, weight, targets, T, entropy=True, loss_fn=loss_fn, chunk_size=9,
                                         impl="torch")
    assert loss_ng.grad_fn is None and _rel(loss_ng, loss64) < tol and ent.shape == (N,)


def test_kernel_chunk_rows(monkeypatch):
    V = 151936

    def check(N, budget, rows):   # one [rows, V] fp32 buffer fits the budget, in as few equal chunks as can
        n_chunks = -(-N // rows)
        assert 1 <= rows <= N and rows * V * 4 <= budget
        assert n_chunks == -(-N // (budget // (V * 4))) and n_chunks * rows - N < n_chunks

    for N in [1, 100, 441, 442, 4096, 10**6 + 7]:
        check(N, 256 * 2**20, chunk_rows(N, V, "cpu"))
    assert chunk_rows(100, V, "cpu") == 100                # at most N
    assert chunk_rows(10**6, 10**9, "cpu") == 1            # at least 1
    # CUDA: 1/8 of the free memory, at most 1 GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 2**30, 80 * 2**30))
    for N in [1000, 16384]:
        check(N, 2**29, chunk_rows(N, V, "cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * 2**30, 80 * 2**30))
    check(16384, 2**30, chunk_rows(16384, V, "cuda"))
    assert chunk_rows(1000, V, "cuda") == 1000


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("entropy", [False, True])
def test_kernel_never_more_than_one_chunk_of_logits(entropy):
    N, H, V, rows = 64, 16, 3000, 16
    hidden, weight, targets, upstream = _data(N, H, V)
    with _LargestTensor() as mode:
        out = fused_logprobs(hidden, weight, targets, entropy=entropy, chunk_size=rows, impl="torch")
        logp = out[0] if entropy else out
        (logp * upstream).sum().backward()
    assert mode.largest <= rows * V   # nothing as large as the [N, V] logits, only [rows, V] chunks
    with _LargestTensor() as mode:   # the check does see a naive implementation's logits
        torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).sum().backward()
    assert mode.largest >= N * V


def test_kernel_triton_impl_needs_interpreter_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight, targets, _ = _data(4, 8, 50)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused_logprobs(hidden, weight, targets, impl="triton")


# Runs in a fresh interpreter: on CPU with TRITON_INTERPRET=1 (it must be set before Triton is used), so the
# Triton kernels themselves run on CPU tensors (small sizes: the interpreter is slow); on a GPU compiled, at
# Qwen's vocabulary too.
_TRITON_SCRIPT = """
import torch, {module} as k
from {test_module} import _data, _reference, _reference_grads, _rel, _grpo_token_loss
cases = [(37, 16, 5000, 0.7, 16, torch.float32, 0.02, 1e-5),    # 2 blocks of 4096, the second ragged
         (21, 32, 4096, 1.0, 5, torch.float32, 1.0, 1e-5),      # V a multiple of the block, peaked softmax
         (19, 8, 300, 1.0, 8, torch.float32, 0.02, 1e-5),       # one block wider than V
         (24, 32, 2500, 1.2, 10, torch.bfloat16, 0.02, 2e-2)]
if "{device}" == "cuda":  # Qwen2.5-VL-3B's width and vocabulary, fp32 and bf16
    cases += [(64, 2048, 151936, 1.0, 24, torch.float32, 0.02, 1e-5),
              (64, 2048, 151936, 0.9, 24, torch.bfloat16, 0.02, 2e-2)]
for N, H, V, T, chunk, dtype, w_std, tol in cases:
    hidden, weight, targets, upstream = _data(N, H, V, dtype, w_std)
    hidden, weight = (x.detach().to("{device}").requires_grad_() for x in (hidden, weight))
    targets, upstream = targets.to("{device}"), upstream.to("{device}")
    logp, ent = k.fused_logprobs(hidden, weight, targets, T, entropy=True, chunk_size=chunk, impl="triton")
    ref_logp, ref_ent = _reference(hidden, weight, targets, T)
    assert _rel(logp, ref_logp) < tol and _rel(ent, ref_ent) < tol, (N, V, _rel(logp, ref_logp), _rel(ent, ref_ent))
    dh, dW = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))
    ref_dh, ref_dW = _reference_grads(hidden, weight, targets, T, upstream)
    assert _rel(dh, ref_dh) < 10 * tol and _rel(dW, ref_dW) < 10 * tol, (N, V, _rel(dh, ref_dh), _rel(dW, ref_dW))
    with torch.no_grad():
        assert _rel(k.fused_logprobs(hidden, weight, targets, T, chunk_size=chunk, impl="triton"), ref_logp) < tol
    loss, lp = k.fused_logprobs(hidden, weight, targets, T, loss_fn=lambda lp, rows: lp * upstream[rows],
                                chunk_size=chunk, impl="triton")
    dh2, dW2 = torch.autograd.grad(loss, (hidden, weight))
    assert _rel(dh2, ref_dh) < 10 * tol and _rel(dW2, ref_dW) < 10 * tol
    # the two kernels agree with their PyTorch twins on one chunk
    z = (hidden[:chunk] @ weight.T).detach()
    t = targets[:chunk]
    for a, b in zip(k._triton_row_stats(z, t, 1 / T, True), k._torch_row_stats(z, t, 1 / T, True)):
        assert _rel(a, b) < tol
    lse = k._torch_row_stats(z, t, 1 / T, False)[0]
    za, zb = z.clone(), z.clone()
    k._triton_dz_(za, t, lse, upstream[:chunk], 1 / T)
    k._torch_dz_(zb, t, lse, upstream[:chunk], 1 / T)
    assert _rel(za, zb) < tol
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_kernel_triton_kernels(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU here: the compiled kernels are checked where there is one (bash .ci/gpu)")
    here = os.path.dirname(os.path.abspath(__file__))
    script = _TRITON_SCRIPT.format(module=fused_logprobs.__module__, device=device,
                                   test_module=os.path.splitext(os.path.basename(__file__))[0])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled on a GPU, interpreted on CPU
    env["PYTHONPATH"] = here + os.pathsep + os.environ.get("PYTHONPATH", "")
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=here, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr
