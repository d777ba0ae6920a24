"""The pretraining flags change only on purpose: this list is the contract with users' scripts
(the SLURM recipes, Megatron-LM habits). Update it together with arguments.py."""

from megatron_trillion.training.arguments import accepted_flags

PINNED = [
    "--config", "--preset", "--num-layers", "--hidden-size", "--ffn-hidden-size",
    "--num-attention-heads", "--num-query-groups", "--seq-length", "--rotary-base",
    "--num-experts", "--moe-router-topk", "--mtp-num-layers", "--mtp-loss-scaling-factor",
    "--init-method-std", "--hidden-dropout", "--attention-dropout", "--transformer-impl",
    "--make-vocab-size-divisible-by", "--tensor-model-parallel-size",
    "--pipeline-model-parallel-size", "--num-layers-per-virtual-pipeline-stage",
    "--expert-model-parallel-size", "--expert-tensor-parallel-size", "--context-parallel-size",
    "--sequence-parallel", "--use-distributed-optimizer", "--overlap-grad-reduce",
    "--overlap-param-gather", "--micro-batch-size", "--global-batch-size",
    "--rampup-batch-size", "--train-iters", "--train-samples", "--seed", "--bf16",
    "--fp8-format", "--fp8-amax-history-len", "--fp8-amax-compute-algo",
    "--recompute-granularity", "--recompute-method", "--recompute-num-layers", "--clip-grad",
    "--max-consecutive-nonfinite-steps", "--exit-interval", "--hang-timeout-seconds",
    "--optimizer", "--lr", "--min-lr", "--muon-lr", "--weight-decay", "--adam-beta1",
    "--adam-beta2", "--adam-eps", "--muon-momentum", "--lr-decay-style", "--lr-wsd-decay-style",
    "--lr-warmup-iters", "--lr-wsd-decay-fraction", "--anneal-weight-decay",
    "--anneal-mtp-loss-scaling-factor", "--anneal-data-path", "--data-path",
    "--valid-data-path", "--mock-data", "--data-cache-path", "--verify-data", "--tokenizer-type",
    "--tokenizer-model", "--vocab-file", "--merge-file", "--vocab-size", "--attention-masking",
    "--xlda-mixing-prob", "--anchor-language", "--lang-alpha", "--lang-beta", "--eval-interval",
    "--eval-iters", "--log-interval", "--tensorboard-dir", "--wandb-project",
    "--wandb-exp-name", "--no-progress-bar", "--device-peak-tflops", "--save", "--load",
    "--save-interval", "--no-load-optim", "--no-load-rng", "--finetune",
    "--exit-signal-handler", "--async-save", "--ckpt-format", "--ckpt-step", "--ckpt-keep-last",
]


def test_accepted_flags_are_pinned():
    assert accepted_flags() == PINNED
