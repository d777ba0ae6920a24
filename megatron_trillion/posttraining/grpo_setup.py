"""A ``--grpo`` run's setup beyond pretraining's: its flag checks, its prompts, its reference
policy and its batch source.

The reference policy (``--grpo-kl-coeff > 0``) is the weights the run starts from: ``--load``
(with ``--finetune``), recorded in every checkpoint, so a resumed run reloads the same reference.
Its weights live in host memory, one copy of each rank's shard in the parameters' dtype (for
Tri-7B in bf16 at TP2: ~7.5 GB of host RAM per rank), and are swapped into the model for the
reference pass of each step; no second model lives on the accelerator.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Optional, Sequence

from megatron_trillion.errors import UserError
from megatron_trillion.posttraining.grpo import GRPOLossConfig
from megatron_trillion.posttraining.rlvr_data import RLVRPrompt, read_rlvr_prompts


def loss_config(config) -> GRPOLossConfig:
    g = config.grpo
    return GRPOLossConfig(clip_low=g.grpo_clip_low, clip_high=g.grpo_clip_high,
                          kl_coeff=g.grpo_kl_coeff, truncated_is_cap=g.grpo_truncated_is_cap)


def grpo_config_errors(config) -> list[str]:
    """The problems of a run's GRPO flags (none when the run is not --grpo and sets none)."""
    from megatron_trillion.data.data_path import split_data_path
    from megatron_trillion.training.arguments import GRPOArgs

    g = config.grpo
    if not config.data.grpo:
        defaults = GRPOArgs()
        given = [f"--{name.replace('_', '-')}" for name in GRPOArgs.__dataclass_fields__
                 if getattr(g, name) != getattr(defaults, name)]
        return [f"{', '.join(given)} need --grpo"] if given else []
    errors = []
    if config.data.sft or config.data.dpo:
        errors.append("--grpo is a run of its own: SFT, then DPO, then GRPO from their "
                      "checkpoint (--load ... --finetune)")
    if config.parallel.pipeline_model_parallel_size > 1:
        errors.append("--grpo samples with the generation engine, which runs without pipeline "
                      "parallelism: use --pipeline-model-parallel-size 1 (TP, DP and EP work)")
    if config.parallel.sequence_parallel:
        errors.append("--grpo samples with the generation engine, which runs without sequence "
                      "parallelism (prompts of any length): drop --sequence-parallel")
    if config.parallel.context_parallel_size > 1:
        errors.append("--grpo samples with the generation engine, which has no context "
                      "parallelism: use --context-parallel-size 1")
    if g.grpo_samples_per_prompt < 2:
        errors.append(f"--grpo-samples-per-prompt must be >= 2 (advantages compare the samples "
                      f"of a prompt), got {g.grpo_samples_per_prompt}")
    seq = config.model.seq_length
    if g.grpo_max_new_tokens < 1 or (seq is not None and g.grpo_max_new_tokens >= seq):
        errors.append(f"--grpo-max-new-tokens must be >= 1 and below --seq-length (the prompt "
                      f"and its answer share it), got {g.grpo_max_new_tokens}")
    if not g.grpo_temperature > 0:
        errors.append(f"--grpo-temperature must be > 0 (greedy answers of a prompt are all "
                      f"the same: every group would be dropped), got {g.grpo_temperature}")
    if not 0 < g.grpo_top_p <= 1:
        errors.append(f"--grpo-top-p must lie in (0, 1], got {g.grpo_top_p}")
    if g.grpo_epochs < 1:
        errors.append(f"--grpo-epochs must be >= 1, got {g.grpo_epochs}")
    if g.grpo_prompts_per_step is not None and g.grpo_prompts_per_step < 1:
        errors.append(f"--grpo-prompts-per-step must be >= 1, got {g.grpo_prompts_per_step}")
    errors += loss_config(config).problems()
    data = config.data
    if data.valid_data_path or data.test_data_path or config.eval.eval_interval:
        errors.append("--grpo has no validation loss: drop --valid-data-path, --test-data-path "
                      "and --eval-interval (measure held-out rewards with the benchmark tool)")
    if data.mock_data:
        errors.append("--grpo samples answers to prompt JSONL files (--data-path); --mock-data "
                      "has no prompts")
    if g.system_prompt_file and not os.path.isfile(g.system_prompt_file):
        errors.append(f"--system-prompt-file {g.system_prompt_file}: no such file")
    if data.data_path:
        try:
            if any(w is not None for w, _, _ in split_data_path(data.data_path, "--data-path",
                                                                 "a file")):
                errors.append("--grpo: --data-path takes files without weights (every prompt "
                              "is used, in a seeded order)")
        except UserError as exc:
            errors.append(str(exc))
    return errors


