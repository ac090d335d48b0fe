"""Order features by how much the patch needs them: ACDC on a flat graph (REFERENCE §4).

Start with F = every candidate (a feature whose patch is non-zero on some
prompt). For each threshold τ in ``logspace(−5, 0, 50)``, visit the features
of F in one fixed, seeded order and remove j when

    KL(F ∖ {j}) − KL(F) < τ

(KL = mean over prompts of D_KL(z ‖ y) at the final token; KL(F) is the value
measured when F was last changed, as in Conmy et al.'s Algorithm 1 and the
authors' code). After each τ record (|F|, KL, edit magnitude). Features
removed later matter more; the records are the curves "KL vs features
patched" and "KL vs edit magnitude".

:func:`acdc_reference` is that loop written plainly: one full nnsight forward
pass per visit. :func:`acdc` takes the same decisions, faster — the same up to
floating-point rounding: it computes each KL with other batch shapes and from
a cached prefix, so a KL differs from the reference's by ~1e-7 relative, and a
decision whose margin KL(F ∖ {j}) − KL(F) − τ is that close to 0 can go the
other way (the benchmark counts such decisions):

* the layers below the site never run again and only positions from a
  subset's first change on are recomputed (:mod:`circuitsae.interventions.replay`);
* **per-prompt memo**: un-patching j changes only the prompts where j's patch
  is non-zero, and KL is a mean over prompts, so a measured per-prompt value
  of KL(F ∖ {j}) stays exact until a removal changes that prompt. A revisit
  re-runs only the prompts that changed since (none, often, at later
  thresholds);
* **speculation**: visits are evaluated in batches, each assuming the
  decisions before it in the batch come out as predicted (from the feature's
  last measured effect, else its attribution estimate); decisions are taken
  up to and including the first wrong prediction, and the later measurements
  are kept only for the prompts the wrong guess did not touch. Every decision
  uses exactly the set the sequential loop would have used.

``order="attribution"`` is the cheap alternative: one forward and backward pass
give each feature's linear effect on the KL, ⟨∂KL/∂x', −(c̄_j − c_j) f_j⟩,
features are ranked by it, and the KL is measured for growing prefixes of
that ranking.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import einops
import numpy as np
import torch
from tqdm.auto import tqdm

from circuitsae.dictionaries import Dictionary
from circuitsae.errors import CircuitSAEError
from circuitsae.interventions.patching import (
    FeatureDeltas,
    _as_ids,
    check_pair,
    clean_run,
    feature_deltas,
    pad_id,
    patched_run,
)
from circuitsae.interventions.replay import Evaluator, make_evaluator
from circuitsae.interventions.splice import check_dictionary
from circuitsae.io import atomic_write
from circuitsae.metrics import kl_divergence
from circuitsae.tasks.pairs import PromptPairs


def default_thresholds() -> np.ndarray:
    """τ in logspace(−5, 0, 50), as in the authors' code."""
    return np.logspace(-5, 0, 50)


@dataclass
class ACDCResult:
    """Curves and ordering from one run.

    ``records``: one dict per threshold (or per prefix size for attribution)
    with ``tau``, ``n_features``, ``kl`` (D_KL(z ‖ y)), ``kl_reverse``
    (D_KL(y ‖ z)), ``edit_magnitude`` and, when answer tokens were given,
    ``logit_diff``. ``order``: dictionary feature ids, most important first.
    """

    site: str
    method: str
    n_candidates: int
    records: list[dict[str, Any]]
    order: list[int]
    removed_at: dict[int, float]
    evaluations: int
    seconds: float
    engine: str
    start: dict[str, Any] = field(default_factory=dict)  # the F = all-candidates and F = ∅ points

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["removed_at"] = {str(k): v for k, v in self.removed_at.items()}
        return d


def _unpack(base: Any, target: Any, lengths: Any, answer_tokens: Any) -> tuple:
    """Prompt pairs (an IOI dataset, say) in place of base and target tensors: their prompts, lengths and
    answer tokens (``answer_tokens``, when given, wins)."""
    if isinstance(base, PromptPairs):
        if target is not None:
            raise CircuitSAEError("give prompt pairs (an IOI dataset) as base, or base and target prompts, not both")
        return base.base, base.target, base.lengths, base.answer_tokens if answer_tokens is None else answer_tokens
    if target is None:
        raise CircuitSAEError("give target prompts, or an IOI dataset as base")
    return base, target, lengths, answer_tokens


