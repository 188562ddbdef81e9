"""Keys shared by the run smoke test and the kill drill test (a plain module: `conftest` is ambiguous
between tests/ and tests/pipelines/)."""

# The smallest whole chain (`robust-dpo run` keys): a tiny world, two objectives (one batch-coupled),
# two optimizer steps each with a checkpoint after each, evaluation under three shift grids.
SMOKE_RUN_KEYS = ["synth.n_train=128", "synth.n_eval=32", "synth.ref_steps=30", "synth.n_classifier=64",
                  "search.objectives=[dpo,kldpo]", "train.max_steps=2", "train.batch_size=16",
                  "train.micro_batch_size=16", "train.checkpoint_every=1", "trial_eval.num_prompts=4",
                  "trial_eval.samples_per_prompt=2", "evaluate.generation.num_prompts=4",
                  "evaluate.generation.samples_per_prompt=2",
                  "run.grid=[mixture:alpha=0:1:5, label_flip:eps=0:0.4:3, source_mixture:target=0:1:3]",
                  "run.frontier_betas=[]"]  # DPO's frontier: its one beta and the reference (no extra trials)
