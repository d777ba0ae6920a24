"""EXTRA_ARGS that turn each sbatch recipe, unedited, into a tiny CPU run on two processes
(GPUS_PER_NODE=2; README "GPU clusters"): the model, sequence, batch (and ramp-up), run length,
warmup, tokenizer and intervals, and parallel sizes that fit two processes. The recipe's
--bf16 stays."""

from __future__ import annotations

COMMON = ["--micro-batch-size", "1", "--lr-warmup-iters", "1",
          "--tokenizer-type", "NullTokenizer", "--vocab-size", "4096",
          "--save-interval", "1000", "--eval-interval", "1000", "--eval-iters", "1",
          "--log-interval", "1", "--no-progress-bar"]

# tri_7b/pretrain: batch 2 for the first 8 samples (4 steps), then 4 per step.
PRETRAIN_ITERS = 12
# tri_7b/context_extension: batch 2, 6 samples.
CONTEXT_ITERS = 3

RECIPE_ARGS = {
    "tri_7b/pretrain.sbatch": [
        "--preset", "tiny-tri-7b", "--seq-length", "128", "--global-batch-size", "4",
        "--rampup-batch-size", "2", "2", "8", "--train-samples", str(8 + 4 * (PRETRAIN_ITERS - 4))],
    # TP 4 -> 2 keeps the recipe's sequence parallelism valid on two processes; CP 2 -> 1.
    "tri_7b/context_extension.sbatch": [
        "--preset", "tiny-tri-7b", "--seq-length", "256", "--global-batch-size", "2",
        "--train-samples", str(2 * CONTEXT_ITERS), "--tensor-model-parallel-size", "2",
        "--context-parallel-size", "1"],
    "tri_21b/pretrain.sbatch": [
        "--preset", "tiny-tri-21b", "--seq-length", "128", "--global-batch-size", "2",
        "--train-samples", "12", "--tensor-model-parallel-size", "2"],
    "trinity_large/pretrain.sbatch": [
        "--preset", "tiny-trinity", "--seq-length", "128", "--global-batch-size", "2",
        "--train-samples", "12", "--tensor-model-parallel-size", "2",
        "--pipeline-model-parallel-size", "1", "--expert-model-parallel-size", "2"],
}


def tiny_args(recipe: str) -> list[str]:
    return [*RECIPE_ARGS[recipe], *COMMON]
