"""One pretraining run, from parsed flags to the final checkpoint: ``pretrain(config)``.

The order is the order of a run: validate every flag (before any process group), bring up the
process groups, build the tokenizer, model chunks, weights, DDP, optimizer, schedules and data,
resume from ``--load``, train, save. The command line (``megatron_trillion.pretrain``) parses
the flags and calls it; tests and the self-test call it directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch

from megatron_trillion.data.attention_blocks import MASKING_XLDA
from megatron_trillion.errors import UserError
from megatron_trillion.models.presets import ModelPreset, model_signature
from megatron_trillion.models.vocab import padded_vocab_size
from megatron_trillion.training.arguments import PretrainConfig, to_flat_dict
from megatron_trillion.training.build import (
    build_model_chunks,
    build_optimizer,
    build_schedules,
    build_tokenizer,
    build_transformer_config,
    connect_ddp_to_schedule,
    describe_schedule,
    initialize_tp_communicators,
    resolve_model_preset,
    tokenizer_config,
)
from megatron_trillion.training.datasets import (
    DatasetBuilder,
    build_chat_format,
    context_parallel_split,
    data_sources,
    data_workdir,
)
from megatron_trillion.training.housekeeping import ExitSignal
from megatron_trillion.training.loop import Run, TrainState
from megatron_trillion.training.objective import Objective, language_model_objective
from megatron_trillion.training.validation import (
    platform_notes,
    validate,
    world_size_from_env,
)

if TYPE_CHECKING:
    from megatron_trillion.training.checkpointing import CheckpointSaver
    from megatron_trillion.training.data import StepBatches
    from megatron_trillion.training.schedules import Switch


@dataclass
class PretrainHooks:
    """What pretraining does at the loop's step boundaries beyond training: checkpoints that
    hold the data position, the exit requests, the anneal switch. Each hook is handed the
    ``Run``, so it reads the model, state and batches the loop holds at that moment."""

    config: PretrainConfig
    preset: ModelPreset
    data: DatasetBuilder
    saver: Optional[CheckpointSaver]
    signals: ExitSignal
    run_config: dict  # the flags (and tokenizer fingerprint) a checkpoint records
    log: Callable[[str], None]

    def save(self, run: Run) -> None:
        state = run.state
        if self.saver.last_saved_iteration == state.iteration:
            return  # e.g. a signal arrived right after a --save-interval save
        chat = self.data.chat
        # a batch source with state of each rank's own (a GRPO rollout between its epochs)
        rank_state = getattr(run.train_batches.dataset, "rank_state", None)
        self.saver.save(
            state.iteration, run.model, run.optimizer,
            rank_state=rank_state(state.consumed_samples) if rank_state else None,
            common={"train_state": state.state_dict(),
                    "scheduler": run.scheduler.state_dict(), "numerics": run.guard.state_dict(),
                    "data": run.train_batches.dataset.state_dict(state.consumed_samples),
                    "model": model_signature(self.preset), "config": self.run_config,
                    # --sft: export and generation use the template training used
                    **({"chat_template": chat.template} if chat is not None else {})})

    def exit_requested(self, run: Run) -> bool:
        """Publish finished background saves; True when the run should save and stop here."""
        if self.saver is not None:
            self.saver.poll()
        interval = self.config.training.exit_interval
        if interval and run.state.iteration % interval == 0:
            return True  # --exit-interval: same path as a signal (save, then stop)
        if run.housekeeping is not None and run.housekeeping.duration_exceeded():
            return True  # --exit-duration-in-mins: the same path
        return self.config.checkpoint.exit_signal_handler and self.signals.agreed()

    def on_anneal_switch(self, run: Run, switches: list[Switch]) -> Optional[StepBatches]:
        """The anneal values take effect; with --anneal-data-path, the batches of the anneal
        mixture from here on (None: the same data)."""
        from megatron_trillion.models.config import set_mtp_loss_scaling_factor

        if self.preset.mtp_num_layers and run.scheduler.mtp_loss_scaling is not None:
            set_mtp_loss_scaling_factor(run.model, run.scheduler.mtp_loss_scaling)
        if not self.config.anneal.anneal_data_path:
            return None
        current = run.train_batches
        dataset = self.data.anneal_dataset(current.dataset, run.state.consumed_samples,
                                           self.log)
        return current.over(dataset) if dataset is not None else None


def pretrain(config: PretrainConfig, log=print, on_step=None) -> tuple[TrainState, Run]:
    from megatron.core import parallel_state as ps

    from megatron_trillion.data.tokenizers import tokenizer_fingerprint
    from megatron_trillion.models.config import set_mtp_loss_scaling_factor
    from megatron_trillion.models.specs import transformer_engine_available as te_available
    from megatron_trillion.platform.distributed import initialize_distributed
    from megatron_trillion.training import checkpointing
    from megatron_trillion.training.data import StepBatches, check_data_files
    from megatron_trillion.training.flops import make_step_flops
    from megatron_trillion.training.housekeeping import Housekeeping
    from megatron_trillion.training.loop import train
    from megatron_trillion.training.numerics import NumericsGuard
    from megatron_trillion.training.reporting import MetricWriters

    # 1. everything that can be checked without process groups
    _set_logging_level(config.logging.logging_level)
    tokenizer = build_tokenizer(config)
    if tokenizer is not None and config.data.vocab_size is not None and \
            config.data.vocab_size != tokenizer.vocab_size:
        raise UserError(f"--vocab-size {config.data.vocab_size} differs from the tokenizer's "
                        f"size ({tokenizer.vocab_size}, --tokenizer-model "
                        f"{config.data.tokenizer_model}); drop --vocab-size or fix it")
    tp = config.parallel.tensor_model_parallel_size
    base_vocab = (tokenizer.vocab_size if tokenizer is not None
                  else config.data.vocab_size
                  or resolve_model_preset(config, check=False).vocab_size)
    # The model pads the vocabulary for TP itself and masks the padding out (models.vocab).
    vocab = padded_vocab_size(base_vocab, config.model.make_vocab_size_divisible_by, tp)
    preset = resolve_model_preset(config, base_vocab, check=False)  # validate() checks it
    shape = validate(config, preset, world_size_from_env(), te_available())
    fingerprint = (tokenizer_fingerprint(tokenizer_config(config), tokenizer)
                   if tokenizer is not None else None)
    check_data_files(config, fingerprint, base_vocab,
                     log if int(os.environ.get("RANK", "0")) == 0 else None)

    # 2. process groups, model, optimizer, schedules
    initialize_distributed(shape.parallel, seed=config.training.seed,
                           timeout_minutes=config.parallel.distributed_timeout_minutes,
                           num_layers=preset.num_layers,
                           num_attention_heads=preset.num_attention_heads,
                           num_query_groups=preset.query_groups,
                           num_moe_experts=preset.num_experts)
    rank = torch.distributed.get_rank()
    say = log if rank == 0 else (lambda line: None)
    if rank == 0:
        say(f" building {preset.name}: {preset.num_layers} layers, hidden {preset.hidden_size}, "
            f"vocab {vocab} (tokenizer {base_vocab}); TP {shape.parallel.tensor} x PP "
            f"{shape.parallel.pipeline} x DP {shape.data_parallel_size}"
            + (f" x EP {shape.parallel.expert}" if shape.parallel.expert > 1 else ""))
        for note in platform_notes(config, preset, te_available(), torch.cuda.is_available()):
            say(f" note: {note}")
    if config.kernels.tp_comm_overlap:
        initialize_tp_communicators(config, preset, shape)
    transformer_config = build_transformer_config(config, preset, shape)
    model = build_model_chunks(config, preset, transformer_config, shape)
    connect_ddp_to_schedule(model, config)
    optimizer = build_optimizer(config, model)
    scheduler, rampup, anneal = build_schedules(config, optimizer, shape, preset)
    say(describe_schedule(config, shape, anneal))

    # 3. data
    # Where generated files (mock data, sample-index caches) go when no path is given.
    workdir = data_workdir(config)
    eod = tokenizer.eod if tokenizer is not None else 0
    chat = build_chat_format(config, tokenizer, say)
    splits = data_sources(config, base_vocab, workdir)
    data = DatasetBuilder(config, shape, splits, eod, workdir, chat)
    languages = splits.languages()
    if chat is None and config.data.attention_masking == MASKING_XLDA and len(languages) < 2:
        say(f" data has one language ({languages[0]}): cross-lingual packing has nothing to "
            "mix, so training uses document blocks (as --attention-masking document)")
    state = TrainState()
    guard = NumericsGuard(max_consecutive_bad_steps=config.training.max_consecutive_nonfinite_steps)
    common = None
    if config.checkpoint.load:
        loaded = checkpointing.load_checkpoint(
            config.checkpoint.load, model, optimizer, model_signature(preset),
            load_optimizer=not (config.checkpoint.no_load_optim or config.checkpoint.finetune),
            load_rng=not (config.checkpoint.no_load_rng or config.checkpoint.finetune),
            iteration=config.checkpoint.ckpt_step, log=say,
            may_not_exist=checkpointing.load_may_be_absent(
                config.checkpoint.load, config.checkpoint.save, config.checkpoint.finetune))
        if loaded is not None and not config.checkpoint.finetune:
            common = loaded.common
            state.load_state_dict(common["train_state"])
            scheduler.load_state_dict(
                common["scheduler"],
                override=config.schedule.override_opt_param_scheduler,
                use_checkpoint=config.schedule.use_checkpoint_opt_param_scheduler)
            anneal = scheduler.anneal  # the checkpoint's, with --use-checkpoint-opt_param-...
            guard.load_state_dict(common["numerics"])
    objective = objective_for(config)
    if common is not None:  # resuming: the data position must be of the same kind of run
        resumed = common.get("data", {}).get("kind", "pretraining")
        current = objective.kind
        if resumed != current:
            raise UserError(f"--load {config.checkpoint.load} holds a {resumed} run's "
                            f"checkpoint and this is a {current} run: add --finetune to start "
                            "from its weights")
    tokens_per_microbatch = (config.batch.micro_batch_size * shape.seq_length
                             // shape.parallel.context)  # THD: ~1/CP of one row of B*S tokens
    if config.kind == "grpo":  # rollouts sampled from the model itself, no dataset
        from megatron_trillion.posttraining.grpo_setup import build_grpo

        batches, objective = build_grpo(config, preset, shape, model, tokenizer, chat, common,
                                        say)
        eval_batches = {}
    else:
        dataset = data.train_dataset(
            common, past_anneal_boundary=(anneal is not None
                                          and scheduler.num_steps >= anneal.start_step), log=say)
        # The ranks of one context-parallel group read the same samples, each keeping its share.
        dp_rank = ps.get_data_parallel_rank(with_context_parallel=False)
        cp_split = context_parallel_split(config, preset, shape)
        prepare = lambda dataset: None  # noqa: E731
        if config.kind == "dpo":
            from megatron_trillion.posttraining.setup import reference_tables

            tables = reference_tables(config, preset, model, data, fingerprint, common, cp_split,
                                      tokens_per_microbatch, say)
            tables.attach(dataset)
            prepare = tables.attach
        batches = StepBatches(dataset, config.batch.micro_batch_size, dp_rank,
                              shape.data_parallel_size, cp_split,
                              prefetch=config.data.num_workers > 0, collate=data.collate)
        eval_batches = data.eval_batches(dp_rank, say, cp_split, prepare)
        if config.kind == "dpo":
            tables.finish()  # the policy's weights again, if the reference was another model
    if scheduler.mtp_loss_scaling is not None and preset.mtp_num_layers:
        set_mtp_loss_scaling_factor(model, scheduler.mtp_loss_scaling)

    # 4. train
    signals = ExitSignal(config.checkpoint.exit_signal_handler)
    run_config = to_flat_dict(config)
    run_config["tokenizer_fingerprint"] = fingerprint  # export and generation compare against it
    saver = checkpointing.CheckpointSaver(
        config.checkpoint.save, keep_last=config.checkpoint.ckpt_keep_last,
        async_save=config.checkpoint.async_save, log=say) if config.checkpoint.save else None
    hooks = PretrainHooks(config, preset, data, saver, signals, run_config, say)
    housekeeping = Housekeeping(
        config.training, config.profiling, rank=rank, log=say,
        trace_dir=os.path.join(config.logging.tensorboard_dir or config.checkpoint.save
                               or os.getcwd(), "profile"))
    writers = MetricWriters(config.logging.tensorboard_dir, config.logging.wandb_project,
                            config.logging.wandb_exp_name, run_config) if rank == 0 else None
    run = Run(
        model=model, optimizer=optimizer, scheduler=scheduler, rampup=rampup, guard=guard,
        train_batches=batches, train_iters=shape.train_iters,
        tokens_per_microbatch=tokens_per_microbatch,
        step_flops=make_step_flops(preset),
        world_size=torch.distributed.get_world_size(),
        log_interval=config.logging.log_interval, eval_interval=config.eval.eval_interval,
        eval_batches=eval_batches, on_anneal_switch=hooks.on_anneal_switch, anneal=anneal,
        save=hooks.save if saver is not None else None,
        save_interval=config.checkpoint.save_interval,
        exit_requested=hooks.exit_requested,
        device_peak_tflops=config.logging.device_peak_tflops or _default_peak(),
        writers=writers, progress=not config.logging.no_progress_bar, log=say, state=state,
        on_step=on_step,
        hang_timeout_seconds=config.training.hang_timeout_seconds,
        housekeeping=housekeeping,
        empty_expert_warning_steps=config.logging.moe_empty_expert_warning_steps,
        objective=objective,
    )
    try:
        final = train(run)
        if saver is not None:
            hooks.save(run)  # no-op when the last step already saved
            saver.wait()
    finally:
        run.train_batches.close()
        if writers is not None:
            writers.close()
    return final, run


def objective_for(config: PretrainConfig) -> Objective:
    """What a run trains for, from its flags."""
    if config.kind == "dpo":
        from megatron_trillion.posttraining.dpo import dpo_objective

        return dpo_objective(config.dpo.dpo_loss, config.dpo.dpo_beta,
                             config.dpo.dpo_sft_loss_weight)
    return language_model_objective(config.kind)


def _set_logging_level(level: Optional[int]) -> None:
    """--logging-level: the Python logging level of this process (Megatron-LM's meaning)."""
    if level is not None:
        import logging

        logging.getLogger().setLevel(level)
        logging.getLogger("megatron").setLevel(level)


def _default_peak() -> Optional[float]:
    from megatron_trillion.platform.device import device_peak_tflops

    return device_peak_tflops()
