#!/usr/bin/env bash
# codecstream: the one entry point. Installs what is missing (system packages as root, the
# .venv, the Python packages), then serves or tests. See README.md.
#
#   ./codecstream.sh serve [codec-server args]   install runtime + client deps, start the server
#   ./codecstream.sh test [pytest args]          install everything, run ruff, mypy and pytest
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$ROOT"
# shellcheck source=scripts/install.sh
source "$ROOT/scripts/install.sh"

usage() {
  sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# Packages type-checked strictly (see [tool.mypy] in pyproject.toml); one without any .py file
# yet is skipped, since mypy refuses an empty directory.
MYPY_TARGETS=(streaming server client)

mypy_targets() {
  local dir
  for dir in "${MYPY_TARGETS[@]}"; do
    if [ -n "$(find "$dir" -name '*.py' -print -quit 2>/dev/null)" ]; then
      printf '%s\n' "$dir"
    else
      say "mypy: skipping $dir/ (no Python files yet)" >&2
    fi
  done
}

# check NAME CMD...: run one check, remember whether it failed, keep going.
FAILED=()
check() {
  local name=$1
  shift
  say "== $name"
  if ! "$@"; then
    FAILED+=("$name")
  fi
}

cmd_serve() {
  setup client
  say "starting codec-server $*"
  exec "$VENV_DIR/bin/codec-server" "$@"
}

cmd_test() {
  setup client,train,dev
  local py="$VENV_DIR/bin/python" targets
  mapfile -t targets < <(mypy_targets)
  check "ruff check ." "$py" -m ruff check .
  check "mypy ${targets[*]}" "$py" -m mypy "${targets[@]}"
  check "pytest -q $*" "$py" -m pytest -q "$@"
  if [ "${#FAILED[@]}" -gt 0 ]; then
    die "failed: ${FAILED[*]}"
  fi
  say "all checks passed"
}

main() {
  local cmd=${1:-help}
  shift || true
  case "$cmd" in
    serve) cmd_serve "$@" ;;
    test) cmd_test "$@" ;;
    help | -h | --help) usage ;;
    *)
      usage >&2
      die "unknown command '$cmd'"
      ;;
  esac
}

main "$@"