def rollout_epochs_done(consumed_prompts: int, prompts_per_step: int, epochs: int) -> int:
    """How many epochs of its rollout a run had trained when it consumed ``consumed_prompts``
    (0 at a rollout boundary)."""
    return consumed_prompts // prompts_per_step % epochs


def read_system_prompt(path: Optional[str]) -> Optional[str]:
    """The text of ``--system-prompt-file`` (None without one)."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--system-prompt-file {path}: cannot read ({exc})") from exc
    if not text:
        raise UserError(f"--system-prompt-file {path} is empty")
    return text


def read_grpo_prompts(tokens: Sequence[str], flag: str = "--data-path") -> list[RLVRPrompt]:
    """The prompts of ``[LANG:]FILE.jsonl ...`` (the language from ``LANG:`` or a ``_xx.jsonl``
    name), every line checked, verifier names and ground truths by the verifier registry."""
    from megatron_trillion.data.sft import parse_sft_data_path

    sources = parse_sft_data_path(tokens, flag)
    return read_rlvr_prompts([(s.path_prefix, s.language) for s in sources])


def prompts_fingerprint(prompts: Sequence[RLVRPrompt]) -> str:
    """Changes when the prompts or their order change (a resume would take other prompts)."""
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(json.dumps([p.messages, p.ground_truth, p.verifier, p.language],
                                 sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def build_grpo(config, preset, shape, model: list, tokenizer, chat, resumed: Optional[dict],
               log: Callable[[str], None]):
    """(batch source, objective) of a --grpo run, after the model holds its starting (or
    resumed) weights. ``resumed``: the common state of the checkpoint a run resumes from."""
    from megatron.core import parallel_state as ps

    from megatron_trillion.posttraining.grpo_objective import grpo_objective, report_fields
    from megatron_trillion.posttraining.rollout import (
        GRPOBatches,
        RolloutConfig,
        encode_prompts,
    )
    from megatron_trillion.posttraining.scoring import verifier_score

    g = config.grpo
    prompts = read_grpo_prompts(config.data.data_path)
    system_prompt = read_system_prompt(g.system_prompt_file)
    prompt_ids = encode_prompts(prompts, chat, system_prompt, shape.seq_length)
    fingerprint = prompts_fingerprint(prompts)
    state = {"prompts": fingerprint}
    if resumed is not None:
        before = resumed.get("data", {})
        if before.get("prompts") != fingerprint:
            raise UserError(f"--load {config.checkpoint.load}: the prompts (--data-path files, "
                            "their lines or order) changed since the checkpoint, so the resumed "
                            "run would not take the prompts a straight run takes; add "
                            "--finetune to start a new GRPO run from its weights")
    reference = None
    identity = _reference_identity(config, resumed)
    state["reference"] = identity
    if g.grpo_kl_coeff > 0:
        reference = _reference_policy(config, preset, model, identity, resumed, log)
        log(f" GRPO reference policy: {identity.get('path') or 'the initial weights'}; "
            f"{reference.host_bytes / 2**30:.2f} GiB of host memory on this rank")
    verifiers = sorted({p.verifier for p in prompts})
    languages = sorted({p.language for p in prompts})
    fields = report_fields(verifiers, languages)
    engine = _engine(model, tokenizer, shape.seq_length, chat)
    rollout = RolloutConfig(samples_per_prompt=g.grpo_samples_per_prompt,
                            max_new_tokens=g.grpo_max_new_tokens,
                            temperature=g.grpo_temperature, top_p=g.grpo_top_p,
                            seed=config.training.seed, system_prompt=system_prompt,
                            scale_rewards_by_std=g.grpo_scale_rewards_by_std)
    log(f" GRPO: {len(prompts)} prompts ({', '.join(verifiers)}; {', '.join(languages)}), "
        f"{shape.global_batch_size} per step x {g.grpo_samples_per_prompt} samples, "
        f"{g.grpo_epochs} optimizer step(s) per rollout")
    batches = GRPOBatches(
        model, engine, prompts, prompt_ids, rollout, verifier_score, fields,
        capacity=config.batch.micro_batch_size * shape.seq_length,
        pad_token=tokenizer.eod, reference=reference, epochs=g.grpo_epochs,
        dp_rank=ps.get_data_parallel_rank(), dp_size=shape.data_parallel_size, state=state)
    if resumed is not None:
        _resume_inside_rollout(config, shape, resumed, batches, log)
    return batches, grpo_objective(loss_config(config), fields)


def _resume_inside_rollout(config, shape, resumed: dict, batches, log) -> None:
    """A checkpoint saved between the epochs of a rollout (a signal, --exit-duration-in-mins)
    holds each rank's batches of that rollout: the resumed run trains its remaining epochs on
    them, as the stopped run would have. They are per rank, so the layout must be the same."""
    from megatron_trillion.training import checkpointing

    epochs = config.grpo.grpo_epochs
    saved_epochs = int(resumed.get("config", {}).get("grpo_epochs", epochs))
    done = rollout_epochs_done(int(resumed.get("data", {}).get("consumed_samples", 0)),
                               shape.global_batch_size, saved_epochs)
    if not done:
        return
    where = f"--load {config.checkpoint.load}"
    if epochs != saved_epochs:
        raise UserError(f"{where} was saved after epoch {done} of a rollout of {saved_epochs} "
                        f"epochs: resume it with that --grpo-epochs, not {epochs}")
    layout, current = list(resumed.get("rng_layout", [])), checkpointing.rank_layout()
    if layout != current:
        raise UserError(f"{where} was saved after epoch {done} of {epochs} of a rollout, whose "
                        f"batches each rank keeps: resume it at its layout (PP, TP, DP) "
                        f"{layout}, not {current} (or from a checkpoint at a rollout boundary)")
    path = checkpointing.resolve_checkpoint(config.checkpoint.load, int(resumed["iteration"]),
                                            log=lambda line: None)
    batches.restore(checkpointing.load_rank_state(path))
    log(f" GRPO: resuming after epoch {done} of {epochs} of a rollout, on its saved batches")


def _engine(model: list, tokenizer, max_sequence_length: int, chat):
    """The generation engine on the training model itself (its MTP heads, which only serve
    training, off while it is built; ``rollout._generating`` does the same while sampling)."""
    from megatron_trillion.inference.engine import GenerationEngine
    from megatron_trillion.posttraining.rollout import _generating

    with _generating(model) as generating:
        return GenerationEngine(generating.core, tokenizer, max_sequence_length,
                                eos_token_ids=chat.end_of_turn_ids())


def _reference_identity(config, resumed: Optional[dict]) -> dict:
    """The weights the run started from: what a resumed run's checkpoint recorded, else
    ``--load`` (resolved to its checkpoint directory), else the seeded initial weights."""
    from megatron_trillion.training import checkpointing

    if resumed is not None and not config.checkpoint.finetune:
        return dict(resumed.get("data", {}).get("reference") or {})
    load = config.checkpoint.load
    if load:
        path = checkpointing.resolve_checkpoint(load, config.checkpoint.ckpt_step,
                                                log=lambda line: None, may_not_exist=True)
        if path is not None:  # .../iter_NNNNNNN
            return {"path": os.path.abspath(load),
                    "iteration": int(os.path.basename(path).split("_")[-1])}
    return {"initial weights": True, "seed": config.training.seed}


def _reference_policy(config, preset, model: list, identity: dict, resumed: Optional[dict],
                      log: Callable[[str], None]):
    from megatron_trillion.models.presets import model_signature
    from megatron_trillion.posttraining.grpo_objective import ReferencePolicy
    from megatron_trillion.training import checkpointing

    if resumed is None or config.checkpoint.finetune:
        return ReferencePolicy(model)  # the weights the model holds now
    path = identity.get("path")
    if not path or not os.path.isdir(path):
        raise UserError(f"--load {config.checkpoint.load}: the run's reference policy "
                        f"({path or 'its initial weights'}) cannot be reloaded; a KL penalty "
                        "against other weights would change the run")
    reference = ReferencePolicy(model)  # this run's weights, for now
    checkpointing.load_checkpoint(path, model, None, model_signature(preset),
                                  load_optimizer=False, load_rng=False,
                                  iteration=identity.get("iteration"), log=log)
    reference.exchange()  # the model holds the run's weights again, `reference` the reference's
    return reference
