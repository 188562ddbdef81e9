"""Stages of the robust-dpo pipeline, composed with Ray Data, Train and Tune.

One module per stage (data, shifts, synthetic, reference, train, evaluate, tune, run), each with a
`main(args)` entry used by `robust-dpo <stage>` (see `pipelines.cli`).
"""
