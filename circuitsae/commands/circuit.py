"""``circuitsae circuit``: the whole-model feature circuit of IOI, with error nodes, drawn and checked."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from circuitsae.circuits.circuit import Faithfulness, FeatureCircuit, faithfulness, feature_circuit
from circuitsae.circuits.curves import split_prompts
from circuitsae.circuits.effects import METHODS, METRICS, NodeEffects, node_effects
from circuitsae.circuits.estimator_error import EstimatorError, check_circuit
from circuitsae.config import model_dtype_option, option, validate
from circuitsae.dictionaries.folders import select_dictionaries
from circuitsae.errors import CircuitSAEError
from circuitsae.io import atomic_write, lock_folder, probe_folder
from circuitsae.models import load_model
from circuitsae.viz.circuit import render
from circuitsae.viz.plots import plot_faithfulness

NAME = "circuit"
HELP = "whole-model feature circuit of IOI with error nodes: circuit.json/.svg/.png, faithfulness, estimator error"
DESCRIPTION = (
    "Estimate the effect of every feature and every site's error term on IOI's logit difference (attribution "
    "patching or integrated gradients, Marks et al. 2024), keep the strongest nodes, join them by edges, draw "
    "the circuit, measure faithfulness and completeness, and (--check) compare the estimates with exact patches."
)
EXAMPLES = (
    "examples:\n  circuitsae circuit --dictionaries runs/bench/every_layer/smollm2-135m --prompts 50 --check\n"
    "  circuitsae circuit --dictionaries runs/saes --arch topk --method ig --steps 10 --max-nodes 40 --out runs/circ"
)


@dataclass
class CircuitConfig:
    """``circuitsae circuit``: the feature circuit of IOI across every site with a dictionary."""

    dictionaries: tuple[str, ...] = option((), "dictionary folders or a training output folder (one per site)")
    arch: "str | None" = option(None, "keep only dictionaries of this architecture (topk, relu, ...)")
    coefficient: "float | None" = option(None, "keep only dictionaries trained with this sparsity coefficient", min=0)
    model: "str | None" = option(None, "model (default: the one the dictionaries were trained on)")
    prompts: int = option(50, "IOI prompt pairs the circuit is selected on", min=1, max=100_000)
    heldout_prompts: int = option(50, "IOI prompt pairs on other templates and names, for held-out faithfulness "
                                  "(0: none)", min=0, max=100_000)  # fmt: skip
    seed: int = option(0, "seed of the IOI prompts (held-out prompts use seed + 1)", min=0, max=(1 << 31) - 1)
    metric: str = option("logit_diff", "the metric: IOI's logit difference IO - S, or KL to the target run",
                         choices=METRICS)  # fmt: skip
    method: str = option("atp", "node and edge estimator: attribution patching or integrated gradients",
                         choices=METHODS)  # fmt: skip
    steps: int = option(10, "integrated-gradient steps", min=1, max=1000)
    max_nodes: int = option(60, "nodes kept in the circuit (by |estimated effect|)", min=1, max=100_000)
    node_threshold: "float | None" = option(None, "keep only nodes with |effect| at least this", min=0)
    edge_threshold: float = option(0.0, "draw only edges with |effect| at least this", min=0)
    check: bool = option(False, "measure exact effects of the circuit's nodes, a stratified sample and edges")
    check_nodes: int = option(300, "nodes outside the circuit checked exactly (with --check)", min=0, max=1_000_000)
    check_edges: int = option(200, "edges checked exactly (with --check)", min=0, max=1_000_000)
    faithfulness: bool = option(True, "faithfulness and completeness curves over the top-n nodes")
    ablation: str = option("mean", "what left-out nodes are set to: the mean over target prompts, or each "
                           "prompt's own target value", choices=("mean", "patch"))  # fmt: skip
    batch_size: int = option(16, "prompt pairs per forward pass", min=1, max=100_000)
    out: str = option("runs/circuit", "output folder")
    device: "str | None" = option(None, "cpu, cuda, ... (default: cuda if available)")
    model_dtype: "str | None" = model_dtype_option()

    def __post_init__(self) -> None:
        validate(self)
        if not self.dictionaries:
            raise CircuitSAEError("name the dictionaries with --dictionaries")


@dataclass
class CircuitRun:
    """What ``circuitsae circuit`` made: the circuit, its curves, its check and the files written."""

    circuit: FeatureCircuit
    curves: dict[str, Faithfulness] = field(default_factory=dict)
    check: "EstimatorError | None" = None
    paths: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def run(cfg: CircuitConfig, *, model: Any = None, progress: bool = True) -> CircuitRun:
    """Build, draw, measure and (``--check``) check the circuit; the output folder is locked while it runs."""
    folder = Path(cfg.out)
    with lock_folder(folder, "circuit"):
        probe_folder(folder)
        return _run(cfg, model, progress)


def _run(cfg: CircuitConfig, model: Any, progress: bool) -> CircuitRun:
    dicts = select_dictionaries(cfg.dictionaries, cfg.arch, cfg.coefficient)
    models = {d.meta.get("model") for d in dicts.values()} - {None}
    model = model or load_model(cfg.model or (min(models) if models else "smollm2-135m"), device=cfg.device,
                                dtype=cfg.model_dtype)  # fmt: skip
    # selection on the even-numbered templates and names, held-out prompts on the odd-numbered ones
    pairs, held = split_prompts(model, cfg.prompts, max(1, cfg.heldout_prompts), seed=cfg.seed)
    circuit, effects, acts = feature_circuit(
        model, dicts, pairs, metric=cfg.metric, method=cfg.method, steps=cfg.steps, max_nodes=cfg.max_nodes,
        node_threshold=cfg.node_threshold, edge_threshold=cfg.edge_threshold, batch_size=cfg.batch_size,
        progress=progress,
    )  # fmt: skip
    seconds = dict(circuit.seconds or {})
    out = Path(cfg.out)
    result = CircuitRun(circuit, seconds=seconds)
    scores = effects.node_scores()
    if cfg.faithfulness:
        t0 = time.perf_counter()
        sizes = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if n <= max(cfg.max_nodes, 1) * 8]
        for errors in (True, False):
            label = "selection prompts" + ("" if errors else ", no error nodes")
            result.curves[label] = faithfulness(model, dicts, pairs, scores, acts, sizes=sizes, metric=cfg.metric,
                                                ablation=cfg.ablation, errors=errors,
                                                batch_size=cfg.batch_size)  # fmt: skip
        if cfg.heldout_prompts:
            _, held_acts = node_effects(model, dicts, held, metric=cfg.metric, batch_size=cfg.batch_size)
            result.curves["held-out prompts"] = faithfulness(model, dicts, held, scores, held_acts, sizes=sizes,
                                                             metric=cfg.metric, ablation=cfg.ablation,
                                                             batch_size=cfg.batch_size)  # fmt: skip
        seconds["faithfulness"] = time.perf_counter() - t0
        path = out / "faithfulness.png"
        plot_faithfulness(result.curves, path, f"{circuit.model}: IOI feature circuits ({cfg.ablation} ablation)")
        result.paths["faithfulness.png"] = str(path)
        atomic_write(out / "faithfulness.json", json.dumps({k: v.to_json() for k, v in result.curves.items()},
                                                          indent=1).encode())  # fmt: skip
        result.paths["faithfulness.json"] = str(out / "faithfulness.json")
    if cfg.check:
        estimates: dict[str, NodeEffects] = {cfg.method: effects}
        if cfg.method != "atp":
            estimates["atp"], _ = node_effects(model, dicts, pairs, metric=cfg.metric, activations=acts)
        result.check = check_circuit(circuit, model, dicts, pairs, estimates, acts, n_nodes=cfg.check_nodes,
                                     n_edges=cfg.check_edges, batch_size=cfg.batch_size,
                                     progress=progress)  # fmt: skip
        seconds.update({f"check_{k}": v for k, v in result.check.seconds.items()})
        atomic_write(out / "estimator_error.json", json.dumps(result.check.to_json(), indent=1).encode())
        result.paths["estimator_error.json"] = str(out / "estimator_error.json")
    circuit.seconds = seconds
    drawn = render(circuit, out / "circuit", max_nodes=min(cfg.max_nodes, 60), min_edge=cfg.edge_threshold)
    result.paths.update({f"circuit.{k}": v for k, v in drawn.items()})
    return result


Config = CircuitConfig


def show(result: CircuitRun) -> str:
    """What ``circuitsae circuit`` prints."""
    c = result.circuit
    errors = [v for v in c.graph if c.nodes[v].get("error")]
    lines = [
        f"feature circuit of {c.model}: {c.number_of_nodes() - 1} nodes ({len(errors)} error nodes), "
        f"{c.number_of_edges()} edges over {len(c.sites or [])} sites, {c.prompts} prompt pairs, "
        f"metric {c.metric} = {c.base_metric:.3g} on the base prompts; node effects by {c.method}"
    ]
    for v in sorted((v for v in c.graph if v != "logits"), key=lambda v: -abs(c.nodes[v]["effect"]))[:10]:
        exact = c.nodes[v].get("exact")
        lines.append(
            f"  {v:>16s} effect {c.nodes[v]['effect']:+.3g}" + (f"  exact {exact:+.3g}" if exact is not None else "")
        )
    for label, f in result.curves.items():
        pts = ", ".join(f"n={n}: {x:.2f}" for n, x in zip(f.n, f.faithfulness))
        lines.append(f"faithfulness ({label}): {pts}")
    if result.check is not None:
        for method, by in result.check.nodes.items():
            s = by["all"]
            lines.append(
                f"{method} vs exact on {s.count} nodes: Spearman {s.spearman:.2f}, median relative error "
                f"{s.median_relative_error:.2f}, sign agreement {s.sign_agreement:.2f}, false negatives "
                f"{s.false_negative_rate:.2f}"
            )
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    lines.append("wrote " + ", ".join(result.paths.values()))
    return "\n".join(lines)
