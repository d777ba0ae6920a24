# megatron-trillion on a pinned NGC PyTorch image (ships torch, Transformer Engine, apex, NCCL).
# Build:  docker build -t megatron-trillion .
# Run:    docker run --gpus all --rm megatron-trillion quickstart
#         docker run --gpus all --rm -v /data:/data megatron-trillion pretrain --preset tri-7b ...
FROM nvcr.io/nvidia/pytorch:25.04-py3

ENV PYTHONUNBUFFERED=1 \
    MEGATRON_TRILLION_SKIP_TORCH=1

WORKDIR /opt/megatron-trillion
COPY . /opt/megatron-trillion

# Keep the image's torch (and its CUDA build): pin every package the image already ships to its
# installed version, so resolving our requirements can never replace them.
RUN pip freeze | grep -iE '^(torch|transformer[-_]engine|apex|triton)[=@ ]' > /tmp/image-pins.txt \
    && pip install --no-cache-dir -c /tmp/image-pins.txt -e . \
    && python -c "import megatron_trillion, megatron.core; print('megatron-core', megatron.core.__version__)"

RUN useradd --create-home --uid 1000 trillion \
    && chown -R trillion /opt/megatron-trillion
USER trillion

ENTRYPOINT ["bash", "/opt/megatron-trillion/docker/entrypoint.sh"]
CMD ["--help"]
