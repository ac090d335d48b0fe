"""``circuitsae tree SITE:ID``: the causal tree of a feature by ablation (Cunningham et al. §5.3, Fig. 5), drawn."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from circuitsae.circuits.trees import CausalTree, causal_tree
from circuitsae.config import model_dtype_option, option, validate
from circuitsae.dictionaries.folders import select_dictionaries
from circuitsae.errors import CircuitSAEError
from circuitsae.io import lock_folder, probe_folder
from circuitsae.models import load_model
from circuitsae.sites import parse_target
from circuitsae.viz.render import render

NAME = "tree"
HELP = "causal tree of a feature by ablation, drawn as DOT/SVG/PNG/JSON"
DESCRIPTION = (
    "Ablate each active feature of the previous site's dictionary and measure the target's decrease; keep "
    "the strongest parents and recurse (Cunningham et al. §5.3, Fig. 5)."
)
EXAMPLES = (
    "examples:\n  circuitsae tree resid.5:123 --dictionaries runs/saes --arch relu --depth 3 --out runs/tree/paren\n"
    "  circuitsae tree resid.5:123 --dictionaries runs/saes/resid.3-relu-c1 runs/saes/resid.4-relu-c1 "
    "runs/saes/resid.5-relu-c1 --branching 2 --contexts 10"
)


@dataclass
class TreeConfig:
    """``circuitsae tree SITE:ID``: the causal tree of a feature, drawn."""

    target: str = option("", "SITE:FEATURE, e.g. resid.5:123", positional="SITE:ID")
    dictionaries: tuple[str, ...] = option((), "dictionary folders or a training output folder (one per site)")
    arch: "str | None" = option(None, "keep only dictionaries of this architecture (relu, gated, ...)")
    coefficient: "float | None" = option(None, "keep only dictionaries trained with this sparsity coefficient", min=0)
    depth: int = option(3, "levels of parents to search (sites upstream of the target)", min=1, max=1000)
    branching: int = option(3, "parents kept per node", min=1, max=1000)
    contexts: int = option(20, "contexts where the target is in [M/2, M]", min=1, max=100_000)
    store: "str | None" = option(None, "activation store (default: the one the target dictionary was trained on)")
    model: "str | None" = option(None, "model (default: the one the dictionaries were trained on)")
    seed: int = option(0, "seed of the context sample", min=0, max=(1 << 63) - 1)
    mode: str = option(
        "paper",
        "paper: every parent is a target of its own, on its own contexts (Cunningham et al. §5.3); "
        "shared: every level on the root's contexts",
        choices=("paper", "shared"),
    )
    max_nodes: int = option(40, "draw at most this many nodes (the strongest)", min=1, max=100_000)
    out: str = option("runs/tree/causal_tree", "output path stem: writes .dot, .svg, .png and .json")
    device: "str | None" = option(None, "cpu, cuda, ... (default: cuda if available)")
    model_dtype: "str | None" = model_dtype_option()

    def __post_init__(self) -> None:
        validate(self)
        if not self.dictionaries:
            raise CircuitSAEError("name the dictionaries with --dictionaries")


def run_tree(cfg: TreeConfig, model: Any = None, progress: bool = True) -> tuple[CausalTree, dict[str, str]]:
    """Load what ``cfg`` names, build the tree and render it; return the tree and the written paths.

    The folder of ``cfg.out`` is locked against other writers and probed before anything loads.
    """
    if Path(cfg.out).is_dir():
        raise CircuitSAEError(
            f"--out {cfg.out} is a folder, but it is the stem of the files written (STEM.dot, .svg, .png, .json): "
            f"name a stem inside it, e.g. {Path(cfg.out) / 'causal_tree'}"
        )
    folder = Path(cfg.out).parent
    with lock_folder(folder, "tree"):
        probe_folder(folder)
        return _run_tree(cfg, model, progress)


def _run_tree(cfg: TreeConfig, model: Any, progress: bool) -> tuple[CausalTree, dict[str, str]]:
    """:func:`run_tree` with its folder locked."""
    target = parse_target(cfg.target)
    dicts = select_dictionaries(cfg.dictionaries, cfg.arch, cfg.coefficient)
    if target[0] not in dicts:
        raise CircuitSAEError(f"no dictionary at {target[0]}: the dictionaries given are at {', '.join(dicts)}")
    models = {d.meta.get("model") for d in dicts.values()} - {None}
    name = cfg.model or (min(models) if models else "smollm2-135m")
    model = model or load_model(name, device=cfg.device, dtype=cfg.model_dtype)
    tree = causal_tree(
        model,
        dicts,
        target,
        cfg.depth,
        cfg.branching,
        cfg.contexts,
        cfg.store,
        cfg.seed,
        mode=cfg.mode,
        progress=progress,
    )
    return tree, render(tree, cfg.out, max_nodes=cfg.max_nodes)


Config = TreeConfig


def run(cfg: TreeConfig, *, model: Any = None, progress: bool = True) -> tuple[CausalTree, dict[str, str]]:
    """The command's work: :func:`run_tree`."""
    return run_tree(cfg, model, progress)


def show(result: tuple[CausalTree, dict[str, str]]) -> str:
    """What ``circuitsae tree`` prints."""
    tree, paths = result
    lines = [
        f"causal tree of {tree.target}: {tree.number_of_nodes()} features, {tree.number_of_edges()} edges, "
        f"{tree.contexts} contexts, {tree.seconds:.1f} s"
    ]
    for u, v, e in sorted(tree.edges(data=True), key=lambda t: -t[2]["effect"])[:10]:
        lines.append(f"  {u:>14s} -> {v:<14s} effect {e['effect']:.3g}  {tree.nodes[u].get('label', '')}")
    lines.append("wrote " + ", ".join(paths.values()))
    return "\n".join(lines)
