"""tempeh: multi-view volumetric head registration (TEMPEH, written from scratch).

Install with ``make install`` (creates ``.venv`` and picks the torch build from ``TORCH_SPEC``)
or ``pip install -e .[test]`` into an environment that already has torch.
"""
from setuptools import find_packages, setup

TOOLS = {
    "tempeh-check-capture": "tempeh.cli.check_capture:main",
    "tempeh-make-synthetic": "tempeh.cli.make_synthetic:main",
    "tempeh-evaluate": "tempeh.cli.evaluate:main",
    "tempeh-build-cache": "tempeh.cli.build_cache:main",
    "tempeh-train": "tempeh.cli.train:run",
    "tempeh-fit-scans": "tempeh.cli.fit_scans:main",
    "tempeh-register-sequence": "tempeh.cli.register_sequence:main",
    "tempeh-visualize": "tempeh.cli.visualize:main",
}

setup(
    name="tempeh",
    version="0.1.0",
    description="Multi-view volumetric head registration in a fixed template topology",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["tempeh", "tempeh.*"]),
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "scipy>=1.10",
        "trimesh>=4.0",
        "embreex>=4.4; platform_machine=='x86_64'",  # bundles Embree 4 (tempeh.geometry.embree_rays)
        "libigl>=2.5",
        "numba>=0.59",
        "opencv-python-headless>=4.8",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "h5py>=3.8",
        "tensorboard>=2.12",
        "matplotlib>=3.7",
        "pillow>=9.0",
    ],
    extras_require={
        "test": ["pytest>=7.4", "pytest-timeout>=2.1"],
        # NVIDIA kaolin is not on the package index; install it from NVIDIA's wheel index by
        # hand if wanted. tempeh only uses it as an optional backend and never requires it.
        "kaolin": [],
    },
    entry_points={"console_scripts": [f"{k}={v}" for k, v in TOOLS.items()]},
)
