"""Hugging Face export / import (tools/convert_checkpoint.py).

- ``checkpoint_reader``: a torch_dist checkpoint read tensor by tensor, any saving layout.
- ``layout``: how megatron-core packs fused weights (QKV per query group, SwiGLU fc1).
- ``llama`` / ``afmoe``: the name and layout mapping per HF architecture, and its config.json.
- ``architectures``: which architecture a preset maps to.
- ``hf_files``: sharded safetensors writer + index, HF directory reader, tokenizer files.
- ``export`` / ``importer``: the two directions.
"""
