"""Build script: the package plus its required C++ extension (pybind11), compiled at install time."""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext_modules = [
    Pybind11Extension(
        "megatron_andromeda.data._helpers",
        ["csrc/helpers.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
    Pybind11Extension(
        "megatron_andromeda.preprocess._fast",
        ["csrc/preprocess_fast.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

EXTRAS = {
    "te": ["transformer-engine[pytorch]"],
    "flash": ["flash-attn>=2.5"],
    "apex": ["apex"],
    "eval": ["lm-eval>=0.4", "sacrebleu>=2.3", "matplotlib"],
    "wandb": ["wandb"],
    "fast": ["gigatoken>=0.10"],  # tools/preprocess_data.py --tokenizer-backend gigatoken (auto picks it)
    "dev": [
        "gigatoken>=0.10",
        "pytest>=7",
        "hypothesis>=6",
        "ruff>=0.5",
        "transformers>=4.44",
        "tensorboard",
        "sacrebleu>=2.3",
        "datasketch>=1.6",
        "zstandard",
        "pyarrow",
        "matplotlib",
        "lm-eval>=0.4",
        "megatron-core>=0.12",  # tests/test_megatron_compat.py: the .bin/.idx format against Megatron's own
    ],
}

setup(
    name="megatron_andromeda",
    version="0.1.0",
    description="Megatron-style 3D-parallel pretraining of PaLM- and MPT-style decoders",
    packages=find_packages(include=["megatron_andromeda", "megatron_andromeda.*"]),
    package_data={"megatron_andromeda": ["presets/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.3",
        "numpy>=1.24",
        "pyyaml>=6",
        "tokenizers>=0.15",
        "sentencepiece>=0.1.99",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require=EXTRAS,
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
