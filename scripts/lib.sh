# shellcheck shell=bash
# Helpers shared by scripts/quickstart and scripts/test. Source it; don't run it.
#
# After sourcing, CAIRN_ROOT is the repository root and the caller's cwd is
# unchanged (callers cd there themselves).

CAIRN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
export CAIRN_ROOT

# System packages every build needs. RocksDB's Rust bindings run bindgen,
# which needs libclang; the C++ parts need a C++ compiler.
# shellcheck disable=SC2034 # used by the scripts that source this file
BUILD_PACKAGES=(build-essential pkg-config clang libclang-dev)

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# Run a command as root: directly when we are root, through sudo otherwise.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "need root to run: $* (run as root or install sudo)"
  fi
}

# True when the Debian package is installed (not merely known, or removed
# with its config files left behind).
package_installed() {
  dpkg -s "$1" 2>/dev/null | grep -q '^Status: install ok installed$'
}

# ensure_packages PKG...: install whichever of PKG are missing, with one
# `apt-get update && apt-get install`. Does nothing when all are present, so
# a warm machine never touches the network.
ensure_packages() {
  [ "$#" -gt 0 ] || return 0
  if ! command -v dpkg >/dev/null 2>&1; then
    warn "not a Debian-based system; make sure these are installed: $*"
    return 0
  fi
  local missing=() p
  for p in "$@"; do
    package_installed "$p" || missing+=("$p")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    return 0
  fi
  log "installing missing system packages: ${missing[*]}"
  # `env` carries the variable through sudo, which would otherwise drop it.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q ||
    die "apt-get update failed"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" ||
    die "apt-get install failed for: ${missing[*]}"
}

# Make sure the python3 on PATH can import each module; install the PyPI
# package of the same name for the ones it cannot. Debian's own python3
# refuses pip installs outside a venv (PEP 668), hence the flag there.
ensure_pip_modules() {
  [ "$#" -gt 0 ] || return 0
  command -v python3 >/dev/null 2>&1 || ensure_packages python3 python3-pip
  local missing=() m
  for m in "$@"; do
    python3 -c "import $m" >/dev/null 2>&1 || missing+=("$m")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  python3 -m pip --version >/dev/null 2>&1 || ensure_packages python3-pip
  log "installing missing Python modules: ${missing[*]}"
  python3 -m pip install -q "${missing[@]}" ||
    python3 -m pip install -q --break-system-packages "${missing[@]}" ||
    die "pip install failed for: ${missing[*]}"
}

# Make sure cargo is on PATH (rustup installs it in ~/.cargo/bin, which a
# non-login shell such as CI's may not have on PATH).
ensure_cargo() {
  if ! command -v cargo >/dev/null 2>&1 && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
    PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
    export PATH
  fi
  command -v cargo >/dev/null 2>&1 ||
    die "cargo not found: install the Rust toolchain (https://rustup.rs) first"
}

# Where cargo puts build output (honours CARGO_TARGET_DIR).
target_dir() {
  local t="${CARGO_TARGET_DIR:-$CAIRN_ROOT/target}"
  case "$t" in
    /*) printf '%s\n' "$t" ;;
    *) printf '%s\n' "$CAIRN_ROOT/$t" ;;
  esac
}

# Build the `cairn` binary (release) and print its path.
build_cli() {
  log "cargo build --release -p cairn-cli (the first build compiles RocksDB: several minutes on 2 cores)"
  (cd "$CAIRN_ROOT" && cargo build --release -p cairn-cli) >&2 ||
    die "build failed"
  local bin
  bin="$(target_dir)/release/cairn"
  [ -x "$bin" ] || die "build succeeded but $bin is missing"
  printf '%s\n' "$bin"
}
