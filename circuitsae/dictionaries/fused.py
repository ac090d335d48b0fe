"""Training losses with hand-written backward passes (same maths as the reference, fewer FLOPs).

Autograd through ``x_c = x − b_dec`` computes the full ``[B, d]`` input
gradient ``dP @ W`` just to sum it into ``b_dec``; here that is the vector
``(Σ_b dP) @ W``, which saves one of the step's big matmuls (1/6 of a ReLU
SAE's, 1/8 of a Gated SAE's), and the elementwise work is done in fewer passes.
Every scalar output (total, mse, sparsity, aux) is differentiable with the
reference semantics — including the stop-gradients of the Gated auxiliary
term — and the tests compare all gradients with autograd on the plain formulas.

**Sparse path.** A trained SAE opens few units (L0 of 20–100 of thousands), and
then only the encoder's forward matmul is inherently dense (2·B·d·F FLOPs).
Every other big product touches only the open units: the decode ``x̂ = cᵀW_dec``,
the code gradient ``∂L/∂c = ∂L/∂x̂ · W_decᵀ`` (needed only where a unit is open,
a *sampled* product), the decoder gradient ``cᵀ ∂L/∂x̂`` and the encoder gradient
``(∂L/∂pre)ᵀ x_c`` (the pre-activation gradient is zero where a unit is closed):
2·B·L0·d FLOPs each instead of 2·B·d·F. :class:`OpenUnits` finds the open units
once per step (flat indices of the mask, row-major: a CSR pattern) and its
transpose order once, and every sparse product of the step reuses them:
``torch.sparse`` CSR × dense for the decode and the two weight gradients
(NumPy's ``flatnonzero`` and stable ``argsort`` build the pattern on a CPU: faster than torch's in a quick
timing here, and single-threaded, so they do not stall when the cores are busy; not a benchmark),
``torch.sparse.sampled_addmm`` for the sampled product, ``index_add_`` for the
bias gradients. Each step chooses by the density of open units, estimated from
its first rows: below :data:`SPARSE_BELOW` the sparse path, else the dense one
(the crossover ``benchmarks/train_throughput.py`` measures). Both paths compute
the same quantities; the tests hold them equal to each other and to autograd at
densities from 0 to 1.

The ReLU and Gated losses below have the sparse path as a second branch of their hand-written backward;
TopK, BatchTopK and JumpReLU (``encoder.py``) train through :class:`Encode` and :class:`Decode`, two small
autograd functions over the same :class:`OpenUnits`.

On a GPU the same selection is what a kernel needs: the CSR pattern feeds
cuSPARSE through the same ``torch.sparse`` calls (``torch.nonzero`` instead of
NumPy's finds the units there), or a fused gather/scatter kernel as in sparsify's
TopK decoder. This GPU path is unmeasured (docs/measured/throughput.md measures the CPU); the trainer's CUDA
default, bf16 autocast, takes the dense reference path anyway.

Used in float32/float64; under autocast the classes fall back to the
reference autograd path (``ReluSAE.loss_reference`` / ``GatedSAE.loss_reference``),
and other dtypes take the dense path.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np
import torch

# said once per process by torch on the first CSR tensor; the kernels used here are tested against dense ones
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

#: density of open units (L0 / d_sae) below which a step takes the sparse path. On 2 CPU cores the sparse
#: step stops paying at 5.8–9.3% open (``benchmarks/train_throughput.py``'s crossover for the standard, Gated,
#: TopK and JumpReLU SAEs at d_sae 4608 and 18432, in its results JSON); this stays under all of them, so a
#: step is never slower than the dense path would have been.
SPARSE_BELOW = 0.04
#: rows the density estimate reads (the trainer's batches are shuffled rows)
PROBE_ROWS = 256


def open_fraction(codes: torch.Tensor) -> float:
    """The fraction of nonzero entries in the first :data:`PROBE_ROWS` rows of ``codes`` (``[B, F]``)."""
    probe = codes[:PROBE_ROWS]
    return int(probe.count_nonzero()) / probe.numel() if probe.numel() else 1.0


def use_sparse(x: torch.Tensor, mode: str, density: float) -> bool:
    """Whether this training step takes the sparse path, for every architecture: only for ``[B, d]`` batches in
    float32/float64 and not under autocast (even when forced); then ``mode`` "sparse"/"dense" forces it, and
    "auto" decides by ``density`` (the fraction of units open) against :data:`SPARSE_BELOW`."""
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled(x.device.type):
        return False
    if mode != "auto":
        return mode == "sparse"
    return density < SPARSE_BELOW


class OpenUnits(NamedTuple):
    """Which units of a ``[B, F]`` code matrix are open, as a CSR pattern and its transpose order.

    ``idx`` are the flat (row-major) indices of the open entries, ``rows``/``cols`` their coordinates,
    ``crow`` the CSR row pointers; ``order`` sorts the entries by column (stable, so rows stay ascending
    within a column) and ``ccol`` are the column pointers of that order.
    """

    idx: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    crow: torch.Tensor
    order: torch.Tensor
    ccol: torch.Tensor
    shape: tuple[int, int]

    @staticmethod
    def of(codes: torch.Tensor) -> "OpenUnits":
        """The nonzero entries of ``codes`` (``[B, F]``, ≥ 0)."""
        return OpenUnits.where(codes > 0)

    @staticmethod
    def where(mask: torch.Tensor) -> "OpenUnits":
        """The True entries of a bool ``[B, F]`` mask."""
        if mask.device.type == "cpu":  # NumPy's flatnonzero: faster than torch.nonzero here
            idx = torch.from_numpy(np.flatnonzero(mask.numpy()))
        else:
            idx = mask.view(-1).nonzero().squeeze(1)
        return OpenUnits.from_flat(idx, tuple(mask.shape))

    @staticmethod
    def from_rows(idx: torch.Tensor, n_cols: int) -> "OpenUnits":
        """``idx[b]`` (``[B, k]``, distinct within a row) are row b's units: TopK's selection."""
        rows = torch.arange(idx.shape[0], device=idx.device)[:, None]
        return OpenUnits.from_flat((rows * n_cols + idx).view(-1).sort().values, (idx.shape[0], n_cols))

    @staticmethod
    def from_flat(idx: torch.Tensor, shape: tuple[int, int]) -> "OpenUnits":
        """Ascending distinct flat indices into a ``shape`` matrix."""
        n, f = shape
        rows, cols = idx // f, idx % f
        crow = torch.zeros(n + 1, dtype=torch.long, device=idx.device)
        torch.cumsum(torch.bincount(rows, minlength=n), 0, out=crow[1:])
        ccol = torch.zeros(f + 1, dtype=torch.long, device=idx.device)
        torch.cumsum(torch.bincount(cols, minlength=f), 0, out=ccol[1:])
        if cols.device.type == "cpu":  # NumPy's stable argsort: faster than torch's here, steady on busy cores
            order = torch.from_numpy(np.argsort(cols.numpy(), kind="stable"))
        else:
            order = torch.argsort(cols, stable=True)
        return OpenUnits(idx, rows, cols, crow, order, ccol, (n, f))

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        """The ``[B, F]`` matrix holding ``values`` at the units, 0 elsewhere."""
        return values.new_zeros(self.shape).view(-1).index_copy_(0, self.idx, values).view(self.shape)

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """The open entries of a ``[B, F]`` tensor, in the pattern's order."""
        return dense.reshape(-1)[self.idx]

    def decode(self, values: torch.Tensor, W: torch.Tensor) -> torch.Tensor:  # noqa: N803
        """``C @ W`` for the ``[B, F]`` matrix C that holds ``values`` at the open units, ``[B, d]``."""
        csr = torch.sparse_csr_tensor(self.crow, self.cols, values, self.shape, check_invariants=False)
        return csr @ W

    def sample(self, G: torch.Tensor, W: torch.Tensor) -> torch.Tensor:  # noqa: N803
        """``(G @ Wᵀ)`` at the open units only (``G`` ``[B, d]``, ``W`` ``[F, d]``): one dot product each."""
        if self.idx.numel() == 0:
            return G.new_zeros(0)
        pattern = torch.sparse_csr_tensor(
            self.crow, self.cols, G.new_zeros(self.idx.numel()), self.shape, check_invariants=False
        )
        return torch.sparse.sampled_addmm(pattern, G, W.T, beta=0.0).values()

    def scatter(self, values: torch.Tensor, X: torch.Tensor) -> torch.Tensor:  # noqa: N803
        """``Cᵀ @ X`` for C as in :meth:`decode` and ``X`` ``[B, d]``: the ``[F, d]`` weight gradient."""
        csr_t = torch.sparse_csr_tensor(
            self.ccol, self.rows[self.order], values[self.order], self.shape[::-1], check_invariants=False
        )
        return csr_t @ X

    def sum_cols(self, values: torch.Tensor) -> torch.Tensor:
        """``C.sum(0)``, ``[F]``: a bias gradient."""
        return values.new_zeros(self.shape[1]).index_add_(0, self.cols, values)


