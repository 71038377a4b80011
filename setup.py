"""megatron-lasp: Linear Attention Sequence Parallelism on megatron-core.

CPU machines: install the CPU torch wheel first (``pip install torch==2.13.0``) so that the
``torch`` requirement below is already satisfied; GPU machines: install next to your CUDA torch
with ``pip install -e .``.
"""

from setuptools import find_packages, setup

setup(
    name="megatron-lasp",
    version="0.1.0",
    description="Linear Attention Sequence Parallelism (LASP) for linear-attention LMs on megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_lasp", "megatron_lasp.*"]),
    # the docs beside the code, and the exported model card's text, which the converter reads at run time
    package_data={"megatron_lasp": ["**/*.md", "hf/templates/model_card.md"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "triton>=3.2",
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        # megatron-core's dist_checkpointing writer needs psutil but does not declare it.
        "psutil",
        # 5.17 is the oldest tested (4.x feeds the prompt into the recurrent state again at every
        # cached generation step); megatron_lasp/hf/modeling_linear_lm.py refuses older versions.
        "transformers>=5.17,<6",
        "tokenizers",
        "safetensors",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "matplotlib", "regex"],
        "te": ["transformer-engine[pytorch]"],
        "fla": ["flash-linear-attention"],
        "tensorboard": ["tensorboard"],
        # Hugging Face side: from_pretrained(device_map=...) and transformers.Trainer need accelerate.
        "hf": ["accelerate>=1.0"],
    },
    entry_points={},
)
