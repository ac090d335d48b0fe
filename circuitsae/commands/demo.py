"""``make demo``: the whole library end to end on the embedded defaults.

Steps, each resumable (a re-run skips what is finished):

1. harvest SmolLM2-135M activations at four successive residual sites over
   the embedded corpus;
2. train, in one pass, baseline SAEs (α = 1 and 4), the α = 0 dictionary and
   a Gated SAE (λ = 2) at every site;
3. evaluate them on held-out text (L0, FVU, γ, loss recovered);
4. IOI feature patching at the last site (Cunningham et al. Fig. 3): ACDC
   and attribution orderings for the baseline (two α), Gated and α = 0
   dictionaries and PCA → KL curves;
5. pick the baseline-SAE feature at the last site that best picks out one of
   the paper's example tokens (")", "'", ".", " the"), analyse it, and build
   and render its causal tree through the earlier sites;
6. write ``summary.json`` and a self-contained ``report.html``.

``scale`` multiplies the tokens, the IOI prompts and thresholds (up to the
paper's 50 and 50) for bigger runs on a GPU.
"""

from __future__ import annotations

import html
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from circuitsae.config import model_dtype_option, option, validate
from circuitsae.errors import CircuitSAEError
from circuitsae.io import atomic_write, digest, lock_folder, probe_folder


@dataclass
class DemoConfig:
    """The demo's settings; ``circuitsae demo`` exposes each as a flag."""

    out: str = option("runs/demo", "output folder: activations, SAEs, IOI curves, tree, report.html")
    model: str = option("smollm2-135m", "model: smollm2-135m, gemma3-270m, a local HF folder or hub id")
    sites: tuple[str, ...] = option(
        (),
        "successive residual sites (IOI and the tree target at the last: few layers after it keep ACDC cheap); "
        "default: the four ending three blocks before the last (SmolLM2: resid.24-27, Gemma 3: resid.12-15)",
    )
    scale: float = option(
        1.0,
        "multiplies tokens, IOI prompts and thresholds (5: the paper's 50 prompts and thresholds)",
        above=0,
        max=1e4,
    )
    tokens: int = option(200_000, "training tokens per site at scale 1", min=1, max=1 << 40)
    ioi_prompts: int = option(10, "IOI prompt pairs at scale 1 (at most 50)", min=1, max=50)
    ioi_thresholds: int = option(10, "ACDC thresholds at scale 1 (at most 50)", min=1, max=50)
    ioi_dense_acdc: bool = option(
        False, "exact ACDC for the dense baselines (α = 0, PCA) too, not only attribution: hours on a 2-core CPU"
    )
    tree_contexts: int = option(20, "contexts of the causal tree", min=1, max=100_000)
    branching: int = option(3, "parents kept per node of the causal tree", min=1, max=1000)
    device: "str | None" = option(None, "cpu, cuda, ... (default: cuda if available)")
    model_dtype: "str | None" = model_dtype_option()

    def __post_init__(self) -> None:
        validate(self)
        if len(self.sites) == 1:
            raise CircuitSAEError("the demo needs at least two successive sites (the tree goes upstream)")

    def scaled(self, n: int, cap: "int | None" = None) -> int:
        v = max(2, round(n * self.scale))
        return min(v, cap) if cap else v


