"""Replay: re-run only the blocks after a site, with an edited activation there.

The one public way to re-run part of a model: :class:`Blocks` runs the decoder layers after a ``resid``
site with Hugging Face's own layer modules, :class:`KeyValueWindow` is the key/value cache those layers call
(it keeps the state's keys and values and replays a window of positions over them), and the evaluators
below answer many feature subsets at once. Exact ACDC (:mod:`circuitsae.circuits.acdc`) and the causal
trees' fast path (:mod:`circuitsae.circuits.trees`) both use it.

Evaluate many feature subsets fast: only the computation downstream of the site is repeated.

An evaluator holds one *state* — a subset F of the candidate features patched
in (:meth:`set_state`) — and answers "what is the KL with the features of R
also un-patched?" for many sets R at once (:meth:`without`). The layers below
the site never run again: the base activation x at the site was recorded once
(:class:`~circuitsae.interventions.patching.FeatureDeltas`), and x' = x + edit(F \\ R).

Two evaluators, same answers:

* :class:`DownstreamEvaluator` (families whose blocks run on their own —
  Llama/SmolLM2, Qwen2, Mistral, Gemma 2 and 3, see :class:`Blocks` — at
  ``resid`` sites) runs only the decoder layers after the site, with Hugging
  Face's own layer modules. It keeps the state's keys and values
  at every later layer, so a subset that differs from the state only from
  position p on recomputes positions ≥ p only (attention is causal, so earlier
  positions cannot change), prompts where R changes nothing are not run at
  all, and the unembedding is applied at the final token only. Sets are
  batched into windows of similar length under a token budget, which bounds
  memory however many candidates there are.
* :class:`HookEvaluator` (any model, any site) runs the full model with a
  forward hook that writes x' at the site, batched over sets and prompts.

Both check themselves on construction against the nnsight run the deltas came
from. The fast one also checks its windowed key/value replay — the part that
depends on how transformers calls the cache (``update(k, v, layer_idx, ...)``)
— against a full pass of the same edit (:meth:`DownstreamEvaluator.replay_error`).
If either check fails, or the replay raises, it falls back to the hook one
with one warning.

**Devices and dtypes.** Activations, edits, logits and masks live on the
device of the recorded activations; the search's bookkeeping (which features
are patched, which prompts a set changes, per-prompt KLs) is small and lives on
the CPU, where ACDC reads it without a device round trip per decision. The
layers run in the model's dtype (bfloat16, say); logits are widened to float32
before any softmax, and every KL is accumulated in float32.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import einops
import torch

from circuitsae import sites as sites_mod
from circuitsae.interventions.patching import FeatureDeltas
from circuitsae.metrics import kl_divergence, wide
from circuitsae.models import input_device


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for two computations of the same logits in ``dtype`` along different paths.

    1e-3 of the largest logit in float32 (and float64); four units of the last place in half precision,
    where the order of a reduction alone moves a logit by that much.
    """
    return max(1e-3, 4 * torch.finfo(dtype).eps)


