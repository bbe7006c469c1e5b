#!/usr/bin/env bash
# Few-shot prompting on SmolLM2-135M-Instruct (the default model, int4): a yes/no sentiment question it answers
# with a sentence zero-shot (so `exact` fails) and with the bare word once it has seen three answered shots.
# Reproduces the table in the README; the chart goes to docs/eval-compare.png. About 5 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
E=examples/eval
COMMON=(--data $E/test.jsonl --limit 40 --max-new-tokens 16 --format json)

echo "zero-shot:";       lmforge eval "${COMMON[@]}" --template $E/templates/question.jinja
echo "3-shot first:";    lmforge eval "${COMMON[@]}" --template $E/templates/question.jinja --pool $E/pool.jsonl --shots 3 --select first
echo "3-shot similar:";  lmforge eval "${COMMON[@]}" --template $E/templates/question.jinja --pool $E/pool.jsonl --shots 3 --select similar

lmforge eval compare --data $E/test.jsonl --limit 40 --max-new-tokens 16 --pool $E/pool.jsonl \
  --variant zero-shot:template=$E/templates/question.jinja \
  --variant question:template=$E/templates/question.jinja,shots=3,select=similar \
  --variant labelled:template=$E/templates/labelled.jinja,shots=3,select=similar \
  --variant system:template=$E/templates/system.jinja,shots=3,select=similar \
  --png docs/eval-compare.png
