#!/usr/bin/env bash
# The XLDA ablation of the Trillion report in one command: the same model, data, steps and seeds
# trained four times, changing only the attention masking -
#   xlda-pair      --attention-masking xlda --xlda-block-scope pair
#   xlda-sequence  --attention-masking xlda --xlda-block-scope sequence
#   document       --attention-masking document   (a block per document)
#   none           --attention-masking none       (classic packing)
# each with ABLATION_SEEDS seeds (default 3: seed ABLATION_SEED, +1, +2); then each model is
# exported to Hugging Face and evaluated; one table shows per-language validation loss and the
# cross-lingual consistency metrics (report section 7.1), as mean +- std over the seeds.
#
# Defaults: a tiny model on the generated sample corpus (CPU is enough), which also states facts
# about ABLATION_FACTS made-up people, each fact in English or in Korean only; the probe asks
# about the facts told only in ABLATION_SOURCE_LANGUAGE, in it (recall) and in
# ABLATION_TARGET_LANGUAGE (transfer). At your own scale, set
#   ABLATION_DATA_PATH="0.7 en:/data/web_en_text_document 0.3 /data/web_ko_text_document"
#   ABLATION_VALID_DATA_PATH="/data/valid_en_text_document /data/valid_ko_text_document"
#   ABLATION_TOKENIZER=/data/tokenizer  ABLATION_PARALLEL_DATA=/data/global_mmlu_en_ko.jsonl
#   (with ABLATION_DATA_PATH, ABLATION_PARALLEL_DATA is required: the facts probe is about the
#   generated corpus only)
#   ABLATION_PRESET=tri-7b ABLATION_SEQ_LENGTH=4096 ABLATION_ITERS=... ABLATION_NPROC=8
#   ABLATION_EXTRA_ARGS="--bf16 --tensor-model-parallel-size 2 ..."
# ABLATION_RUNS="xlda-pair none" runs a subset (tools/xlda_ablation_table.py tabulates any run
# directories: runs made by separate invocations on the same data can share one table).
# Everything lands in $ABLATION_OUT (default ablation_out/); the table also goes to
# $ABLATION_OUT/table.md.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${ABLATION_OUT:-ablation_out}"
PRESET="${ABLATION_PRESET:-tiny-tri-7b}"
SEQ="${ABLATION_SEQ_LENGTH:-256}"
ITERS="${ABLATION_ITERS:-60}"
MBS="${ABLATION_MICRO_BATCH_SIZE:-2}"
GBS="${ABLATION_GLOBAL_BATCH_SIZE:-8}"
LR="${ABLATION_LR:-3e-3}"
WARMUP="${ABLATION_WARMUP_ITERS:-5}"
NPROC="${ABLATION_NPROC:-1}"
DOCS="${ABLATION_DOCS_PER_LANG:-100}"
VOCAB="${ABLATION_VOCAB_SIZE:-2048}"
FACTS="${ABLATION_FACTS:-40}"
MENTIONS="${ABLATION_FACT_MENTIONS:-12}"
SOURCE_LANG="${ABLATION_SOURCE_LANGUAGE:-en}"
TARGET_LANG="${ABLATION_TARGET_LANGUAGE:-ko}"
SEED="${ABLATION_SEED:-1234}"
SEEDS="${ABLATION_SEEDS:-3}"
PYTHON="${PYTHON:-python}"
read -r -a EXTRA <<< "${ABLATION_EXTRA_ARGS:-}"
mkdir -p "$OUT"
step() { printf '\n=== %s\n' "$*"; }

if [[ -z "${ABLATION_DATA_PATH:-}" ]]; then
  step "data: the sample corpus (en/ko/ja) with facts, a BPE tokenizer, indexed datasets, the probe"
  # One-paragraph documents: several per sequence, so the block scopes differ.
  "$PYTHON" tools/make_sample_corpus.py --output "$OUT/corpus/train.jsonl" \
    --docs-per-lang "$DOCS" --max-paragraphs 1 --seed 1 --facts "$FACTS" --fact-mentions "$MENTIONS"
  "$PYTHON" tools/make_sample_corpus.py --output "$OUT/corpus/valid.jsonl" \
    --docs-per-lang $(( DOCS / 10 > 4 ? DOCS / 10 : 4 )) --max-paragraphs 1 --seed 2
  "$PYTHON" tools/train_tokenizer.py --input "$OUT/corpus/train.jsonl" \
    --output-dir "$OUT/tokenizer" --lang-key lang --vocab-size "$VOCAB" \
    --budget en=$(( (VOCAB - 272) / 2 )) ko=$(( (VOCAB - 272) * 28 / 100 )) \
             ja=$(( (VOCAB - 272) / 5 ))   # 272 = 256 bytes + special tokens
  mkdir -p "$OUT/data"
  for split in train valid; do
    "$PYTHON" tools/preprocess_data.py --input "$OUT/corpus/$split.jsonl" \
      --output-prefix "$OUT/data/$split" --json-keys text --lang-key lang \
      --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$OUT/tokenizer" \
      --append-eod --workers 1 --no-progress
  done
  ABLATION_DATA_PATH="$OUT/data/train_en_text_document $OUT/data/train_ko_text_document $OUT/data/train_ja_text_document"
  ABLATION_VALID_DATA_PATH="$OUT/data/valid_en_text_document $OUT/data/valid_ko_text_document $OUT/data/valid_ja_text_document"
  ABLATION_TOKENIZER="$OUT/tokenizer"
  if [[ -z "${ABLATION_PARALLEL_DATA:-}" ]]; then
    ABLATION_PARALLEL_DATA="$OUT/probe.jsonl"
    "$PYTHON" tools/make_sample_corpus.py --output "$ABLATION_PARALLEL_DATA" --seed 1 \
      --facts "$FACTS" --fact-probe --fact-languages "$SOURCE_LANG" "$TARGET_LANG"
  fi
