"""Issue 7: fine-tuning with transformers.Trainer (scripts/train.py): full, LoRA and state tuning, gradient
checkpointing, packed sequences, multi-process DDP, sequence classification and the feature encoder."""

import json
import math
import os
import re
import shutil
import subprocess
import warnings

import helpers
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from helpers import accelerate_launch, load_script
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

from modeling_rwkv7 import RWKV7Config, RWKV7ForCausalLM, RWKV7ForSequenceClassification, RWKV7Model
from modeling_rwkv7.state_tuning import RWKV7StateTuning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(REPO, "models", "rwkv7-tiny-default")
CORPUS = os.path.join(REPO, "data", "shakespeare", "validation.jsonl")


train = load_script(helpers.REPO / "scripts" / "train.py")


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread (no OpenMP hand-offs for [32, 9, 32] tensors)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> str:
    """Three short real documents (the starts of three scenes the default model never saw) as JSONL."""
    with open(CORPUS) as handle:
        rows = [json.loads(line) for line in handle]
    path = tmp_path_factory.mktemp("text") / "small.jsonl"
    with open(path, "w") as handle:
        for row in rows[18:21]:
            handle.write(json.dumps({"text": row["text"][:1200]}) + "\n")
    return str(path)


def run_train(output_dir, *extra: str) -> dict:
    """scripts/train.py in this process; returns its final eval metrics."""
    return train.main(
        [
            "--output_dir",
            str(output_dir),
            "--block_size",
            "64",
            "--per_device_train_batch_size",
            "2",
            "--per_device_eval_batch_size",
            "8",
            "--logging_steps",
            "1",
            "--save_strategy",
            "no",
            "--disable_tqdm",
            "true",
            "--report_to",
            "none",
            "--seed",
            "0",
            *extra,
        ]
    )


def eval_loss_history(output_dir) -> list[float]:
    with open(os.path.join(output_dir, "trainer_state.json")) as handle:
        return [entry["eval_loss"] for entry in json.load(handle)["log_history"] if "eval_loss" in entry]


def evaluate(model, dataset) -> float:
    args = TrainingArguments(
        output_dir="unused",
        per_device_eval_batch_size=8,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_pin_memory=False,
    )
    return Trainer(model=model, args=args, eval_dataset=dataset, data_collator=default_data_collator).evaluate()[
        "eval_loss"
    ]


def eval_dataset(small_text, cross_documents: bool):
    tokenizer = train.load_tokenizer(train.ScriptArguments(model=DEFAULT_MODEL, data=small_text))
    documents = train.load_documents(small_text, "text")
    return train.build_dataset(documents, tokenizer, "text", 64, cross_documents)


# --- loss goes down; adapters and states reload exactly ----------------------------------------------------------


@pytest.mark.parametrize(
    "method, learning_rate, min_decrease",
    # state tuning changes only where each row starts from (2 x 64 x 64 numbers per layer): a smaller gain
    [("full", "1e-3", 0.5), ("lora", "1e-2", 0.15), ("state", "2", 0.05)],
)
def test_fine_tuning_lowers_the_loss_and_its_checkpoint_reloads_exactly(
    small_text, tmp_path, method, learning_rate, min_decrease
):
    metrics = run_train(
        tmp_path,
        "--model",
        DEFAULT_MODEL,
        "--method",
        method,
        "--data",
        small_text,
        "--eval_data",
        small_text,
        "--max_steps",
        "30",
        "--learning_rate",
        learning_rate,
        "--eval_on_start",
        "true",
    )
    losses = eval_loss_history(tmp_path)
    assert losses[-1] == metrics["eval_loss"]
    message = f"{method}: eval loss {losses[0]:.3f} -> {metrics['eval_loss']:.3f}"
    assert metrics["eval_loss"] < losses[0] - min_decrease, message
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-6)

    base = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    if method == "full":
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
        assert train.weights_digest(reloaded) != train.weights_digest(base)
        assert reloaded.config.use_cache  # the Trainer's training-time setting does not leak into the saved model
    elif method == "lora":
        from peft import PeftModel
        from safetensors import safe_open

        with safe_open(tmp_path / "adapter_model.safetensors", framework="pt") as adapter:
            assert adapter.keys() and all("lora_A" in key or "lora_B" in key for key in adapter.keys())
        reloaded = PeftModel.from_pretrained(base, tmp_path)
    else:
        state_file = tmp_path / train.STATE_FILE
        assert os.path.getsize(state_file) < 200_000 and not (tmp_path / "model.safetensors").exists()
        reloaded = RWKV7StateTuning(base).load_state(state_file)
    reloaded_loss = evaluate(reloaded, eval_dataset(small_text, cross_documents=method != "state"))
    assert reloaded_loss == metrics["eval_loss"]


