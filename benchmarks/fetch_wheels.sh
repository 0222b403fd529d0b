#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels that benchmarks/gpu.sh
# installs on the GPU machine (which has JAX, flax, optax, chex, PyTorch and
# Python 3.12, but no package index). They land in benchmarks/wheels/ (ignored
# by git; name it in the device tool's `carry`).
#
#   dp-accounting      needed by dpjax itself (its accountant)
#   jax-privacy        peer: jax_privacy.clipped_grad (+ pydantic and its needs)
#   opacus             peers: Opacus hooks and ghost clipping (pure Python; uses the machine's torch)
#
# Pinned to the versions of shared/ANCHORS.md; one version of each (two would
# stop the install there). About 3 MB in all.
set -euo pipefail
cd "$(dirname "$0")"
PIP=${PIP:-python3 -m pip}
mkdir -p wheels
$PIP download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d wheels \
  dp-accounting==0.6.0 jax-privacy==2.0.0 opacus==1.6.0 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0
ls -l wheels
