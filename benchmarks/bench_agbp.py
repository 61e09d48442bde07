"""AGBP training throughput (images/s) per backbone, through the real trainer.

Runs ``train_backbone`` on a synthetic image/map set (data loading, joint augmentation, base loss,
distillation, optimiser step: everything a real run does except reading a map store) and reports the
median step time after warm-up. CPU section always; GPU section (bf16 autocast) when CUDA is available.

    .venv/bin/python benchmarks/bench_agbp.py                       # CPU, the four partition backbones
    .venv/bin/python benchmarks/bench_agbp.py --backbones yolov8n --steps 10 --gpu-batch 64
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import agssp_pipeline  # noqa: F401  (offline defaults)
from agssp_pipeline.config import PipelineConfig
from agssp_pipeline.training.agbp import TrainingCallback, train_backbone
from agssp_pipeline.training.data import make_synthetic_pretrain_table
from agssp_pipeline.training.settings import BackboneSettings


class StepTimer(TrainingCallback):
    def __init__(self):
        self.ticks: list[float] = []
        self.last = None

    def on_step_end(self, progress):
        self.ticks.append(time.perf_counter())
        self.last = progress


def measure(backbone: str, device: str, batch: int, image_size: int, steps: int, base_loss: str, root: Path, table) -> dict:
    settings = BackboneSettings(
        base_loss=base_loss,
        epochs=1,
        batch_size=batch,
        image_size=image_size,
        num_workers=2,
        device=device,
        max_steps_per_epoch=steps + 1,
        resume=False,
    )
    timer = StepTimer()
    config = PipelineConfig(storage_root=str(root / f"storage_{backbone}_{device}"))
    started = time.perf_counter()
    result = train_backbone(config, backbone, settings=settings, table=table, callbacks=[timer])
    wall = time.perf_counter() - started
    step_times = [b - a for a, b in zip(timer.ticks, timer.ticks[1:], strict=False)]  # first step = warm-up
    median = statistics.median(step_times) if step_times else float("nan")
    return {
        "backbone": backbone,
        "device": result.lineage["device"],
        "batch": batch,
        "image_size": image_size,
        "base_loss": result.lineage["resolved"]["base_loss"],
        "timed_steps": len(step_times),
        "median_step_s": median,
        "images_per_s": batch / median if step_times else float("nan"),
        "wall_s_incl_build_and_checkpoint": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["yolov8n", "yolov8s", "resnet50", "swin_b"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--cpu-batch", type=int, default=4)
    parser.add_argument("--cpu-size", type=int, default=128)
    parser.add_argument("--gpu-batch", type=int, default=64)
    parser.add_argument("--gpu-size", type=int, default=224)
    parser.add_argument("--base-loss", default="cls", choices=["cls", "ssl", "none"])
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sections = [] if args.skip_cpu else [("cpu", args.cpu_batch, args.cpu_size)]
        if torch.cuda.is_available():
            sections.append(("cuda", args.gpu_batch, args.gpu_size))
        for device, batch, size in sections:
            images = max(batch * (args.steps + 1), 16)
            table = make_synthetic_pretrain_table(str(root / f"images_{device}"), images=images, size=max(size * 5 // 4, 64))
            for backbone in args.backbones:
                row = measure(backbone, device, batch, size, args.steps, args.base_loss, root, table)
                rows.append(row)
                print(
                    f"{row['backbone']:>9} {row['device']:<28} batch {row['batch']:>3} @{row['image_size']}px "
                    f"{row['base_loss']:>6}+distill: median step {row['median_step_s']:.3f}s -> "
                    f"{row['images_per_s']:.2f} images/s ({row['timed_steps']} steps; run wall {row['wall_s_incl_build_and_checkpoint']:.1f}s)",
                    flush=True,
                )
    print(f"\ntorch {torch.__version__}, threads {torch.get_num_threads()}, CUDA {torch.cuda.is_available()}")


if __name__ == "__main__":
    main()
