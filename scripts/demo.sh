#!/usr/bin/env bash
# The main job on the built-in demo: synthetic receipts and invoices (plus the SROIE receipt scans when
# ../shared/corpus is there) -> pages -> tiny seeded Pixtral, constrained by schemas/receipt.json -> Parquet in
# out/demo/parquet, then a table of the rows read back with DuckDB and the accuracy against the samples' ground
# truth (`pixtract eval`).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# The demo needs no storage emulator (those are for the tests): no npm needed.
PIXTRACT_SETUP_EMULATORS=0 scripts/setup.sh
cargo build --quiet --bin pixtract
px=target/debug/pixtract
echo
echo "== pixtract doctor"
$px doctor
echo
echo "== sample documents"
.venv/bin/python scripts/make_samples.py out/demo/inputs
# Born-digital PDFs (real text, not images) with where every value is printed: the run grounds their answers.
.venv/bin/python scripts/make_samples.py out/demo/digital --digital
mkdir -p out/demo/inputs/digital
cp -f out/demo/digital/*.pdf out/demo/inputs/digital/
corpus=../shared/corpus/receipts-sroie
if [ -d "$corpus" ]; then
  # A few real scans nobody here made, beside the synthetic ones.
  for f in 000 001 002; do cp -f "$corpus/$f.jpg" "out/demo/inputs/sroie_$f.jpg"; done
fi
# A second run over the same output would skip every document (already done): the demo starts afresh.
rm -rf out/demo/parquet
echo
echo "== pixtract run pipelines/demo.toml"
set +e
$px run pipelines/demo.toml
code=$?
set -e
# 0: all rows ok; 2: some rows are errors (the tiny random model can run out of tokens): both are a finished run.
if [ "$code" != 0 ] && [ "$code" != 2 ]; then exit "$code"; fi
echo
echo "== rows read back from Parquet (DuckDB)"
.venv/bin/python - <<'PY'
import duckdb
rows = duckdb.sql("""
  SELECT regexp_replace(source_uri, '.*/', '') AS document, page_start AS page, status,
         left(coalesce(merchant_name, ''), 24) AS merchant_name, total, len(items) AS items,
         round(_confidence.total.min, 3) AS total_conf, generated_tokens AS tokens,
         left(coalesce(error, ''), 40) AS error
  FROM read_parquet('out/demo/parquet/**/*.parquet', hive_partitioning = true)
  ORDER BY document, page""")
rows.show(max_width=200)
PY
echo "(the tiny model has random weights: values are noise, but typed, schema-valid and traceable to their pages)"
echo
echo "== pixtract eval: the output against the samples' ground truth (out/demo/inputs/ground_truth.json)"
$px eval --predictions out/demo/parquet --labels out/demo/inputs/ground_truth.json
echo "(random weights, so accuracy near 0 is the expected result: the same command on a real model's output is"
echo " how you measure it; see docs/eval.md)"
echo
echo "== grounding: where a value is printed on a born-digital page (pixtract locate)"
$px locate out/demo/digital/digital_mueller_rechnung.pdf --value invoice_total=4261.39 \
  --value invoice_date=2024-03-07 --value vendor_name="Müller & Söhne GmbH" --value "items[0].unit_price=115.5" \
  --value "items[0].description=Beratung (Stunden)" || true
echo "(found in the page's own notation: 4.261,39 and 07.03.2024; the run writes the same into _location / _grounded)"
echo
echo "== pixtract review: the values to check, boxed on their pages"
$px review out/demo/parquet --out out/demo/review.html --max-rows 10
echo "(the tiny model's noise is not printed on any page: every answer of a born-digital page is listed as ungrounded)"