def test_state_tuning_resumes_from_a_checkpoint_exactly(small_text, tmp_path):
    common = [
        "--model",
        DEFAULT_MODEL,
        "--method",
        "state",
        "--data",
        small_text,
        "--max_steps",
        "6",
        "--learning_rate",
        "0.5",
        "--save_strategy",
        "steps",
        "--save_steps",
        "3",
    ]
    run_train(tmp_path / "straight", *common)
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    assert sorted(os.listdir(checkpoint)) == sorted(
        [
            "initial_state.safetensors",
            "optimizer.pt",
            "rng_state.pth",
            "scheduler.pt",
            "trainer_state.json",
            "training_args.bin",
        ]
        + [f for f in os.listdir(checkpoint) if f.startswith("tokenizer") or f.endswith(".txt")]
    )
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-3")
    run_train(tmp_path / "resumed", *common, "--resume_from_checkpoint", "last")

    base = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    straight = RWKV7StateTuning(base).load_state(tmp_path / "straight" / train.STATE_FILE).initial_state
    resumed = RWKV7StateTuning(base).load_state(tmp_path / "resumed" / train.STATE_FILE).initial_state
    at_step_3 = RWKV7StateTuning(base).load_state(checkpoint / train.STATE_FILE).initial_state
    assert torch.equal(resumed, straight)
    assert not torch.equal(at_step_3, straight)


def test_bad_command_lines_and_data_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of --model"):
        train.ScriptArguments(model="a", config="b.json", data="d.txt")
    with pytest.raises(ValueError, match=r"--method must be one of \('full', 'lora', 'state'\), got 'qlora'"):
        train.ScriptArguments(model="a", data="d.txt", method="qlora")
    with pytest.raises(ValueError, match="--block_size must be at least 2, got 1"):
        train.ScriptArguments(model="a", data="d.txt", block_size=1)
    with pytest.raises(ValueError, match="--config_overrides item 'hidden_size' is not key=value"):
        train.parse_overrides("hidden_size")
    assert train.parse_overrides("hidden_size=64, dropout=0.1,tie_word_embeddings=true,wkv_backend=recurrent") == {
        "hidden_size": 64,
        "dropout": 0.1,
        "tie_word_embeddings": True,
        "wkv_backend": "recurrent",
    }

    csv = tmp_path / "docs.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"Unsupported data file .*docs.csv"):
        train.load_documents(str(csv), "text")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(ValueError, match=r"has columns \['body'\], not the text column 'text'"):
        train.load_documents(str(jsonl), "text")
    text = tmp_path / "docs.txt"
    text.write_text("First paragraph,\ntwo lines.\n\nSecond paragraph.\n")
    assert train.load_documents(str(text), "text")["text"] == ["First paragraph,\ntwo lines.", "Second paragraph.\n"]


@pytest.mark.slow
def test_training_from_scratch_with_bf16_autocast_and_activation_checkpointing(small_text, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"hidden_size": 32, "num_hidden_layers": 2, "head_dim": 16, "tie_word_embeddings": True})
    )
    run_train(
        tmp_path / "out",
        "--config",
        str(config),
        "--data",
        small_text,
        "--max_steps",
        "3",
        "--learning_rate",
        "1e-2",
        "--bf16",
        "--use_cpu",
        "--activation_checkpointing",
        "true",
    )
    with open(tmp_path / "out" / "trainer_state.json") as handle:
        losses = [entry["loss"] for entry in json.load(handle)["log_history"] if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert trained.dtype == torch.float32  # autocast computes in bf16; the weights stay float32
    assert trained.config.hidden_size == 32 and trained.config.tie_word_embeddings
    published = json.loads((tmp_path / "out" / "generation_config.json").read_text())  # the converter's defaults
    assert published["do_sample"] is True and published["top_p"] == 0.3 and published["eos_token_id"] == [0, 261]


# --- gradient checkpointing -------------------------------------------------------------------------------------


def random_causal_lm(seed: int, vocab_size: int = 101, wkv_backend: str = "auto") -> RWKV7ForCausalLM:
    """A tiny model with random weights (the official init zeroes the output projections)."""
    torch.manual_seed(seed)
    config = RWKV7Config(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=3, head_dim=32, wkv_backend=wkv_backend
    )
    model = RWKV7ForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0.0, 0.2)
    return model


