"""Indirect-object identification (IOI), the task of Wang et al. 2022 used by Cunningham et al. 2023 §4.

A prompt names two people, then repeats one of them (the subject S) and stops where the other (the
indirect object IO) is the natural next word: "Then, Mary and John went to the store. John gave a drink to"
→ " Mary". Order ABBA puts IO first in the opening clause, BABA puts S first. Each base prompt has a
*target* (counterfactual) prompt, identical except that IO is replaced by a third name T, so that both
tokenise to the same length and differ at exactly one position. Performance is the logit difference
logit[IO] − logit[S] at the final token.

Token convention: position 0 of every prompt is the start token (``start_token_id``); prompts are
right-padded, and the prediction to read is at ``end_position = lengths − 1``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from circuitsae.errors import CircuitSAEError
from circuitsae.models import input_device, start_token_id
from circuitsae.tasks.pairs import PromptPairs

# fmt: off
#: Common English first names; ``single_token_names`` keeps those that are one token with a leading space.
NAMES: tuple[str, ...] = (
    "Aaron", "Adam", "Alan", "Alex", "Alice", "Amy", "Andrew", "Andy", "Anna", "Anthony", "Arthur", "Austin",
    "Ben", "Betty", "Bill", "Blake", "Bob", "Brian", "Carl", "Carol", "Charles", "Charlie", "Chris", "Claire",
    "Dan", "Daniel", "David", "Dean", "Diana", "Edward", "Elizabeth", "Ellen", "Emily", "Emma", "Eric", "Eva",
    "Frank", "Fred", "George", "Grace", "Grant", "Hannah", "Harry", "Helen", "Henry", "Ian", "Jack", "Jacob",
    "Jake", "James", "Jamie", "Jane", "Jason", "Jeff", "Jennifer", "Jeremy", "Jessica", "Jim", "Joe", "John",
    "Jonathan", "Jordan", "Joseph", "Joshua", "Julia", "Justin", "Karen", "Kate", "Kelly", "Kevin", "Laura",
    "Leon", "Lewis", "Linda", "Lisa", "Louis", "Lucy", "Luke", "Maria", "Mark", "Martin", "Mary", "Matthew",
    "Max", "Michael", "Michelle", "Mike", "Nancy", "Nathan", "Nick", "Oliver", "Patrick", "Paul", "Peter",
    "Rachel", "Richard", "Robert", "Rose", "Ruby", "Ryan", "Sam", "Sarah", "Scott", "Sean", "Sid", "Simon",
    "Sophie", "Stephen", "Steven", "Susan", "Taylor", "Thomas", "Tim", "Tom", "Tony", "Tyler", "Victoria",
    "Walter", "Warren", "William",
)
# fmt: on

#: Prompt templates: {A} and {B} open the first clause, {S} (the subject) is repeated in the second, and the
#: text stops right before the indirect object. The first 15 follow Wang et al. 2022 (two that SmolLM2-135M
#: found ambiguous reworded); the rest are new.
TEMPLATES: tuple[str, ...] = (
    "Then, {A} and {B} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Then, {A} and {B} had a lot of fun at the {PLACE}. {S} gave a {OBJECT} to",
    "Then, {A} and {B} were working at the {PLACE}. {S} decided to give a {OBJECT} to",
    "Then, {A} and {B} were thinking about going to the {PLACE}. {S} wanted to give a {OBJECT} to",
    "Then, {A} and {B} had a long argument, and afterwards {S} said to",
    "After {A} and {B} went to the {PLACE}, {S} gave a {OBJECT} to",
    "When {A} and {B} got a {OBJECT} at the {PLACE}, {S} decided to give it to",
    "When {A} and {B} got a {OBJECT} at the {PLACE}, {S} decided to give the {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {S} gave a {OBJECT} to",
    "On Sunday, {A} and {B} visited the {PLACE}. {S} gave a {OBJECT} to",
    "After the lunch, {A} and {B} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Afterwards, {A} and {B} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Then, {A} and {B} had a long argument. Afterwards {S} said to",
    "The {PLACE} {A} and {B} went to had a {OBJECT}. {S} gave it to",
    "After a long day, {A} and {B} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Yesterday, {A} and {B} met at the {PLACE}. {S} handed a {OBJECT} to",
    "Later, {A} and {B} walked to the {PLACE}. {S} passed a {OBJECT} to",
    "In the morning, {A} and {B} arrived at the {PLACE}. {S} brought a {OBJECT} to",
    "Last week, {A} and {B} had dinner at the {PLACE}. {S} gave a {OBJECT} to",
)

#: Places for {PLACE}.
PLACES: tuple[str, ...] = (
    "store", "garden", "restaurant", "school", "hospital", "office", "house", "station", "park", "library",
    "beach", "market", "museum",
)  # fmt: skip

#: Objects for {OBJECT} (each takes the article "a").
OBJECTS: tuple[str, ...] = (
    "ring", "book", "bone", "basketball", "computer", "necklace", "drink", "snack", "letter", "gift", "key",
    "pen", "cake", "flower",
)  # fmt: skip

ORDERS: tuple[str, str] = ("ABBA", "BABA")


def _tokenizer(model_or_tokenizer: Any) -> Any:
    """The tokenizer itself, or the ``.tokenizer`` of an nnsight-wrapped model."""
    return model_or_tokenizer if hasattr(model_or_tokenizer, "encode") else model_or_tokenizer.tokenizer


def _name_token(tokenizer: Any, name: str) -> int | None:
    """The id of ``" " + name`` when that is a single token, else ``None``."""
    ids = tokenizer.encode(" " + name, add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 else None


def single_token_names(tokenizer: Any, names: Sequence[str] = NAMES) -> list[str]:
    """The names (in the given order) that are exactly one token with a leading space."""
    return [name for name in names if _name_token(tokenizer, name) is not None]


@dataclass(frozen=True, eq=False)
class IOIDataset(PromptPairs):
    """Base IOI prompts with their counterfactual targets, tokenised and right-padded: :class:`PromptPairs`
    with what IOI knows about each prompt.

    Position 0 of every row is the start token; ``lengths`` counts it. The target prompt is the base with
    the IO name replaced by ``target_token``'s name, at ``io_position``; everything else is identical. The
    answers are IO (right) and S (wrong): :attr:`answer_tokens` is ``(io_token, s_token)``.
    """

    io_token: torch.Tensor
    """Id of " IO" (the correct answer on the base prompt), LongTensor [N]."""
    s_token: torch.Tensor
    """Id of " S" (the repeated subject), LongTensor [N]."""
    target_token: torch.Tensor
    """Id of " T" (the name replacing IO in the target prompt), LongTensor [N]."""
    io_position: torch.Tensor
    """Position of IO in the base prompt (and of T in the target prompt), LongTensor [N]."""
    s1_position: torch.Tensor
    """Position of the first occurrence of S, LongTensor [N]."""
    s2_position: torch.Tensor
    """Position of the second occurrence of S, LongTensor [N]."""
    texts: list[str]
    """Base prompts as text (without the start token)."""
    target_texts: list[str]
    """Target prompts as text."""
    templates: list[int]
    """Index into the template list used for each prompt."""
    orders: list[str]
    """Per prompt, "ABBA" (IO named first) or "BABA" (S named first)."""
    seed: int = 0
    """The seed the dataset was generated from."""

    @property
    def answer_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(io_token, s_token)``: the logit difference IO − S is IOI's measure."""
        return self.io_token, self.s_token


