#!/usr/bin/env bash
# The Daft contender's own venv, .venv-daft at the repo root: Daft 0.7.26 needs pyarrow<26 (the project pins
# >=26), so it runs under the versions it supports, with the project's torch and torchvision. Ray is the
# project's 2.60, for the `daft_ray` contender only: Daft's `ray` extra says <2.60, but the plain `daft`
# requirement does not, so pip installs both without a conflict (and the Ray runner ran on it, 2026-11-29).
#
#     bench/daft-venv.sh            # idempotent: a venv built with these pins is left as it is
#
# DAFT_WHEELS: a folder holding the Daft wheel if the index lacks it (default /tmp/dl2).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-daft"
pins="daft==0.7.26 pyarrow==25.0.1 torch==2.14.1 torchvision==0.29.1 numpy pillow ray[data]==2.60.0"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"

if [[ -f "$venv/.pins" && "$(cat "$venv/.pins")" == "$pins" ]] && "$venv/bin/python" -c "import daft, torch" 2>/dev/null; then
  echo "$venv is up to date ($pins)"
  exit 0
fi
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
# shellcheck disable=SC2086
"$venv/bin/pip" install --quiet --find-links "${DAFT_WHEELS:-/tmp/dl2}" $pins
echo "$pins" > "$venv/.pins"
"$venv/bin/python" -c "import daft, pyarrow, ray, torch; print('$venv: daft', daft.__version__, 'pyarrow', pyarrow.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"