def with_method(model, method: str):
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8))
        with torch.no_grad():  # LoRA's B starts at zero: make the adapters active
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, 0.1)
        return model
    if method == "state":
        model = RWKV7StateTuning(model)
        with torch.no_grad():
            model.initial_state.normal_(0.0, 0.5)
    return model


def test_lora_adapted_model_decodes_token_by_token_like_a_full_pass():
    """PEFT wraps our projections (`RWKV7Linear`) as LoRA base layers: the few-row CPU decoding path must keep the
    adapters in, so stepping through a prompt gives the full pass's logits, which differ from the base model's."""
    model = with_method(random_causal_lm(seed=4), "lora").eval()
    input_ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(input_ids=input_ids).logits
        cache, steps = None, []
        for t in range(input_ids.shape[1]):
            out = model(input_ids=input_ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
        with model.disable_adapter():
            base = model(input_ids=input_ids).logits
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4 * max(1.0, full.abs().max().item())
    assert (base - full).abs().max().item() > 1e-2


@pytest.mark.parametrize(
    "method, use_reentrant", [("full", None), ("full", True), ("lora", True), ("state", False), ("state", True)]
)
def test_gradient_checkpointing_gives_the_same_gradients(method, use_reentrant, one_thread):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 101, (3, 40), generator=generator)  # 40 tokens: the chunked WKV form
    inputs = {"input_ids": input_ids, "labels": input_ids}
    if method != "state":  # packed rows and padding go through the checkpointed blocks too
        inputs["position_ids"] = torch.tensor([list(range(15)) + list(range(25))] * 3)
        inputs["attention_mask"] = torch.ones(3, 40, dtype=torch.long)
        inputs["attention_mask"][1, :5] = 0

    gradients = []
    for checkpointing in (False, True):
        model = with_method(random_causal_lm(seed=2), method).train()
        base = model.model if method == "state" else model
        if checkpointing and use_reentrant is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # the deprecated name users know still works
                base.gradient_checkpointing_enable()
        elif checkpointing:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        block = (base.get_base_model() if method == "lora" else base).model.layers[1].attn
        calls = []
        block.register_forward_hook(lambda *_: calls.append(1))
        model(**inputs).loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # checkpointing recomputes the block in the backward pass
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})

    plain, checkpointed = gradients
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        assert plain[name].abs().max() > 0, name
        difference = (plain[name] - checkpointed[name]).abs().max().item()
        assert difference <= 1e-5, f"{name}: {difference:.2e}"


# --- packed sequences -------------------------------------------------------------------------------------------


def test_packing_marks_document_starts_and_pads_the_last_row():
    a, b, c = [5, 6, 7], [8, 9], [10, 11, 12, 13]
    rows = train.pack_documents([a, [], b, c], block_size=4, pad_token_id=0)
    assert rows["input_ids"] == [[5, 6, 7, 8], [9, 10, 11, 12], [13, 0, 0, 0]]
    assert rows["position_ids"] == [[0, 1, 2, 0], [1, 0, 1, 2], [3, 4, 5, 6]]
    assert rows["labels"] == [[-100, 6, 7, -100], [9, -100, 11, 12], [13, -100, -100, -100]]
    assert rows["attention_mask"] == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]

    per_document = train.pack_documents([a, b, c], block_size=3, cross_documents=False)
    assert per_document["input_ids"] == [[5, 6, 7], [8, 9, 0], [10, 11, 12], [13, 0, 0]]
    assert per_document["position_ids"] == [[0, 1, 2], [0, 1, 2], [0, 1, 2], [3, 4, 5]]
    assert per_document["labels"] == [[-100, 6, 7], [-100, 9, -100], [-100, 11, 12], [13, -100, -100]]


