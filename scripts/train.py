"""Train RWKV-7 from scratch or fine-tune it (full, LoRA or state tuning) with `transformers.Trainer`.

    # fine-tune the shipped tiny model on a text file (one document per paragraph), evaluating perplexity
    python scripts/train.py --model models/rwkv7-tiny-default --data my_text.txt --method lora \\
        --eval_fraction 0.1 --output_dir out/lora --max_steps 200 --learning_rate 1e-3 \\
        --eval_strategy steps --eval_steps 50

    # train from scratch on JSONL documents (`{"text": ...}` per line), bf16 autocast (on CPU: --bf16 --use_cpu),
    # checkpoints every 100 steps, resumable with --resume_from_checkpoint last (or a checkpoint folder)
    python scripts/train.py --config my_config.json --config_overrides hidden_size=128,num_hidden_layers=4 \\
        --data train.jsonl --eval_data validation.jsonl --block_size 256 --bf16 --output_dir out/scratch \\
        --save_steps 100

    # the same on 2 CPU processes (DDP over gloo); `accelerate launch --cpu --num_processes 2` alone starts ONE
    # process (accelerate needs --mpirun_hostfile for that), so launch through torch.distributed instead:
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py --use_cpu ...

    # FSDP2 on GPUs (each process holds 1/N of the weights, gradients and optimizer state; one unit per RWKV7Block).
    # accelerate 1.15 runs FSDP on accelerator devices only: on CPU it would fall back to DDP, which this script
    # refuses (scripts/fsdp_check.py trains under FSDP2 on CPU, with torch's fully_shard directly)
    accelerate launch --use_fsdp --fsdp_version 2 --fsdp_transformer_layer_cls_to_wrap RWKV7Block \
        --fsdp_reshard_after_forward true --fsdp_state_dict_type FULL_STATE_DICT --num_processes 8 scripts/train.py ...

All `TrainingArguments` options are accepted as flags (`--learning_rate`, `--per_device_train_batch_size`,
`--activation_checkpointing`, `--bf16`, `--save_steps`, ...). Documents are tokenized with the RWKV World tokenizer,
each followed by the end-of-document token 0, and packed into rows of `--block_size` tokens. A row can hold
several documents: `position_ids` restart at 0 where a document starts, and the model resets its state there, so
no document sees another one (a document that overflows a row goes on in the next row, from a fresh state, as in
any fixed-length training). With `--method state` each row holds one document (padded), because every row starts
from the tuned state. Evaluation reports `eval_loss` and `eval_perplexity`. Python code that a model or tokenizer
folder names (its `auto_map`) runs only with `--trust-remote-code`.
"""

import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from modeling_rwkv7 import RWKV7Config, RWKV7ForCausalLM, RWKV7Tokenizer  # noqa: E402  (registers the Auto classes)
from modeling_rwkv7.configuration_rwkv7 import default_generation_config  # noqa: E402
from modeling_rwkv7.state_tuning import RWKV7StateTuning  # noqa: E402

IGNORE_INDEX = -100
STATE_FILE = "initial_state.safetensors"
TEXT_EXTENSIONS = (".txt", ".text", ".md")
JSON_EXTENSIONS = (".json", ".jsonl")
METHODS = ("full", "lora", "state")
DATA_EXTENSIONS = TEXT_EXTENSIONS + JSON_EXTENSIONS + (".csv", ".tsv", ".parquet", ".arrow")
_DATASET_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")


