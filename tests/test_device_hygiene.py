"""Static checks of the device discipline: every tensor factory in the hot modules names its device, and every
checkpoint is read onto the CPU first.

A factory without ``device=`` makes a CPU tensor, which is right for bookkeeping and wrong the moment it meets
GPU activations; the bug only shows on a GPU. Writing ``device="cpu"`` for bookkeeping makes the choice visible,
and this test makes forgetting it fail on any machine.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "circuitsae"
#: modules whose tensors meet activations, logits or weights on the model's device
HOT = [
    "interventions/splice.py", "interventions/patching.py", "interventions/replay.py", "circuits/acdc.py",
    "circuits/trees.py", "circuits/features.py", "training/evaluate.py", "data/harvest.py", "training/trainer.py",
    "training/runs.py", "training/resampling.py", "metrics.py", "data/store.py", "tasks/ioi.py", "dictionaries/fused.py",
]  # fmt: skip
FACTORIES = {"arange", "zeros", "ones", "full", "empty", "tensor", "eye", "linspace", "randn", "rand", "randint",
             "randperm"}  # fmt: skip


def _torch_calls(tree: ast.AST, names: set[str]) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "torch"
        and node.func.attr in names
    ]


def _keyword(call: ast.Call, name: str) -> "ast.expr | None":
    return next((k.value for k in call.keywords if k.arg == name), None)


@pytest.mark.parametrize("module", HOT)
def test_tensor_factories_name_their_device(module):
    tree = ast.parse((PACKAGE / module).read_text())
    missing = [
        f"{module}:{c.lineno} torch.{c.func.attr}" for c in _torch_calls(tree, FACTORIES) if not _keyword(c, "device")
    ]
    assert not missing, "factories without device= (write device='cpu' for CPU bookkeeping): " + ", ".join(missing)


def test_checkpoints_are_read_onto_the_cpu():
    found = []
    for path in PACKAGE.rglob("*.py"):
        for call in _torch_calls(ast.parse(path.read_text()), {"load"}):
            where = _keyword(call, "map_location")
            ok = isinstance(where, ast.Constant) and where.value == "cpu"
            found.append((f"{path.relative_to(PACKAGE)}:{call.lineno}", ok))
    assert found, "no torch.load found: the check would be vacuous"
    bad = [w for w, ok in found if not ok]
    assert not bad, f"torch.load without map_location='cpu': {bad}"


def test_the_check_catches_a_factory_without_device():
    tree = ast.parse("import torch\nx = torch.arange(3)\ny = torch.zeros(2, device=x.device)\n")
    calls = _torch_calls(tree, FACTORIES)
    assert [c.func.attr for c in calls if not _keyword(c, "device")] == ["arange"]
