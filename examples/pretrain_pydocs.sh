#!/usr/bin/env bash
# Pre-train a small GPT from scratch on the Python 3.11 documentation (Debian's python3.11-doc: ~500 reST
# sources, 12 MB of text), on this CPU, in about 15 minutes of training:
#   tokenizer (byte-level BPE, 8192) -> lmforge data prepare -> lmforge pretrain (small-gpt: 6 x 384, block 256)
# Everything lands in runs/pydocs/ (override with OUT=...); rerunning resumes where it stopped.
#   bash examples/pretrain_pydocs.sh            # or: make example-pretrain
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/pydocs}
STEPS=${STEPS:-800}
SRC=/usr/share/doc/python3.11/html/_sources
LMFORGE=${LMFORGE:-.venv/bin/lmforge}

if [ ! -d "$SRC" ]; then
    if [ "$(id -u)" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3.11-doc >/dev/null
    else
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3.11-doc >/dev/null
    fi
fi
mkdir -p "$OUT"
[ -f "$OUT/tokenizer/tokenizer.json" ] || "$LMFORGE" tokenizer train --files "$SRC" --kind bpe --vocab-size 8192 \
    --out "$OUT/tokenizer"
# reST files are one document each; a 2% validation split by document
"$LMFORGE" data prepare "$SRC" --tokenizer "$OUT/tokenizer" --out "$OUT/data" --val-fraction 0.02
RESUME=()
[ -f "$OUT/run/run.json" ] && RESUME=(--resume)
"$LMFORGE" pretrain --data "$OUT/data" --out "$OUT/run" --preset small-gpt --steps "$STEPS" --batch-size 8 \
    --lr 1e-3 --eval-every 100 --save-every 100 --sample-prompt "The list" --sample-tokens 40 "${RESUME[@]}"
"$LMFORGE" generate --model "$OUT/run" -t 0.7 --seed 0 --max-new-tokens 60 "The list"
