#!/usr/bin/env bash
# The Dockerfile's install steps, replayed without Docker in a scratch directory, then a smoke
# test of the result (see .ci/verify_dockerfile_steps.py). Needs python3 (3.11+), make and npm.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 .ci/verify_dockerfile_steps.py "$@"
