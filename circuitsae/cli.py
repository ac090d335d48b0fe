"""The ``circuitsae`` command line.

Every sub-command's flags come from the same config dataclass as the Python
API. A usage mistake or bad input prints one line, ``circuitsae: error: ...``,
and exits with status 2; Ctrl-C exits with 130 and says how to resume.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from circuitsae import distributed
from circuitsae.config import add_arguments, from_arguments
from circuitsae.errors import CircuitSAEError
from circuitsae.harvest import HarvestConfig

EXAMPLES = {
    "harvest": "examples:\n  circuitsae harvest --sites resid.3 resid.4 --tokens 200000 --out runs/acts\n"
    "  circuitsae harvest --model tiny-llama --corpus my_texts/ --tokens 5000 --out /tmp/acts",
    "train": "examples:\n  circuitsae train --store runs/acts --arch relu gated --out runs/saes\n"
    "  circuitsae train --store runs/acts --sites resid.4 --arch gated --coefficients 1 2 4 8 --expansion 4",
    "eval": "examples:\n  circuitsae eval runs/saes                      # every SAE in a training folder\n"
    "  circuitsae eval runs/saes/resid.4-gated-c2 --contexts 64 --out eval.json",
    "ioi": "examples:\n  circuitsae ioi runs/saes                       # every dictionary in a training folder, + PCA\n"
    "  circuitsae ioi runs/saes/resid.16-relu-c1 runs/saes/resid.16-relu-c0 --prompts 50 --out runs/ioi",
    "feature": "examples:\n  circuitsae feature resid.4:123 --dictionaries runs/saes --arch gated --out runs/feature\n"
    "  circuitsae feature resid.4:123 --dictionaries runs/saes/resid.4-relu-c1 --contexts 20 --split heldout",
    "tree": "examples:\n  circuitsae tree resid.5:123 --dictionaries runs/saes --arch relu --depth 3 --out runs/tree/paren\n"
    "  circuitsae tree resid.5:123 --dictionaries runs/saes/resid.3-relu-c1 runs/saes/resid.4-relu-c1 "
    "runs/saes/resid.5-relu-c1 --branching 2 --contexts 10",
    "convert": "examples:\n  circuitsae convert runs/saes/resid.4-relu-c1 /tmp/sae-lens --to saelens\n"
    "  circuitsae convert my_saelens_sae runs/imported --to circuitsae     # SAE Lens, dictionary_learning, sparsify\n"
    "  circuitsae convert runs/saes/resid.4-gated-c2 /tmp/gated-as-jumprelu --to saelens --architecture jumprelu",
    "demo": "examples:\n  circuitsae demo                                # the embedded defaults, ~30 min on 2 CPU cores\n"
    "  circuitsae demo --model gemma3-270m           # the same on Gemma 3 270M (resid.12-15)\n"
    "  circuitsae demo --scale 5 --ioi-dense-acdc --device cuda --model-dtype float32   # paper-sized, on a GPU",
}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CircuitSAEError(f"{message} (see {self.prog} --help)")


def _cmd_harvest(args: argparse.Namespace) -> None:
    from circuitsae.harvest import harvest

    store = harvest(from_arguments(HarvestConfig, args))
    if distributed.current().main:
        print(store)


def _cmd_train(args: argparse.Namespace) -> None:
    from circuitsae.train import TrainConfig, train

    cfg = from_arguments(TrainConfig, args)
    saved = train(cfg)
    world = distributed.current()
    if world.active and not saved and not world.main and cfg.parallel == "data":
        return  # rank 0 saves and reports
    if not saved:
        print(f"stopped after {cfg.stop_after} steps; re-run the same command to continue")
        return
    for name, sae in saved.items():
        m = sae.meta["metrics"]
        print(
            f"{name}: L0 {m.get('l0', float('nan')):.1f}, FVU {m.get('fvu', float('nan')):.3f}, "
            f"gamma {m.get('gamma', float('nan')):.3f} -> {cfg.out}/{name}"
        )
    print(f"next: circuitsae eval {cfg.out}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from circuitsae.evaluate import EvalConfig, evaluate, format_table

    args.dictionaries = args.paths
    report = evaluate(from_arguments(EvalConfig, args))
    print(format_table(report["results"]))
    print(f"wrote {report['path']}")


def _cmd_ioi(args: argparse.Namespace) -> None:
    from circuitsae.ioi_curves import IOIConfig, run_ioi

    args.dictionaries = args.paths
    report = run_ioi(from_arguments(IOIConfig, args))
    ioi = report["ioi"]
    print(f"IOI on {report['prompts']} prompts: logit diff {ioi['logit_diff']:.2f}, accuracy {ioi['accuracy']:.2f}")
    for r in report["results"]:
        last = r["start"]["all"]
        print(f"{r['site']} {r['label']:28s} {r['method']:11s} candidates {r['n_candidates']:5d}  "
              f"KL all {last['kl']:.3g}  {r['seconds']:.0f} s")  # fmt: skip
    print(f"wrote {report['path']} and kl_vs_patches.png ({report['seconds']:.0f} s)")


@contextlib.contextmanager
def _one_line_warnings() -> Any:
    """Print each warning raised inside as one line, ``circuitsae: warning: ...``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            yield
        finally:
            for w in caught:
                print(f"circuitsae: warning: {w.message}", file=sys.stderr)


