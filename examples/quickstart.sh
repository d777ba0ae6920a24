#!/usr/bin/env bash
# megatron-trillion quick start, end to end on one machine (CPU is enough, ~5-10 minutes on
# 2 cores):
#   1. install into .venv            4. preprocess into per-language indexed datasets
#   2. write a small EN/KO/JA corpus 5. pretrain a tiny Tri-7B-style model with XLDA + MTP + WSD
#   3. train a byte-level BPE         under TP2 x PP2 x DP2 (8 gloo processes on CPU)
#      with per-language budgets     6. generate a few tokens from the checkpoint,
#                                       export to HF, generate with transformers
# Everything lands in $QUICKSTART_OUT (default: quickstart_out/). Re-running reuses the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install.sh

OUT="${QUICKSTART_OUT:-quickstart_out}"
ITERS="${QUICKSTART_ITERS:-60}"
NPROC="${QUICKSTART_NPROC:-8}"
TP="${QUICKSTART_TP:-2}"
PP="${QUICKSTART_PP:-2}"
mkdir -p "$OUT"
step() { printf '\n=== %s\n' "$*"; }

step "1/5 sample corpus (English, Korean, Japanese; generated, no download)"
python tools/make_sample_corpus.py --output "$OUT/corpus/train.jsonl" --docs-per-lang 600 --seed 1
python tools/make_sample_corpus.py --output "$OUT/corpus/valid.jsonl" --docs-per-lang 40 --seed 2

step "2/5 byte-level BPE tokenizer with per-language vocabulary budgets"
python tools/train_tokenizer.py --input "$OUT/corpus/train.jsonl" --output-dir "$OUT/tokenizer" \
  --lang-key lang --vocab-size 2048 --budget en=900 ko=500 ja=350

step "3/5 preprocess into megatron-core indexed datasets, one per language"
mkdir -p "$OUT/data"
for split in train valid; do
  python tools/preprocess_data.py --input "$OUT/corpus/$split.jsonl" \
    --output-prefix "$OUT/data/$split" --json-keys text --lang-key lang \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$OUT/tokenizer" \
    --append-eod --workers 2 --no-progress
done

step "4/5 pretrain tiny-tri-7b: XLDA, MTP, WSD, TP${TP} x PP${PP} x DP$((NPROC / TP / PP)) on ${NPROC} processes"
rm -rf "$OUT/checkpoints"
OMP_NUM_THREADS=1 torchrun --nproc-per-node "$NPROC" -m megatron_trillion.pretrain \
  --preset tiny-tri-7b --seq-length 128 \
  --data-path "$OUT"/data/train_en_text_document "$OUT"/data/train_ko_text_document \
              "$OUT"/data/train_ja_text_document \
  --valid-data-path "$OUT"/data/valid_en_text_document "$OUT"/data/valid_ko_text_document \
                    "$OUT"/data/valid_ja_text_document \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$OUT/tokenizer" \
  --attention-masking xlda --xlda-mixing-prob 0.5 --anchor-language en \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --use-distributed-optimizer \
  --micro-batch-size 2 --global-batch-size 8 --train-iters "$ITERS" \
  --lr 3e-3 --min-lr 3e-4 --lr-decay-style wsd --lr-warmup-iters 5 \
  --lr-wsd-decay-fraction 0.2 --weight-decay 0.1 \
  --log-interval 10 --eval-interval "$ITERS" --eval-iters 2 \
  --save "$OUT/checkpoints" --save-interval "$ITERS" \
  --tensorboard-dir "$OUT/tensorboard"

step "5/5 generate from the checkpoint (loaded at TP1 x PP1)"
python tools/generate.py --load "$OUT/checkpoints" --max-new-tokens 16 \
  --prompt "The river" --prompt "오늘은" --prompt "今日は"
# ... then export to Hugging Face (LlamaForCausalLM, fp32: same greedy tokens as above) and
# generate with transformers from the export.
rm -rf "$OUT/hf"
python tools/convert_checkpoint.py export --load "$OUT/checkpoints" --save "$OUT/hf" \
  --dtype fp32 --no-progress-bar
python tools/hf_generate.py --model "$OUT/hf" --max-new-tokens 16 \
  --prompt "The river" --prompt "오늘은" --prompt "今日は"

printf '\nDone. Checkpoint: %s/checkpoints  Hugging Face export: %s/hf  TensorBoard: %s/tensorboard\n' \
  "$OUT" "$OUT" "$OUT"
