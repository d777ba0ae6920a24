"""megatron-trillion: 3D-parallel pretraining of the Trillion model family on megatron-core."""

__version__ = "0.1.0"
