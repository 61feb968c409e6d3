# Sourced by bin/demo and bin/test: make sure what they need is on this machine, then the
# project's virtual environment. Debian packages are installed with apt-get when running as root;
# otherwise one line says what to install, and the script stops.

PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
APT_UPDATED=

# need_debian "what is missing" PACKAGE... — install PACKAGEs (root) or say what to run (not root)
need_debian() {
    local what=$1; shift
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        echo "$0: installing $* (missing: $what)" >&2
        export DEBIAN_FRONTEND=noninteractive
        [[ -n $APT_UPDATED ]] || { apt-get update -qq && APT_UPDATED=1; }
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    else
        echo "$0: missing $what; install with: sudo apt-get install $*" >&2
        exit 1
    fi
}

# need_python — a Python 3.11 that can make virtual environments (Debian: python3.11-venv)
need_python() {
    if ! command -v "$PYTHON" >/dev/null; then
        need_debian "$PYTHON" python3.11 python3.11-venv ca-certificates
    fi
    if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
        need_debian "$PYTHON's venv module" python3.11-venv
    fi
}

# need_test_tools — what the tests run besides Python: a real Prometheus and promtool, systemd's
# unit checker, a C compiler with libzmq and msgpack-c for the C client, and ip for network namespaces.
need_test_tools() {
    local missing=() packages=()
    command -v promtool >/dev/null && command -v prometheus >/dev/null || { missing+=(prometheus); packages+=(prometheus); }
    command -v systemd-analyze >/dev/null || { missing+=(systemd-analyze); packages+=(systemd); }
    command -v cc >/dev/null && command -v make >/dev/null || { missing+=("a C compiler"); packages+=(build-essential); }
    command -v pkg-config >/dev/null || { missing+=(pkg-config); packages+=(pkg-config); }
    pkg-config --exists libzmq 2>/dev/null || { missing+=("libzmq headers"); packages+=(libzmq3-dev); }
    [[ -f /usr/include/msgpack.h ]] || { missing+=("msgpack-c headers"); packages+=(libmsgpack-dev); }
    command -v ip >/dev/null || { missing+=(ip); packages+=(iproute2); }
    command -v git >/dev/null || { missing+=(git); packages+=(git); }  # the wheel test builds from the files git knows
    command -v mount >/dev/null || { missing+=(mount); packages+=(mount); }
    if (( ${#packages[@]} )); then
        local list
        list=$(printf ', %s' "${missing[@]}")
        need_debian "${list:2}" "${packages[@]}"
    fi
}

# need_venv — .venv with torch (the CPU build; see TORCH_INDEX_URL below) and this project, editable.
# Redone when pyproject.toml changes.
need_venv() {
    local stamp=$VENV/.installed
    [[ -f $stamp && $stamp -nt pyproject.toml ]] && return
    need_python
    echo "$0: installing the project into $VENV (first time: about a minute)" >&2
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    # torch first and pinned: an unpinned resolve pulls a multi-GB CUDA build. Where no CPU wheel
    # is at hand (pip's find-links), TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu picks it.
    "$VENV/bin/pip" install --quiet torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
    "$VENV/bin/pip" install --quiet -e '.[test]'
    touch "$stamp"
}
