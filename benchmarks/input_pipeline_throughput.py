"""Steady-state throughput of the training input pipeline, in-process versus worker processes.

    python -m data.synthetic_screen --out /tmp/screen --preset demo --workers 2
    python -m benchmarks.input_pipeline_throughput --dataset /tmp/screen --workers 0,1

Prints, per worker count, the time to the first batch and the steady-state batches/s and crops/s
(after `--warmup` batches), with the ratio to the first listed worker count (the baseline).
"""
from __future__ import annotations

from benchmarks.measure import iterator_rate
from maejax import flags
from maejax.input_pipeline import make_train_iterator, open_dataset


def main() -> None:
    parser = flags.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, metavar="DIR")
    parser.add_argument("--workers", default="0,1", help="comma-separated worker counts; the first is the baseline")
    parser.add_argument("--batch_size", deprecated="--batch-size", type=int, default=64)
    parser.add_argument("--crop_size", deprecated="--crop-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batches", type=int, default=100)
    args = parser.parse_args()
    dataset = open_dataset(args.dataset)
    print(f"{args.dataset}: {len(dataset)} records {dataset.crop_shape}, batch {args.batch_size}, "
          f"crop {args.crop_size}, {args.batches} batches after {args.warmup} warm-up")
    print(f"{'workers':>7} {'first batch s':>13} {'batches/s':>10} {'crops/s':>9} {'ratio':>6}")
    baseline = None
    for workers in (int(w) for w in args.workers.split(",")):
        iterator = make_train_iterator(dataset, batch_size=args.batch_size, crop_size=args.crop_size, seed=0,
                                       num_workers=workers, process_index=0, process_count=1)
        result = iterator_rate(iterator, args.batch_size, args.warmup, batches=args.batches)
        baseline = baseline or result["batches_per_s"]
        print(f"{workers:>7} {result['first_batch_s']:>13.2f} {result['batches_per_s']:>10.1f} "
              f"{result['crops_per_s']:>9.0f} {result['batches_per_s'] / baseline:>6.2f}")


if __name__ == "__main__":  # grain worker processes are spawned: keep the entry point guarded
    main()
