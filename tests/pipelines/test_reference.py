"""The reference stage: Ray Data map_batches actor pool -> cached columns; precomputed == live."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from pipelines import collate as collate_lib
from pipelines import model as model_lib
from pipelines.reference import ReferenceCacheConfig, compute_reference_dataset, model_fingerprint

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cached(ray_session, tiny_model_dir, pairs_dataset, tmp_path_factory):
    cfg = ReferenceCacheConfig(data=str(pairs_dataset), model=str(tiny_model_dir),
                               output=str(tmp_path_factory.mktemp("refcache")), batch_size=5)
    return cfg, compute_reference_dataset(cfg)


def _read(split_dir) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in sorted(split_dir.glob("*.parquet"))], ignore_index=True)


def _live_logps(model_dir, rows: dict) -> torch.Tensor:
    model = model_lib.load_causal_lm(str(model_dir), attn_implementation="sdpa").eval()
    with torch.no_grad():
        return model_lib.compute_row_logps(model, collate_lib.collate_pairs(rows, 0)).logps


def test_precompute_adds_live_reference_columns_in_order_and_is_reused(cached, tiny_model_dir, pairs_dataset, capsys):
    from pipelines import schema

    cfg, path = cached
    assert schema.read_manifest(path)["format"] == "pairs"
    for split in ("train", "eval"):
        source, written = _read(pairs_dataset / split), _read(path / split)
        assert written["row_id"].tolist() == source["row_id"].tolist()  # order preserved
        rows = {c: source[c].tolist() for c in schema.PAIR_TOKEN_COLUMNS}
        live = _live_logps(tiny_model_dir, rows)
        b = len(source)
        assert written["reference_chosen_logps"].to_numpy() == pytest.approx(live[:b].numpy(), abs=1e-5)
        assert written["reference_rejected_logps"].to_numpy() == pytest.approx(live[b:].numpy(), abs=1e-5)
    stamps = {f: f.stat().st_mtime_ns for f in path.rglob("*.parquet")}
    assert compute_reference_dataset(cfg) == path
    assert "reusing cached reference log-probs" in capsys.readouterr().out
    assert {f: f.stat().st_mtime_ns for f in path.rglob("*.parquet")} == stamps


def test_precomputed_reference_gives_the_live_loss(cached, tiny_model_dir):
    """Two DPO steps from the cached columns (no reference model) equal two steps with a live
    frozen reference: same losses, gradient norms and parameters."""
    import robust_objectives as ro

    from pipelines.train.step import StepContext, train_step

    frame = _read(cached[1] / "train").iloc[:8]
    columns = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids",
               "reference_chosen_logps", "reference_rejected_logps")
    rows = {c: frame[c].tolist() for c in columns}
    results = []
    for live in (True, False):
        policy = model_lib.load_causal_lm(str(tiny_model_dir), attn_implementation="sdpa").train()
        reference = model_lib.load_causal_lm(str(tiny_model_dir), attn_implementation="sdpa").eval() if live else None
        ctx = StepContext(objective=ro.get_objective("dpo"), hyperparameters={"beta": 0.5}, listwise=False,
                          needs_vocab=False, needs_embeddings=False, batch_coupled=False, live_reference=live)
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        history = [train_step(policy, reference, optimizer, scheduler, [collate_lib.collate_pairs(rows, 0)], ctx, s)
                   for s in range(2)]
        results.append(([(h["loss"], h["grad_norm"]) for h in history],
                        {n: p.detach() for n, p in policy.named_parameters()}))
    (live_metrics, live_params), (pre_metrics, pre_params) = results
    assert live_metrics[1][0] != pytest.approx(live_metrics[0][0], rel=1e-4)  # the step changed the loss
    for (a, b), (c, d) in zip(pre_metrics, live_metrics):
        assert a == pytest.approx(c, rel=1e-5) and b == pytest.approx(d, rel=1e-5)
    assert max(float((pre_params[n] - p).abs().max()) for n, p in live_params.items()) < 1e-6


def test_listwise_reference_column_holds_one_logp_per_response(ray_session, tiny_model_dir, listwise_dataset, tmp_path):
    from pipelines import schema

    path = compute_reference_dataset(ReferenceCacheConfig(data=str(listwise_dataset), model=str(tiny_model_dir),
                                                          output=str(tmp_path), batch_size=3))
    source, written = _read(listwise_dataset / "train"), _read(path / "train")
    assert written["row_id"].tolist() == source["row_id"].tolist()  # order preserved
    rows = {c: source[c].tolist() for c in schema.LIST_TOKEN_COLUMNS + ("scores",)}
    model = model_lib.load_causal_lm(str(tiny_model_dir), attn_implementation="sdpa").eval()
    with torch.no_grad():
        live = model_lib.compute_row_logps(model, collate_lib.collate_lists(rows, 0)).logps.reshape(len(source), 3)
    assert torch.tensor([list(v) for v in written["reference_logps"]]) == pytest.approx(live, abs=1e-5)


def test_reference_cli_prints_the_cache_path_and_rejects_bad_input(cached, tiny_model_dir, tmp_path, capsys):
    from pipelines.cli import main

    cfg, path = cached
    assert main(["reference", "--data", cfg.data, "--model", cfg.model, "--output", cfg.output, "batch_size=5"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(path)
    assert main(["reference", "--data", str(tmp_path), "--model", cfg.model]) == 2
    assert "is not a dataset written by `robust-dpo data`" in capsys.readouterr().err


def test_model_fingerprint_follows_the_weights(tmp_path, tiny_model_dir):
    from toy_checkpoints import save_tiny_model_and_tokenizer

    other = save_tiny_model_and_tokenizer(tmp_path / "other", [f"w{i}" for i in range(40)], seed=1)
    assert model_fingerprint(tiny_model_dir) == model_fingerprint(tiny_model_dir)
    assert model_fingerprint(other) != model_fingerprint(tiny_model_dir)


def test_reference_values_go_back_by_address_and_a_missing_row_is_an_error(ray_session, tmp_path):
    """Values arrive in any order; each lands on the row its (file, position) names, and a file whose
    rows did not all come back is refused instead of being misaligned."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from pipelines.row_order import put_back, rows_by_file

    # what the actor pool hands back when blocks come back swapped and interleaved
    arrivals = [pa.table({"_file_index": [1, 0], "_row": [0, 2], "reference_chosen_logps": [-9.0, -3.0],
                          "reference_rejected_logps": [-90.0, -30.0]}),
                pa.table({"_file_index": [0, 0], "_row": [0, 1], "reference_chosen_logps": [-1.0, -2.0],
                          "reference_rejected_logps": [-10.0, -20.0]})]
    source = tmp_path / "part.parquet"
    pq.write_table(pa.table({"row_id": ["a", "b", "c"]}), source)
    by_file = rows_by_file(ray.data.from_arrow(arrivals), num_files=2)
    assert by_file[1].column("reference_chosen_logps").to_pylist() == [-9.0]
    arrived = by_file[0]
    columns = {"reference_chosen_logps": pa.float64(), "reference_rejected_logps": pa.float64()}
    table = put_back(pq.read_table(source), arrived, columns=columns, source=str(source), what="reference values")
    assert table.column("row_id").to_pylist() == ["a", "b", "c"]
    assert table.column("reference_chosen_logps").to_pylist() == [-1.0, -2.0, -3.0]
    assert table.column("reference_rejected_logps").to_pylist() == [-10.0, -20.0, -30.0]
    with pytest.raises(RuntimeError, match="has 3 rows but 2 reference values"):
        put_back(pq.read_table(source), arrived.slice(0, 2), columns=columns, source=str(source),
                 what="reference values")
    with pytest.raises(RuntimeError, match="has 3 rows but 0 reference values"):
        put_back(pq.read_table(source), None, columns=columns, source=str(source), what="reference values")


def test_train_builds_the_reference_stage_config_from_its_own():
    """reference.mode=precomputed runs this stage with the run's model, data, precision, attention
    kernel and GPU use, and the run's reference.* cache and pool settings."""
    from pipelines.train import reference_stage_config
    from pipelines.train.config import build_train_config

    cfg = build_train_config({"model": {"path": "m"}, "data": {"path": "d"}, "objective": {"name": "wdpo"},
                              "reference": {"mode": "precomputed", "cache_dir": "c", "batch_size": 7, "concurrency": 3},
                              "train": {"precision": "bf16", "use_gpu": True}})
    assert reference_stage_config(cfg) == ReferenceCacheConfig(
        data="d", model="m", output="c", batch_size=7, concurrency=3, use_gpu=True, precision="bf16",
        attn_implementation="eager")
