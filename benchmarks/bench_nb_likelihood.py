"""Cost of the NB log-likelihood's forward + backward on one training minibatch.

Usage::

    python benchmarks/bench_nb_likelihood.py                 # 128 x 2,000, three densities
    python benchmarks/bench_nb_likelihood.py --batch-size 1024 --repeats 50

Compares :func:`perturbx.module.negative_binomial_log_likelihood` (hand-written forward and
backward, gamma-function terms looked up in per-gene count tables) with autograd through
``scvi.distributions.NegativeBinomial(mu, theta).log_prob(x).sum(-1)``, on minibatches of the
simulated screen's counts (30% non-zero) and of the same counts binomially thinned to lower
densities (single-cell data are typically 5-15% non-zero). Each figure is the median over
``--rounds`` rounds of ``--repeats`` calls, the two implementations alternating, so that both
see the same machine load.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def time_call(fn, repeats: int) -> float:
    """Milliseconds per call of ``fn`` (mean over ``repeats`` calls)."""
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    from scvi.distributions import NegativeBinomial

    import perturbx
    from perturbx.module import negative_binomial_log_likelihood

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument(
        "--keep",
        type=float,
        nargs="+",
        default=[1.0, 0.4, 0.15],
        help="binomial thinning probabilities of the counts",
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    adata = perturbx.data.simulate_drug_screen(
        n_cells=max(args.batch_size, 1000), n_genes=args.n_genes, seed=0
    )
    counts = torch.tensor(adata.X[: args.batch_size].toarray())
    generator = torch.Generator().manual_seed(0)
    log_rate = torch.log(counts.mean(0, keepdim=True) + 0.1) + 0.3 * torch.randn(
        counts.shape, generator=generator
    )
    log_rate.requires_grad_(True)
    log_theta = (0.5 * torch.randn(args.n_genes, generator=generator) + 1.0).requires_grad_(True)

    def step(likelihood, x):
        def run():
            likelihood(x).sum().backward()
            log_rate.grad = log_theta.grad = None

        return run

    def perturbx_nb(x):
        return negative_binomial_log_likelihood(x, log_rate, log_theta)

    def scvi_nb(x):
        return NegativeBinomial(mu=log_rate.exp(), theta=log_theta.exp()).log_prob(x).sum(-1)

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"minibatch {args.batch_size} x {args.n_genes}"
    )
    print(f"{'non-zero':>9} {'perturbx ms':>12} {'scvi autograd ms':>17} {'speed-up':>9}")
    for keep in args.keep:
        x = (
            counts
            if keep >= 1
            else torch.binomial(counts, torch.full_like(counts, keep), generator=generator)
        )
        ours, theirs = step(perturbx_nb, x), step(scvi_nb, x)
        ours(), theirs()  # warm-up
        times = np.array(
            [
                [time_call(ours, args.repeats), time_call(theirs, args.repeats)]
                for _ in range(args.rounds)
            ]
        )
        ours_ms, theirs_ms = np.median(times, axis=0)
        density = float((x > 0).float().mean())
        print(f"{density:>9.1%} {ours_ms:>12.2f} {theirs_ms:>17.2f} {theirs_ms / ours_ms:>8.1f}x")


if __name__ == "__main__":
    main()
