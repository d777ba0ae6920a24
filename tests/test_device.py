"""The device rule (``platform.device``) on a CPU machine."""

from __future__ import annotations

import numpy as np
import torch

from megatron_trillion.data.packed_batch import collate_packed
from megatron_trillion.platform import device


def _batch() -> dict:
    sample = {"tokens": [1, 2, 3, 4], "labels": [2, 3, 4, 0], "loss_mask": [1, 1, 1, 0],
              "position_ids": [0, 1, 0, 1], "cu_seqlens_blocks": [0, 2, 4],
              "cu_seqlens_documents": [0, 2, 4], "document_ids": [[0, 5], [0, 6]], "index": 3}
    return collate_packed([{k: (v if k == "index" else np.asarray(v))
                            for k, v in sample.items()}])


def test_to_device_moves_model_inputs_once_and_keeps_host_bookkeeping():
    assert device.compute_device() == torch.device("cpu")
    batch = _batch()
    moved = device.to_device(batch, torch.device("meta"))  # a device distinct from the host
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert moved[key].device.type == "meta" and batch[key].device.type == "cpu"
    params = moved["packed_seq_params"]
    assert params.cu_seqlens_q.device.type == "meta" and params.cu_seqlens_q.dtype == torch.int32
    # max_seqlen stays a host int: reading it from the device would sync in every layer
    assert params.max_seqlen_q == 2 and isinstance(params.max_seqlen_q, int)
    assert moved["document_ids"][0].device.type == "cpu" and moved["indices"] == [3]
    assert device.pin_batch(batch) is batch  # pinning needs CUDA


def test_cuda_device_max_connections_is_set_for_tp_and_cp_only():
    env: dict = {}
    assert device.require_single_device_connection(1, 1, env) is None and env == {}
    assert "set CUDA_DEVICE_MAX_CONNECTIONS=1" in device.require_single_device_connection(2, 1,
                                                                                          env)
    assert env == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    assert device.require_single_device_connection(1, 2, env) is None  # already 1
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}
    warning = device.require_single_device_connection(1, 2, env)
    assert warning.startswith("warning: CUDA_DEVICE_MAX_CONNECTIONS=8") and env[
        "CUDA_DEVICE_MAX_CONNECTIONS"] == "8"  # the user's choice is kept, and named
