#!/usr/bin/env bash
# Create the peer-library virtual environments used by benchmarks/train_throughput.py
# and benchmarks/interop.py.
#
#   benchmarks/.venv-saelens    torch==2.13.0 (CPU wheel) + sae-lens==6.54.12
#   benchmarks/.venv-dictlearn  torch==2.13.0 (CPU wheel) + dictionary-learning==0.1.0
#   benchmarks/.venv-sparsify   torch==2.13.0 (CPU wheel) + eai-sparsify==1.3.3 (interop only)
#
# torch is installed first and then held at 2.13.0 with a constraints file, so
# neither peer can drag in a newer CUDA build. Idempotent: a venv holding the
# stamp file .setup-complete is left alone (delete the venv, or pass --force,
# to rebuild). A failed dictionary-learning or sparsify install is reported, the
# venv gets a .setup-failed marker (and no .setup-complete), and the script still
# exits 0.
#
# Environment: PYTHON (interpreter for the venvs, default python3).
set -u -o pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BENCH="$(dirname "$HERE")"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
SAELENS_PIN="sae-lens==6.54.12"
DICTLEARN_PIN="dictionary-learning==0.1.0"
SPARSIFY_PIN="eai-sparsify==1.3.3"
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

log() { printf '[peers/setup] %s\n' "$*" >&2; }

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "$TORCH_PIN" > "$CONSTRAINTS"

# build_venv NAME PEER_PIN IMPORT_CHECK
build_venv() {
    local name="$1" pin="$2" check="$3"
    local venv="$BENCH/.venv-$name"
    local stamp="$venv/.setup-complete"
    local want="$TORCH_PIN $pin"

    if [[ $FORCE -eq 0 && -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/python" ]]; then
        log "$name: already complete ($want), skipping"
        return 0
    fi

    log "$name: building $venv ($want)"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv" || { log "$name: venv creation failed"; return 1; }
    local pip=("$venv/bin/python" -m pip install --disable-pip-version-check)

    # 1. torch first: exactly 2.13.0, the CPU wheel from the find-links folder.
    "${pip[@]}" "$TORCH_PIN" || { log "$name: torch install failed"; return 1; }
    # 2. the peer, torch held at 2.13.0 by the constraints file.
    "${pip[@]}" -c "$CONSTRAINTS" "$pin" numpy || { log "$name: $pin install failed"; return 1; }
    # 3. PyPI has no CPU build of torchvision: the wheel pulled in as a dependency
    #    (nnsight 0.3.7 -> torchvision) links against CUDA torch and breaks
    #    `import transformers` on a CPU torch. Nothing on the SAE training path uses
    #    it, so a torchvision that cannot be imported is removed.
    if "$venv/bin/python" -m pip show -q torchvision >/dev/null 2>&1; then
        if ! "$venv/bin/python" -c "import torchvision" >/dev/null 2>&1; then
            log "$name: removing torchvision (CUDA-only wheel, does not load on CPU torch)"
            "$venv/bin/python" -m pip uninstall -y -q torchvision || return 1
        fi
    fi
    # 4. sanity: torch not replaced, peer importable, dependency set consistent.
    "$venv/bin/python" - <<PY || { log "$name: post-install check failed"; return 1; }
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
$check
print("torch", torch.__version__, "ok")
PY
    "$venv/bin/python" -m pip check >&2 || log "$name: pip check reports conflicts (see above); continuing"
    echo "$want" > "$stamp"
    rm -f "$venv/.setup-failed"
    log "$name: done"
}

build_venv saelens "$SAELENS_PIN" \
    "from sae_lens.saes.standard_sae import StandardTrainingSAE; from sae_lens.saes.gated_sae import GatedTrainingSAE" \
    || { log "saelens: FAILED"; status_saelens=1; }

if ! build_venv dictlearn "$DICTLEARN_PIN" \
    "from dictionary_learning.trainers import StandardTrainer, GatedSAETrainer"; then
    log "dictlearn: FAILED to install cleanly; the dictionary_learning peer will be skipped"
    mkdir -p "$BENCH/.venv-dictlearn"
    rm -f "$BENCH/.venv-dictlearn/.setup-complete"
    echo "failed $(date -u +%FT%TZ)" > "$BENCH/.venv-dictlearn/.setup-failed"
fi

if ! build_venv sparsify "$SPARSIFY_PIN" \
    "from sparsify import SparseCoder, SaeConfig"; then
    log "sparsify: FAILED to install cleanly; the sparsify peer will be skipped"
    mkdir -p "$BENCH/.venv-sparsify"
    rm -f "$BENCH/.venv-sparsify/.setup-complete"
    echo "failed $(date -u +%FT%TZ)" > "$BENCH/.venv-sparsify/.setup-failed"
fi

if [[ "${status_saelens:-0}" -ne 0 ]]; then
    rm -f "$BENCH/.venv-saelens/.setup-complete"
    mkdir -p "$BENCH/.venv-saelens"
    echo "failed $(date -u +%FT%TZ)" > "$BENCH/.venv-saelens/.setup-failed"
    exit 1   # sae-lens is expected to install here; a failure is an error
fi
exit 0
