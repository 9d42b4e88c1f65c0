# Sourced by the scripts: make or reuse .venv and install the project into it.
# A second run only compares a stamp, so it is fast.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
stamp="$venv/.installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    # The distribution was called "aioserver" before it became "aioserver-tcp"
    # (PyPI's "aioserver" is another project): remove that install, which would
    # otherwise stay beside the new one with the same command and pytest plugin.
    if "$venv/bin/python" -m pip show --quiet aioserver >/dev/null 2>&1; then
        "$venv/bin/python" -m pip uninstall --quiet --yes aioserver >/dev/null
    fi
    # The bench extra too: tests/test_bench.py runs the bench's peers (gevent, Twisted, trio).
    if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root[test,bench]"; then
        echo "scripts: installing into $venv failed" >&2
        exit 1
    fi
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
