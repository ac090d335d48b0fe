import json
import os
import subprocess
import sys

import pytest

from circuitsae.commands.cli import main
from circuitsae.training.evaluate import Evaluation, format_table


def _err(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["harvest", "--model", "no-such-model", "--out", "{tmp}/o"], "cannot load model 'no-such-model'"),
        (["harvest", "--model", "tiny-llama", "--sites", "resid.9", "--out", "{tmp}/o"], "out of range"),
        (["harvest", "--model", "tiny-llama", "--sites", "layer3", "--out", "{tmp}/o"], "unknown site"),
        (["harvest", "--model", "tiny-llama", "--corpus", "{tmp}/empty", "--out", "{tmp}/o"], "holds no text"),
        (["harvest", "--model", "tiny-llama", "--tokens", "0", "--out", "{tmp}/o"], "tokens must be >= 1, got 0"),
        (["harvest", "--model", "tiny-llama", "--tokens", "-5", "--out", "{tmp}/o"], "tokens must be >= 1, got -5"),
        (["harvest", "--model", "tiny-llama", "--tokens", "many"], "is not a whole number"),
        (
            ["harvest", "--model", "tiny-llama", "--tokens", "100", "--out", "{tmp}/file/sub"],
            "cannot write to output folder",
        ),
        (["harvest", "--bogus"], "unrecognized arguments"),
        (["harvest", "--model-dtype", "float8"], "invalid choice: 'float8'"),
        (["harvest", "--model", "tiny-llama", "--device", "tpu", "--out", "{tmp}/o"], "unknown device 'tpu'"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_llama, capsys, tmp_path, argv, match):
    # tiny_llama: the one-time model conversion (with its own progress bar) is done before
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("a file, not a folder")
    code, err = _err(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    assert err.startswith("circuitsae: error:") and match in err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err


def test_harvest_cli_writes_a_store(capsys, tmp_path, text_corpus):
    code = main(
        [
            "harvest",
            "--model",
            "tiny-gpt2",
            "--sites",
            "resid.0",
            "mlp.1",
            "--tokens",
            "300",
            "--ctx-len",
            "16",
            "--corpus",
            str(text_corpus),
            "--heldout-fraction",
            "0.25",
            "--out",
            str(tmp_path / "o"),
            "--dtype",
            "bfloat16",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "ActivationStore(" in out and "tiny-gpt2" in out and "dtype=bfloat16" in out
    assert (tmp_path / "o" / "meta.json").is_file()


def test_entry_point_help_and_error_exit_code():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    help_ = subprocess.run(
        [sys.executable, "-m", "circuitsae", "harvest", "--help"], capture_output=True, text=True, env=env
    )
    assert help_.returncode == 0
    for flag in ("--model", "--sites", "--tokens", "--out", "--corpus", "--dtype", "examples:"):
        assert flag in help_.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "circuitsae", "harvest", "--sites", "nope"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "unknown site" in bad.stderr


def test_ctrl_c_exits_130_and_says_how_to_resume(capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("circuitsae.commands.harvest.harvest", interrupted)
    assert main(["harvest", "--model", "tiny-llama"]) == 130
    assert "re-run the same command to resume" in capsys.readouterr().err


def test_harvest_train_eval_cli(capsys, tmp_path, text_corpus, tiny_llama):
    acts, saes = str(tmp_path / "acts"), str(tmp_path / "saes")
    assert (
        main(
            [
                "harvest",
                "--model",
                "tiny-llama",
                "--sites",
                "resid.1",
                "resid.2",
                "--tokens",
                "2000",
                "--ctx-len",
                "32",
                "--corpus",
                str(text_corpus),
                "--out",
                acts,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--store",
                acts,
                "--out",
                saes,
                "--arch",
                "relu",
                "gated",
                "--coefficients",
                "0.5",
                "--sites",
                "resid.2",
                "--expansion",
                "2",
                "--batch-size",
                "128",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "resid.2-relu-c0.5: L0" in out and "resid.2-gated-c0.5" in out and f"circuitsae eval {saes}" in out
    assert main(["eval", saes, "--contexts", "4", "--rows", "500"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:5] == ["name", "l0", "fvu", "gamma", "loss_recovered"]
    assert sum(line.startswith("resid.2-") for line in out.splitlines()) == 2
    report = json.loads((tmp_path / "saes" / "eval.json").read_text())
    for r in report["results"].values():
        assert r["ce_zero"] > 0 and r["ce_clean"] > 0 and r["contexts"] == 4 and 0 <= r["dead_fraction"] <= 1
    ev = Evaluation.read(tmp_path / "saes" / "eval.json")  # the file is the typed result's JSON, key for key
    assert json.dumps(ev.to_json(), indent=1) == (tmp_path / "saes" / "eval.json").read_text()
    assert format_table(ev) == format_table(report["results"]) and format_table(ev) in out
    # IOI curves from the same SAEs, with the PCA baseline fitted on their store
    curves = tmp_path / "ioi"
    argv = ["ioi", saes, "--prompts", "4", "--thresholds", "5", "--no-attribution", "--out", str(curves)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "IOI on 4 prompts" in out and "wrote" in out
    report = json.loads((curves / "kl_vs_patches.json").read_text())
    labels = {r["label"] for r in report["results"]}
    assert labels == {"baseline α=0.5 (R=2)", "gated λ=0.5 (R=2)", "PCA"}
    for r in report["results"]:
        assert len(r["records"]) == 5 and r["n_candidates"] > 0 and r["seconds"] > 0
    assert (curves / "kl_vs_patches.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "--store", "{tmp}/none"], "not an activation store"),
        (["train", "--arch", "wavelet"], "unknown architecture"),
        (["train", "--coefficients", "-1"], "coefficients must be >= 0"),
        (["eval", "{tmp}"], "neither a saved dictionary nor a folder of them"),
        (["eval"], "the following arguments are required: DICTIONARY"),
        (["ioi", "{tmp}"], "neither a saved dictionary nor a folder of them"),
        (["ioi", "x", "--engine", "warp"], "argument --engine: invalid choice"),
    ],
)
def test_train_and_eval_bad_input(capsys, tmp_path, argv, match):
    code, err = _err(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2 and match in err and len(err.splitlines()) == 1, err
