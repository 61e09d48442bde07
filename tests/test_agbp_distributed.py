"""AGBP under DDP: two CPU processes (Gloo) as torchrun would start them; only rank 0 writes."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from agssp_pipeline.training.distributed import DistContext, init_distributed, mean_across_ranks


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, storage: str, table, out_dir: str) -> None:
    import os

    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world_size),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
        }
    )
    import torch

    torch.set_num_threads(1)
    from agssp_pipeline.config import PipelineConfig
    from agssp_pipeline.training.agbp import TrainingCallback, train_backbone
    from agssp_pipeline.training.distributed import shutdown
    from agssp_pipeline.training.settings import BackboneSettings

    class Steps(TrainingCallback):
        def __init__(self):
            self.steps = []

        def on_step_end(self, progress):
            self.steps.append([progress.step, progress.steps_per_epoch])

    ctx = init_distributed("cpu")
    steps = Steps()
    settings = BackboneSettings(
        base_loss="cls", epochs=1, batch_size=2, image_size=64, num_workers=0, crop_scale_min=1.0, hflip=0.0
    )
    result = train_backbone(
        PipelineConfig(storage_root=storage),
        "yolov8n",
        settings=settings,
        table=table,
        callbacks=[steps],
        dist_ctx=ctx,
    )
    trained = result.lineage  # same dict on every rank
    probe = mean_across_ranks(float(rank), ctx)
    with open(f"{out_dir}/rank{rank}.json", "w") as handle:
        json.dump(
            {
                "run_id": result.run_id,
                "steps": steps.steps,
                "world_size": trained["world_size"],
                "probe": probe,
            },
            handle,
        )
    shutdown(ctx)


@pytest.mark.slow
def test_two_process_ddp_run_shards_data_and_writes_once(tmp_path):
    from agssp_pipeline.training import checkpoint as ckpt
    from agssp_pipeline.training.data import make_synthetic_pretrain_table

    table = make_synthetic_pretrain_table(str(tmp_path / "images"), images=8, size=64)
    storage = str(tmp_path / "storage")
    mp.spawn(_worker, args=(2, _free_port(), storage, table, str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert reports[0]["run_id"] == reports[1]["run_id"]  # rank 0's run id was broadcast
    # 8 images, 2 ranks, batch 2 per rank -> 2 steps each; callbacks only fire on rank 0
    assert reports[0]["steps"] == [[1, 2], [2, 2]] and reports[1]["steps"] == []
    assert reports[0]["world_size"] == 2 and reports[0]["probe"] == pytest.approx(0.5)
    from agssp_pipeline.config import PipelineConfig

    layout = PipelineConfig(storage_root=storage).layout()
    runs = ckpt.list_runs(layout, "yolov8n")
    assert len(runs) == 1 and runs[0][1]["status"] == "complete" and runs[0][1]["world_size"] == 2


def test_single_process_context_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_distributed("cpu")
    assert ctx == DistContext(rank=0, local_rank=0, world_size=1, device=ctx.device) and ctx.is_main
    assert mean_across_ranks(3.0, ctx) == 3.0
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            init_distributed("cuda:0")