fi
: "${ABLATION_VALID_DATA_PATH:?set ABLATION_VALID_DATA_PATH (per-language validation loss)}"
: "${ABLATION_TOKENIZER:?set ABLATION_TOKENIZER (the tokenizer of ABLATION_DATA_PATH)}"
read -r -a DATA_PATH <<< "$ABLATION_DATA_PATH"
read -r -a VALID_DATA_PATH <<< "$ABLATION_VALID_DATA_PATH"
# A probe of your corpus' facts: parallel questions the models can only answer from training.
PARALLEL="${ABLATION_PARALLEL_DATA:?set ABLATION_PARALLEL_DATA (parallel multiple-choice items, e.g. Global-MMLU en/ko)}"

launch() {
  if [[ "$NPROC" == 1 ]]; then
    # One process without torchrun: a free port, so parallel jobs on one host do not collide.
    MASTER_PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" \
      "$PYTHON" -m megatron_trillion.pretrain "$@"
  else
    torchrun --standalone --nproc-per-node "$NPROC" -m megatron_trillion.pretrain "$@"
  fi
}

read -r -a RUNS <<< "${ABLATION_RUNS:-xlda-pair xlda-sequence document none}"
for run in "${RUNS[@]}"; do
  case "$run" in
    xlda-pair)     masking=(--attention-masking xlda --xlda-block-scope pair) ;;
    xlda-sequence) masking=(--attention-masking xlda --xlda-block-scope sequence) ;;
    document)      masking=(--attention-masking document) ;;
    none)          masking=(--attention-masking none) ;;
    *) echo "error: ABLATION_RUNS: unknown run '$run' (xlda-pair xlda-sequence document none)" >&2
       exit 2 ;;
  esac
  rm -rf "$OUT/runs/$run"
  for (( n = 0; n < SEEDS; n++ )); do
    seed=$(( SEED + n ))
    dir="$OUT/runs/$run/seed-$seed"
    mkdir -p "$dir"
    step "$run, seed $seed: pretrain ${masking[*]}"
    OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" launch \
      --preset "$PRESET" --seq-length "$SEQ" --seed "$seed" \
      --data-path "${DATA_PATH[@]}" --valid-data-path "${VALID_DATA_PATH[@]}" \
      --data-cache-path "$OUT/index-cache" \
      --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$ABLATION_TOKENIZER" \
      "${masking[@]}" --xlda-mixing-prob 0.5 --anchor-language "$SOURCE_LANG" \
      --micro-batch-size "$MBS" --global-batch-size "$GBS" --train-iters "$ITERS" \
      --lr "$LR" --min-lr "$(awk "BEGIN { print $LR / 10 }")" --lr-decay-style wsd \
      --lr-warmup-iters "$WARMUP" --lr-wsd-decay-fraction 0.2 \
      --log-interval "$ITERS" --eval-interval "$ITERS" --eval-iters 2 --no-progress-bar \
      --save "$dir/checkpoints" --save-interval "$ITERS" "${EXTRA[@]}" 2>&1 | tee "$dir/train.log"
    step "$run, seed $seed: export to Hugging Face and evaluate ${SOURCE_LANG} -> ${TARGET_LANG}"
    "$PYTHON" tools/convert_checkpoint.py export --load "$dir/checkpoints" --save "$dir/hf" \
      --dtype fp32 --no-progress-bar
    "$PYTHON" tools/eval_consistency.py --model "$dir/hf" --data "$PARALLEL" \
      --source-language "$SOURCE_LANG" --target-language "$TARGET_LANG" \
      --output "$dir/consistency.json" --no-progress-bar
  done
done

step "XLDA ablation: ${PRESET}, ${ITERS} steps of ${GBS} x ${SEQ} tokens, ${SEEDS} seed(s)"
"$PYTHON" tools/xlda_ablation_table.py "${RUNS[@]/#/$OUT/runs/}" | tee "$OUT/table.md"
