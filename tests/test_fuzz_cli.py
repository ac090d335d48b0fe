"""Property-based fuzzing of every numeric option of every command (hypothesis).

Each drawn value — huge, negative, zero, NaN, inf, a fraction where a count is due, text — must end in a
config that was built or in a :class:`~circuitsae.errors.CircuitSAEError` of one line; never another exception.
Training, where sizes become tensors, also runs end to end on a tiny store under a memory limit: it trains or
refuses in one line, and never allocates past the limit.

``CIRCUITSAE_FUZZ_EXAMPLES`` sets the examples per property (small by default, so ``make test`` stays fast;
``benchmarks/fuzz.py`` runs it deeper); ``CIRCUITSAE_FUZZ_REPORT`` names a JSONL file to which every example's
outcome is appended.
"""

import dataclasses
import json
import os
import resource
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuitsae import CircuitSAEError
from circuitsae.commands.cli import build_parser, command_modules, main
from circuitsae.config import _base_type, from_arguments

EXAMPLES = int(os.environ.get("CIRCUITSAE_FUZZ_EXAMPLES", "25"))
REPORT = os.environ.get("CIRCUITSAE_FUZZ_REPORT")
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _record(suite: str, case: str, outcome: str, message: str = "") -> None:
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(json.dumps({"suite": suite, "case": case, "outcome": outcome, "message": message[:200]}) + "\n")


def _numeric_options() -> list[tuple[str, str, bool]]:
    """(command, --flag, sequence?) of every int or float option of every command."""
    found = []
    for module in command_modules():
        hints = typing.get_type_hints(module.Config)
        for f in dataclasses.fields(module.Config):
            tp, _, seq = _base_type(hints[f.name])
            if tp in (int, float) and not f.metadata.get("positional") and f.metadata.get("cli") is not False:
                found.append((module.NAME, "--" + f.name.replace("_", "-"), seq))
    return found


OPTIONS = _numeric_options()
#: the positional arguments each command needs before its flags can be parsed
POSITIONAL = {"eval": ["d"], "ioi": ["d"], "feature": ["resid.0:1"], "tree": ["resid.0:1"], "convert": ["a", "b"]}
NEEDS = {"feature": ["--dictionaries", "d"], "tree": ["--dictionaries", "d"], "circuit": ["--dictionaries", "d"],
         "convert": ["--to", "circuitsae"]}  # fmt: skip

values = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "-0", "0", "1e308", "1e-320", "0x10", "", "1_000", "one", "1e3", "-1"]),
)


def test_every_numeric_option_is_fuzzed():
    names = {(c, f) for c, f, _ in OPTIONS}
    assert ("train", "--expansion") in names and ("harvest", "--tokens") in names and len(OPTIONS) >= 30


@FUZZ
@given(option=st.sampled_from(OPTIONS), value=values, second=values)
def test_numeric_options_parse_to_a_config_or_one_line(option, value, second):
    command, flag, seq = option
    argv = [command, *POSITIONAL.get(command, []), *NEEDS.get(command, []), flag, value]
    if seq:
        argv.append(second)
    case = f"{command} {flag}"
    try:
        args = build_parser().parse_args(argv)
        from_arguments(args.module.Config, args)
    except CircuitSAEError as e:
        assert "\n" not in str(e), str(e)
        _record("cli", case, "refused", str(e))
        return
    _record("cli", case, "accepted", " ".join(argv))


@pytest.fixture(scope="module")
def tiny_store(random_store):
    return random_store("fuzz", 512, 64, 16)


TRAIN_SIZES = [o for o in OPTIONS if o[0] == "train"]
LIMIT_BYTES = 1 << 30


@FUZZ
@given(option=st.sampled_from(TRAIN_SIZES), value=values, second=values)
def test_training_trains_or_refuses_and_stays_under_the_memory_limit(
    option, value, second, tiny_store, tmp_path_factory, monkeypatch, capsys
):
    """End to end on a tiny store (two steps at most): a run either finishes or is refused in one line."""
    _, flag, seq = option
    monkeypatch.setenv("CIRCUITSAE_MEMORY_LIMIT", str(LIMIT_BYTES))
    out = tmp_path_factory.mktemp("o")
    base = ["train", "--store", str(tiny_store), "--out", str(out), "--arch", "relu", "topk", "--batch-size", "64"]
    base += ["--stop-after", "2", "--expansion", "2", "--coefficients", "4"]
    argv = [*base, flag, value] + ([second] if seq else [])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    code = main(argv)
    err = capsys.readouterr().err.strip()
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert code in (0, 2), err
    if code == 2:  # the progress bar may come first, on stderr too: the error is the last line, and one line
        last = err.splitlines()[-1]
        assert "Traceback" not in err and last.split("\r")[-1].startswith("circuitsae: error:"), err
        assert err.count("circuitsae: error:") == 1, err
        err = last
    assert grew < LIMIT_BYTES, f"peak memory grew by {grew / 2**20:.0f} MiB for {' '.join(argv)}"
    _record("train", f"train {flag}", "refused" if code else "trained", err if code else " ".join(argv[len(base) :]))
