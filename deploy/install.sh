#!/bin/sh
# Install the feed into a fresh virtual environment at $1, from the current directory (a source
# tree, or the Docker build stage's copy of one). The Dockerfile runs this script, and so does
# .ci/verify-dockerfile-steps.sh, so the image's install steps are tested where no Docker runs.
set -eu
venv="${1:?usage: deploy/install.sh VENV_DIR}"
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
# constraints.txt: the exact versions `make lock` recorded, the same ones `make setup` and CI use.
"$venv/bin/pip" install --no-cache-dir --disable-pip-version-check --quiet --quiet \
  -c constraints.txt '.[jwt]'

# Fail the build, not the first start, when something is missing. (-I: import the installed
# package, not the source tree in the current directory.)
"$venv/bin/feed" --version
"$venv/bin/python" -I - <<'PY'
from pathlib import Path

import feed.app.http
from connectors.postgres_migrate import load_migrations

names = [m.name for m in load_migrations()]
assert names, "no migrations found beside the installed connectors package"
index = Path(feed.app.http.DASHBOARD_DIR) / "index.html"
assert index.is_file(), f"the dashboard was not built into the package ({index} is missing)"
print(f"migrations: {', '.join(names)}; dashboard: {index.parent}")
PY
