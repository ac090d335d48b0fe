"""Every number a user gives is checked before work starts: one line, exit 2, nothing written.

The cases are those a careless user hit before the checks existed (a NaN learning rate, an expansion that
asks for terabytes, a negative step count that did nothing and said nothing); each must now be refused at
the edge, before a store is opened or a tensor allocated.
"""

import math

import pytest
import torch

from circuitsae import CircuitSAEError
from circuitsae.commands.cli import main
from circuitsae.config import validate
from circuitsae.data.harvest import HarvestConfig
from circuitsae.data.store import store_from_tensors
from circuitsae.memory import MemoryPlan, format_bytes, parse_size
from circuitsae.training.config import TrainConfig
from circuitsae.training.runs import memory_plan


@pytest.fixture(scope="module")
def small_store(random_store):
    return random_store("acts", 2048, 256, 16)


def _one_line(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("circuitsae: error:") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--arch", "topk", "--coefficients", "nan"], "coefficients must be a finite number, got nan"),
        (["--arch", "relu", "--coefficients", "nan"], "coefficients must be a finite number, got nan"),
        (["--arch", "topk", "--arch-coefficients", "topk=inf"], "each coefficient must be a finite number"),
        (["--arch", "topk", "--coefficients", "2.5"], "a whole number >= 1, not 2.5"),
        (["--expansion", "nan"], "expansion must be a finite number"),
        (["--expansion", "1e10"], "expansion must be <= 4096"),
        (["--expansion", "0"], "expansion must be > 0"),
        (["--lr", "nan"], "lr must be a finite number"),
        (["--lr", "-1"], "lr must be > 0"),
        (["--stop-after", "-1"], "stop_after must be >= 1, got -1"),
        (["--stop-after", "0"], "stop_after must be >= 1, got 0"),
        (["--resample-every", "-5"], "resample_every must be >= 0 (or -1), got -5"),
        (["--eval-rows", "-1"], "eval_rows must be >= 1, got -1"),
        (["--lr-warmup", "inf"], "lr_warmup must be a finite number"),
        (["--coef-warmup", "1.5"], "coef_warmup must be <= 1"),
        (["--batch-size", "0"], "batch_size must be >= 1"),
        (["--seed", "-3"], "seed must be >= 0"),
    ],
)
def test_train_numbers_refused_before_the_store_is_opened(capsys, tmp_path, flags, match):
    out = tmp_path / "saes"
    err = _one_line(capsys, ["train", "--store", str(tmp_path / "no-store"), "--out", str(out), *flags])
    assert match in err
    assert not out.exists()  # refused before anything was written (the store does not even exist)


def test_resample_every_minus_one_means_never():
    assert TrainConfig(resample_every=-1).resample_every == -1


def test_numbers_from_the_api_are_checked_and_normalised():
    cfg = TrainConfig(batch_size=512.0, expansion=4, coefficients=[1, 2])
    assert cfg.batch_size == 512 and type(cfg.batch_size) is int
    assert cfg.expansion == 4.0 and type(cfg.expansion) is float and cfg.coefficients == (1.0, 2.0)
    for bad, match in [
        (dict(batch_size="512"), "batch_size must be a whole number, got '512'"),
        (dict(batch_size=True), "batch_size must be a whole number, got True"),
        (dict(batch_size=0.5), "batch_size must be a whole number, got 0.5"),
        (dict(tied="yes"), "tied must be true or false"),
        (dict(parallel="both"), "parallel must be one of data, runs"),
        (dict(out=None), "out needs a value"),
        (dict(coefficients=5), "coefficients must be a list of values"),
    ]:
        with pytest.raises(CircuitSAEError, match=match):
            TrainConfig(**bad)
    assert HarvestConfig(sites="resid.3").sites == ("resid.3",)  # one site given as a string, not its characters


def test_every_config_calls_validate():
    """A NaN in any numeric field of any command's config is refused (no config skips the checks)."""
    import dataclasses
    import typing

    from circuitsae.commands.cli import command_modules
    from circuitsae.config import _base_type

    for module in command_modules():
        cls = module.Config
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, _, seq = _base_type(hints[f.name])
            if tp is not float:
                continue
            value = (math.nan,) if seq else math.nan
            with pytest.raises(CircuitSAEError, match=f"{f.name} must be a finite number"):
                cls(**{f.name: value})


def test_memory_plan_refuses_in_one_line_before_allocating(small_store, tmp_path, monkeypatch, capsys):
    cfg = TrainConfig(store=str(small_store), out=str(tmp_path / "o"), arch=("relu",), expansion=4096)
    plan = memory_plan(cfg, 16, [("resid.0", "relu", 1.0)], 1, 256)
    d_dict = 4096 * 16
    # W_enc and W_dec [d_dict, d], b_enc [d_dict], b_dec [d]: counted exactly from a meta-device build
    assert dict(plan.items)["weights"] == 4 * (2 * d_dict * 16 + d_dict + 16)
    monkeypatch.setenv("CIRCUITSAE_MEMORY_LIMIT", "64M")
    err = _one_line(
        capsys,
        [
            "train",
            "--store",
            str(small_store),
            "--out",
            str(tmp_path / "o"),
            "--arch",
            "relu",
            "--expansion",
            "4096",
            "--batch-size",
            "256",
        ],  # fmt: skip
    )
    assert "training 1 SAE on 1 site(s) of width 16 would need" in err and "more than the 64 MiB" in err
    assert not list((tmp_path / "o").glob("checkpoint*.pt"))


