"""Foundation proof: real megatron-core on CPU/gloo gives the serial numbers under TP, PP, DP.

Weights are made identical across layouts the way a user would: the serial run saves a
megatron-core distributed checkpoint and the parallel run loads it, resharded.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from multiprocess import run_distributed

VOCAB, SEQ, BATCH = 128, 16, 4


def _tiny_gpt(tp: int, pp: int, pre_process: bool = True, post_process: bool = True):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=96, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
        pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=False,
    )


def _batch(step: int = 0):
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _position_ids(n: int):
    return torch.arange(SEQ).unsqueeze(0).expand(n, SEQ)


def _save(model, path: str) -> None:
    from megatron.core import dist_checkpointing

    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), path)


def _load(model, path: str) -> None:
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), path)
    model.load_state_dict(state)


def _full_logits(model, tokens):
    """Vocab-parallel logits gathered over the tensor-parallel group."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    with torch.no_grad():
        logits = model(tokens, _position_ids(tokens.shape[0]), None)
        return gather_from_tensor_model_parallel_region(logits).numpy()


def _swap_in_grads(model) -> None:
    for param in model.parameters():
        param.data = param.grad.detach().clone()


# ---------------------------------------------------------------------------------------------
# TP


def serial_reference(ckpt: str, grads: str):
    from megatron_trillion.platform.distributed import ParallelSizes, initialize_distributed

    initialize_distributed(ParallelSizes())
    model = _tiny_gpt(1, 1)
    _save(model, ckpt)
    tokens, labels = _batch()
    logits = _full_logits(model, tokens)
    loss = model(tokens, _position_ids(BATCH), None, labels=labels).mean()
    loss.backward()
    _swap_in_grads(model)
    _save(model, grads)
    return {"logits": logits, "loss": float(loss),
            "n_params": sum(p.numel() for p in model.parameters())}


def tp_run(ckpt: str, grads: str, tp: int):
    from megatron_trillion.platform.distributed import ParallelSizes, initialize_distributed

    initialize_distributed(ParallelSizes(tensor=tp))
    model = _tiny_gpt(tp, 1)
    _load(model, ckpt)
    tokens, labels = _batch()
    logits = _full_logits(model, tokens)
    loss = model(tokens, _position_ids(BATCH), None, labels=labels).mean()
    loss.backward()
    reference = _tiny_gpt(tp, 1)
    _load(reference, grads)  # the serial gradients, resharded to this rank's layout
    expected = dict(reference.named_parameters())
    worst = max(
        float((param.grad - expected[name]).abs().max()) for name, param in model.named_parameters()
    )
    return {"logits": logits, "loss": float(loss), "grad_err": worst,
            "n_params": sum(p.numel() for p in model.parameters())}


@pytest.mark.slow
def test_tp2_matches_tp1_logits_and_grads(tmp_path):
    ckpt, grads = str(tmp_path / "ckpt"), str(tmp_path / "grads")
    (serial,) = run_distributed(serial_reference, 1, ckpt=ckpt, grads=grads)
    ranks = run_distributed(tp_run, 2, ckpt=ckpt, grads=grads, tp=2)
    for rank in ranks:
        np.testing.assert_allclose(rank["logits"], serial["logits"], rtol=0, atol=1e-5)
        assert abs(rank["loss"] - serial["loss"]) <= 1e-5
        assert rank["grad_err"] <= 1e-5
    # The model really is split: each rank holds little more than half of the weights.
    assert ranks[0]["n_params"] < 0.6 * serial["n_params"]


# ---------------------------------------------------------------------------------------------
# PP, and TP x PP x DP with mcore DDP + distributed optimizer


def _forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    output = model(tokens, _position_ids(tokens.shape[0]), None, labels=labels)

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        return loss, {"lm loss": loss.detach()}

    return output, loss_func


# TP x PP x DP with the distributed optimizer through the real training entry point:
# tests/test_pretrain_parallel.py.


def pipeline_run(ckpt: str, tp: int, pp: int, steps: int, distributed_optimizer: bool):
    """Train `steps` Adam steps on a fixed batch stream; return the per-step mean loss."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_trillion.platform.distributed import ParallelSizes, initialize_distributed

    initialize_distributed(ParallelSizes(tensor=tp, pipeline=pp))
    model = _tiny_gpt(
        tp, pp,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    _load(model, ckpt)
    model = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer
        ),
        module=model,
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1, clip_grad=1.0,
                        use_distributed_optimizer=distributed_optimizer),
        [model],
    )
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    micro_batch = BATCH // dp // 2  # two micro-batches per rank
    forward_backward = get_forward_backward_func()
    losses = []
    for step in range(steps):
        tokens, labels = _batch(step)
        mine = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
        tokens, labels = tokens[mine], labels[mine]
        micro = [(tokens[i:i + micro_batch], labels[i:i + micro_batch])
                 for i in range(0, tokens.shape[0], micro_batch)]
        model.zero_grad_buffer()
        optimizer.zero_grad()
        out = forward_backward(
            forward_step_func=_forward_step, data_iterator=iter(micro), model=[model],
            num_microbatches=len(micro), seq_length=SEQ, micro_batch_size=micro_batch,
            forward_only=False,
        )
        success, grad_norm, _ = optimizer.step()
        assert success
        if parallel_state.is_pipeline_last_stage():
            local = torch.stack([o["lm loss"] for o in out]).mean()
        else:
            local = torch.zeros(())
        # Mean over micro-batches and DP ranks; broadcast from the last stage to every rank.
        torch.distributed.all_reduce(local, group=parallel_state.get_data_parallel_group())
        local /= dp
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        torch.distributed.broadcast(local, last, group=parallel_state.get_pipeline_model_parallel_group())
        losses.append(float(local))
    return losses


@pytest.mark.slow
def test_pp2_matches_serial_loss(tmp_path):
    ckpt, grads = str(tmp_path / "ckpt"), str(tmp_path / "grads")
    run_distributed(serial_reference, 1, ckpt=ckpt, grads=grads)
    (serial,) = run_distributed(pipeline_run, 1, ckpt=ckpt, tp=1, pp=1, steps=3,
                                distributed_optimizer=False)
    pp2 = run_distributed(pipeline_run, 2, ckpt=ckpt, tp=1, pp=2, steps=3,
                          distributed_optimizer=False)
    assert serial[0] != serial[-1]  # training moved the loss
    for rank in pp2:
        np.testing.assert_allclose(rank, serial, rtol=0, atol=1e-5)
