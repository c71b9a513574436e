#!/usr/bin/env bash
# Fetches the wheels scripts/gpu_session.sh installs on a lent device machine, into ./.whl (which
# .git/info/exclude must ignore; the device call carries it). The device image has torch,
# transformers, numpy, scikit-learn and matplotlib, but not diffusers or the HTTP server's packages.
# Versions follow this machine's .venv, for Python 3.12 on x86-64.
set -eu
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude || echo "/.whl/" >>.git/info/exclude
mkdir -p .whl
for pkg in diffusers importlib_metadata opentelemetry-api fastapi starlette pydantic pydantic_core annotated-types \
    typing-inspection uvicorn; do
    version=$(.venv/bin/pip show "$pkg" | awk '/^Version/{print $2}')
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$pkg==$version"
done
ls .whl
