# shellcheck shell=bash
# Install helpers for codecstream.sh (sourced, not run). Every step is idempotent:
# system packages are installed only when missing, the virtual environment is created only
# when absent, and pip runs only when pyproject.toml or the requested extras changed.

APT_PACKAGES=(libportaudio2 libopus0 libsndfile1 pulseaudio libasound2-plugins sox)
VENV_DIR="${CODECSTREAM_VENV:-.venv}"
STAMP_FILE="$VENV_DIR/.codecstream-install-stamp"
INSTALL_LOG="$VENV_DIR/.codecstream-install.log"

say() { printf '[codecstream] %s\n' "$*"; }
die() { printf '[codecstream] error: %s\n' "$*" >&2; exit 1; }

# run_logged LOG CMD...: run CMD with its output in LOG; on failure show the log's tail.
run_logged() {
  local log=$1
  shift
  if ! "$@" >"$log" 2>&1; then
    printf '[codecstream] command failed: %s\n--- last lines of %s ---\n' "$*" "$log" >&2
    tail -n 40 "$log" >&2
    return 1
  fi
}

is_installed_deb() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

python_can_venv() {
  command -v python3 >/dev/null 2>&1 && python3 -c 'import ensurepip, venv' >/dev/null 2>&1
}

missing_apt_packages() {
  local pkg
  for pkg in "${APT_PACKAGES[@]}"; do
    is_installed_deb "$pkg" || printf '%s\n' "$pkg"
  done
  python_can_venv || printf '%s\n' python3 python3-venv
}

# root_cmd: prints the prefix that runs a command as root ("" or "sudo"); fails without one.
root_cmd() {
  if [ "$(id -u)" -eq 0 ]; then
    printf ''
  elif command -v sudo >/dev/null 2>&1; then
    printf 'sudo'
  else
    return 1
  fi
}

install_system_packages() {
  if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    say "no apt-get here: skipping system packages (${APT_PACKAGES[*]} are expected)"
    return 0
  fi
  local missing
  missing=$(missing_apt_packages | sort -u | tr '\n' ' ')
  if [ -z "${missing// /}" ]; then
    say "system packages: all present"
    return 0
  fi
  local sudo log
  sudo=$(root_cmd) || die "missing system packages: ${missing}- run as root, or: apt-get install ${missing}"
  say "system packages: installing ${missing}"
  log=$(mktemp)
  # shellcheck disable=SC2086  # $sudo and $missing are deliberately word-split
  if ! run_logged "$log" $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q \
    || ! run_logged "$log" $sudo env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -q --no-install-recommends $missing; then
    die "apt-get failed (see above)"
  fi
  rm -f "$log"
  say "system packages: done"
}

ensure_venv() {
  if [ -x "$VENV_DIR/bin/python" ]; then
    return 0
  fi
  python_can_venv || die "python3 with the venv module is required (apt-get install python3-venv)"
  say "creating virtual environment $VENV_DIR ($(python3 --version 2>&1))"
  python3 -m venv "$VENV_DIR" || die "python3 -m venv $VENV_DIR failed"
}

# stamp_for EXTRAS: what the stamp file holds after installing EXTRAS with this pyproject.toml.
stamp_for() {
  printf '%s %s\n' "$(sha256sum pyproject.toml | cut -d' ' -f1)" "$1"
}

# stamp_covers EXTRAS: true when the last install used this pyproject.toml and a superset of
# EXTRAS (a comma-separated list).
stamp_covers() {
  [ -f "$STAMP_FILE" ] || return 1
  local hash stamped wanted extra
  read -r hash stamped <"$STAMP_FILE" || return 1
  [ "$hash" = "$(sha256sum pyproject.toml | cut -d' ' -f1)" ] || return 1
  IFS=, read -r -a wanted <<<"$1"
  for extra in "${wanted[@]}"; do
    [[ ",$stamped," == *",$extra,"* ]] || return 1
  done
}

# install_python_packages EXTRAS: editable install of the project with EXTRAS (e.g. client,dev).
install_python_packages() {
  local extras=$1
  if stamp_covers "$extras"; then
    say "python packages: up to date (.[$extras])"
    return 0
  fi
  rm -f "$STAMP_FILE"
  say "python packages: installing .[$extras] into $VENV_DIR (log: $INSTALL_LOG)"
  run_logged "$INSTALL_LOG" "$VENV_DIR/bin/python" -m pip install --no-input \
    --disable-pip-version-check -e ".[$extras]" \
    || die "pip install failed (full log: $INSTALL_LOG)"
  stamp_for "$extras" >"$STAMP_FILE"
  say "python packages: done"
}

# setup EXTRAS: everything a fresh Debian machine needs to run the project with EXTRAS.
setup() {
  install_system_packages
  ensure_venv
  install_python_packages "$1"
}
