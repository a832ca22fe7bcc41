# Sourced by scripts/serve and scripts/test: make ./.venv usable, install torch then lipcert.
#
#   lipcert_venv [EXTRAS]   EXTRAS: "" (serve) or "dev" (tests)
#
# Idempotent and quick on a second run: torch is installed only when the pinned version is
# missing, and lipcert only when pyproject.toml or the checkout path changed (a stamp file in
# .venv records both). Set TORCH_INDEX_URL to pick a wheel index for torch, e.g.
# https://download.pytorch.org/whl/cpu for the small CPU-only wheel.

TORCH_VERSION="2.13.0"
VENV=".venv"
VPY="$VENV/bin/python"

_say() { printf '==> %s\n' "$*" >&2; }

_as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        _say "need root for: $*"; return 1
    fi
}

# apt-get install PACKAGES, running `apt-get update` only when the first try fails.
lipcert_apt_install() {
    command -v apt-get >/dev/null || { _say "apt-get not found; install $* by hand"; return 1; }
    export DEBIAN_FRONTEND=noninteractive
    _as_root apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 || {
        _as_root apt-get update -q >/dev/null &&
            _as_root apt-get install -y -q --no-install-recommends "$@" >/dev/null
    }
}

_find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null || continue
        if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    _say "lipcert needs Python >= 3.11 (set PYTHON=/path/to/python3.11)"
    return 1
}

# A venv is usable when its python runs and its sys.prefix is this checkout's .venv
# (a copied or cloned .venv keeps stale absolute paths in its scripts; we never run those).
_venv_ok() {
    [ -x "$VPY" ] && "$VPY" - "$VENV" <<'PY' 2>/dev/null
import os, sys
sys.exit(os.path.realpath(sys.prefix) != os.path.realpath(sys.argv[1]))
PY
}

_make_venv() {
    local py
    py="$(_find_python)" || return 1
    _say "creating $VENV with $py"
    rm -rf "$VENV"
    if ! "$py" -m venv "$VENV" 2>/dev/null; then
        # Debian's python3 ships venv/ensurepip separately.
        local minor
        minor="$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
        lipcert_apt_install "python${minor}-venv" || lipcert_apt_install python3-venv
        rm -rf "$VENV"
        "$py" -m venv "$VENV"
    fi
}

# Run "$@" (a long pip install), saying every 30 s that it is still at WHAT, so that a first
# install (a few minutes, mostly downloads) never looks like a hang.
_with_heartbeat() {
    local what="$1"
    shift
    "$@" &
    local pid=$! waited=0
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        waited=$((waited + 1))
        if [ $((waited % 30)) -eq 0 ] && kill -0 "$pid" 2>/dev/null; then
            _say "still $what (${waited} s)"
        fi
    done
    wait "$pid"
}

_torch_version() {
    "$VPY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true
}

lipcert_venv() {
    local extras="${1:-}"
    _venv_ok || _make_venv
    local pip=("$VPY" -m pip install -q)

    # 1. torch first, pinned, so the resolver never pulls another (multi-GB) build.
    local have
    have="$(_torch_version)"
    if [ "${have%%+*}" != "$TORCH_VERSION" ]; then
        _say "installing torch==$TORCH_VERSION into $VENV (first run only; can take minutes)"
        if [ -n "${TORCH_INDEX_URL:-}" ]; then
            _with_heartbeat "installing torch" \
                "${pip[@]}" "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
        else
            _with_heartbeat "installing torch" "${pip[@]}" "torch==$TORCH_VERSION"
        fi
    fi

    # 2. lipcert itself (editable), with EXTRAS; skipped when the stamp says it is current.
    # A dev install also satisfies a plain one.
    local spec="." digest stamp
    [ -n "$extras" ] && spec=".[$extras]"
    digest="$(pwd -P) $(sha256sum pyproject.toml | cut -d' ' -f1)"
    stamp="$VENV/.lipcert-stamp-${extras:-base}"
    if [ "$(cat "$stamp" 2>/dev/null)" = "$digest" ] ||
        { [ -z "$extras" ] && [ "$(cat "$VENV/.lipcert-stamp-dev" 2>/dev/null)" = "$digest" ]; }; then
        return 0
    fi
    _say "installing lipcert ($spec, editable) and its dependencies (first run: a few minutes)"
    _with_heartbeat "installing lipcert's dependencies" "${pip[@]}" -e "$spec"
    echo "$digest" >"$stamp"
}
