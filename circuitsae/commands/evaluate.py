"""``circuitsae eval DICTIONARY ...``: L0, FVU, γ and loss recovered of saved dictionaries."""

from __future__ import annotations

from typing import Any

from circuitsae.training.evaluate import EvalConfig, Evaluation, evaluate, format_table

NAME = "eval"
HELP = "L0, FVU, gamma, loss recovered of saved dictionaries"
DESCRIPTION = (
    "Evaluate saved dictionaries on held-out data: reconstruction metrics, and loss recovered "
    "with each spliced into the model. Prints a table and writes JSON."
)
EXAMPLES = (
    "examples:\n  circuitsae eval runs/saes                      # every SAE in a training folder\n"
    "  circuitsae eval runs/saes/resid.4-gated-c2 --contexts 64 --out eval.json"
)
Config = EvalConfig


def run(cfg: EvalConfig, *, model: Any = None, progress: bool = True) -> Evaluation:
    """The command's work: :func:`circuitsae.training.evaluate.evaluate`."""
    return evaluate(cfg, model=model, progress=progress)


def show(report: Evaluation) -> str:
    """What ``circuitsae eval`` prints."""
    sources = ", ".join(
        s if s.startswith("forward passes") else f"store {s}"
        for s in dict.fromkeys(r.store for r in report.results.values())
    )
    return format_table(report) + f"\nheld-out data from {sources}\nwrote {report.path}"
