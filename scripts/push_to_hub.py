"""Publish a converted RWKV-7 folder (see `rwkv7-convert`) to the Hugging Face Hub.

    python scripts/push_to_hub.py FOLDER OWNER/NAME [--public] [--license apache-2.0] [--base-model BlinkDL/rwkv7-g1]
                                  [--benchmarks results.json] [--card-template TEMPLATE.md] [--dry-run]

Checks that the folder loads on its own (config.json `auto_map`, every code file it and the tokenizer need, every
weight shard), renders README.md from the model card template with the repository id and the real parameter count
(license, base model and benchmark rows default to those of the folder's own README.md), then creates the
repository (private unless `--public`) and uploads everything in one commit. A symbolic link whose target lies
outside the folder is refused. `--dry-run` prints the files and the card instead, touching nothing.

`--benchmarks` is a JSON list of rows: `[{"task": "LAMBADA", "dataset": "lambada_openai", "metric": "accuracy",
"value": 0.71, "split": "test"}]` (dataset and split optional); they become the card's table and its `model-index`.
"""

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from modeling_rwkv7 import RWKV7Config
from modeling_rwkv7.configuration_rwkv7 import default_generation_config
from modeling_rwkv7.model_card_rwkv7 import MODEL_CARD_TEMPLATE, count_parameters, render_model_card

COMMIT_MESSAGE = "Upload RWKV-7 model (modeling_rwkv7)"


def files_to_upload(folder: Path) -> list[Path]:
    """Every file of the folder but README.md (replaced by the rendered card), hidden files and caches. Raises
    ValueError if the folder holds a symbolic link (to a file or a folder) whose target lies outside it."""
    root = folder.resolve()
    entries = [
        path
        for path in folder.rglob("*")
        if not any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(folder).parts)
    ]
    outside = [
        f"{path.relative_to(folder)} -> {path.resolve()}"
        for path in entries
        if path.is_symlink() and not path.resolve().is_relative_to(root)
    ]
    if outside:
        raise ValueError(
            f"{folder} holds symbolic links to outside it: {outside}. Copy what they point to into the folder, or "
            "remove them."
        )
    return sorted(path for path in entries if path.is_file() and path.relative_to(folder).as_posix() != "README.md")


def check_folder(folder: Path) -> None:
    """Raise ValueError naming everything that would keep the folder from loading with trust_remote_code."""
    from transformers.dynamic_module_utils import get_relative_imports

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} has no config.json; is it a converted model folder?")
    config = json.loads(config_file.read_text())
    problems = []
    if config.get("model_type") != "rwkv7":
        problems.append(f"config.json has model_type={config.get('model_type')!r}, expected 'rwkv7'")
    auto_map = dict(config.get("auto_map") or {})
    for auto_class in ("AutoConfig", "AutoModelForCausalLM"):
        if auto_class not in auto_map:
            problems.append(f"config.json auto_map lacks {auto_class} (found {sorted(auto_map)})")
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        auto_map.update(json.loads(tokenizer_config.read_text()).get("auto_map") or {})

    modules = {
        reference.split(".")[0]
        for value in auto_map.values()
        for reference in (value if isinstance(value, list) else [value])
        if reference
    }
    seen = set()
    while modules:
        module = modules.pop()
        seen.add(module)
        code_file = folder / f"{module}.py"
        if not code_file.is_file():
            problems.append(f"code file {code_file.name} is missing")
            continue
        modules |= set(get_relative_imports(str(code_file))) - seen

    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        shards = set(json.loads(index_file.read_text())["weight_map"].values())
        problems += [f"weight shard {shard} is missing" for shard in sorted(shards) if not (folder / shard).is_file()]
    elif not (folder / "model.safetensors").is_file():
        problems.append("no model.safetensors nor model.safetensors.index.json")
    if problems:
        raise ValueError(f"{folder} is not ready to publish: " + "; ".join(problems) + ".")


def card_defaults(folder: Path) -> dict:
    """License, base model and benchmark rows of the folder's existing README.md (empty when it has none)."""
    from huggingface_hub import ModelCard

    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    data = ModelCard.load(readme).data
    rows = [
        {
            "task": result.dataset_name,
            "dataset": result.dataset_type,
            "split": result.dataset_split,
            "metric": result.metric_type,
            "value": result.metric_value,
        }
        for result in data.eval_results or []
    ]
    return {"license": data.license, "base_model": data.base_model, "benchmarks": rows}


def build_card(
    folder: Path,
    repo_id: str,
    *,
    license: Optional[str] = None,
    base_model: Optional[str] = None,
    benchmarks: Optional[list] = None,
    template: Path = MODEL_CARD_TEMPLATE,
) -> str:
    defaults = card_defaults(folder)
    return render_model_card(
        RWKV7Config.from_pretrained(folder),
        repo_id=repo_id,
        num_parameters=count_parameters(folder),
        license=license or defaults.get("license") or "apache-2.0",
        base_model=base_model or defaults.get("base_model"),
        benchmarks=benchmarks if benchmarks is not None else defaults.get("benchmarks", []),
        template=template,
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="converted model folder")
    parser.add_argument("repo_id", help="Hub model repository, OWNER/NAME")
    parser.add_argument("--public", action="store_true", help="create the repository as public (default: private)")
    parser.add_argument("--license", help="license id for the card (default: the folder card's, else apache-2.0)")
    parser.add_argument("--base-model", help="Hub id of the original weights (default: the folder card's)")
    parser.add_argument("--benchmarks", type=Path, help="JSON list of benchmark rows (task, metric, value)")
    parser.add_argument("--card-template", type=Path, default=MODEL_CARD_TEMPLATE, help="Jinja model card template")
    parser.add_argument("--commit-message", default=COMMIT_MESSAGE)
    parser.add_argument("--dry-run", action="store_true", help="print the files and the card; upload nothing")
    args = parser.parse_args(argv)

    folder = args.folder
    try:
        check_folder(folder)
        benchmarks = json.loads(args.benchmarks.read_text()) if args.benchmarks else None
        card = build_card(
            folder,
            args.repo_id,
            license=args.license,
            base_model=args.base_model,
            benchmarks=benchmarks,
            template=args.card_template,
        )
        files = files_to_upload(folder)
        generated = {"README.md": card.encode("utf-8")}
        if not (folder / "generation_config.json").is_file():  # a folder saved from a model built from a config
            defaults = default_generation_config(RWKV7Config.from_pretrained(folder))
            generated["generation_config.json"] = defaults.to_json_string().encode()
    except (FileNotFoundError, ValueError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")

    if args.dry_run:
        print(f"Would create model repository {args.repo_id} (private={not args.public}) and upload in one commit:")
        print("  README.md (the card below)")
        if "generation_config.json" in generated:
            print("  generation_config.json (the folder has none: the published defaults, sampling with top_p 0.3)")
        for path in files:
            print(f"  {path.relative_to(folder).as_posix()} ({path.stat().st_size:,} bytes)")
        print("----- README.md -----")
        print(card, end="")
        return

    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    url = api.create_repo(args.repo_id, repo_type="model", private=not args.public, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in generated.items()]
    operations += [
        CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
        for path in files
    ]
    api.create_commit(
        repo_id=args.repo_id, repo_type="model", operations=operations, commit_message=args.commit_message
    )
    print(f"Uploaded {len(operations)} files to {url}")


if __name__ == "__main__":
    main()