@pytest.mark.parametrize("wkv_backend, lengths", [("recurrent", (8, 11)), ("chunked", (30, 41))])
def test_a_packed_row_gives_each_document_the_losses_it_has_alone(one_thread, wkv_backend, lengths):
    model = random_causal_lm(seed=3, wkv_backend=wkv_backend).eval()
    generator = torch.Generator().manual_seed(4)
    first, second = (torch.randint(1, 101, (n,), generator=generator).tolist() + [0] for n in lengths)
    block_size = sum(lengths) + 5
    rows = train.pack_documents([first, second], block_size=block_size)
    batch = {key: torch.tensor(value) for key, value in rows.items()}
    assert batch["input_ids"].shape == (1, block_size)

    def token_losses(logits, labels):
        return F.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="none", ignore_index=-100)

    with torch.no_grad():
        packed = model(**batch)
        packed_losses = token_losses(packed.logits, batch["labels"])
        alone = [token_losses(model(torch.tensor([doc])).logits, torch.tensor([doc])) for doc in (first, second)]
        leaked = token_losses(
            model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
        )

    n1, n2 = len(first), len(second)
    torch.testing.assert_close(packed_losses[: n1 - 1], alone[0], rtol=0, atol=1e-5)
    assert packed_losses[n1 - 1] == 0  # the next document's first token is not a target
    torch.testing.assert_close(packed_losses[n1 : n1 + n2 - 1], alone[1], rtol=0, atol=1e-5)
    assert not packed_losses[n1 + n2 - 1 :].any()  # padding
    torch.testing.assert_close(packed.loss, torch.cat(alone).mean(), rtol=1e-6, atol=1e-6)
    # without the document boundary, the first document's state leaks into the second
    assert (leaked[n1 : n1 + n2 - 1] - alone[1]).abs().max() > 1e-2


@pytest.mark.parametrize(
    "collator_options",
    [
        {},  # position_ids
        {"return_position_ids": False, "return_flash_attn_kwargs": True},  # cu_seq_lens_q / _k, max_length_q / _k
        {"return_position_ids": False, "return_seq_idx": True},
    ],
)
def test_data_collator_with_flattening_gives_each_document_the_losses_it_has_alone(one_thread, collator_options):
    from transformers import DataCollatorWithFlattening

    model = random_causal_lm(seed=6).eval()
    generator = torch.Generator().manual_seed(7)
    documents = [torch.randint(0, 101, (n,), generator=generator).tolist() for n in (9, 30, 17)]
    batch = DataCollatorWithFlattening(**collator_options)([{"input_ids": doc} for doc in documents])
    assert batch["input_ids"].shape == (1, 56)
    assert ("position_ids" in batch) == ("return_position_ids" not in collator_options)

    with torch.no_grad():
        packed = F.cross_entropy(model(**batch).logits[0, :-1], batch["labels"][0, 1:], reduction="none")
        alone = [
            F.cross_entropy(model(torch.tensor([doc])).logits[0, :-1], torch.tensor(doc[1:]), reduction="none")
            for doc in documents
        ]
        leaked = F.cross_entropy(model(batch["input_ids"]).logits[0, :-1], batch["labels"][0, 1:], reduction="none")
    start = 0
    for doc, expected in zip(documents, alone):
        torch.testing.assert_close(packed[start : start + len(doc) - 1], expected, rtol=0, atol=1e-5)
        start += len(doc)
    assert (leaked[9:38] - alone[1]).abs().max() > 1e-2


# --- multi-process (DDP) ----------------------------------------------------------------------------------------