def _record(
    tau: "float | None",
    member: torch.Tensor,
    kl: torch.Tensor,
    kl_rev: torch.Tensor,
    logits: torch.Tensor,
    fd: FeatureDeltas,
    answers: Any,
) -> dict[str, Any]:
    rec = {
        "tau": None if tau is None else float(tau),
        "n_features": int(member.sum()),
        "kl": float(kl.mean()),
        "kl_reverse": float(kl_rev.mean()),
        "edit_magnitude": fd.edit_magnitude(member),
    }
    if answers is not None:
        io, s = (torch.as_tensor(a).to(logits.device) for a in answers)
        n = torch.arange(len(logits), device=logits.device)
        rec["logit_diff"] = float((logits[n, io] - logits[n, s]).mean())
    return rec


def _result(
    fd: FeatureDeltas,
    method: str,
    records: list,
    order: list[int],
    removed_at: dict[int, float],
    evaluations: int,
    t0: float,
    engine: str,
    start: "dict | None" = None,
) -> ACDCResult:
    """Package one ordering's outcome; ``seconds`` counts from ``t0``."""
    return ACDCResult(
        site=fd.site,
        method=method,
        n_candidates=fd.n_candidates,
        records=records,
        order=order,
        removed_at=removed_at,
        evaluations=evaluations,
        seconds=time.perf_counter() - t0,
        engine=engine,
        start=start if start is not None else {},
    )


def _order(fd: FeatureDeltas, removed_at: dict[int, float], removal_rank: dict[int, int]) -> list[int]:
    """Feature ids, most important first: never removed, then removed latest first."""
    feats = fd.features.tolist()
    survivors = [f for f in feats if f not in removed_at]
    removed = sorted(removal_rank, key=lambda f: -removal_rank[f])
    return survivors + removed


