"""megadiff: a Megatron-style trainer for tri-modal masked discrete diffusion models."""

from setuptools import find_packages, setup

setup(
    name="megadiff",
    version="0.1.0",
    description="Megatron-style distributed trainer for tri-modal masked discrete diffusion models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megadiff", "megadiff.*"]),
    include_package_data=True,
    install_requires=[
        # torch is installed first and kept pinned (CPU boxes: the local 2.13.0 wheel);
        # a lower bound only, so an installed torch is never replaced.
        "torch>=2.4",
        "megatron-core==0.16.1",
        "numpy>=1.24",
        "pyyaml>=6.0",
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.6", "matplotlib>=3.7"],
        # GPU boxes only: Transformer Engine (FP8, fused kernels). Never install on CPU boxes.
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        # train.engine=deepspeed; install with DS_BUILD_OPS=0 (no CUDA ops are compiled)
        "deepspeed": ["deepspeed==0.19.8"],
    },
    entry_points={"console_scripts": ["megadiff=megadiff.cli:main"]},
)