@dataclass
class ScriptArguments:
    """What to train and on which data (the optimisation itself is set with `TrainingArguments` flags)."""

    model: Optional[str] = field(default=None, metadata={"help": "Model folder or Hub name to fine-tune."})
    config: Optional[str] = field(default=None, metadata={"help": "RWKV7Config JSON file: train from scratch."})
    config_overrides: Optional[str] = field(
        default=None,
        metadata={"help": "With --config: comma-separated key=value pairs, e.g. hidden_size=128,dropout=0.1."},
    )
    tokenizer: Optional[str] = field(
        default=None,
        metadata={
            "help": "Tokenizer folder. Default: --model when it holds a tokenizer, else the RWKV World tokenizer."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run the Python code that the --model / --tokenizer folder or repository names in its auto_map. "
            "Off by default: this package's own RWKV-7 classes load those folders without it."
        },
    )
    data: Optional[str] = field(
        default=None, metadata={"help": "Training documents: a .txt / .jsonl / .json file, or a dataset name."}
    )
    eval_data: Optional[str] = field(default=None, metadata={"help": "Evaluation documents, same forms as --data."})
    eval_fraction: float = field(
        default=0.0, metadata={"help": "Without --eval_data: hold out this fraction of the documents for evaluation."}
    )
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Configuration name of a named dataset."})
    text_column: str = field(default="text", metadata={"help": "Column holding the document text."})
    sample_by: str = field(
        default="paragraph", metadata={"help": "For text files, what one document is: line, paragraph or document."}
    )
    block_size: int = field(default=512, metadata={"help": "Tokens per training row."})
    method: str = field(
        default="full", metadata={"help": "full (all weights), lora (PEFT LoRA) or state (state tuning)."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: Optional[str] = field(
        default=None,
        metadata={"help": "Comma-separated module names; default: PEFT's rwkv7 targets (r/k/v/o_proj, key, value)."},
    )
    save_dtype: Optional[str] = field(
        default=None,
        metadata={"help": "With --method full: dtype of the saved final model (float32, bfloat16, float16)."},
    )
    check_replicas: bool = field(
        default=False,
        metadata={"help": "After training, print each process's weights sha256 and fail unless all processes agree."},
    )

    def __post_init__(self):
        if (self.model is None) == (self.config is None):
            raise ValueError("Pass exactly one of --model (fine-tune) and --config (train from scratch).")
        if self.data is None:
            raise ValueError("--data is required.")
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}.")
        if self.config_overrides and self.config is None:
            raise ValueError("--config_overrides applies to --config (a model trained from scratch).")
        if self.block_size < 2:
            raise ValueError(f"--block_size must be at least 2, got {self.block_size}.")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"--eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        if self.sample_by not in ("line", "paragraph", "document"):
            raise ValueError(f"--sample_by must be line, paragraph or document, got {self.sample_by!r}.")
        if self.save_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"--save_dtype must be float32, bfloat16 or float16, got {self.save_dtype!r}.")


# --- data ------------------------------------------------------------------------------------------------------------


def load_documents(source: str, text_column: str, sample_by: str = "paragraph", dataset_config: Optional[str] = None):
    """A `datasets.Dataset` with one document per row in `text_column`: from a local text file (split into
    documents per `sample_by`), a JSON / JSONL file, or a named dataset (its `train` split). A `source` that is not
    a local path is looked up as a dataset name only if it is one ('name' or 'owner/name', no file extension)."""
    from datasets import load_dataset

    looks_like_a_path = source.startswith((".", "/", "~")) or os.path.splitext(source)[1].lower() in DATA_EXTENSIONS
    if not os.path.exists(source) and (looks_like_a_path or not _DATASET_NAME.fullmatch(source)):
        raise FileNotFoundError(
            f"Data {source!r}: no such file or folder (a Hub dataset name is 'name' or 'owner/name', without a "
            "file extension)."
        )
    if os.path.isfile(source):
        extension = os.path.splitext(source)[1].lower()
        if extension in TEXT_EXTENSIONS:
            dataset = load_dataset("text", data_files=source, sample_by=sample_by, split="train")
            dataset = dataset.rename_column("text", text_column) if text_column != "text" else dataset
        elif extension in JSON_EXTENSIONS:
            dataset = load_dataset("json", data_files=source, split="train")
        else:
            raise ValueError(f"Unsupported data file {source!r}: expected {TEXT_EXTENSIONS + JSON_EXTENSIONS}.")
    else:
        dataset = load_dataset(source, dataset_config, split="train")
    if text_column not in dataset.column_names:
        raise ValueError(f"{source!r} has columns {dataset.column_names}, not the text column {text_column!r}.")
    return dataset.select_columns([text_column])


def pack_documents(
    documents: list[list[int]], block_size: int, pad_token_id: int = 0, cross_documents: bool = True
) -> dict[str, list[list[int]]]:
    """Pack tokenized documents into rows of exactly `block_size` tokens.

    Returns lists of rows for `input_ids`, `position_ids` (the position inside the document: 0 where a document
    starts, which makes the model reset its state there), `attention_mask` (0 at the padding of the last row) and
    `labels` (`input_ids`, with -100 at padding and at every document's first token, which no context predicts).
    With `cross_documents=False` no row holds more than one document: each document is cut into rows of its own.
    """
    rows = {"input_ids": [], "position_ids": [], "attention_mask": [], "labels": []}

    def emit(ids: list[int], positions: list[int]):
        for start in range(0, len(ids), block_size):
            block_ids, block_positions = ids[start : start + block_size], positions[start : start + block_size]
            padding = block_size - len(block_ids)
            labels = [IGNORE_INDEX if p == 0 else t for t, p in zip(block_ids, block_positions)]
            rows["input_ids"].append(block_ids + [pad_token_id] * padding)
            # padding continues the positions, so it never reads as a document start
            next_position = block_positions[-1] + 1
            rows["position_ids"].append(block_positions + list(range(next_position, next_position + padding)))
            rows["attention_mask"].append([1] * len(block_ids) + [0] * padding)
            rows["labels"].append(labels + [IGNORE_INDEX] * padding)

    documents = [doc for doc in documents if doc]
    if cross_documents:
        if documents:
            emit([t for doc in documents for t in doc], [p for doc in documents for p in range(len(doc))])
    else:
        for doc in documents:
            emit(doc, list(range(len(doc))))
    return rows