class Blocks:
    """The decoder blocks of one model, run on their own: residual rows in, residual rows (or logits) out.

    Families that allow it (``sites.Layout.blocks_only``: Llama/SmolLM2, Qwen2, Mistral, Gemma 2 and 3) call
    each block as ``block(h, attention_mask, position_ids, position_embeddings, past_key_values)``, as their
    own model does. What differs between them is read from the family's layout and the config: a rotary
    table per kind of layer (Gemma 3), which layers see only a sliding window (``layer_types``, or every
    layer for Mistral), and capped final logits (``final_logit_softcapping``, Gemma 2).
    """

    def __init__(self, model: Any, first: int, last: int) -> None:
        self.hf = sites_mod._hf_module(model)
        inner, cfg = self.hf.model, self.hf.config
        self.lay = sites_mod.layout(model)
        self.index = list(range(first, last + 1))
        self.layers = [inner.layers[i] for i in self.index]
        self.norm, self.rotary, self.lm_head = inner.norm, inner.rotary_emb, self.hf.lm_head
        types = getattr(cfg, "layer_types", None)
        window = getattr(cfg, "sliding_window", None)
        self.kinds = [types[i] if types else "full_attention" for i in self.index]
        self.windows = [
            window if window and (self.lay.window_everywhere or kind == "sliding_attention") else None
            for kind in self.kinds
        ]
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.dtype = self.lm_head.weight.dtype

    @staticmethod
    def family_supported(model: Any) -> bool:
        """True when ``model``'s family runs its blocks on their own (``sites.Layout.blocks_only``)."""
        hf = sites_mod._hf_module(model)
        model_type = getattr(hf.config, "model_type", None)
        inner = getattr(hf, "model", None)
        return (
            model_type in sites_mod.ARCHITECTURES
            and sites_mod.ARCHITECTURES[model_type].blocks_only
            and all(hasattr(inner, a) for a in ("layers", "norm", "rotary_emb"))
            and hasattr(hf, "lm_head")
        )

    @staticmethod
    def supports(model: Any, site: str) -> bool:
        """True when ``site`` is a ``resid`` site of a family whose blocks run on their own."""
        return sites_mod.Site.parse(site).kind == "resid" and Blocks.family_supported(model)

    def mask(self, pos: torch.Tensor, t: int, window: "int | None", dtype: torch.dtype) -> torch.Tensor:
        """Additive attention mask ``[R, 1, Q, t]`` for queries at positions ``pos`` ``[R, Q]`` over keys 0..t-1.

        A key is seen when it is not after the query and, with a sliding window w, less than w before it.
        """
        keys = torch.arange(t, device=pos.device)
        q = einops.rearrange(pos, "r q -> r 1 q 1")
        allowed = keys <= q if window is None else (keys <= q) & (q - keys < window)
        return torch.zeros(allowed.shape, dtype=dtype, device=pos.device).masked_fill(~allowed, torch.finfo(dtype).min)

    def run(self, h: torch.Tensor, pos: torch.Tensor, t: int, kv: Any = None) -> torch.Tensor:
        """The blocks on rows ``h`` ``[R, Q, d]`` at positions ``pos`` ``[R, Q]``, keys over 0..t-1."""
        h = h.to(self.dtype)
        masks = {w: self.mask(pos, t, w, h.dtype) for w in set(self.windows)}
        if self.lay.rope_per_layer_type:
            rope = {kind: self.rotary(h, pos, kind) for kind in set(self.kinds)}
        else:
            shared = self.rotary(h, pos)
            rope = {kind: shared for kind in set(self.kinds)}
        for layer, kind, window in zip(self.layers, self.kinds, self.windows):
            h = layer(h, attention_mask=masks[window], position_ids=pos, past_key_values=kv,
                      position_embeddings=rope[kind])  # fmt: skip
            h = h[0] if isinstance(h, tuple) else h
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (float32) from final residual rows ``[..., d]``: final norm, unembedding, softcap."""
        logits = wide(self.lm_head(self.norm(h)))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _replace_output(module: Any, value: torch.Tensor) -> Any:
    def hook(_mod: Any, _inp: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return (value.to(out[0].dtype), *out[1:])
        return value.to(out.dtype)

    return module.register_forward_hook(hook)


def _capture_output(module: Any, into: dict[str, torch.Tensor], key: str) -> Any:
    def hook(_mod: Any, _inp: Any, out: Any) -> None:
        into[key] = out[0] if isinstance(out, tuple) else out

    return module.register_forward_hook(hook)


def run_segment(
    model: Any,
    first: int,
    last: int,
    h: torch.Tensor,
    *,
    replace: "Mapping[str, torch.Tensor] | None" = None,
    capture: "str | None" = None,
) -> tuple[torch.Tensor, "torch.Tensor | None"]:
    """Blocks ``first..last`` on full rows ``h`` ``[R, T, d]`` (block ``first``'s input, positions 0..T−1), with
    the outputs of the sites in ``replace`` (any kind, of those blocks) set to the given ``[R, T, d]`` values by
    forward hooks; returns the last block's output and, with ``capture``, that site's output in this run.

    Families whose blocks run on their own only (:meth:`Blocks.family_supported`).
    """
    blocks = Blocks(model, first, last)
    handles, caught = [], {}
    try:
        for site, value in (replace or {}).items():
            handles.append(_replace_output(sites_mod.module(blocks.hf, site), value))
        if capture is not None:
            handles.append(_capture_output(sites_mod.module(blocks.hf, capture), caught, "x"))
        r, t = h.shape[:2]
        pos = torch.arange(t, device=h.device).expand(r, t)
        out = blocks.run(h, pos, t)
    finally:
        for handle in handles:
            handle.remove()
    return out, caught.get("x")


class Downstream:
    """The model after one site: a new activation there in, the final logits at chosen positions out, and
    nothing before the site run again.

    At ``resid.L`` the blocks after L run on the new residual rows; at ``attn.L`` or ``mlp.L`` block L runs from
    its recorded input with the site's output replaced (a forward hook), then the blocks after it. The
    unembedding is applied at the chosen positions only. Families whose blocks run on their own only
    (:meth:`Blocks.family_supported`); elsewhere the callers run the whole model through nnsight.
    """

    def __init__(self, model: Any, site: "str | sites_mod.Site") -> None:
        self.model = model
        self.site = sites_mod.Site.parse(site)
        self.resid = self.site.kind == "resid"
        self.first = self.site.layer + 1 if self.resid else self.site.layer
        self.last = sites_mod.n_layers(model) - 1
        self.blocks = Blocks(model, self.first, self.last)

    def final_logits(self, value: torch.Tensor, block_input: "torch.Tensor | None", end: torch.Tensor) -> torch.Tensor:
        """Logits ``[R, V]`` (float32) at position ``end[r]`` of each row, with the site's activation set to
        ``value`` ``[R, T, d]``; ``block_input`` is block L's input (the residual before it) for attn/mlp sites."""
        if self.resid:
            h = value
            out, _ = run_segment(self.model, self.first, self.last, h)
        else:
            if block_input is None:
                raise ValueError(f"{self.site} needs the input of block {self.site.layer}")
            out, _ = run_segment(self.model, self.first, self.last, block_input, replace={str(self.site): value})
        rows = torch.arange(out.shape[0], device=out.device)
        return self.blocks.head(out[rows, end.to(out.device)])


class Evaluator:
    """Common state handling; subclasses implement :meth:`_final_logits` (and the fast path overrides more)."""

    def __init__(self, model: Any, deltas: FeatureDeltas, token_budget: int = 4096) -> None:
        self.hf = getattr(model, "_module", model)
        self.fd = deltas
        self.device = deltas.x_base.device
        self.token_budget = int(token_budget)
        self.y_logp = wide(deltas.target_logits).log_softmax(-1)
        self.evaluations = 0  # subsets evaluated (each over every affected prompt)
        self.member: "torch.Tensor | None" = None  # the state's subset (bool [K], CPU); None until set_state
        self.changes = deltas.delta.ne(0).cpu()  # [N, T, K]: where each candidate's patch is non-zero
        self.lengths = deltas.lengths.cpu()
        self.state_x = deltas.x_base.clone()
        self.state_logits = deltas.base_logits.clone()
        self.state_kl = kl_divergence(self.state_logits, deltas.target_logits).cpu()

    # -- shared ------------------------------------------------------------------
    def kl_of(self, logits: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """D_KL(z ‖ y) per row (float32, on the CPU), z = ``logits`` of the rows, y the target logits of each row's prompt."""
        logz = wide(logits).log_softmax(-1)
        return (logz.exp() * (logz - self.y_logp[prompts.to(logz.device)])).sum(-1).cpu()

    def removal_edit(self, removed: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """[R, T, d]: edit of the candidates ``removed`` at each of ``prompts``."""
        return self.fd.delta[prompts][..., removed] @ self.fd.directions[removed]

    def affected(self, removed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts where un-patching ``removed`` changes something, and the first position that changes (CPU)."""
        nz = self.changes[..., removed].any(-1)  # [N, T]
        prompts = nz.any(-1).nonzero().flatten()
        first = nz[prompts].float().argmax(-1)
        return prompts, first

    def set_state(self, member: torch.Tensor) -> dict[str, Any]:
        """Make ``member`` (bool [K]) the state; return its final logits and per-prompt KLs both ways.

        Nothing runs when ``member`` already is the state.
        """
        if self.member is None or not torch.equal(member, self.member):
            self.member = member.clone()
            self.state_x = self.fd.x_base + self.fd.edit(member)
            self.state_logits = self._state_run(self.state_x)
            self.state_kl = self.kl_of(self.state_logits, torch.arange(len(self.lengths), device="cpu"))
            self.evaluations += 1
        return self.state()

    def remove(self, removed: Sequence[int]) -> None:
        """Un-patch the candidates ``removed`` from the state (here: recompute it; the fast path updates it)."""
        member = self.member.clone()
        member[torch.as_tensor(removed, dtype=torch.long)] = False
        self.set_state(member)

    def state(self) -> dict[str, Any]:
        """The state's final logits, per-prompt D_KL(z ‖ y) and D_KL(y ‖ z)."""
        return {
            "logits": self.state_logits,
            "kl": self.state_kl,
            "kl_reverse": kl_divergence(self.fd.target_logits, self.state_logits).cpu(),
        }

    def without(self, removals: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean KL(z ‖ y) over prompts with each set of candidate indices un-patched from the state."""
        return self.without_per_prompt(removals).mean(-1)

    def without_per_prompt(
        self, removals: Sequence[torch.Tensor], only: "Sequence[torch.Tensor] | None" = None
    ) -> torch.Tensor:
        """[S, N]: per-prompt KL(z ‖ y) with each set un-patched from the state.

        Prompts a set does not change keep the state's KL. ``only`` (bool [N]
        per set) restricts the prompts actually run; the others are returned as
        NaN, for the caller to fill from what it already knows.
        """
        per_prompt = self.state_kl[None].repeat(len(removals), 1)
        rows = []  # (set index, prompt, first changed position)
        for i, removed in enumerate(removals):
            prompts, first = self.affected(torch.as_tensor(removed, dtype=torch.long))
            if only is not None:
                per_prompt[i, ~only[i]] = float("nan")
                keep = only[i][prompts]
                prompts, first = prompts[keep], first[keep]
            rows += [(i, int(p), int(f)) for p, f in zip(prompts.tolist(), first.tolist())]
        if rows:
            kl = self._rows_kl(rows, removals)
            for (i, p, _), v in zip(rows, kl.tolist()):
                per_prompt[i, p] = v
        self.evaluations += len(removals)
        return per_prompt

    def gradient(self, member: torch.Tensor) -> torch.Tensor:
        """d mean_n KL(z_n ‖ y_n) / d x' at the site for the subset ``member`` ([N, T, d])."""
        x = (self.fd.x_base + self.fd.edit(member)).detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self._state_run(x, grad=True)
            logz = wide(logits).log_softmax(-1)
            (logz.exp() * (logz - self.y_logp)).sum(-1).mean().backward()
        return x.grad.detach()

    # -- per engine --------------------------------------------------------------
    def _state_run(self, x: torch.Tensor, grad: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def _rows_kl(self, rows: list[tuple[int, int, int]], removals: Sequence[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class HookEvaluator(Evaluator):
    """Full forward passes with the site's output overwritten by a forward hook; any model, any site."""

    name = "hook"

    def __init__(self, model: Any, deltas: FeatureDeltas, base_ids: torch.Tensor, token_budget: int = 4096) -> None:
        super().__init__(model, deltas, token_budget)
        self.ids = base_ids.to(input_device(model))
        self.module = sites_mod.module(self.hf, deltas.site)
        vocab = deltas.target_logits.shape[-1]
        # full logits [R, T, V] are the memory peak: keep them near 256 MB
        self.max_rows = max(1, min(token_budget // base_ids.shape[1], (64 << 20) // (base_ids.shape[1] * vocab)))

    def _forward(self, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        handle = _replace_output(self.module, x)
        try:
            logits = self.hf(input_ids=self.ids[prompts.to(self.ids.device)]).logits
        finally:
            handle.remove()
        rows = torch.arange(len(prompts), device=logits.device)
        return wide(logits[rows, (self.lengths[prompts] - 1).to(logits.device)])

    def _state_run(self, x: torch.Tensor, grad: bool = False) -> torch.Tensor:
        n = len(self.lengths)
        with torch.set_grad_enabled(grad):
            if grad:
                return self._forward(x, torch.arange(n, device="cpu"))
            return torch.cat(
                [
                    self._forward(x[i : i + self.max_rows], torch.arange(i, min(n, i + self.max_rows), device="cpu"))
                    for i in range(0, n, self.max_rows)
                ]
            )

    @torch.no_grad()
    def _rows_kl(self, rows: list[tuple[int, int, int]], removals: Sequence[torch.Tensor]) -> torch.Tensor:
        out = []
        for c in range(0, len(rows), self.max_rows):
            chunk = rows[c : c + self.max_rows]
            prompts = torch.tensor([p for _, p, _ in chunk], device="cpu")
            x = self.state_x[prompts].clone()
            for r, (i, p, _) in enumerate(chunk):
                removed = torch.as_tensor(removals[i], dtype=torch.long)
                x[r] -= self.removal_edit(removed, torch.tensor([p], device="cpu"))[0]
            out.append(self.kl_of(self._forward(x, prompts), prompts))
        return torch.cat(out)


class KeyValueWindow:
    """The cache object HF attention layers call as ``update(k, v, layer_idx)``.

    Recording: keeps each layer's keys/values (the state's). Replaying: writes
    the window's new keys/values over the state's, row by row, and returns the
    full-length tensors.
    """

    def __init__(self) -> None:
        self.store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.replay: "tuple[torch.Tensor, torch.Tensor] | None" = None  # (prompt rows, window positions)
        self.record = True  # False: a pass that must not replace the state (gradients)
        self.commit = False  # True: a replayed window becomes the state's keys/values for its prompts

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        if self.replay is None:
            if self.record:
                self.store[layer_idx] = (k.detach(), v.detach())
            return k, v
        prompts, index = self.replay
        ks, vs = self.store[layer_idx]
        ks, vs = ks[prompts], vs[prompts]  # [R, heads, T, head_dim]
        idx = einops.repeat(index, "r q -> r h q e", h=k.shape[1], e=k.shape[-1])
        ks, vs = ks.scatter(2, idx, k), vs.scatter(2, idx, v)
        if self.commit:
            self.store[layer_idx][0][prompts] = ks
            self.store[layer_idx][1][prompts] = vs
        return ks, vs


class DownstreamEvaluator(Evaluator):
    """Only the decoder layers after a ``resid`` site run; positions before the first change reuse the state's keys."""

    name = "downstream"

    def __init__(self, model: Any, deltas: FeatureDeltas, token_budget: int = 4096) -> None:
        super().__init__(model, deltas, token_budget)
        site = sites_mod.Site.parse(deltas.site)
        self.blocks = Blocks(model, site.layer + 1, sites_mod.n_layers(model) - 1)
        self.kv = KeyValueWindow()

    supports = staticmethod(Blocks.supports)

    def _run(self, h: torch.Tensor, pos: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Run the later layers on windows ``h`` [R, Q, d] at positions ``pos`` [R, Q]; logits at ``last`` [R]."""
        h = self.blocks.run(h, pos, self.fd.x_base.shape[1], self.kv)
        return self.blocks.head(h[torch.arange(len(h), device=h.device), last.to(h.device)])

    def _state_run(self, x: torch.Tensor, grad: bool = False) -> torch.Tensor:
        n, t, _ = x.shape
        pos = einops.repeat(torch.arange(t, device=x.device), "t -> n t", n=n)
        self.kv.replay, self.kv.record = None, not grad
        try:
            with torch.set_grad_enabled(grad):
                return self._run(x, pos, self.lengths - 1)
        finally:
            self.kv.record = True

    @torch.no_grad()
    def _rows_kl(self, rows: list[tuple[int, int, int]], removals: Sequence[torch.Tensor]) -> torch.Tensor:
        t = self.fd.x_base.shape[1]
        lengths = self.lengths
        need = torch.tensor([int(lengths[p]) - f for _, p, f in rows], device="cpu")  # positions each row recomputes
        # windows of similar length: Q a power of two, rows sorted so each batch pads little
        q_of = (2 ** torch.ceil(torch.log2(need.float()))).long().clamp(max=t)
        out = torch.empty(len(rows), dtype=self.state_kl.dtype, device="cpu")  # per-row KLs come back to the CPU
        for q in q_of.unique().tolist():
            members = (q_of == q).nonzero().flatten()
            per_batch = max(1, self.token_budget // q)
            for b in range(0, len(members), per_batch):
                sel = members[b : b + per_batch]
                out[sel] = self._window_kl([rows[i] for i in sel.tolist()], removals, q)
        return out

    @torch.no_grad()
    def remove(self, removed: Sequence[int]) -> None:
        """Update the state in place: only the prompts and positions the removal changes are recomputed."""
        removed = torch.as_tensor(removed, dtype=torch.long)
        prompts, first = self.affected(removed)
        self.member = self.member.clone()
        self.member[removed] = False
        self.evaluations += 1
        if len(prompts) == 0:
            return
        self.state_x[prompts] -= self.removal_edit(removed, prompts)
        q = int((self.lengths[prompts] - first).max())
        rows = [(0, int(p), int(f)) for p, f in zip(prompts.tolist(), first.tolist())]
        self.kv.commit = True
        try:
            logits = self._window_logits(rows, [torch.zeros(0, dtype=torch.long, device="cpu")], q)
        finally:
            self.kv.commit = False
        self.state_logits[prompts] = logits
        self.state_kl[prompts] = self.kl_of(logits, prompts)

    @torch.no_grad()
    def replay_error(self, n_sets: int = 3) -> float:
        """Largest |logit| difference between the windowed replay and a full pass, for a few real removals.

        With every candidate patched (a full pass, recorded as the state), un-patch the candidates whose
        patches start latest — so the replayed window is shorter than the prompt — once through the
        window/replay path and once through a full pass that does not touch the recorded keys and values.
        Leaves the state at "nothing patched". Returns 0 when no removal starts after position 0.
        """
        k = self.fd.n_candidates
        first_change = self.changes.float().argmax(1).masked_fill(~self.changes.any(1), -1).amax(0)  # [K]
        picks = [int(j) for j in first_change.argsort(descending=True)[:n_sets] if first_change[j] > 0]
        err = 0.0
        if picks:
            everything = torch.ones(k, dtype=torch.bool, device="cpu")
            self.set_state(everything)
            for j in picks:
                removed = torch.tensor([j], dtype=torch.long, device="cpu")
                prompts, first = self.affected(removed)
                rows = [(0, int(p), int(f)) for p, f in zip(prompts.tolist(), first.tolist())]
                q = int((self.lengths[prompts] - first).max())
                replayed = self._window_logits(rows, [removed], q)
                x = self.state_x[prompts] - self.removal_edit(removed, prompts)
                pos = einops.repeat(torch.arange(x.shape[1], device=x.device), "t -> n t", n=len(prompts))
                self.kv.record = False
                try:
                    full = self._run(x, pos, self.lengths[prompts] - 1)
                finally:
                    self.kv.record = True
                err = max(err, float((wide(replayed) - wide(full)).abs().max()))
            self.set_state(torch.zeros(k, dtype=torch.bool, device="cpu"))
        self.evaluations = 0
        return err

    def _window_kl(self, rows: list[tuple[int, int, int]], removals: Sequence[torch.Tensor], q: int) -> torch.Tensor:
        prompts = torch.tensor([p for _, p, _ in rows], device="cpu")
        return self.kl_of(self._window_logits(rows, removals, q), prompts)

    def _window_logits(
        self, rows: list[tuple[int, int, int]], removals: Sequence[torch.Tensor], q: int
    ) -> torch.Tensor:
        prompts = torch.tensor([p for _, p, _ in rows], device="cpu")
        ends = self.lengths[prompts]
        starts = (ends - q).clamp(min=0)  # window [start, start + q) ends at or after the final token
        pos = starts[:, None] + torch.arange(q, device="cpu")[None]  # [R, q], CPU: it indexes the CPU bookkeeping too
        h = self.state_x[prompts[:, None], pos]  # [R, q, d]
        for r, (i, p, _) in enumerate(rows):
            removed = torch.as_tensor(removals[i], dtype=torch.long)
            h[r] -= self.fd.delta[p, pos[r]][:, removed] @ self.fd.directions[removed]
        pos = pos.to(self.device)
        self.kv.replay = (prompts, pos)
        try:
            return self._run(h, pos, ends - 1 - starts)
        finally:
            self.kv.replay = None


def make_evaluator(
    model: Any, deltas: FeatureDeltas, base_ids: torch.Tensor, engine: str = "auto", token_budget: int = 4096
) -> Evaluator:
    """The fastest evaluator that reproduces the nnsight run's logits; ``engine`` forces one."""
    if engine not in ("auto", "downstream", "hook"):
        raise ValueError(f"engine must be auto, downstream or hook, not {engine!r}")
    if engine != "hook" and DownstreamEvaluator.supports(model, deltas.site):
        ev: Evaluator = DownstreamEvaluator(model, deltas, token_budget)
    elif engine == "downstream":
        raise ValueError(
            f"the downstream engine needs a resid site of a family whose blocks run on their own, not {deltas.site}"
        )
    else:
        ev = HookEvaluator(model, deltas, base_ids, token_budget)
    got = ev.set_state(torch.zeros(deltas.n_candidates, dtype=torch.bool, device="cpu"))["logits"]
    ev.evaluations = 0
    ref = deltas.base_logits
    tol = tolerance(sites_mod._hf_module(model).lm_head.weight.dtype) * float(ref.abs().max()) + 1e-4
    err = float((got - ref).abs().max())
    problem = None if err <= tol else f"off by {err:.2e} on this model"
    if problem is None and isinstance(ev, DownstreamEvaluator):
        try:
            replay = ev.replay_error()
        except Exception as e:  # a transformers version that calls the cache another way
            problem = f"its key/value replay failed ({type(e).__name__}: {e})"
        else:
            if replay > tol:
                problem = f"its windowed key/value replay is off by {replay:.2e} on this model"
    if problem is not None:
        if isinstance(ev, DownstreamEvaluator) and engine == "auto":
            warnings.warn(f"downstream evaluator {problem}; using full forward passes", stacklevel=2)
            return make_evaluator(model, deltas, base_ids, "hook", token_budget)
        raise RuntimeError(f"the {ev.name} evaluator does not reproduce the model's logits: {problem}")
    return ev
