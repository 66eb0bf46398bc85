"""The CUDA kernels under compute-sanitizer: every public path that launches them, at a small
shape and at odd ones (odd V, a column slice, few rows split across the vocabulary, strided rows).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python bench/sanitize_cuda.py [cuda|triton]

Without a GPU (TRITON_INTERPRET=1 python bench/sanitize_cuda.py triton) the same calls run on CPU
tensors: a dry run of this script's logic, not a memory check.

With torch's caching allocator off, every tensor is its own allocation, so a read past the end
of the logits or of an output is reported instead of landing in a neighbour's cached block.
"""
import sys

import torch

import rankops

# (N, V, vocab_size, dtype): small; odd V in bf16; a padded vocabulary; few rows with a huge odd
# vocabulary (the vocabulary split across blocks); one row of one column.
CASES = [(8, 1000, None, torch.float32), (37, 50257, None, torch.bfloat16),
         (5, 50304, 50277, torch.float16), (3, 262147, None, torch.bfloat16), (1, 1, None, torch.float32)]


def main():
    backend = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if backend not in rankops.available_backends():
        sys.exit(f"backend {backend!r} is not available here: {rankops.available_backends()}")
    for n_rows, n_vocab, vocab_size, dtype in CASES:
        g = torch.Generator(device=device).manual_seed(n_rows)
        logits = torch.randn(n_rows, n_vocab, generator=g, device=device).mul_(3).to(dtype)
        targets = torch.randint(0, vocab_size or n_vocab, (n_rows,), generator=g, device=device)
        targets[1::3] = -100  # row 0 is always kept: an all-ignored call is an error
        for view in (logits, logits.t().contiguous().t()):  # contiguous, and column-major rows
            s = rankops.token_stats(view, targets, vocab_size=vocab_size, backend=backend)
            ref = rankops.token_stats(view, targets, vocab_size=vocab_size, backend="torch")
            assert torch.equal(s.rank, ref.rank) and torch.equal(s.ties, ref.ties), (n_rows, n_vocab)
            acc = rankops.RankAccumulator(vocab_size or n_vocab, device=device)
            acc.update(view, targets, backend=backend)
            acc.update(view, targets, backend=backend, check_finite=False, validate=False)
            x = view.detach().clone().requires_grad_(True)
            rankops.compensated_cross_entropy(x, targets, 0.3, vocab_size=vocab_size, backend=backend).backward()
            assert torch.isfinite(x.grad.float()).all()
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"ok {backend} N={n_rows} V={n_vocab} vocab_size={vocab_size} {dtype}", flush=True)


if __name__ == "__main__":
    main()