def build_dataset(documents, tokenizer, text_column: str, block_size: int, cross_documents: bool):
    """Tokenize a dataset of documents (each followed by the end-of-document token) and pack it into rows."""
    end_of_document = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_document

    def tokenize_and_pack(batch):
        token_ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        return pack_documents(
            [ids + [end_of_document] for ids in token_ids if ids], block_size, pad_token_id, cross_documents
        )

    return documents.map(
        tokenize_and_pack, batched=True, batch_size=1000, remove_columns=documents.column_names, desc="tokenize + pack"
    )


# --- model -----------------------------------------------------------------------------------------------------------


def parse_overrides(overrides: Optional[str]) -> dict:
    """`"hidden_size=128,dropout=0.1,tie_word_embeddings=true"` -> {"hidden_size": 128, ...} (JSON values, else
    strings)."""
    parsed = {}
    for item in filter(None, (overrides or "").split(",")):
        if "=" not in item:
            raise ValueError(f"--config_overrides item {item!r} is not key=value.")
        key, value = (part.strip() for part in item.split("=", 1))
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


def load_model(args: ScriptArguments) -> RWKV7ForCausalLM:
    if args.model is not None:
        return AutoModelForCausalLM.from_pretrained(
            args.model, dtype=torch.float32, trust_remote_code=args.trust_remote_code
        )
    with open(args.config) as handle:
        config_dict = json.load(handle)
    config_dict.update(parse_overrides(args.config_overrides))
    model = RWKV7ForCausalLM(RWKV7Config(**config_dict))
    model.generation_config = default_generation_config(model.config)  # what the converter's folders carry
    return model


def load_tokenizer(args: ScriptArguments):
    """--tokenizer, else the tokenizer saved with --model, else the RWKV World tokenizer."""
    source = args.tokenizer
    if source is None and args.model is not None and os.path.isfile(os.path.join(args.model, "tokenizer_config.json")):
        source = args.model
    if source is None:
        return RWKV7Tokenizer()
    return AutoTokenizer.from_pretrained(source, trust_remote_code=args.trust_remote_code)


def apply_method(model: RWKV7ForCausalLM, args: ScriptArguments) -> torch.nn.Module:
    """The module the Trainer optimises: the model itself, a PEFT LoRA model, or an `RWKV7StateTuning` wrapper."""
    if args.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        targets = args.lora_target_modules.split(",") if args.lora_target_modules else None
        lora_config = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=targets,
        )
        return get_peft_model(model, lora_config)
    if args.method == "state":
        return RWKV7StateTuning(model)
    return model


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every tensor of `model.state_dict()` (names and raw bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --- trainer ---------------------------------------------------------------------------------------------------------


class RWKV7Trainer(Trainer):
    """`Trainer` that also logs perplexity (`exp(eval_loss)`) and checkpoints a state-tuned model as its small
    state file alone (`initial_state.safetensors`) instead of the frozen weights."""

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        for key in [key for key in logs if key.endswith("eval_loss")]:
            logs[key.replace("loss", "perplexity")] = math.exp(min(logs[key], 100.0))
        super().log(logs, start_time)

    def _state_tuning(self) -> Optional[RWKV7StateTuning]:
        model = self.accelerator.unwrap_model(self.model)
        return model if isinstance(model, RWKV7StateTuning) else None

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        tuned = self._state_tuning()
        if tuned is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            tuned.save_state(os.path.join(output_dir, STATE_FILE))
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[torch.nn.Module] = None) -> None:
        tuned = self._state_tuning()
        if tuned is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        state_path = os.path.join(resume_from_checkpoint, STATE_FILE)
        if not os.path.isfile(state_path):
            raise ValueError(f"{resume_from_checkpoint} holds no {STATE_FILE}: it is not a state-tuning checkpoint.")
        tuned.load_state(state_path)


def check_replicas(model: torch.nn.Module, process_index: int) -> str:
    """Print this process's weights digest; under torch.distributed, raise unless every process has the same."""
    digest = weights_digest(model)
    print(f"[process {process_index}] weights sha256 {digest}", flush=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        digests = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"The processes ended with different weights: sha256 per process {digests}.")
    return digest


