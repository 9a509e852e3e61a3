#!/bin/bash
# Prepare a one-shot GPU session on a lent machine that has torch (CUDA), triton and onnxruntime but no MONAI,
# nibabel, ISA-L or rapidgzip, and no network: download their wheels for the device's Python into .whl/ and copy
# the wholeBody bundle's configs into .device/ (both git-ignored). Then, through the device tool, run
#     bash benchmarks/device_session.sh          carrying [".whl", ".device"]
# PYVER: the device's Python (default 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${PYVER:-3.12}"
mkdir -p .whl .device
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d .whl "monai==1.6.1" "nibabel>=5.0" "isal>=1.9" "rapidgzip>=0.14"
SRC="${WHOLEBODY:-../shared/bundles/wholeBody_ct_segmentation}"
rm -rf .device/wholeBody_ct_segmentation
mkdir -p .device/wholeBody_ct_segmentation
cp -r "$SRC/configs" .device/wholeBody_ct_segmentation/
chmod -R u+w .device/wholeBody_ct_segmentation
ls -la .whl .device/wholeBody_ct_segmentation/configs
