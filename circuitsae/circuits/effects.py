"""Node effects in a whole-model feature circuit, estimated and exact (REFERENCE §8; Marks et al. 2024).

With a dictionary at every site and its error term kept, each site's activation is x = x̂(c) + ε and the
spliced model is the model. The **nodes** are every feature c_i of every site and every site's error ε, at
each position. A node's indirect effect on a metric m of base/target prompt pairs is what m does when that
node alone takes its value from the target run:

- **exact**: IE(a) = m(base with a set to a_target) − m(base), everything after the site recomputed (later
  dictionaries re-encode, their errors follow, so they pass the change on unaltered);
- **atp** (attribution patching, one backward pass): IE ≈ ∇_a m · Δa;
- **ig** (integrated gradients, ``steps`` N, Marks et al. use 10): IE ≈ Δa · (1/N) Σ_k ∇_a m at
  a_base + (k/N)Δa, interpolating one site at a time.

The decoder is linear, so a site's nodes move its activation by Δx = Δc W_dec + Δε, and the gradient with
respect to a feature is the gradient with respect to the site's activation read along its decoder row:
∇_{c_i} m = ∇_x m · f_i (ε held, as REFERENCE §8 states for feature gradients), ∇_ε m = ∇_x m. One backward
pass of the unspliced model therefore gives every node's attribution at once, and IG needs one pass per site
with the whole site interpolated (its N steps batched as rows). A site's feature and error estimates add up
to ∇_x m · Δx, and for IG the sum tends to the exact effect of patching the whole site as N grows.

A node is patched at every position of its prompts from the dictionary's first position on (the BOS
position, which a dictionary trained without it never saw, is not a node); per-position estimates are kept
(``NodeEffects.features`` ``[N, T, F]``) and summed over positions for a circuit.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from circuitsae import sites as sites_mod
from circuitsae.dictionaries import Dictionary
from circuitsae.errors import CircuitSAEError
from circuitsae.interventions.patching import position_mask
from circuitsae.interventions.replay import Blocks, Downstream, run_segment, tolerance
from circuitsae.interventions.splice import check_dictionary, default_start, logits_of, site_device, write
from circuitsae.metrics import wide
from circuitsae.models import dtype_name, input_device
from circuitsae.tasks.pairs import PromptPairs

METRICS = ("logit_diff", "kl")
METHODS = ("atp", "ig")


# -- the metric ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """m on prompt pairs, per prompt: ``metric(logits [N, T, V], rows) -> [N]`` (rows: which pairs).

    ``"logit_diff"``: logit(right) − logit(wrong) at each prompt's last position (IOI: IO − S).
    ``"kl"``: D_KL(z ‖ y) of the run z from the target run y at the last position (REFERENCE §4's direction).
    """

    kind: str
    end: torch.Tensor
    right: "torch.Tensor | None" = None
    wrong: "torch.Tensor | None" = None
    target_logp: "torch.Tensor | None" = None

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        dev = logits.device
        return self.final(logits[torch.arange(logits.shape[0], device=dev), self.end[rows].to(dev)], rows)

    def final(self, final: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """m from the logits at each row's last position only, ``[R, V]``."""
        dev = final.device
        final = wide(final)
        if self.kind == "logit_diff":
            assert self.right is not None and self.wrong is not None
            right = final.gather(1, self.right[rows].to(dev)[:, None])[:, 0]
            return right - final.gather(1, self.wrong[rows].to(dev)[:, None])[:, 0]
        assert self.target_logp is not None
        logp = final.log_softmax(-1)
        return (logp.exp() * (logp - self.target_logp[rows].to(dev))).sum(-1)


def make_metric(model: Any, pairs: PromptPairs, kind: str = "logit_diff", batch_size: int = 32) -> Metric:
    """The metric ``kind`` (:data:`METRICS`) on ``pairs``; "kl" runs the target prompts once for y."""
    if kind not in METRICS:
        raise CircuitSAEError(f"metric must be one of {', '.join(METRICS)}, got {kind!r}")
    end = pairs.end_position.cpu()
    if kind == "logit_diff":
        answers = pairs.answer_tokens
        if answers is None:
            raise CircuitSAEError("the logit-difference metric needs prompt pairs with answer tokens (IOI's)")
        return Metric(kind, end, answers[0].cpu(), answers[1].cpu())
    finals = []
    with torch.no_grad():
        for rows in batches(len(pairs), batch_size):
            with model.trace(pairs.target[rows].to(input_device(model))):
                logits = logits_of(model).save()
            finals.append(wide(logits[torch.arange(len(rows)), end[rows].to(logits.device)]).log_softmax(-1).cpu())
    return Metric(kind, end, target_logp=torch.cat(finals))


def batches(n: int, size: int) -> list[torch.Tensor]:
    """Row indices ``0..n−1`` in consecutive groups of ``size``."""
    return [torch.arange(i, min(n, i + size)) for i in range(0, n, max(1, int(size)))]


# -- nodes and their effects ------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Node:
    """One node of a whole-model circuit: feature ``feature`` of ``site``'s dictionary, or (``feature`` None)
    the site's error term, at every position (``position`` None) or at one position."""

    site: str
    feature: "int | None"
    position: "int | None" = None

    @property
    def is_error(self) -> bool:
        return self.feature is None

    def __str__(self) -> str:
        if self.site == "logits":
            return "logits"
        what = "err" if self.feature is None else str(self.feature)
        return f"{self.site}/{what}" + ("" if self.position is None else f"@{self.position}")


@dataclass
class NodeEffects:
    """Per-prompt, per-position effects of every node on the metric (one estimator).

    ``features[site]`` is ``[N, T, F]`` (feature i of prompt n at position t), ``errors[site]`` ``[N, T]``;
    positions that are not nodes (padding, positions before the dictionary's first) hold 0.
    ``base_metric`` is m on the base prompts, ``[N]``.
    """

    method: str
    metric: str
    sites: tuple[str, ...]
    features: dict[str, torch.Tensor]
    errors: dict[str, torch.Tensor]
    base_metric: torch.Tensor
    steps: "int | None" = None

    def node_scores(self) -> dict[Node, float]:
        """Each node's effect summed over positions and averaged over prompts (the circuit's node score);
        every error node, and every feature with a nonzero score."""
        out: dict[Node, float] = {}
        for site in self.sites:
            feat = self.features[site].sum(1).mean(0)
            for i in torch.nonzero(feat).flatten().tolist():
                out[Node(site, int(i))] = float(feat[i])
            out[Node(site, None)] = float(self.errors[site].sum(1).mean(0))
        return out

    def site_totals(self) -> dict[str, tuple[float, float]]:
        """Per site, (features' summed effect, the error node's effect), averaged over prompts."""
        return {
            s: (float(self.features[s].sum((1, 2)).mean()), float(self.errors[s].sum(1).mean())) for s in self.sites
        }

    def by_role(self, pairs: PromptPairs) -> dict[str, dict[Node, float]]:
        """Node scores by IOI token role: for each of IO, S1, S2 and END (the last position) and ``other``
        (every other position), each node's effect summed over that role's positions and averaged over prompts,
        so prompts of different templates line up (REFERENCE §8, "Aggregation")."""
        roles = {"IO": "io_position", "S1": "s1_position", "S2": "s2_position"}
        if not all(hasattr(pairs, a) for a in roles.values()):
            raise CircuitSAEError("token roles need IOI prompt pairs (circuitsae.tasks.make_ioi)")
        n, t = next(iter(self.errors.values())).shape
        masks = {}
        for role, attr in roles.items():
            masks[role] = torch.nn.functional.one_hot(getattr(pairs, attr).cpu(), t).bool()
        masks["END"] = torch.nn.functional.one_hot(pairs.end_position.cpu(), t).bool()
        masks["other"] = ~(masks["IO"] | masks["S1"] | masks["S2"] | masks["END"])
        out: dict[str, dict[Node, float]] = {}
        for role, mask in masks.items():
            scores: dict[Node, float] = {}
            for site in self.sites:
                m = mask.to(self.features[site].dtype)
                feat = (self.features[site] * m[..., None]).sum(1).mean(0)
                for i in torch.nonzero(feat).flatten().tolist():
                    scores[Node(site, int(i))] = float(feat[i])
                scores[Node(site, None)] = float((self.errors[site] * m).sum(1).mean(0))
            out[role] = scores
        return out

    def top(self, n: int) -> list[tuple[Node, float]]:
        """The ``n`` nodes of largest |score|, largest first."""
        return sorted(self.node_scores().items(), key=lambda kv: -abs(kv[1]))[:n]


@dataclass
class PairActivations:
    """Each site's activations on the base and target prompts (float32, on the CPU), what the estimators and
    the exact patches start from: ``base[site]``/``target[site]`` ``[N, T, d]``, ``starts[site]`` (the
    dictionary's first position), ``mask[site]`` ``[N, T]`` (the positions that are nodes), ``inputs[L]`` the
    base run's input to block L where an attn or mlp site of block L has no resid site before it to read it
    from (:meth:`block_input`)."""

    sites: tuple[str, ...]
    base: dict[str, torch.Tensor]
    target: dict[str, torch.Tensor]
    starts: dict[str, int]
    mask: dict[str, torch.Tensor]
    base_metric: torch.Tensor
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)

    def block_input(self, layer: int) -> torch.Tensor:
        """The base run's residual entering block ``layer``, ``[N, T, d]``."""
        if f"resid.{layer - 1}" in self.base:
            return self.base[f"resid.{layer - 1}"]
        if layer not in self.inputs:
            raise CircuitSAEError(f"the input of block {layer} was not recorded")
        return self.inputs[layer]

    def deltas(self, site: str, dictionary: Dictionary) -> tuple[torch.Tensor, torch.Tensor]:
        """(Δc ``[N, T, F]``, Δε ``[N, T, d]``) at ``site``: the target's codes and error minus the base's,
        0 where the position is not a node."""
        w = dictionary.W_dec
        xb, xt = self.base[site].to(w), self.target[site].to(w)
        with torch.no_grad():
            cb, ct = dictionary.encode(xb), dictionary.encode(xt)
            eb, et = xb - dictionary.decode(cb), xt - dictionary.decode(ct)
        m = self.mask[site].to(w.device)
        return wide((ct - cb) * m[..., None]).cpu(), wide((et - eb) * m[..., None]).cpu()


