#!/usr/bin/env bash
# Prepare the GPU check (benchmarks/gpu_check.py) on this machine, before a lent GPU machine is started:
# wheels for Python 3.12 of what its image lacks (cellvae's and scVI's dependencies, ~34 MB) into .whl/,
# and the Kang data into .gpu/. Both folders are git-ignored; the device tool carries them.
# How to run the check itself: benchmarks/README.md, "GPU check".
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .gpu
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  anndata==0.12.19 scanpy==1.11.5 umap-learn==0.5.12 pynndescent==0.6.0 igraph==1.0.0 leidenalg==0.12.0 \
  texttable==1.7.2 legacy-api-wrap==1.5 natsort==8.4.0 session-info2==0.4.1 scverse-misc==0.0.3 \
  array-api-compat==1.16.0 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 pandas==2.3.3 \
  scvi-tools==1.4.2 ml-collections==1.1.0 mudata==0.3.10 pyro-ppl==1.9.2 pyro-api==0.1.2 sparse==0.19.3 \
  scikit-misc==0.5.3 pytz==2026.6 tzdata==2026.6 \
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
python3 -m pip wheel --no-deps -w .whl docrep==0.3.2  # scVI needs it; published as a source archive only (pure Python)
cp ../shared/data/kang_ctrl_5donors_muscat.h5ad .gpu/
du -sh .whl .gpu