class ReluLoss(torch.autograd.Function):
    """(total, mse, l1, x̂, codes) of the ReLU SAE: total = mse + α·l1 (batch means of row sums).

    ``mode``: "auto" (sparse below :data:`SPARSE_BELOW` density), "dense" or "sparse".
    """

    @staticmethod
    def forward(ctx: Any, x, W_enc, W_dec, b_enc, b_dec, alpha: float, mode: str = "auto"):  # noqa: N803
        n = x.shape[0]
        xc = x if b_dec is None else x - b_dec
        codes = torch.addmm(b_enc, xc, W_enc.T).clamp_min_(0)
        ctx.sparse = use_sparse(x, mode, open_fraction(codes))
        if ctx.sparse:
            units = OpenUnits.of(codes)
            vals = units.gather(codes)
            x_hat = units.decode(vals, W_dec)
            if b_dec is not None:
                x_hat.add_(b_dec)
            ctx.units = units
            saved = (xc, vals, W_enc, W_dec)
        else:
            x_hat = codes @ W_dec if b_dec is None else torch.addmm(b_dec, codes, W_dec)
            saved = (xc, codes, W_enc, W_dec)
        err = x_hat - x
        mse = err.pow(2).sum() / n
        l1 = codes.sum() / n
        ctx.save_for_backward(err, *saved)
        ctx.alpha, ctx.has_bdec = alpha, b_dec is not None
        ctx.mark_non_differentiable(x_hat, codes)
        return mse + alpha * l1, mse, l1, x_hat, codes

    @staticmethod
    def backward(ctx: Any, g_total, g_mse, g_l1, _g_xhat, _g_codes):
        err, xc, codes, W_enc, W_dec = ctx.saved_tensors
        n = xc.shape[0]
        d_xhat = err * (2 * (g_total + g_mse) / n)
        push = (ctx.alpha * g_total + g_l1) / n  # ∂/∂c of the L1 term, where a unit is open
        if ctx.sparse:  # `codes` holds the open units' values
            units = ctx.units
            d_W_dec = units.scatter(codes, d_xhat)
            d_pre = units.sample(d_xhat, W_dec).add_(push)
            d_W_enc = units.scatter(d_pre, xc)
            d_b_enc = units.sum_cols(d_pre)
        else:
            d_W_dec = codes.T @ d_xhat
            d_pre = d_xhat @ W_dec.T
            d_pre.add_(push).mul_(codes > 0)
            d_W_enc = d_pre.T @ xc
            d_b_enc = d_pre.sum(0)
        d_b_dec = d_xhat.sum(0) - d_b_enc @ W_enc if ctx.has_bdec else None
        return None, d_W_enc, d_W_dec, d_b_enc, d_b_dec, None, None