def test_memory_helpers():
    assert parse_size("8G") == 8 << 30 and parse_size("512M") == 512 << 20 and parse_size("1.5GiB") == 3 << 29
    assert parse_size("1000") == 1000 and format_bytes(3 << 29) == "1.5 GiB" and format_bytes(12) == "12 B"
    for bad in ("lots", "-1G", "0", "nanG"):
        with pytest.raises(CircuitSAEError, match="memory size"):
            parse_size(bad)
    plan = MemoryPlan("a job").add("weights", 3 << 30).add("batches", 1 << 30)
    assert plan.total == 4 << 30 and plan.describe() == "weights 3 GiB + batches 1 GiB = 4 GiB"
    plan.check("cpu", override="5G")
    with pytest.raises(CircuitSAEError, match=r"a job would need 4 GiB of memory \(weights 3 GiB, batches 1 GiB\)"):
        plan.check("cpu", override="2G")


def test_a_store_without_heldout_rows_trains_and_says_so(tmp_path, capsys):
    store_from_tensors(tmp_path / "acts", {"resid.0": torch.randn(1024, 64)})
    argv = ["--store", str(tmp_path / "acts"), "--out", str(tmp_path / "saes"), "--arch", "relu", "--batch-size", "128"]
    assert main(["train", *argv]) == 0
    out = capsys.readouterr().out
    assert "no held-out rows in the store, so no held-out metrics" in out and "nan" not in out.lower()
    err = _one_line(capsys, ["eval", str(tmp_path / "saes"), "--model", "tiny-llama"])
    assert "has no held-out rows" in err


def test_harvest_sizes_refused_before_tokenising(tiny_llama, tmp_path, capsys, text_corpus):
    out = tmp_path / "acts"
    base = ["harvest", "--model", "tiny-llama", "--corpus", str(text_corpus), "--out", str(out)]
    err = _one_line(capsys, [*base, "--ctx-len", str(1 << 19), "--batch-size", "1024"])
    assert "harvesting 1 site(s)" in err and "would need" in err
    err = _one_line(capsys, [*base, "--heldout-fraction", "0"])
    assert "heldout_fraction must be > 0" in err
    err = _one_line(capsys, [*base, "--tokens", "nan"])
    assert "tokens must be a finite number, got nan" in err


def test_validate_accepts_special_values_and_sequences():
    import dataclasses

    from circuitsae.config import option

    @dataclasses.dataclass
    class C:
        n: int = option(0, "a count", min=0, max=10, special=(-1,))
        xs: tuple[float, ...] = option((), "some numbers", above=0)

        def __post_init__(self):
            validate(self)

    assert C(n=-1).n == -1 and C(xs=[1, 2.5]).xs == (1.0, 2.5)
    with pytest.raises(CircuitSAEError, match=r"n must be <= 10, got 11"):
        C(n=11)
    with pytest.raises(CircuitSAEError, match=r"xs must be > 0, got 0"):
        C(xs=(1, 0))


def test_a_dictionary_finds_its_store_from_any_working_directory(tmp_path, monkeypatch, capsys):
    """The store is recorded relative to the dictionary's folder (with its fingerprint), not to where training ran."""
    import json

    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    g = torch.Generator().manual_seed(0)
    store_from_tensors(
        "acts",
        {"resid.0": torch.randn(1024, 64, generator=g)},
        {"resid.0": torch.randn(128, 64, generator=g)},
        model="tiny-llama",
    )
    argv = ["--store", "acts", "--out", "saes", "--arch", "relu", "--batch-size", "128"]
    assert main(["train", *argv]) == 0
    cfg = json.loads((work / "saes" / "resid.0-relu-c1" / "cfg.json").read_text())
    assert cfg["store"] == "../../acts" and len(cfg["store_fingerprint"]) == 16
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    dictionary = str(work / "saes" / "resid.0-relu-c1")
    assert main(["eval", dictionary, "--model", "tiny-llama", "--contexts", "2", "--out", "e.json"]) == 0
    assert f"held-out data from store {work / 'acts'}" in capsys.readouterr().out
    # another store at the same path is not the one the dictionary was trained on
    import shutil

    shutil.rmtree(work / "acts")
    store_from_tensors(
        work / "acts", {"resid.0": torch.randn(1024, 64)}, {"resid.0": torch.randn(128, 64)}, model="tiny-llama"
    )
    err = _one_line(capsys, ["eval", dictionary, "--model", "tiny-llama", "--out", "e.json"])
    assert "is not the one" in err and "fingerprint" in err
    shutil.rmtree(work / "acts")
    err = _one_line(capsys, ["eval", dictionary, "--model", "tiny-llama", "--out", "e.json"])
    assert "was trained on store ../../acts, which is not at" in err and "pass --store" in err