def make_ioi(
    model_or_tokenizer: Any,
    n: int = 50,
    seed: int = 0,
    templates: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
) -> IOIDataset:
    """Generate ``n`` IOI prompts and their counterfactual targets, deterministically from ``seed``.

    Prompt i uses order ABBA when i is even, BABA when odd; consecutive pairs share a template and the
    templates are cycled, so every template is used in both orders once ``n >= 2 * len(templates)``.
    IO, S and the target name T are three distinct single-token names; places and objects are sampled.

    Raises :class:`CircuitSAEError` if a given name is not a single token, if fewer than 3 names are
    usable, or if a template does not tokenise so that base and target differ only at the IO name.
    """
    tok = _tokenizer(model_or_tokenizer)
    if n < 1:
        raise CircuitSAEError(f"an IOI dataset needs n >= 1 prompts, not {n}")
    templates = list(TEMPLATES if templates is None else templates)
    if not templates:
        raise CircuitSAEError("make_ioi needs at least one template")
    if names is None:
        pool = single_token_names(tok)
    else:
        pool = list(dict.fromkeys(names))
        bad = [name for name in pool if _name_token(tok, name) is None]
        if bad:
            raise CircuitSAEError(f"these names are not single tokens with a leading space: {', '.join(bad)}")
    if len(pool) < 3:
        raise CircuitSAEError(f"IOI needs at least 3 single-token names (IO, S and a target), got {len(pool)}")

    rng = random.Random(seed)
    start = start_token_id(tok)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        t_idx, order = (i // 2) % len(templates), ORDERS[i % 2]
        io, s, tgt = rng.sample(pool, 3)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        a, b = (io, s) if order == "ABBA" else (s, io)
        fill = dict(S=s, PLACE=place, OBJECT=obj)
        try:
            text = templates[t_idx].format(A=a, B=b, **fill)
            target_text = templates[t_idx].format(A=tgt if a == io else a, B=tgt if b == io else b, **fill)
        except (KeyError, IndexError, ValueError) as e:
            raise CircuitSAEError(
                f"template {t_idx} ({templates[t_idx]!r}) may use only {{A}}, {{B}}, {{S}}, {{PLACE}} and {{OBJECT}}"
            ) from e
        base_ids = [start, *tok.encode(text, add_special_tokens=False)]
        target_ids = [start, *tok.encode(target_text, add_special_tokens=False)]
        io_tok, s_tok, t_tok = (_name_token(tok, name) for name in (io, s, tgt))
        diff = [p for p, (x, y) in enumerate(zip(base_ids, target_ids)) if x != y]
        s_pos = [p for p, x in enumerate(base_ids) if x == s_tok]
        if (
            len(base_ids) != len(target_ids)
            or len(diff) != 1
            or base_ids[diff[0]] != io_tok
            or target_ids[diff[0]] != t_tok
            or base_ids.count(io_tok) != 1
            or len(s_pos) != 2
        ):
            raise CircuitSAEError(
                f"template {t_idx} does not tokenise into clean IOI prompts (each name must be its own "
                f"' Name' token, IO once and S twice): {text!r} vs {target_text!r}"
            )
        rows.append(dict(ids=base_ids, tids=target_ids, io=io_tok, s=s_tok, t=t_tok, pos=diff[0], s_pos=s_pos,
                         text=text, target_text=target_text, template=t_idx, order=order))  # fmt: skip

    width = max(len(r["ids"]) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else start
    base = torch.full((n, width), pad, dtype=torch.long, device="cpu")
    target = base.clone()
    for i, r in enumerate(rows):
        base[i, : len(r["ids"])] = torch.tensor(r["ids"], device="cpu")
        target[i, : len(r["tids"])] = torch.tensor(r["tids"], device="cpu")

    def col(key: str) -> torch.Tensor:
        return torch.tensor([r[key] for r in rows], dtype=torch.long, device="cpu")

    return IOIDataset(
        base=base,
        target=target,
        lengths=torch.tensor([len(r["ids"]) for r in rows], dtype=torch.long, device="cpu"),
        io_token=col("io"),
        s_token=col("s"),
        target_token=col("t"),
        io_position=col("pos"),
        s1_position=torch.tensor([r["s_pos"][0] for r in rows], dtype=torch.long, device="cpu"),
        s2_position=torch.tensor([r["s_pos"][1] for r in rows], dtype=torch.long, device="cpu"),
        texts=[r["text"] for r in rows],
        target_texts=[r["target_text"] for r in rows],
        templates=[r["template"] for r in rows],
        orders=[r["order"] for r in rows],
        seed=seed,
    )


def final_logits(logits: torch.Tensor, dataset: IOIDataset) -> torch.Tensor:
    """Gather full logits [N, T, V] at each prompt's ``end_position`` → [N, V]."""
    end = dataset.end_position.to(logits.device)
    return logits[torch.arange(logits.shape[0], device=logits.device), end]


def logit_diff(logits: torch.Tensor, dataset: IOIDataset) -> torch.Tensor:
    """logit[IO] − logit[S] per prompt, from final-token logits [N, V] → [N]."""
    idx = torch.stack([dataset.io_token, dataset.s_token], dim=1).to(logits.device)
    pair = logits.gather(1, idx)
    return pair[:, 0] - pair[:, 1]


@torch.no_grad()
def ioi_performance(model: Any, dataset: IOIDataset, batch_size: int = 64) -> dict[str, float]:
    """How well ``model`` does IOI on ``dataset``.

    Returns ``logit_diff`` (mean of logit[IO] − logit[S] on the base prompts), ``logit_diff_std``,
    ``accuracy`` (fraction of base prompts with logit[IO] > logit[S]), ``target_logit_diff`` (mean of
    logit[T] − logit[S] on the target prompts) and ``n``. Each nnsight trace runs ``batch_size`` base
    prompts together with their targets.
    """
    if batch_size < 1:
        raise CircuitSAEError(f"batch_size must be >= 1, not {batch_size}")
    base, target = [], []
    for lo in range(0, len(dataset), batch_size):
        part = dataset.subset(range(lo, min(lo + batch_size, len(dataset))))
        with model.trace(torch.cat([part.base, part.target]).to(input_device(model))):
            logits = model.output.logits.save()
        k = len(part)
        base.append(logit_diff(final_logits(logits[:k], part), part).float().cpu())
        target_answers = replace(part, io_token=part.target_token)
        target.append(logit_diff(final_logits(logits[k:], target_answers), target_answers).float().cpu())
    base_ld, target_ld = torch.cat(base), torch.cat(target)
    return {
        "logit_diff": float(base_ld.mean()),
        "logit_diff_std": float(base_ld.std()) if len(base_ld) > 1 else 0.0,
        "accuracy": float((base_ld > 0).float().mean()),
        "target_logit_diff": float(target_ld.mean()),
        "n": len(dataset),
    }