class GatedLoss(torch.autograd.Function):
    """(total, mse, sparsity, aux, x̂, codes) of the Gated SAE, REFERENCE §2.

    ``mode`` as in :class:`ReluLoss`; the density is the open gates' (π_gate > 0), a superset of the codes'.
    """

    @staticmethod
    def forward(ctx: Any, x, W_gate, b_gate, r_mag, b_mag, W_dec, b_dec, lam: float, mode: str = "auto"):  # noqa: N803
        n = x.shape[0]
        xc = x - b_dec
        proj = xc @ W_gate.T  # [B, F]
        scale = r_mag.exp()
        gate = (proj + b_gate).clamp_min_(0)  # ReLU(π_gate); π_gate > 0 ⇔ gate > 0
        codes = torch.addcmul(b_mag, proj, scale).clamp_min_(0).mul_(gate > 0)
        ctx.sparse = use_sparse(x, mode, open_fraction(gate))
        if ctx.sparse:  # every product below only at the open gates
            units = OpenUnits.of(gate)
            gates, mags, projs = units.gather(gate), units.gather(codes), units.gather(proj)
            x_hat = units.decode(mags, W_dec).add_(b_dec)
            err_aux = units.decode(gates, W_dec).add_(b_dec).sub_(x)
            ctx.units = units
            saved = (projs, gates, mags)
        else:
            x_hat = torch.addmm(b_dec, codes, W_dec)
            err_aux = torch.addmm(b_dec, gate, W_dec) - x
            saved = (proj, gate, codes)
        err = x_hat - x
        mse = err.pow(2).sum() / n
        sparsity = gate.sum() / n
        aux = err_aux.pow(2).sum() / n
        ctx.save_for_backward(xc, *saved, err, err_aux, scale, W_gate, W_dec)
        ctx.lam = lam
        ctx.mark_non_differentiable(x_hat, codes)
        return mse + lam * sparsity + aux, mse, sparsity, aux, x_hat, codes

    @staticmethod
    def backward(ctx: Any, g_total, g_mse, g_sparsity, g_aux, _g_xhat, _g_codes):
        xc, proj, gate, codes, err, err_aux, scale, W_gate, W_dec = ctx.saved_tensors
        n = xc.shape[0]
        d_xhat = err * (2 * (g_total + g_mse) / n)
        d_xaux = err_aux * (2 * (g_total + g_aux) / n)
        push = (ctx.lam * g_total + g_sparsity) / n
        d_b_dec = d_xhat.sum(0)
        if ctx.sparse:  # proj, gate, codes hold the open gates' values
            units = ctx.units
            d_W_dec = units.scatter(codes, d_xhat)  # the auxiliary decoder is sg(W_dec), sg(b_dec): no term here
            d_mag = units.sample(d_xhat, W_dec).mul_(codes > 0)
            d_pi = units.sample(d_xaux, W_dec).add_(push)
            d_b_mag, d_r_mag = units.sum_cols(d_mag), units.sum_cols(d_mag * proj) * scale
            d_b_gate = units.sum_cols(d_pi)
            d_proj = d_pi.add_(d_mag.mul_(scale[units.cols]))
            d_W_gate = units.scatter(d_proj, xc)
            d_b_dec -= units.sum_cols(d_proj) @ W_gate
        else:
            d_W_dec = codes.T @ d_xhat  # the auxiliary decoder is sg(W_dec), sg(b_dec): no term here
            d_mag = (d_xhat @ W_dec.T).mul_(codes > 0)  # ∂/∂(W_mag x_c + b_mag)
            d_pi = (d_xaux @ W_dec.T).add_(push).mul_(gate > 0)
            d_b_mag = d_mag.sum(0)
            d_r_mag = (d_mag * proj).sum(0) * scale
            d_b_gate = d_pi.sum(0)
            d_proj = d_pi.add_(d_mag.mul_(scale))  # both paths read proj = x_c W_gateᵀ
            d_W_gate = d_proj.T @ xc
            d_b_dec -= d_proj.sum(0) @ W_gate  # through x_c = x − b_dec
        return None, d_W_gate, d_b_gate, d_r_mag, d_b_mag, d_W_dec, d_b_dec, None, None


