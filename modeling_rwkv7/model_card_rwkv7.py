"""The model card (README.md) of a converted RWKV-7 folder, rendered from the Jinja template shipped with the package
(`model_card_template.md`); used by the converter and by `scripts/push_to_hub.py`."""

import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from .configuration_rwkv7 import RWKV7Config

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "model_card_template.md"
CARD_TAGS = ["rwkv", "rwkv7", "linear-attention", "custom_code"]


def count_parameters(folder: str | os.PathLike) -> int:
    """Number of parameters stored in a folder's safetensors files (read from the headers only)."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No .safetensors file in {folder}.")
    total = 0
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                total += int(torch.Size(shape).numel())
    return total


def render_model_card(
    config: RWKV7Config,
    *,
    repo_id: str,
    num_parameters: int,
    license: str = "apache-2.0",
    base_model: Optional[str] = None,
    benchmarks: Sequence[Mapping] = (),
    template: str | os.PathLike = MODEL_CARD_TEMPLATE,
) -> str:
    """The README.md of a converted model: YAML metadata (library, pipeline, tags, license, base model,
    parameter count, `model-index` from `benchmarks`) and the body from the Jinja `template`.

    benchmarks: rows `{"task": ..., "metric": ..., "value": ...}` (optional "dataset", "split"), shown as a table.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    template = Path(template)
    if not template.is_file():
        raise FileNotFoundError(f"Model card template {template} not found (pass card_template / --card-template).")
    rows = [_benchmark_row(row) for row in benchmarks]
    eval_results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=row["dataset"],
            dataset_name=row["task"],
            dataset_split=row.get("split"),
            metric_type=row["metric"],
            metric_value=row["value"],
        )
        for row in rows
    ]
    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        license=license,
        pipeline_tag="text-generation",
        tags=list(CARD_TAGS),
        model_name=repo_id.rsplit("/", 1)[-1],
        eval_results=eval_results or None,
        num_parameters=num_parameters,
    )
    dtype = config.dtype if isinstance(config.dtype, str) else str(config.dtype).removeprefix("torch.")
    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        repo_id=repo_id,
        model_name=repo_id.rsplit("/", 1)[-1],
        base_model=base_model,
        num_parameters=num_parameters,
        parameters_human=_human_count(num_parameters),
        config=config,
        dtype=dtype,
        benchmarks=rows,
    )
    return str(card)


def _benchmark_row(row: Mapping) -> dict:
    missing = [key for key in ("task", "metric", "value") if key not in row]
    if missing:
        raise ValueError(f"Benchmark row {dict(row)} lacks {missing}; each row needs task, metric and value.")
    return {"dataset": row.get("dataset", row["task"]), **row}


def _human_count(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


__all__ = ["CARD_TAGS", "MODEL_CARD_TEMPLATE", "count_parameters", "render_model_card"]