def resolve_resume(value: Optional[str]):
    """`--resume_from_checkpoint`: a checkpoint folder, or `last` / `true` for the newest one in --output_dir."""
    if value is None or value.lower() in ("", "none", "false"):
        return None
    return True if value.lower() in ("last", "true") else value


def warn_if_cpu_processes_were_dropped() -> None:
    """`accelerate launch --cpu --num_processes N` (N > 1, no --mpirun_hostfile) starts one process, not N."""
    launched_for_several = os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ
    world_size_keys = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    if launched_for_several and not any(key in os.environ for key in world_size_keys):
        print(
            "WARNING: `accelerate launch --cpu --num_processes N` started a single process (without --mpirun_hostfile "
            "accelerate does not start N CPU processes). For DDP on CPU run `accelerate launch --multi_gpu "
            "--num_processes N scripts/train.py --use_cpu ...` or "
            "`torchrun --nproc_per_node N scripts/train.py --use_cpu ...`.",
            file=sys.stderr,
            flush=True,
        )


def refuse_fsdp_that_accelerate_dropped(trainer: Trainer, training_args: TrainingArguments) -> None:
    """`accelerate launch --use_fsdp` (or `--fsdp`) on CPU: accelerate enables FSDP on accelerator devices only and
    would train with DDP instead (accelerate 1.15 keeps DistributedType.MULTI_CPU); refuse rather than do that."""
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or bool(training_args.fsdp)
    if asked and not trainer.is_fsdp_enabled:
        import accelerate

        raise RuntimeError(
            f"FSDP was asked for, but accelerate {accelerate.__version__} did not enable it on "
            f"{training_args.device.type!r}: it would train with {trainer.accelerator.distributed_type} instead. "
            "accelerate runs FSDP on accelerator devices only. On CPU, use `accelerate launch --multi_gpu "
            "--num_processes N scripts/train.py --use_cpu ...` (DDP), or scripts/fsdp_check.py to train under FSDP2."
        )


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the script with `argv` (default: the command line). Returns the final evaluation metrics (empty
    without evaluation data)."""
    warn_if_cpu_processes_were_dropped()
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    args, training_args = parser.parse_args_into_dataclasses(args=argv)
    training_args.remove_unused_columns = False  # the rows hold model inputs only
    if training_args.device.type == "cpu":
        training_args.dataloader_pin_memory = False
    set_seed(training_args.seed)

    tokenizer = load_tokenizer(args)
    model = load_model(args)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}."
        )

    cross_documents = args.method != "state"
    with training_args.main_process_first(desc="tokenize + pack"):
        documents = load_documents(args.data, args.text_column, args.sample_by, args.dataset_config)
        eval_documents = None
        if args.eval_data is not None:
            eval_documents = load_documents(args.eval_data, args.text_column, args.sample_by, args.dataset_config)
        elif args.eval_fraction > 0:
            split = documents.train_test_split(test_size=args.eval_fraction, seed=training_args.seed)
            documents, eval_documents = split["train"], split["test"]
        train_dataset = build_dataset(documents, tokenizer, args.text_column, args.block_size, cross_documents)
        eval_dataset = None
        if eval_documents is not None:
            eval_dataset = build_dataset(eval_documents, tokenizer, args.text_column, args.block_size, cross_documents)

    model = apply_method(model, args)
    if training_args.should_log:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(
            f"RWKV-7 {args.method}: {trainable:,} trainable of {total:,} parameters; {len(train_dataset):,} training "
            f"rows of {args.block_size} tokens" + (f", {len(eval_dataset):,} evaluation rows" if eval_dataset else ""),
            flush=True,
        )

    use_cache = model.config.use_cache  # the Trainer turns it off for training; the saved model keeps its own
    trainer = RWKV7Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    refuse_fsdp_that_accelerate_dropped(trainer, training_args)
    trainer.train(resume_from_checkpoint=resolve_resume(training_args.resume_from_checkpoint))

    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    unwrapped.config.use_cache = use_cache
    if args.check_replicas:
        check_replicas(unwrapped, training_args.process_index)
    if args.save_dtype is not None and args.method == "full":
        unwrapped.to(getattr(torch, args.save_dtype))
    trainer.save_model()

    metrics = {}
    if eval_dataset is not None:
        if args.save_dtype is not None and args.method == "full":
            unwrapped.to(torch.float32)  # evaluates the saved (rounded) weights
        metrics = trainer.evaluate()
        trainer.save_metrics("eval", metrics)
    trainer.save_state()
    return metrics


if __name__ == "__main__":
    main()
