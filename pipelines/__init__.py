"""Stages of the robust-dpo pipeline, composed with Ray Data, Train and Tune.

One import path per stage, in data-flow order: `world` (synth), `data`, `reference`, `train`,
`evaluate`, `tune`, `run`; each exposes `add_arguments`, `CONFIG`, `build_config` and `main(args)`
for `robust-dpo <stage>` (see `pipelines.cli`).  Shared pieces live once: `config` (the loader),
`paths`, `console`, `schema` (the on-disk contract), `model` (loading, collation, log-probs),
`row_order`, `ray_session`, `tracking`, `report` / `pareto`.
"""