def _timed(seconds: dict, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    seconds[name] = time.perf_counter() - t0
    return out


def default_sites(model: Any) -> tuple[str, ...]:
    """Four successive residual sites ending three blocks before the last (resid.24-27 of SmolLM2's 30)."""
    from circuitsae.sites import n_layers

    last = n_layers(model) - 3
    return tuple(f"resid.{layer}" for layer in range(max(0, last - 3), last + 1))


def _train(cfg: DemoConfig, store: Any, out: Path, progress: bool) -> None:
    from circuitsae.training.trainer import train

    common = dict(store=str(store.root), lr=1e-3, batch_size=1024, epochs=2, device=cfg.device, progress=progress)
    # baseline and α = 0 at R = 4; Gated at R = 3 (equal compute, as in the Gated paper)
    train(out=str(out / "saes"), arch=("relu",), coefficients=(1.0, 4.0, 0.0), expansion=4.0, **common)
    train(out=str(out / "saes-gated"), arch=("gated",), coefficients=(2.0,), expansion=3.0, **common)


def _evaluate(out: Path, model: Any, device: "str | None", progress: bool) -> Any:
    """Evaluate every dictionary (an :class:`~circuitsae.training.evaluate.Evaluation`), or read eval.json back
    when it is newer than all of them."""
    from circuitsae.training.evaluate import Evaluation, evaluate

    folders = [p.parent for p in sorted(out.glob("saes*/*/cfg.json"))]
    done, stamp = out / "eval.json", out / "eval.sha1"
    if done.exists() and stamp.exists() and stamp.read_text() == digest(folders):
        return Evaluation.read(done)
    report = evaluate(
        dictionaries=tuple(map(str, folders)), out=str(done), model=model, device=device, progress=progress
    )
    atomic_write(stamp, digest(folders).encode())
    return report


def _ioi(cfg: DemoConfig, model: Any, out: Path, progress: bool) -> dict:
    from circuitsae.commands.ioi import run_ioi
    from circuitsae.training.trainer import run_name

    site = cfg.sites[-1]
    dicts = [str(out / "saes" / run_name(site, "relu", c)) for c in (1, 4, 0)] + [
        str(out / "saes-gated" / run_name(site, "gated", 2))
    ]
    rep = run_ioi(dictionaries=dicts, model=model, prompts=cfg.scaled(cfg.ioi_prompts, 50),
                  thresholds=cfg.scaled(cfg.ioi_thresholds, 50), acdc_dense=cfg.ioi_dense_acdc,
                  out=str(out / "ioi"), device=cfg.device,
                  progress=progress)  # fmt: skip
    rows = [{"label": r["label"], "method": r["method"], "n_candidates": r["n_candidates"],
             "kl_all": r["start"]["all"]["kl"], "kl_none": r["start"]["none"]["kl"],
             "evaluations": r["evaluations"], "seconds": r["seconds"]} for r in rep.results]  # fmt: skip
    return {"site": site, "prompts": rep.prompts, "thresholds": len(rep.thresholds),
            "performance": rep.ioi, "png": str(out / "ioi" / "kl_vs_patches.png"),
            "json": rep.path, "rows": rows, "finding": ioi_finding(rep.results),
            "skipped": rep.skipped}  # fmt: skip


def ioi_finding(results: list[dict]) -> str:
    """One sentence: the features each ACDC curve keeps to halve the unpatched KL (:func:`halving`: the crossing
    interpolated on log n, with the two recorded counts around it)."""
    from circuitsae.circuits.curves import halving

    parts = []
    for r in results:
        if r["method"] == "acdc":
            h = halving(r)
            n, x = h["features"], h["features_interpolated"]
            count = str(n) if x is None else f"~{x:.0f} ({h['bracket'][0]}–{n} recorded)"
            parts.append(f"{r['label']}: {'more than all ' + str(r['n_candidates']) if n is None else count}")
    return "Features ACDC keeps to halve the unpatched KL — " + "; ".join(parts) + "."


def _feature_and_tree(cfg: DemoConfig, model: Any, out: Path, progress: bool) -> tuple[dict, dict]:
    from circuitsae.circuits.features import analyse_feature, find_token_feature
    from circuitsae.circuits.trees import causal_tree
    from circuitsae.data.store import ActivationStore
    from circuitsae.dictionaries import load_dictionary
    from circuitsae.training.trainer import run_name
    from circuitsae.viz.plots import write_feature_report
    from circuitsae.viz.render import render

    dicts = {s: load_dictionary(out / "saes" / run_name(s, "relu", 1)) for s in cfg.sites}
    site = cfg.sites[-1]
    store = ActivationStore(out / "activations")
    pick = find_token_feature(dicts[site], store, site, model.tokenizer, progress=progress)
    report = analyse_feature(model, dicts[site], store, pick["feature"], site, progress=progress)
    paths = write_feature_report(report, out / "feature")
    feature = {"site": site, "dictionary": run_name(site, "relu", 1), **pick, "density": report.density,
               "max_activation": report.max_activation, "histogram": paths["histogram"],
               "logit_effect": paths["logit_effect"], "unembed": [t for t, _ in report.unembed["top"][:10]],
               "contexts_html": [f"{c.activation:.3g}&nbsp;&nbsp;" + c.marked(20, 4, "<b>{}</b>", html.escape)
                                 for c in report.top[:8]]}  # fmt: skip
    t0 = time.perf_counter()
    causal = causal_tree(model, dicts, (site, pick["feature"]), depth=len(cfg.sites) - 1, branching=cfg.branching,
                         contexts=cfg.tree_contexts, progress=progress)  # fmt: skip
    seconds = time.perf_counter() - t0
    files = render(causal, out / "tree" / "causal_tree")
    caption = (f"Causal tree of {site}:{pick['feature']} (the {pick['token']!r} feature) over "
               f"{causal.contexts} contexts where it is in [M/2, M], depth "
               f"{len(cfg.sites) - 1}, {cfg.branching} parents per node: each edge is the mean drop of the child's "
               f"activation when the parent is ablated (less than rank one); thicker is stronger. "
               f"{causal.number_of_nodes()} nodes, built in {seconds:.0f} s.")  # fmt: skip
    tree = {"caption": caption, "seconds": seconds, "nodes": causal.number_of_nodes(), **files}
    return feature, tree


def run_demo(config: "DemoConfig | None" = None, *, progress: bool = True, **overrides: Any) -> dict:
    """Run every step into ``config.out``; return the summary (also ``summary.json``, ``report.html``).

    The folder is locked against other writers for the whole run (each step's own lock nests inside) and probed
    before the model loads.
    """
    cfg = DemoConfig(**{**(asdict(config) if config else {}), **overrides})
    with lock_folder(cfg.out, "demo"):
        probe_folder(cfg.out)
        return _run_demo(cfg, progress)


def _run_demo(cfg: DemoConfig, progress: bool) -> dict:
    """:func:`run_demo` in its locked folder."""
    from circuitsae.data.harvest import HarvestConfig, harvest
    from circuitsae.models import dtype_name, input_device, load_model
    from circuitsae.training.evaluate import format_table
    from circuitsae.viz.report import write_report

    out = Path(cfg.out)
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    model = load_model(cfg.model, device=cfg.device, dtype=cfg.model_dtype)
    cfg.sites = cfg.sites or default_sites(model)
    hc = HarvestConfig(model=cfg.model, sites=cfg.sites, tokens=cfg.scaled(cfg.tokens),
                       out=str(out / "activations"), device=cfg.device)  # fmt: skip
    store = _timed(seconds, "harvest", harvest, hc, model=model)
    _timed(seconds, "train", _train, cfg, store, out, progress)
    ev = _timed(seconds, "evaluate", _evaluate, out, model, cfg.device, progress)
    if progress:
        print(format_table(ev))
    ioi = _timed(seconds, "ioi", _ioi, cfg, model, out, progress)
    feature, tree = _timed(seconds, "feature+tree", _feature_and_tree, cfg, model, out, progress)
    seconds["total"] = time.perf_counter() - t_all
    summary = {
        "model": store.config["model"],
        "model_dtype": dtype_name(model),
        "device": str(input_device(model)),
        "corpus": store.config["corpus"],
        "sites": list(cfg.sites),
        "scale": cfg.scale,
        "machine": f"{platform.node()} ({platform.machine()}, {platform.processor() or 'cpu'})",
        "train_tokens": store.n_rows("train"),
        "heldout_tokens": store.n_rows("heldout"),
        "seconds": seconds,
        "saes": {
            k: {m: getattr(v, m) for m in ("l0", "fvu", "gamma", "loss_recovered", "delta_ce", "dead_fraction")}
            for k, v in ev.results.items()
        },  # fmt: skip
        "ioi": ioi,
        "feature": feature,
        "tree": tree,
    }
    summary["files"] = {"summary": str(out / "summary.json"), "report": str(out / "report.html")}
    atomic_write(out / "summary.json", json.dumps(summary, indent=1, default=str).encode())
    write_report(summary, out / "report.html")
    return summary


def one_screen(summary: dict) -> str:
    """The final summary printed by ``circuitsae demo``."""
    s = summary
    best = {k: v for k, v in s["saes"].items() if "-c0" not in k}
    lines = [f"circuitsae demo on {s['model']}: {s['train_tokens']:,} tokens at {', '.join(s['sites'])}"]
    lines += [f"  {k:24s} L0 {v['l0']:6.1f}  FVU {v['fvu']:.3f}  loss recovered {v['loss_recovered']:.3f}"
              for k, v in best.items()]  # fmt: skip
    i = s["ioi"]
    lines.append(f"IOI at {i['site']}: logit diff {i['performance']['logit_diff']:.2f}, {i['finding']}")
    lines += [f"  {k['label']}: skipped ({k['reason']})" for k in i.get("skipped", [])]
    f = s["feature"]
    lines.append(f"feature {f['site']}:{f['feature']} fires on {f['token']!r} (precision {f['precision']:.2f})")
    lines.append(f"causal tree: {s['tree']['nodes']} nodes in {s['tree']['seconds']:.0f} s -> {s['tree'].get('svg')}")
    lines.append(f"wall time {s['seconds']['total'] / 60:.1f} min; report: {s['files']['report']}")
    return "\n".join(lines)


NAME = "demo"
HELP = "run the main job end to end on the embedded defaults"
DESCRIPTION = (
    "Harvest SmolLM2 activations on the embedded corpus; train baseline, Gated and α = 0 dictionaries; "
    "evaluate them; IOI feature patching with ACDC; one feature analysed and its causal tree drawn; "
    "report.html. Resumable: re-run the same command after an interruption."
)
EXAMPLES = (
    "examples:\n  circuitsae demo                                # the embedded defaults, ~30 min on 2 CPU cores\n"
    "  circuitsae demo --model gemma3-270m           # the same on Gemma 3 270M (resid.12-15)\n"
    "  circuitsae demo --scale 5 --ioi-dense-acdc --device cuda --model-dtype float32   # paper-sized, on a GPU"
)
Config = DemoConfig


def run(cfg: DemoConfig, *, model: Any = None, progress: bool = True) -> dict:
    """The command's work: :func:`run_demo` (it loads its own model)."""
    return run_demo(cfg, progress=progress)


show = one_screen