class Encode(torch.autograd.Function):
    """``pre = W_enc x_c + b_enc`` read at the units only (from the dense forward ``pre``), and differentiated
    through them only: ∂x_c, ∂W_enc, ∂b_enc cost O(nnz·d), not the two dense products autograd would do."""

    @staticmethod
    def forward(ctx: Any, xc, W_enc, b_enc, pre, units: OpenUnits):  # noqa: N803
        ctx.units = units
        ctx.save_for_backward(xc, W_enc)
        return units.gather(pre)

    @staticmethod
    def backward(ctx: Any, g):
        xc, W_enc = ctx.saved_tensors
        units = ctx.units
        d_xc = units.decode(g, W_enc) if ctx.needs_input_grad[0] else None
        return d_xc, units.scatter(g, xc), units.sum_cols(g), None, None


class Decode(torch.autograd.Function):
    """``C @ W_dec`` for C holding ``values`` at the units; ∂values is the sampled product, ∂W_dec a scatter."""

    @staticmethod
    def forward(ctx: Any, values, W_dec, units: OpenUnits):  # noqa: N803
        ctx.units = units
        ctx.save_for_backward(values, W_dec)
        return units.decode(values, W_dec)

    @staticmethod
    def backward(ctx: Any, g):
        values, W_dec = ctx.saved_tensors
        units = ctx.units
        d_values = units.sample(g, W_dec) if ctx.needs_input_grad[0] else None
        return d_values, units.scatter(values, g), None