def run_accelerate(launch_options: list[str], script_options: list[str], cwd) -> subprocess.CompletedProcess:
    """`accelerate launch scripts/train.py` with this checkout's package."""
    script = os.path.join(REPO, "scripts", "train.py")
    return accelerate_launch(launch_options, script, script_options, cwd, dict(os.environ, PYTHONPATH=REPO))


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_process_cpu_ddp_ends_with_identical_weights(small_text, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"hidden_size": 32, "num_hidden_layers": 2, "head_dim": 16, "tie_word_embeddings": True})
    )
    options = [
        "--config",
        str(config),
        "--data",
        small_text,
        "--block_size",
        "32",
        "--per_device_train_batch_size",
        "2",
        "--max_steps",
        "4",
        "--learning_rate",
        "1e-2",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "true",
        "--report_to",
        "none",
        "--use_cpu",
        "--check_replicas",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    result = run_accelerate(["--multi_gpu", "--num_processes", "2"], options, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    # the two processes share stdout, so their lines may interleave: match the reports, not lines
    digests = dict(re.findall(r"\[process (\d+)\] weights sha256 ([0-9a-f]{64})", result.stdout))
    assert sorted(digests) == ["0", "1"], output[-4000:]
    assert len(set(digests.values())) == 1  # each process trained on its own shard: DDP kept them in step

    rows = int(re.search(r"([\d,]+) training rows", result.stdout).group(1).replace(",", ""))
    with open(tmp_path / "out" / "trainer_state.json") as handle:
        state = json.load(handle)
    assert state["global_step"] == 4
    assert state["epoch"] == pytest.approx(4 / math.ceil(rows / (2 * 2)))  # an epoch: 2 processes x 2 rows a step
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert train.weights_digest(trained) == digests["0"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_accelerate_cpu_launch_without_mpirun_warns_that_it_runs_one_process(tmp_path):
    result = run_accelerate(["--cpu", "--num_processes", "2"], ["--help"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "started a single process" in result.stderr and "--multi_gpu --num_processes N" in result.stderr


def test_blocks_are_never_split_across_devices():
    from accelerate import infer_auto_device_map

    model = random_causal_lm(seed=5)
    assert set(model._no_split_modules) == {"RWKV7Block"}
    block_bytes = sum(p.numel() * 4 for p in model.model.layers[1].parameters())
    budget = {0: int(2.5 * block_bytes), 1: int(2.5 * block_bytes), "cpu": 10**9}  # forces several devices

    def split_blocks(device_map) -> list[str]:
        return [name for name in device_map if re.match(r"model\.layers\.\d+\.", name)]

    assert split_blocks(infer_auto_device_map(model, max_memory=budget))  # without the hint a block is split
    device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=model._no_split_modules)
    assert len(set(device_map.values())) > 1
    assert split_blocks(device_map) == []


# --- sequence classification and the feature encoder ------------------------------------------------------------


def majority_sign_task(n: int, seed: int, length: int = 9, width: int = 6) -> Dataset:
    """Continuous features [n, length, width]; the label says whether feature 0 is positive at most steps."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, length, width, generator=generator)
    labels = ((features[..., 0] > 0).sum(dim=1) > length // 2).long()
    return Dataset.from_dict({"inputs_embeds": features.tolist(), "labels": labels.tolist()})


def test_trainer_teaches_sequence_classification_on_continuous_features(tmp_path, one_thread):
    torch.manual_seed(0)
    config = RWKV7Config(vocab_size=None, input_size=6, hidden_size=32, head_dim=16, num_hidden_layers=2, num_labels=2)
    model = RWKV7ForSequenceClassification(config)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=32,
        per_device_eval_batch_size=128,
        num_train_epochs=5,
        learning_rate=1e-2,
        warmup_steps=10,
        weight_decay=0.0,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        dataloader_pin_memory=False,
    )

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=majority_sign_task(2048, seed=1),
        eval_dataset=majority_sign_task(512, seed=2),
        compute_metrics=accuracy,
    )
    before = trainer.evaluate()["eval_accuracy"]
    trainer.train()
    after = trainer.evaluate()["eval_accuracy"]
    assert after > 0.9, f"accuracy {before:.3f} -> {after:.3f}"


class FeatureRegressor(torch.nn.Module):
    """What the seed's users write: the RWKV-7 encoder, their own head on `pooler_output`, their own loss."""

    def __init__(self, config: RWKV7Config):
        super().__init__()
        self.encoder = RWKV7Model(config)
        self.head = torch.nn.Linear(config.hidden_size, 1)

    def forward(self, inputs_embeds, labels=None):
        prediction = self.head(self.encoder(inputs_embeds=inputs_embeds).pooler_output).squeeze(-1)
        return {"loss": None if labels is None else F.mse_loss(prediction, labels), "prediction": prediction}


def test_trainer_fits_a_user_head_on_the_feature_encoder(tmp_path, one_thread):
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(2304, 8, 5, generator=generator)
    targets = features[..., 1].mean(dim=1) * 2  # twice the mean of feature 1 over the sequence: variance 0.5
    train_set = Dataset.from_dict({"inputs_embeds": features[:2048].tolist(), "labels": targets[:2048].tolist()})
    eval_set = Dataset.from_dict({"inputs_embeds": features[2048:].tolist(), "labels": targets[2048:].tolist()})

    torch.manual_seed(0)
    model = FeatureRegressor(
        RWKV7Config(vocab_size=None, input_size=5, hidden_size=32, head_dim=16, num_hidden_layers=1)
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=32,
        num_train_epochs=6,
        learning_rate=1e-2,
        warmup_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        dataloader_pin_memory=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.2 * targets.var().item() and after < before / 3, f"mse {before:.3f} -> {after:.3f}"
