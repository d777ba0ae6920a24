# megatron-trillion on a pinned NGC PyTorch image (ships torch, Transformer Engine, apex, NCCL).
# Build:  docker build -t megatron-trillion .
# Run:    docker run --gpus all --rm megatron-trillion quickstart
#         docker run --gpus all --rm -v /data:/data megatron-trillion pretrain --preset tri-7b ...
# Base image: megatron-core 0.16.1 is developed against Transformer Engine >= 2.9, < 2.12 (its
# `dev` extra: transformer-engine[core_cu13,pytorch]>=2.9.0a0,<2.12.0, CUDA 13). NGC PyTorch
# 25.11 ships TE 2.9 with PyTorch 2.10 on CUDA 13; 25.04 (the previous pin) shipped TE 2.3.
# The build stops below if the image's TE is outside that range (read from megatron-core's own
# metadata), so a future bump of this tag cannot drift silently. On a GPU node, run
# `megatron-trillion-selftest` before a long job.
FROM nvcr.io/nvidia/pytorch:25.11-py3

ENV PYTHONUNBUFFERED=1 \
    MEGATRON_TRILLION_SKIP_TORCH=1

WORKDIR /opt/megatron-trillion
COPY . /opt/megatron-trillion

# Keep the image's torch (and its CUDA build): pin every package the image already ships to its
# installed version, so resolving our requirements can never replace them.
RUN pip freeze | grep -iE '^(torch|transformer[-_]engine|apex|triton)[=@ ]' > /tmp/image-pins.txt \
    && pip install --no-cache-dir -c /tmp/image-pins.txt -e . \
    && python -c "import megatron_trillion, megatron.core; print('megatron-core', megatron.core.__version__)" \
    && python -m megatron_trillion.selftest.te_range

RUN useradd --create-home --uid 1000 trillion \
    && chown -R trillion /opt/megatron-trillion
USER trillion

ENTRYPOINT ["bash", "/opt/megatron-trillion/docker/entrypoint.sh"]
CMD ["--help"]