def _check_inputs(model: Any, dictionaries: Mapping[str, Dictionary], pairs: PromptPairs) -> list[str]:
    if not dictionaries:
        raise CircuitSAEError("give at least one site's dictionary ({site: dictionary})")
    if not isinstance(pairs, PromptPairs) or len(pairs) == 0:
        raise CircuitSAEError("node effects need prompt pairs (e.g. circuitsae.tasks.make_ioi), at least one")
    order = [str(s) for s in sites_mod.resolve(model, list(dictionaries))]
    for s in order:
        check_dictionary(model, s, dictionaries[s])
    return order


def record(
    model: Any,
    dictionaries: Mapping[str, Dictionary],
    pairs: PromptPairs,
    metric: Metric,
    *,
    gradients: bool = True,
    batch_size: int = 16,
    progress: bool = False,
) -> PairActivations:
    """Run the target and base prompts once, keeping every site's activation (and, with ``gradients``, ∇_x m
    of the base run at every site from one backward pass of m summed over prompts)."""
    order = _check_inputs(model, dictionaries, pairs)
    n, t = pairs.base.shape
    starts = {s: default_start(dictionaries[s]) for s in order}
    mask = {s: position_mask(pairs.lengths, t, starts[s]) for s in order}
    base: dict[str, list] = {s: [] for s in order}
    target: dict[str, list] = {s: [] for s in order}
    grads: dict[str, list] = {s: [] for s in order}
    parsed = {s: sites_mod.Site.parse(s) for s in order}
    # blocks whose input no recorded resid site holds, read before the block's first site (nnsight's order)
    need = {p.layer for p in parsed.values() if p.kind != "resid" and f"resid.{p.layer - 1}" not in order}
    inputs: dict[int, list] = {layer: [] for layer in need}
    metric_base = []
    for rows in tqdm(batches(n, batch_size), desc="record base and target runs", disable=not progress):
        saved: dict[str, Any] = {}
        with torch.no_grad(), model.trace(pairs.target[rows].to(input_device(model))):
            for s in order:
                saved[s] = sites_mod.read(model, s).save()
        for s in order:
            target[s].append(wide(saved[s].detach()).cpu())
        kept: dict[str, Any] = {}
        block_in: dict[int, Any] = {}
        with torch.set_grad_enabled(gradients), model.trace(pairs.base[rows].to(input_device(model))):
            for s in order:
                layer = parsed[s].layer
                if layer in need and layer not in block_in:
                    block_in[layer] = sites_mod.module(model, f"resid.{layer}").input.save()
                x = sites_mod.read(model, s)
                if gradients:
                    x.retain_grad()
                kept[s] = x
            logits = logits_of(model).save()
        m = metric(logits, rows)
        if gradients:
            m.sum().backward()
        metric_base.append(m.detach().cpu())
        for s in order:
            base[s].append(wide(kept[s].detach()).cpu())
            if gradients:
                grads[s].append(wide(kept[s].grad).cpu())
        for layer, h in block_in.items():
            inputs[layer].append(wide(h.detach()).cpu())
    return PairActivations(
        tuple(order),
        {s: torch.cat(v) for s, v in base.items()},
        {s: torch.cat(v) for s, v in target.items()},
        starts,
        mask,
        torch.cat(metric_base),
        {s: torch.cat(v) for s, v in grads.items()} if gradients else {},
        {layer: torch.cat(v) for layer, v in inputs.items()},
    )


