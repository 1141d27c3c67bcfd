#!/usr/bin/env bash
# Prepares, on this machine, what benchmarks/device/check.sh needs on a lent GPU machine, which reaches no package
# registry and does not see ../shared: wheels of the dependencies its image lacks (.whl/) and the real slides
# (.device-data/slides). Both are git-ignored; name them in the device call's `carry` (docs/benchmarks.md, "On a
# GPU"). PY_VERSION=3.11 builds the same kit for this machine's Python, to rehearse check.sh here.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY_VERSION=${PY_VERSION:-3.12}
WHEELS=${WHEELS:-.whl}
DATA=${WSI_SHARED_DATA:-../shared/data}
# wsi-pipeline's dependencies (with dask[array,distributed]'s and pydantic's) that the device image (Python 3.12,
# torch 2.11, numpy, scipy, pillow, scikit-image, matplotlib, pytest, ...: ../.library/device/KINDS.md) does not
# hold, plus tifffile and typing-extensions, whose versions there are not known (small); each at the version this
# project is tested with (.venv). scikit-image (13.6 MB) stays out: with it the kit passes the 64 MiB a call carries;
# check.sh prints the version it finds there. tests/test_device_kit.py keeps both lists in step with pyproject.toml.
ON_DEVICE="torch torchvision numpy pillow scikit-image click pyyaml tqdm safetensors matplotlib h5py timm"
PACKAGES="openslide-python openslide-bin zarr numcodecs donfig google-crc32c dask distributed partd locket tblib
tornado zict shapely imagecodecs tifffile pydantic pydantic-core annotated-types typing-inspection typing-extensions
scikit-learn joblib threadpoolctl"
[ "$PY_VERSION" = 3.12 ] || PACKAGES="$PACKAGES importlib-metadata zipp lazy-importer"  # dask needs them before 3.12
[ -x .venv/bin/python ] || make install
rm -rf "$WHEELS" && mkdir -p "$WHEELS"
pins=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" $PACKAGES)
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux2010_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do platforms="$platforms --platform $p"; done
# shellcheck disable=SC2086  # word splitting of the pins and platforms is meant
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  $platforms -d "$WHEELS" $pins
# the GPU tests and benchmarks read CMU-1-Small-Region and synthetic slides they write themselves
rm -rf .device-data && mkdir -p .device-data/slides && cp "$DATA/slides/CMU-1-Small-Region.svs" .device-data/slides/
chmod -R u+w .device-data
echo "wheels: $(ls "$WHEELS" | wc -l) files, $(du -sh "$WHEELS" | cut -f1); slides: $(du -sh .device-data | cut -f1)"
echo "working tree that travels: $(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1) bytes tracked + the two folders (limit 64 MiB)"
