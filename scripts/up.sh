#!/usr/bin/env bash
# Start the whole marketplace on this machine with embedded PostgreSQL and NATS:
#   scripts/up.sh [--data-dir DIR] [--port 8080] [--node sim|vllm] [--model PATH]
set -euo pipefail
cd "$(dirname "$0")/.."
case " $* " in
    *" --node vllm "*|*" --node=vllm "*) scripts/bootstrap.sh full ;;
    *) scripts/bootstrap.sh server ;;
esac
# shellcheck disable=SC1091
. .venv/bin/activate
exec market up "$@"