def _replays(model: Any, replay: bool) -> bool:
    """Whether to run only the model after each patched site (:class:`~circuitsae.interventions.replay.Downstream`)."""
    return bool(replay) and Blocks.family_supported(model)


def _interpolated_gradient(
    model: Any,
    acts: PairActivations,
    pairs: PromptPairs,
    metric: Metric,
    site: str,
    steps: int,
    batch_size: int,
    replay: bool = True,
) -> torch.Tensor:
    """(1/N) Σ_k ∇_x m at x_base + (k/N)(x_target − x_base) of ``site`` alone, ``[N, T, d]`` (float32, CPU)."""
    start = acts.starts[site]
    alphas = torch.arange(steps, dtype=torch.float32) / steps
    out = []
    # prompt × step rows share a pass: 4 × batch_size of them (on 2 CPU cores 40–160 rows a pass ran
    # SmolLM2's blocks 20% faster than 10)
    per_batch = max(1, (4 * batch_size) // steps)
    dev, dtype = site_device(model, site), getattr(torch, dtype_name(model))
    if _replays(model, replay):
        tail = Downstream(model, site)
        for rows in batches(len(pairs), per_batch):
            xb = acts.base[site][rows]
            delta = (acts.target[site][rows] - xb) * acts.mask[site][rows][..., None]
            path = xb[None] + alphas[:, None, None, None] * delta[None]  # [steps, n, T, d]
            value = path.reshape(-1, *path.shape[2:]).to(device=dev, dtype=dtype).requires_grad_()
            inp = None
            if not tail.resid:
                inp = acts.block_input(tail.site.layer)[rows].repeat(steps, 1, 1).to(device=dev, dtype=dtype)
            with torch.enable_grad():
                final = tail.final_logits(value, inp, metric.end[rows].repeat(steps))
                metric.final(final, rows.repeat(steps)).sum().backward()
            out.append(wide(value.grad).cpu().reshape(steps, len(rows), *path.shape[2:]).mean(0))
        return torch.cat(out)
    for rows in batches(len(pairs), per_batch):
        xb, xt = acts.base[site][rows, start:], acts.target[site][rows, start:]
        path = xb[None] + alphas[:, None, None, None] * (xt - xb)[None]  # [steps, n, T', d]
        ids = pairs.base[rows].repeat(steps, 1)
        value = path.reshape(-1, *path.shape[2:]).to(device=dev, dtype=dtype).requires_grad_()
        with model.trace(ids.to(input_device(model))):
            write(model, site, value, start)
            logits = logits_of(model).save()
        metric(logits, rows.repeat(steps)).sum().backward()
        g = wide(value.grad).cpu().reshape(steps, len(rows), *path.shape[2:]).mean(0)
        out.append(torch.nn.functional.pad(g, (0, 0, start, 0)))
    return torch.cat(out)


def node_effects(
    model: Any,
    dictionaries: Mapping[str, Dictionary],
    pairs: PromptPairs,
    *,
    metric: "str | Metric" = "logit_diff",
    method: str = "atp",
    steps: int = 10,
    batch_size: int = 16,
    activations: "PairActivations | None" = None,
    replay: bool = True,
    progress: bool = False,
) -> tuple[NodeEffects, PairActivations]:
    """Every node's estimated effect (``method`` "atp" or "ig", :data:`METHODS`) on ``metric`` over ``pairs``.

    ``dictionaries`` maps sites to dictionaries (SAEs, PCA, :class:`~circuitsae.dictionaries.IdentityDictionary`
    for neurons); every site in it gets feature and error nodes. Returns the effects and the recorded
    activations (pass them back as ``activations`` to skip the recording runs, or to :func:`exact_effects`).
    With ``replay`` (families whose blocks run on their own), IG runs only the blocks after each site.
    """
    if method not in METHODS:
        raise CircuitSAEError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "ig" and (int(steps) != steps or steps < 1):
        raise CircuitSAEError(f"integrated gradients need steps >= 1 (an integer), got {steps!r}")
    m = metric if isinstance(metric, Metric) else make_metric(model, pairs, metric, batch_size)
    acts = activations
    if acts is None or (method == "atp" and not acts.grads):
        acts = record(model, dictionaries, pairs, m, gradients=method == "atp", batch_size=batch_size,
                      progress=progress)  # fmt: skip
    features, errors = {}, {}
    for s in tqdm(acts.sites, desc=f"node effects ({method})", disable=not progress):
        d = dictionaries[s]
        dc, de = acts.deltas(s, d)
        if method == "atp":
            g = acts.grads[s]
        else:
            g = _interpolated_gradient(model, acts, pairs, m, s, steps, batch_size, replay)
        g = g * acts.mask[s][..., None]
        features[s] = (g.to(dc.dtype) @ wide(d.W_dec.detach()).cpu().T) * dc
        errors[s] = (g.to(de.dtype) * de).sum(-1)
    effects = NodeEffects(method, m.kind, acts.sites, features, errors, acts.base_metric,
                          steps if method == "ig" else None)  # fmt: skip
    return effects, acts


# -- exact effects ----------------------------------------------------------------------------------------------
def node_delta(acts: PairActivations, dictionary: Dictionary, node: Node) -> torch.Tensor:
    """What patching ``node`` alone adds to its site's activation, ``[N, T, d]`` (float32, CPU)."""
    dc, de = acts.deltas(node.site, dictionary)
    if node.feature is None:
        delta = de
    else:
        if not 0 <= node.feature < dictionary.d_dict:
            raise CircuitSAEError(f"{node}: feature ids of {node.site} lie in 0..{dictionary.d_dict - 1}")
        delta = dc[..., node.feature, None] * wide(dictionary.W_dec[node.feature].detach()).cpu()
    if node.position is not None:
        keep = torch.zeros(delta.shape[1], dtype=delta.dtype)
        keep[node.position] = 1
        delta = delta * keep[None, :, None]
    return delta


class _Tails:
    """m with one site's activation replaced, per prompt, by the blocks after the site alone (``fast``) or by a
    whole-model nnsight run. The fast path checks itself once on the first site it runs against the recorded
    base metric; beyond the tolerance it warns and runs whole models from then on."""

    def __init__(self, model: Any, acts: PairActivations, metric: Metric, ids: torch.Tensor, replay: bool) -> None:
        self.model, self.acts, self.metric, self.ids = model, acts, metric, ids
        self.fast = _replays(model, replay)
        self.checked = False
        self.tails: dict[str, Downstream] = {}
        self.dtype = getattr(torch, dtype_name(model))

    def metric_with(self, site: str, value: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """m per row with ``site`` set to ``value`` ``[R, T, d]``; row r is prompt ``rows[r]`` (CPU, float)."""
        if self.fast and not self.checked:
            self.checked = True
            first = rows.unique()
            got = self._fast(site, self.acts.base[site][first], first)
            ref = self.acts.base_metric[first]
            tol = tolerance(self.dtype) * max(1.0, float(ref.abs().max()))
            if float((got - ref).abs().max()) > tol:
                warnings.warn(f"running the blocks after {site} alone does not reproduce the model's metric "
                              f"(off by {float((got - ref).abs().max()):.2e}); using whole-model runs", stacklevel=3)  # fmt: skip
                self.fast = False
        return self._fast(site, value, rows) if self.fast else self._whole(site, value, rows)

    def _fast(self, site: str, value: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        tail = self.tails.setdefault(site, Downstream(self.model, site))
        dev = site_device(self.model, site)
        inp = None if tail.resid else self.acts.block_input(tail.site.layer)[rows].to(device=dev, dtype=self.dtype)
        final = tail.final_logits(value.to(device=dev, dtype=self.dtype), inp, self.metric.end[rows])
        return self.metric.final(final, rows).cpu()

    def _whole(self, site: str, value: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        with self.model.trace(self.ids[rows].to(input_device(self.model))):
            x = sites_mod.read(self.model, site)
            x[:] = value.to(device=x.device, dtype=x.dtype)
            logits = logits_of(self.model).save()
        return self.metric(logits, rows).cpu()


@torch.no_grad()
def exact_effects(
    model: Any,
    dictionaries: Mapping[str, Dictionary],
    pairs: PromptPairs,
    nodes: Sequence[Node],
    acts: PairActivations,
    *,
    metric: "str | Metric" = "logit_diff",
    batch_size: int = 16,
    replay: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """The exact effect of patching each node alone, per prompt: ``[len(nodes), N]``.

    Each node's change (:func:`node_delta`) is added to its site in a base run and everything after runs as
    the model does. With ``replay`` (families whose blocks run on their own) only the blocks after the site run,
    from the recorded activations; otherwise whole-model runs through nnsight. ``batch_size`` rows (node ×
    prompt) share a pass.
    """
    m = metric if isinstance(metric, Metric) else make_metric(model, pairs, metric, batch_size)
    n = len(pairs)
    unknown = sorted({nd.site for nd in nodes} - set(acts.sites))
    if unknown:
        raise CircuitSAEError(f"nodes at sites without recorded activations: {', '.join(unknown)}")
    tails = _Tails(model, acts, m, pairs.base, replay)
    out = torch.zeros(len(nodes), n, dtype=acts.base_metric.dtype)
    per_run = max(1, batch_size // n) if n < batch_size else 1
    by_site: dict[str, list[int]] = {}
    for i, nd in enumerate(nodes):
        by_site.setdefault(nd.site, []).append(i)
    groups = [(s, idx[j : j + per_run]) for s, idx in by_site.items() for j in range(0, len(idx), per_run)]
    for site, group in tqdm(groups, desc="exact node effects", disable=not progress):
        deltas = [node_delta(acts, dictionaries[site], nodes[i]) for i in group]
        for rows in batches(n, max(1, batch_size // len(group))):
            value = torch.cat([acts.base[site][rows] + dl[rows] for dl in deltas])
            values = tails.metric_with(site, value, rows.repeat(len(group))).reshape(len(group), len(rows))
            for j, i in enumerate(group):
                out[i, rows] = values[j].to(out.dtype) - acts.base_metric[rows]
    return out


# -- edges ------------------------------------------------------------------------------------------------------
#: the metric's node: edges from the last block's output end here
LOGITS = Node("logits", None)


def upstream_sites(site: str, present: Sequence[str]) -> list[str]:
    """The sites whose nodes feed ``site``'s directly (REFERENCE §8), among ``present``: attn.L ← resid.L−1;
    mlp.L ← resid.L−1, attn.L; resid.L ← resid.L−1, attn.L, mlp.L; ``"logits"`` ← the last resid."""
    if site == "logits":
        resid = [s for s in present if s.startswith("resid.")]
        return [max(resid, key=lambda s: sites_mod.Site.parse(s).layer)] if resid else []
    s = sites_mod.Site.parse(site)
    want = {"attn": [f"resid.{s.layer - 1}"], "mlp": [f"resid.{s.layer - 1}", f"attn.{s.layer}"],
            "resid": [f"resid.{s.layer - 1}", f"attn.{s.layer}", f"mlp.{s.layer}"]}[s.kind]  # fmt: skip
    return [u for u in want if u in present]


@dataclass
class EdgeEffects:
    """Estimated edge effects ê(u→d) = ∇_d m · ∂d/∂u · Δu (Marks et al.; REFERENCE §8), per prompt ``[N]``,
    summed over the positions of u and d; d may be :data:`LOGITS`."""

    metric: str
    edges: dict[tuple[Node, Node], torch.Tensor]

    def scores(self) -> dict[tuple[Node, Node], float]:
        """Each edge's effect averaged over prompts."""
        return {k: float(v.mean()) for k, v in self.edges.items()}


def _cut_run(
    model: Any, dictionaries: Mapping[str, Dictionary], order: list[str], starts: Mapping[str, int], ids: torch.Tensor
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, tuple[torch.Tensor, torch.Tensor]], Any]:
    """A base run in which every site's output is rebuilt from leaves, x = x̂(c) + ε with c and ε detached,
    so the graph between sites is local: the codes and errors each site computes from its input (``down``,
    functions of the upstream leaves), the leaves (``leaves``) and the logits."""
    down: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    leaves: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.enable_grad(), model.trace(ids.to(input_device(model))):
        for s in order:
            d, start = dictionaries[s], starts[s]
            x = sites_mod.read(model, s)
            # a copy: the write below changes x in place, and the codes must stay functions of the upstream leaves
            xs = x[:, start:].to(d.W_dec.dtype).clone()
            c = d.encode(xs)
            e = xs - d.decode(c)
            down[s] = (c, e)
            c_leaf, e_leaf = c.detach().requires_grad_(), e.detach().requires_grad_()
            leaves[s] = (c_leaf, e_leaf)
            rebuilt = (d.decode(c_leaf) + e_leaf).to(x.dtype)
            x[:] = torch.cat([x[:, :start].detach(), rebuilt], 1)
        logits = logits_of(model).save()
    return down, leaves, logits


def edge_effects(
    model: Any,
    dictionaries: Mapping[str, Dictionary],
    pairs: PromptPairs,
    nodes: Sequence[Node],
    acts: PairActivations,
    *,
    metric: "str | Metric" = "logit_diff",
    batch_size: int = 16,
    progress: bool = False,
) -> EdgeEffects:
    """ê(u→d) for every pair of ``nodes`` (position None: summed over positions) at directly connected sites
    (:func:`upstream_sites`), and from the last resid's nodes into the metric (:data:`LOGITS`).

    ``acts`` must hold the base run's gradients (from :func:`node_effects` with "atp" or :func:`record`). One
    backward pass per downstream node, through the one layer between it and its upstream sites.
    """
    m = metric if isinstance(metric, Metric) else make_metric(model, pairs, metric, batch_size)
    if not acts.grads:
        raise CircuitSAEError("edge effects need the base run's gradients: record with gradients=True")
    kept: dict[str, list[Node]] = {}
    for nd in nodes:
        if nd.position is not None:
            raise CircuitSAEError(f"edges join nodes summed over positions; {nd} names position {nd.position}")
        kept.setdefault(nd.site, []).append(nd)
    order = [s for s in acts.sites]
    deltas = {s: acts.deltas(s, dictionaries[s]) for s in kept}
    n = len(pairs)
    out: dict[tuple[Node, Node], torch.Tensor] = {}
    targets = [s for s in order if s in kept] + ["logits"]
    for rows in tqdm(batches(n, batch_size), desc="edge effects", disable=not progress):
        down, leaves, logits = _cut_run(model, dictionaries, order, acts.starts, pairs.base[rows])
        for s2 in targets:
            ups = [u for u in upstream_sites(s2, order) if u in kept]
            if not ups:
                continue
            if s2 == "logits":
                scalars = [(LOGITS, m(logits, rows).sum())]
            else:
                d2, start2 = dictionaries[s2], acts.starts[s2]
                g = acts.grads[s2][rows, start2:].to(d2.W_dec)
                c2, e2 = down[s2]
                scalars = [
                    (nd, (g * e2).sum() if nd.is_error else ((g @ d2.W_dec[nd.feature]) * c2[..., nd.feature]).sum())
                    for nd in kept[s2]
                ]
            inputs = [t for u in ups for t in leaves[u]]
            for nd, scalar in scalars:
                grads = torch.autograd.grad(scalar, inputs, retain_graph=True, allow_unused=True)
                for j, u in enumerate(ups):
                    gc, ge = grads[2 * j], grads[2 * j + 1]
                    dc, de = deltas[u]
                    start = acts.starts[u]
                    for un in kept[u]:
                        g_u = ge if un.is_error else gc
                        if g_u is None:
                            val = torch.zeros(len(rows), dtype=dc.dtype)
                        elif un.is_error:
                            val = (wide(g_u.detach()).cpu() * de[rows, start:]).sum((1, 2))
                        else:
                            val = (wide(g_u[..., un.feature].detach()).cpu() * dc[rows, start:, un.feature]).sum(1)
                        out.setdefault((un, nd), torch.zeros(n, dtype=val.dtype))[rows] = val
    return EdgeEffects(m.kind, out)


@torch.no_grad()
def exact_edge_effects(
    model: Any,
    dictionaries: Mapping[str, Dictionary],
    pairs: PromptPairs,
    edges: Sequence[tuple[Node, Node]],
    acts: PairActivations,
    *,
    metric: "str | Metric" = "logit_diff",
    batch_size: int = 16,
    replay: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """The exact effect of each edge u→d per prompt, ``[len(edges), N]`` (REFERENCE §8): d' = d with u patched
    and every site between them held at its base value (a local recompute), then m(base with only d set to d')
    − m(base). An edge into :data:`LOGITS` is u's own exact effect. With ``replay`` (families whose blocks run
    on their own) the local recompute runs the blocks from u to d only and the rest the blocks after d only."""
    m = metric if isinstance(metric, Metric) else make_metric(model, pairs, metric, batch_size)
    n = len(pairs)
    order = list(acts.sites)
    tails = _Tails(model, acts, m, pairs.base, replay)
    out = torch.zeros(len(edges), n, dtype=acts.base_metric.dtype)
    for i, (u, d) in enumerate(tqdm(edges, desc="exact edge effects", disable=not progress)):
        if d == LOGITS:
            out[i] = exact_effects(model, dictionaries, pairs, [u], acts, metric=m, batch_size=batch_size,
                                   replay=replay)[0]  # fmt: skip
            continue
        if u.site not in order or d.site not in order or order.index(u.site) >= order.index(d.site):
            raise CircuitSAEError(f"{u} → {d}: an edge runs from an earlier site to a later one")
        between = order[order.index(u.site) + 1 : order.index(d.site)]
        delta_u = node_delta(acts, dictionaries[u.site], u)
        dd, start = dictionaries[d.site], acts.starts[d.site]
        for rows in batches(n, batch_size):
            xn = _local_recompute(model, acts, pairs, u.site, delta_u[rows], between, d.site, rows, tails.fast)
            xb = acts.base[d.site][rows, start:].to(dd.W_dec)
            xn = xn[:, start:].to(dd.W_dec)
            mask = acts.mask[d.site][rows, start:].to(dd.W_dec)[..., None]
            if d.is_error:
                change = (xn - dd.decode(dd.encode(xn))) - (xb - dd.decode(dd.encode(xb)))
            else:
                dc = dd.encode(xn)[..., d.feature] - dd.encode(xb)[..., d.feature]
                change = dc[..., None] * dd.W_dec[d.feature]
            if d.position is not None:
                keep = torch.zeros(change.shape[1], 1, dtype=change.dtype, device=change.device)
                keep[d.position - start] = 1
                change = change * keep
            change = torch.nn.functional.pad(wide(change * mask).cpu(), (0, 0, start, 0))
            value = acts.base[d.site][rows] + change
            out[i, rows] = tails.metric_with(d.site, value, rows).to(out.dtype) - acts.base_metric[rows]
    return out


def _local_recompute(
    model: Any,
    acts: PairActivations,
    pairs: PromptPairs,
    up: str,
    delta: torch.Tensor,
    between: Sequence[str],
    down: str,
    rows: torch.Tensor,
    fast: bool,
) -> torch.Tensor:
    """``down``'s activation ``[R, T, d]`` in a base run with ``delta`` added at ``up`` and every site of
    ``between`` held at its base value: the blocks from ``up`` to ``down`` alone (``fast``), or a whole run."""
    dtype = getattr(torch, dtype_name(model))
    if not fast:
        with model.trace(pairs.base[rows].to(input_device(model))):
            x = sites_mod.read(model, up)
            x[:] = x + delta.to(device=x.device, dtype=x.dtype)
            for s in between:
                h = sites_mod.read(model, s)
                h[:] = acts.base[s][rows].to(device=h.device, dtype=h.dtype)
            saved = sites_mod.read(model, down).save()
        return wide(saved.detach()).cpu()
    pu, pd = sites_mod.Site.parse(up), sites_mod.Site.parse(down)
    dev = site_device(model, up)
    new_up = (acts.base[up][rows] + delta).to(device=dev, dtype=dtype)
    replace = {s: acts.base[s][rows].to(device=dev, dtype=dtype) for s in between}
    if pu.kind == "resid":
        first, h = pu.layer + 1, new_up
    else:
        first, h = pu.layer, acts.block_input(pu.layer)[rows].to(device=dev, dtype=dtype)
        replace[up] = new_up
    out, caught = run_segment(model, first, pd.layer, h, replace=replace, capture=down)
    assert caught is not None
    return wide(caught.detach()).cpu()