def _visit_order(k: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(k, generator=g, device="cpu").tolist()


def _prepare(
    model: Any, dictionary: Dictionary, site: str, base: Any, target: Any, lengths: Any, target_lengths: Any, start: Any
):
    base_t, target_t = _as_ids(base, "base"), _as_ids(target, "target")
    check_pair(base_t, target_t, lengths, target_lengths, pad_id(model))
    check_dictionary(model, site, dictionary)
    fd = feature_deltas(
        model, dictionary, site, base_t, target_t, lengths=lengths, target_lengths=target_lengths, start=start
    )
    return base_t, target_t, fd


class _Search:
    """ACDC's bookkeeping: F, KL(F), and a per-prompt memo of KL(F ∖ {j}).

    Un-patching j changes only the prompts where j's patch is non-zero
    (``touches[j]``), so KL(F ∖ {j}) − KL(F) is a sum over those prompts, and a
    measured per-prompt value stays exact until a removal changes that prompt.
    Each prompt carries a version (removals that changed it); a memo entry
    records the versions it was measured at, so a revisit re-runs only the
    prompts that changed since.
    """

    def __init__(self, ev: Evaluator, fd: FeatureDeltas, member: torch.Tensor, kl_f: float) -> None:
        self.ev, self.fd, self.member, self.kl_f = ev, fd, member, kl_f
        # [K, N], on the CPU like all of the search's bookkeeping (state_kl, memo, versions)
        self.touches = einops.reduce(ev.changes, "n t k -> k n", "max")
        self.version = torch.zeros(self.touches.shape[1], dtype=torch.long, device="cpu")
        self.memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # j -> (versions, per-prompt KL of F ∖ {j})
        self.last_effect: dict[int, float] = {}
        self.removed_at: dict[int, float] = {}
        self.rank: dict[int, int] = {}

    def stale(self, j: int) -> torch.Tensor:
        """Prompts j changes whose KL(F ∖ {j}) is not known for the current F."""
        m = self.memo.get(j)
        return self.touches[j].clone() if m is None else self.touches[j] & (m[0] != self.version)

    def div(self, j: int) -> float:
        """KL(F ∖ {j}) from the memo: j's prompts from there, every other prompt is F's own."""
        kl = self.ev.state_kl.clone()
        if j in self.memo:
            t = self.touches[j]
            kl[t] = self.memo[j][1][t]
        return float(kl.mean())

    def decide(self, j: int, div: float, tau: float) -> bool:
        """Remove j from F when KL(F ∖ {j}) − KL(F) < τ; return whether it was removed."""
        self.last_effect[j] = div - self.kl_f
        if div - self.kl_f >= tau:
            return False
        self.member[j], self.kl_f = False, div
        self.ev.remove([j])
        self.version[self.touches[j]] += 1
        feature = int(self.fd.features[j])
        self.removed_at[feature], self.rank[feature] = float(tau), len(self.rank)
        return True

    def _store(self, j: int, fresh: torch.Tensor, ran: torch.Tensor, invalid: "torch.Tensor | None" = None) -> None:
        old = self.memo.get(j)
        kl = old[1].clone() if old is not None else torch.full_like(fresh, float("nan"))
        kl[ran] = fresh[ran]
        version = self.version.clone()
        if invalid is not None:
            version[invalid] = -1
        self.memo[j] = (version, kl)

    def speculate(self, chunk: list[int], predicted: list[bool], tau: float) -> int:
        """Measure ``chunk`` in one batch, each visit assuming the predicted decisions before it.

        Decisions are taken in order up to and including the first wrong
        prediction; returns how many. Later measurements are kept in the memo
        for the prompts the wrong guess (and the unapplied guesses after it)
        did not touch.
        """
        sets, only, pending = [], [], []
        pend = torch.zeros_like(self.version, dtype=torch.bool)
        for j, pred in zip(chunk, predicted):
            sets.append(torch.tensor(pending + [j], device="cpu"))
            only.append(self.touches[j] & (self.stale(j) | pend))
            if pred:
                pending.append(j)
                pend |= self.touches[j]
        values = self.ev.without_per_prompt(sets, only)
        for n, (j, pred) in enumerate(zip(chunk, predicted)):
            self._store(j, values[n], only[n])
            if self.decide(j, self.div(j), tau) != pred:
                invalid = self.touches[j].clone()
                for m in range(n + 1, len(chunk)):
                    self._store(chunk[m], values[m], only[m], invalid)
                    if predicted[m]:
                        invalid |= self.touches[chunk[m]]
                return n + 1
        return len(chunk)


def acdc(
    model: Any,
    dictionary: Dictionary,
    site: str,
    base: Any,
    target: Any = None,
    *,
    lengths: Any = None,
    target_lengths: Any = None,
    answer_tokens: Any = None,
    thresholds: Any = None,
    seed: int = 0,
    order: str = "acdc",
    engine: str = "auto",
    start: "int | None" = None,
    token_budget: int = 4096,
    batch_visits: int = 64,
    progress: bool = True,
    checkpoint: "str | Path | None" = None,
) -> ACDCResult:
    """Order the dictionary's features for patching target into base (see the module docstring).

    ``base`` may be :class:`~circuitsae.tasks.pairs.PromptPairs`, e.g. an IOI dataset (then ``target``,
    ``lengths`` and the answer tokens, IO/S for IOI, come from it). Each base prompt and its target must have the
    same real length (``target_lengths``, if not ``lengths``; see
    :func:`~circuitsae.interventions.patching.check_pair`). ``order`` is ``"acdc"`` (exact) or
    ``"attribution"`` (linear estimate, one backward pass). ``engine`` picks the
    evaluator (``auto``: the downstream-only one where it applies).
    ``checkpoint``: a file where exact ACDC keeps its state after every
    threshold; a run that finds one for the same problem resumes after the
    last finished threshold (same decisions, up to floating-point rounding:
    the per-prompt memo starts empty) and deletes it when done.
    """
    base, target, lengths, answers = _unpack(base, target, lengths, answer_tokens)
    if order not in ("acdc", "attribution"):
        raise CircuitSAEError(f"order must be 'acdc' or 'attribution', not {order!r}")
    t0 = time.perf_counter()
    base_t, _, fd = _prepare(model, dictionary, site, base, target, lengths, target_lengths, start)
    ev = make_evaluator(model, fd, base_t, engine, token_budget)
    if order == "attribution":
        return _attribution(ev, fd, answers, t0, progress)
    taus = np.sort(np.asarray(default_thresholds() if thresholds is None else thresholds, dtype=float))
    k = fd.n_candidates
    visit = _visit_order(k, seed)
    member = torch.ones(k, dtype=torch.bool, device="cpu")
    ends = _endpoints(ev, fd, answers)
    key = {"taus": taus.tolist(), "features": fd.features.tolist(), "seed": int(seed), "site": fd.site}
    saved = _resume(checkpoint, key)
    records, done, before = [], 0, 0
    if saved is not None:
        member = torch.tensor(saved["member"], dtype=torch.bool, device="cpu")
        records, done, before = saved["records"], len(saved["records"]), saved["evaluations"]
        t0 -= saved["seconds"]
    state = ev.set_state(member)
    kl_f = float(state["kl"].mean())
    est = _attribution_scores(ev, member)  # predictions for the first threshold
    search = _Search(ev, fd, member, kl_f)
    if saved is not None:
        search.removed_at = {int(f): t for f, t in saved["removed_at"].items()}
        search.rank = {int(f): r for f, r in saved["rank"].items()}
    width = 1  # visits per speculative batch: doubles after a fully accepted batch, halves after a miss
    bar = tqdm(taus[done:], desc=f"acdc {fd.site}", unit="τ", disable=not progress, initial=done, total=len(taus))
    for tau in bar:
        queue = [j for j in visit if member[j]]
        i = 0
        while i < len(queue):
            j = queue[i]
            if not search.stale(j).any():  # every prompt j changes is as it was when F ∖ {j} was measured
                search.decide(j, search.div(j), tau)
                i += 1
                continue
            chunk = [j]
            while i + len(chunk) < len(queue) and len(chunk) < width and search.stale(queue[i + len(chunk)]).any():
                chunk.append(queue[i + len(chunk)])
            predicted = [search.last_effect.get(jj, float(est[jj])) < tau for jj in chunk]
            n_done = search.speculate(chunk, predicted, tau)
            width = min(batch_visits, width * 2) if n_done == len(chunk) else max(1, width // 2)
            i += n_done
            bar.set_postfix(F=int(member.sum()), visit=f"{i}/{len(queue)}", evals=ev.evaluations)
        state = ev.state()
        records.append(_record(tau, member, state["kl"], state["kl_reverse"], state["logits"], fd, answers))
        bar.set_postfix(F=int(member.sum()), kl=f"{search.kl_f:.3g}", evals=ev.evaluations)
        if checkpoint is not None:
            _keep(checkpoint, key, member, records, search, before + ev.evaluations, time.perf_counter() - t0)
    removed_at, rank = search.removed_at, search.rank
    order = _order(fd, removed_at, rank)
    result = _result(fd, "acdc", records, order, removed_at, before + ev.evaluations, t0, ev.name, ends)
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    return result


def _keep(path, key: dict, member: torch.Tensor, records: list, search: "_Search", evaluations: int, seconds: float):
    """Write ACDC's state after a threshold (atomically: a half-written file is never read back)."""
    state = {
        **key,
        "member": member.tolist(),
        "records": records,
        "removed_at": {str(f): t for f, t in search.removed_at.items()},
        "rank": {str(f): r for f, r in search.rank.items()},
        "evaluations": evaluations,
        "seconds": seconds,
    }
    atomic_write(Path(path), json.dumps(state).encode())


def _resume(path, key: dict) -> "dict | None":
    """The state kept by :func:`_keep` for this problem, or None (no file); another problem's is refused."""
    if path is None or not Path(path).is_file():
        return None
    state = json.loads(Path(path).read_text())
    differ = [k for k in key if state.get(k) != key[k]]
    if differ:
        raise CircuitSAEError(
            f"{path} is the checkpoint of another ACDC run (its {', '.join(differ)} differ); delete it to start over"
        )
    return state


def _endpoints(ev: Evaluator, fd: FeatureDeltas, answers: Any) -> dict[str, Any]:
    """The two ends of every curve: nothing patched (the base run) and every candidate patched."""
    out = {}
    for name, member in (("none", torch.zeros(fd.n_candidates, dtype=torch.bool, device="cpu")), ("all", None)):
        member = torch.ones(fd.n_candidates, dtype=torch.bool, device="cpu") if member is None else member
        s = ev.set_state(member)
        out[name] = _record(None, member, s["kl"], s["kl_reverse"], s["logits"], fd, answers)
    return out


def _attribution_scores(ev: Evaluator, member: torch.Tensor) -> torch.Tensor:
    """Linear estimate of KL(F ∖ {j}) − KL(F) for every candidate j: ⟨∂KL/∂x', −(c̄_j − c_j) f_j⟩."""
    g = ev.gradient(member)  # [N, T, d]
    gw = g @ ev.fd.directions.T  # [N, T, K]
    return -(gw * ev.fd.delta).sum((0, 1)).cpu() * member


def _attribution(ev: Evaluator, fd: FeatureDeltas, answers: Any, t0: float, progress: bool) -> ACDCResult:
    k = fd.n_candidates
    ends = _endpoints(ev, fd, answers)
    scores = _attribution_scores(ev, torch.ones(k, dtype=torch.bool, device="cpu"))
    ranked = torch.argsort(scores, descending=True, stable=True)
    sizes = sorted({0, k, *np.unique(np.round(np.logspace(0, np.log10(k), 40)).astype(int)).tolist()})
    records = []
    for n in tqdm(sizes, desc=f"attribution {fd.site}", unit="set", disable=not progress):
        member = torch.zeros(k, dtype=torch.bool, device="cpu")
        member[ranked[:n]] = True
        s = ev.set_state(member)
        rec = _record(None, member, s["kl"], s["kl_reverse"], s["logits"], fd, answers)
        rec["estimated_effect"] = float(scores[ranked[n - 1]]) if n else None
        records.append(rec)
    records.reverse()  # like ACDC: from many features to few
    order = [int(fd.features[j]) for j in ranked]
    return _result(fd, "attribution", records, order, {}, ev.evaluations, t0, ev.name, ends)


@torch.no_grad()
def acdc_reference(
    model: Any,
    dictionary: Dictionary,
    site: str,
    base: Any,
    target: Any = None,
    *,
    lengths: Any = None,
    target_lengths: Any = None,
    answer_tokens: Any = None,
    thresholds: Any = None,
    seed: int = 0,
    start: "int | None" = None,
    progress: bool = False,
) -> ACDCResult:
    """The sequential oracle: a full nnsight forward pass of the base prompts for every visit."""
    base, target, lengths, answers = _unpack(base, target, lengths, answer_tokens)
    t0 = time.perf_counter()
    base_t, target_t, fd = _prepare(model, dictionary, site, base, target, lengths, target_lengths, start)
    lengths_t = fd.lengths
    saved = clean_run(model, target_t, [fd.site], lengths_t)
    y = saved["logits"]
    evaluations = 0

    def run(member: torch.Tensor) -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        plan = {fd.site: (dictionary, fd.features[member])}
        return patched_run(model, plan, base_t, saved, lengths_t, start)[0]

    taus = np.sort(np.asarray(default_thresholds() if thresholds is None else thresholds, dtype=float))
    k = fd.n_candidates
    member = torch.ones(k, dtype=torch.bool, device="cpu")
    prev = float(kl_divergence(run(member), y).mean())
    removed_at, rank, records = {}, {}, []
    for tau in tqdm(taus, desc=f"reference {fd.site}", disable=not progress):
        for j in _visit_order(k, seed):
            if not member[j]:
                continue
            member[j] = False
            div = float(kl_divergence(run(member), y).mean())
            if div - prev < tau:
                prev = div
                removed_at[int(fd.features[j])], rank[int(fd.features[j])] = float(tau), len(rank)
            else:
                member[j] = True
        z = run(member)
        records.append(_record(tau, member, kl_divergence(z, y), kl_divergence(y, z), z, fd, answers))
    return _result(fd, "reference", records, _order(fd, removed_at, rank), removed_at, evaluations, t0, "nnsight")