def _cmd_feature(args: argparse.Namespace) -> None:
    from circuitsae.features import FeatureConfig, run_feature

    with _one_line_warnings():
        report = run_feature(from_arguments(FeatureConfig, args))
    print(report.summary())
    print("wrote " + ", ".join(report.paths.values()))


def _cmd_tree(args: argparse.Namespace) -> None:
    from circuitsae.trees import TreeConfig, run_tree

    with _one_line_warnings():
        graph, paths = run_tree(from_arguments(TreeConfig, args))
    a = graph.graph
    print(
        f"causal tree of {a['target']}: {graph.number_of_nodes()} features, {graph.number_of_edges()} edges, "
        f"{a['contexts']} contexts, {a['seconds']:.1f} s"
    )
    for u, v, e in sorted(graph.edges(data=True), key=lambda t: -t[2]["effect"])[:10]:
        print(f"  {u:>14s} -> {v:<14s} effect {e['effect']:.3g}  {graph.nodes[u].get('label', '')}")
    print("wrote " + ", ".join(paths.values()))


def _cmd_demo(args: argparse.Namespace) -> None:
    from circuitsae.demo import DemoConfig, one_screen, run_demo

    summary = run_demo(from_arguments(DemoConfig, args))
    print(one_screen(summary))


def _cmd_convert(args: argparse.Namespace) -> None:
    from circuitsae.dictionaries.formats import ConvertConfig, convert

    out, d = convert(from_arguments(ConvertConfig, args))
    arch = json.loads((out / "cfg.json").read_text())["architecture"]  # as written (a Gated SAE may be a jumprelu)
    where = f", site {d.meta['site']}" if d.meta.get("site") else ""
    print(f"wrote {out} ({args.to} {arch}, d={d.d}, d_dict={d.d_dict}{where})")


