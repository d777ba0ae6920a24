"""The pretraining flags change only on purpose: this list is the contract with users' scripts
(the SLURM recipes, Megatron-LM scripts). Update it together with arguments.py."""

from megatron_trillion.training.arguments import accepted_flags, refused_flags

PINNED = [
    "--config", "--preset", "--num-layers", "--hidden-size", "--ffn-hidden-size",
    "--num-attention-heads", "--num-query-groups", "--group-query-attention", "--kv-channels",
    "--seq-length", "--max-position-embeddings", "--position-embedding-type",
    "--no-position-embedding", "--rotary-base", "--rotary-percent", "--swiglu", "--normalization",
    "--norm-epsilon", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--use-mcore-models", "--num-experts", "--moe-router-topk", "--moe-ffn-hidden-size",
    "--moe-router-load-balancing-type", "--moe-aux-loss-coeff", "--moe-router-bias-update-style",
    "--moe-router-bias-update-rate", "--moe-router-bias-update-momentum",
    "--moe-router-bias-update-clamp-scale", "--moe-token-dispatcher-type",
    "--mtp-num-layers", "--mtp-loss-scaling-factor", "--init-method-std", "--hidden-dropout",
    "--attention-dropout", "--transformer-impl", "--make-vocab-size-divisible-by",
    "--attention-backend", "--apply-rope-fusion", "--no-rope-fusion", "--no-masked-softmax-fusion",
    "--no-gradient-accumulation-fusion", "--cross-entropy-loss-fusion",
    "--cross-entropy-fusion-impl", "--moe-grouped-gemm", "--tp-comm-overlap",
    "--tensor-model-parallel-size", "--pipeline-model-parallel-size",
    "--num-layers-per-virtual-pipeline-stage", "--expert-model-parallel-size",
    "--expert-tensor-parallel-size", "--context-parallel-size", "--cp-comm-type",
    "--sequence-parallel",
    "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
    "--distributed-timeout-minutes", "--micro-batch-size", "--global-batch-size",
    "--rampup-batch-size", "--step-batch-size-schedule", "--train-iters", "--train-samples",
    "--seed", "--bf16", "--grad-reduce-in-bf16", "--fp8-format", "--fp8-amax-history-len",
    "--fp8-amax-compute-algo", "--fp8-param-gather", "--calculate-per-token-loss",
    "--recompute-granularity", "--recompute-method", "--recompute-num-layers", "--clip-grad",
    "--max-consecutive-nonfinite-steps", "--exit-interval", "--exit-duration-in-mins",
    "--hang-timeout-seconds", "--manual-gc", "--manual-gc-interval", "--no-manual-gc-eval",
    "--empty-unused-memory-level", "--optimizer", "--lr", "--min-lr", "--decoupled-lr",
    "--decoupled-min-lr", "--muon-lr", "--weight-decay", "--adam-beta1", "--adam-beta2",
    "--adam-eps", "--muon-momentum", "--muon-fp32-matmul-prec", "--lr-decay-style",
    "--lr-wsd-decay-style",
    "--lr-decay-iters", "--lr-decay-samples", "--lr-warmup-iters", "--lr-warmup-samples",
    "--lr-warmup-fraction", "--lr-warmup-init", "--lr-wsd-decay-fraction",
    "--override-opt_param-scheduler", "--override-opt-param-scheduler",
    "--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
    "--anneal-weight-decay", "--anneal-mtp-loss-scaling-factor", "--anneal-data-path",
    "--data-path", "--data-args-path", "--split", "--train-data-path", "--valid-data-path",
    "--test-data-path", "--mock-data", "--data-cache-path", "--verify-data", "--no-mmap-bin-files",
    "--num-workers", "--no-create-attention-mask-in-dataloader", "--tokenizer-type",
    "--tokenizer-model", "--tiktoken-pattern", "--vocab-file", "--merge-file", "--vocab-size",
    "--attention-masking", "--xlda-block-scope", "--xlda-mixing-prob", "--anchor-language",
    "--lang-alpha", "--lang-beta", "--sft", "--chat-template", "--sft-overlong-conversations",
    "--dpo", "--grpo",
    "--eval-interval", "--eval-iters", "--log-interval", "--log-throughput",
    "--logging-level", "--tensorboard-dir", "--wandb-project", "--wandb-exp-name",
    "--no-progress-bar", "--device-peak-tflops", "--moe-empty-expert-warning-steps",
    "--profile", "--use-pytorch-profiler",
    "--profile-step-start", "--profile-step-end", "--profile-ranks", "--record-memory-history",
    "--memory-snapshot-path", "--save", "--load", "--save-interval", "--no-load-optim",
    "--no-load-rng", "--finetune", "--exit-signal-handler", "--async-save", "--ckpt-format",
    "--ckpt-step", "--ckpt-keep-last", "--dpo-loss", "--dpo-beta", "--dpo-sft-loss-weight",
    "--dpo-reference-load", "--dpo-max-length-ratio",
    "--grpo-prompts-per-step", "--grpo-samples-per-prompt", "--grpo-max-new-tokens",
    "--grpo-temperature", "--grpo-top-p", "--grpo-kl-coeff", "--grpo-clip-low",
    "--grpo-clip-high", "--grpo-epochs", "--grpo-scale-rewards-by-std",
    "--grpo-truncated-is-cap", "--system-prompt-file",
]

# Megatron-LM flags that are recognised and refused with a reason (see REFUSED_FLAGS).
REFUSED = [
    "--fp16", "--loss-scale", "--initial-loss-scale", "--min-loss-scale", "--loss-scale-window",
    "--hysteresis", "--use-megatron-fsdp", "--use-torch-fsdp2",
    "--data-parallel-sharding-strategy", "--use-nccl-ub", "--fsdp-double-buffer",
    "--fsdp-manual-registration", "--init-model-with-meta-device",
    "--no-check-for-nan-in-loss-and-grad", "--apply-layernorm-1p", "--use-flash-attn",
    "--batch-size", "--warmup", "--checkpoint-activations",
]


def test_accepted_flags_are_pinned():
    assert accepted_flags() == PINNED


def test_refused_flags_are_pinned():
    assert refused_flags() == REFUSED
