#!/usr/bin/env bash
# localllm installer for Linux and macOS.
#
#   curl -fsSL <raw URL of this file> | bash            # install or upgrade
#   bash install.sh --uninstall [--purge]                # remove (--purge also deletes models and chats)
#
# It makes its own virtual environment, picks the engine build for this machine
# (NVIDIA GPU: llama.cpp with CUDA plus PyTorch for the native engine; Apple
# silicon: llama.cpp with Metal; otherwise CPU), and links `localllm` into
# ~/.local/bin. Running it again upgrades in place.
set -euo pipefail

APP_DIR="${LOCALLLM_APP_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/localllm-app}"
BIN_DIR="${LOCALLLM_BIN_DIR:-$HOME/.local/bin}"
SOURCE="${LOCALLLM_SOURCE:-localllm}"   # a package name, a wheel, or a source checkout
PYTHON="${LOCALLLM_PYTHON:-python3}"
LLAMA_CPP_VERSION="0.3.36"
MODE="install"
ACCEL=""
DRY_RUN=0
PURGE=0

say() { printf 'localllm: %s\n' "$*"; }
die() { printf 'localllm: error: %s\n' "$*" >&2; exit 1; }

usage() {
    cat <<'EOF'
usage: install.sh [--cpu | --cuda | --metal] [--dry-run]
       install.sh --uninstall [--purge]

  --cpu / --cuda / --metal   force the engine build instead of detecting it
  --dry-run                  print what would be done, change nothing
  --uninstall                remove the app and the `localllm` link
  --purge                    with --uninstall: also delete downloaded models and chats

Environment: LOCALLLM_SOURCE (what to install: package name, wheel or checkout),
LOCALLLM_APP_DIR, LOCALLLM_BIN_DIR, LOCALLLM_PYTHON.
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) ACCEL="cpu" ;;
        --cuda) ACCEL="cuda" ;;
        --metal) ACCEL="metal" ;;
        --dry-run) DRY_RUN=1 ;;
        --uninstall) MODE="uninstall" ;;
        --purge) PURGE=1 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
done

run() {
    if [ "$DRY_RUN" -eq 1 ]; then
        printf 'would run:'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

detect_accelerator() {
    if [ -n "$ACCEL" ]; then
        printf '%s' "$ACCEL"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        printf 'cuda'
    elif [ "$(uname -s)" = "Darwin" ] && [ "$(uname -m)" = "arm64" ]; then
        printf 'metal'
    else
        printf 'cpu'
    fi
}

check_python() {
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; install Python 3.11 or newer"
    "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
        || die "Python 3.11 or newer is needed ($PYTHON is $("$PYTHON" -V 2>&1))"
    "$PYTHON" -c 'import venv' 2>/dev/null || die "Python's venv module is missing (Debian/Ubuntu: apt install python3-venv)"
}

install_app() {
    local accel venv pip extras
    accel="$(detect_accelerator)"
    venv="$APP_DIR/venv"
    pip="$venv/bin/pip"
    check_python
    say "installing into $APP_DIR for $accel"
    run mkdir -p "$APP_DIR" "$BIN_DIR"
    if [ ! -x "$venv/bin/python" ]; then
        run "$PYTHON" -m venv "$venv"
    fi
    run "$pip" install --upgrade pip
    extras="starter,chat"
    case "$accel" in
        cuda)
            # Build llama.cpp for CUDA. The wheel cache would hand back a CPU build, so skip it here.
            run env CMAKE_ARGS="-DGGML_CUDA=on" "$pip" install --no-cache-dir --force-reinstall \
                "llama-cpp-python==$LLAMA_CPP_VERSION"
            extras="starter,chat,native"   # the native engine: PyTorch with CUDA
            ;;
        metal)
            run env CMAKE_ARGS="-DGGML_METAL=on" "$pip" install "llama-cpp-python==$LLAMA_CPP_VERSION"
            ;;
        cpu)
            run "$pip" install "llama-cpp-python==$LLAMA_CPP_VERSION"
            ;;
        *) die "unknown accelerator: $accel" ;;
    esac
    run "$pip" install --upgrade "${SOURCE}[${extras}]"
    run ln -sf "$venv/bin/localllm" "$BIN_DIR/localllm"
    say "installed: $BIN_DIR/localllm"
    case ":$PATH:" in
        *":$BIN_DIR:"*) ;;
        *) say "add $BIN_DIR to your PATH, e.g.: echo 'export PATH=\"$BIN_DIR:\$PATH\"' >> ~/.profile" ;;
    esac
    say "start chatting: localllm chat"
}

uninstall_app() {
    local data
    data="${LOCALLLM_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/localllm}"
    if [ -L "$BIN_DIR/localllm" ]; then
        run rm -f "$BIN_DIR/localllm"
    fi
    if [ -d "$APP_DIR" ]; then
        run rm -rf "$APP_DIR"
    fi
    if [ "$PURGE" -eq 1 ]; then
        run rm -rf "$data"
        say "removed the app, models and chats"
    else
        say "removed the app; models and chats stay in $data (--purge deletes them)"
    fi
}

if [ "$MODE" = "uninstall" ]; then
    uninstall_app
else
    install_app
fi
