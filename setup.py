"""advcl-dist: distributed adversarial contrastive pretraining (AdvCL, NeurIPS 2021)."""
from setuptools import find_packages, setup

setup(
    name="advcl-dist",
    version="0.1.0",
    description="AdvCL adversarial contrastive pretraining from one GPU to SLURM clusters",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["advcl_dist", "advcl_dist.*"]),
    install_requires=[
        "torch>=2.2",
        "torchvision>=0.17",
        "numpy>=1.24",
        "omegaconf>=2.3",
        "pyyaml>=6",
        "tensorboard>=2.14",
        "tqdm>=4.66",
        "faiss-cpu>=1.7.4",
        "submitit>=1.5",
        "pyautoattack>=0.2",
        "scikit-learn>=1.3",
        "scipy>=1.10",  # non-negative least squares of the scaling bench (also a scikit-learn dependency)
        "matplotlib>=3.7",
        "safetensors>=0.4",
    ],
    extras_require={
        "ffcv": ["ffcv==1.0.2", "numba", "opencv-python", "pillow"],
        "deepspeed": ["deepspeed>=0.14"],
        "gpu": ["faiss-gpu"],
        "dev": ["pytest>=7.4", "pytest-xdist>=3.8", "ruff>=0.4"],
    },
    classifiers=[
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
    ],
)
