#!/usr/bin/env bash
# The second suite (`make test-corpus`): the tests that read real documents made by others (SROIE receipt scans with
# their labels, a PDF renderer's edge-case files). They are not in the repository (licences): the corpus folder comes
# from PIXTRACT_CORPUS (the folder holding receipts-sroie/ and pdf-edge-cases/) or ../shared/corpus beside the
# checkout. Missing, this fails and says what is missing; `make test` needs nothing beside the checkout.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
corpus=${PIXTRACT_CORPUS:-$root/../shared/corpus}
missing=()
for sub in receipts-sroie pdf-edge-cases; do
  [ -d "$corpus/$sub" ] || missing+=("$corpus/$sub")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "test-corpus: the corpus is missing: ${missing[*]}" >&2
  echo "test-corpus: set PIXTRACT_CORPUS to the folder holding receipts-sroie/ and pdf-edge-cases/" >&2
  exit 1
fi
export PIXTRACT_CORPUS="$corpus"
scripts/setup.sh
# Test names that read the corpus contain "corpus"; `make test` runs every other test.
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast -E 'test(/corpus/)' "$@"
else
  cargo test --no-fail-fast corpus "$@"
fi
