#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels of the peers the GPU machine's image lacks, for its Python 3.12 /
# torch 2.11 / CUDA 13 (x86-64): xformers (prebuilt for torch >= 2.10) and open_clip_torch with the pure deps the
# image does not have (ftfy, wcwidth; torch, torchvision, regex, tqdm, huggingface-hub, safetensors and timm are
# in the image). benchmarks/gpu_session.sh installs them with pip --no-index --no-deps. flash-attn publishes no
# wheels on PyPI (source only, a long nvcc build), so it is not carried. Keep .whl/ small: the tree that travels
# to the device is limited to 64 MiB.
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  xformers==0.0.35 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
ls -l .whl
du -sh .whl