def _add(
    sub: Any, name: str, help_: str, description: str, func: Any, cls: "type | None" = None
) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help=help_,
        description=description,
        epilog=EXAMPLES[name],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if cls is not None:
        add_arguments(p, cls)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``circuitsae`` parser: one sub-command per step, flags generated from each config dataclass."""
    from circuitsae.demo import DemoConfig
    from circuitsae.dictionaries.formats import ConvertConfig
    from circuitsae.evaluate import EvalConfig
    from circuitsae.features import FeatureConfig
    from circuitsae.ioi_curves import IOIConfig
    from circuitsae.train import TrainConfig
    from circuitsae.trees import TreeConfig

    parser = _Parser(
        prog="circuitsae",
        description="Sparse-autoencoder circuits on real language models.",
        epilog="a typical session (each command resumes if interrupted; COMMAND --help for its flags):\n"
        "  circuitsae harvest --sites resid.3 resid.4 --tokens 200000 --out runs/acts\n"
        "  circuitsae train --store runs/acts --arch relu gated --out runs/saes\n"
        "  circuitsae eval runs/saes\n"
        "  circuitsae ioi runs/saes --prompts 20 --out runs/ioi\n"
        "  circuitsae feature resid.4:123 --dictionaries runs/saes --arch relu\n"
        "  circuitsae tree resid.4:123 --dictionaries runs/saes --arch relu --depth 1\n"
        "  circuitsae demo                  # all of it on the embedded defaults, with report.html",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add(
        sub,
        "harvest",
        "record site activations over a corpus into a store",
        "Run the model through nnsight over a corpus and store the activations of one or more sites (resumable).",
        _cmd_harvest,
        HarvestConfig,
    )
    _add(
        sub,
        "train",
        "train baseline and/or Gated SAEs on a store, many in one pass",
        "Train every (site, architecture, coefficient) combination in one pass over the store; "
        "checkpointed and resumable.",
        _cmd_train,
        TrainConfig,
    )
    e = _add(
        sub,
        "eval",
        "L0, FVU, gamma, loss recovered of saved dictionaries",
        "Evaluate saved dictionaries on held-out data: reconstruction metrics, and loss recovered "
        "with each spliced into the model. Prints a table and writes JSON.",
        _cmd_eval,
        EvalConfig,
    )
    e.add_argument("paths", nargs="+", metavar="DICTIONARY", help="dictionary folders or training output folders")
    i = _add(
        sub,
        "ioi",
        "IOI feature patching with ACDC ordering: KL curves vs PCA and alpha=0",
        "Patch dictionary features from counterfactual IOI prompts into base prompts, order them by ACDC "
        "(and attribution), and plot KL against features patched and edit magnitude (Cunningham et al. Fig. 3).",
        _cmd_ioi,
        IOIConfig,
    )
    i.add_argument("paths", nargs="+", metavar="DICTIONARY", help="dictionary folders or training output folders")
    f = _add(
        sub,
        "feature",
        "what one dictionary feature reads and writes: contexts, histogram, logit effect",
        "Top and random contexts of a feature, its token histogram by activation range, the next-token "
        "log-probs its ablation moves and the tokens its direction unembeds to (Cunningham et al. Fig. 4).",
        _cmd_feature,
        FeatureConfig,
    )
    f.add_argument("target", metavar="SITE:ID", help="the feature, e.g. resid.4:123")
    t = _add(
        sub,
        "tree",
        "causal tree of a feature by ablation, drawn as DOT/SVG/PNG/JSON",
        "Ablate each active feature of the previous site's dictionary and measure the target's decrease; keep "
        "the strongest parents and recurse (Cunningham et al. §5.3, Fig. 5).",
        _cmd_tree,
        TreeConfig,
    )
    t.add_argument("target", metavar="SITE:ID", help="the target feature, e.g. resid.5:123")
    c = _add(
        sub,
        "convert",
        "read a dictionary in any format; write it as circuitsae or SAE Lens",
        "Read a circuitsae, SAE Lens, dictionary_learning or sparsify folder and write it to a new folder in "
        "circuitsae's or SAE Lens's (v6) format. Settings that cannot be read exactly are refused by name.",
        _cmd_convert,
        ConvertConfig,
    )
    c.add_argument("source", metavar="IN", help="the dictionary folder to read")
    c.add_argument("out", metavar="OUT", help="the folder to write (new or empty: never overwritten)")
    _add(
        sub,
        "demo",
        "run the main job end to end on the embedded defaults",
        "Harvest SmolLM2 activations on the embedded corpus; train baseline, Gated and α = 0 dictionaries; "
        "evaluate them; IOI feature patching with ACDC; one feature analysed and its causal tree drawn; "
        "report.html. Resumable: re-run the same command after an interruption.",
        _cmd_demo,
        DemoConfig,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return 0, 2 on a usage error or bad input (one line on stderr), 130 on Ctrl-C."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 2
        try:
            args.func(args)
        finally:
            distributed.shutdown()
    except CircuitSAEError as e:
        print(f"circuitsae: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("circuitsae: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


__all__ = ["main", "build_parser"]
