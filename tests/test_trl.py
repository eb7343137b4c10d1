"""TRL's SFTTrainer on RWKV-7: packing and padding-free batches reset the state at every document boundary.

SFTTrainer flattens the documents of a batch into one row (`packing=True` with its default "bfd" strategy, or
`padding_free=True`) and marks them with `position_ids` restarting at 0, plus `cu_seq_lens_q` / `cu_seq_lens_k`,
`max_length_q` / `max_length_k` and `seq_idx`. The truth for every document is the same model run on that document
alone.
"""

import json
import os

import pytest
import torch
import trl
from datasets import Dataset

from modeling_rwkv7 import RWKV7ForCausalLM, RWKV7Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(REPO, "models", "rwkv7-tiny-default")
CORPUS = os.path.join(REPO, "data", "shakespeare", "validation.jsonl")
LEARNING_RATE = 1e-2
MODES = {"packing": {"packing": True}, "padding_free": {"padding_free": True, "max_length": None}}


def random_documents(count: int, seed: int) -> list[str]:
    """`count` spans of held-out Shakespeare, of random start and length (20 to 300 characters)."""
    with open(CORPUS) as handle:
        texts = [json.loads(line)["text"] for line in handle]
    generator = torch.Generator().manual_seed(seed)
    documents = []
    for _ in range(count):
        text = texts[torch.randint(len(texts), (1,), generator=generator).item()]
        length = torch.randint(20, 301, (1,), generator=generator).item()
        start = torch.randint(len(text) - length, (1,), generator=generator).item()
        documents.append(text[start : start + length])
    return documents


def sft_trainer(mode: str, documents: list[str], output_dir) -> "trl.SFTTrainer":
    """An SFTTrainer on the shipped default model whose first batch holds every document, taking one plain SGD step
    (no clipping, no decay) so that the update is `-LEARNING_RATE * gradient`; in float32 (TRL's default is bf16
    autocast) and with TRL's default gradient checkpointing."""
    model = RWKV7ForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    args = trl.SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=len(documents),
        max_steps=1,
        optim="sgd",
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        bf16=False,
        use_cpu=True,
        dataloader_pin_memory=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        **({"max_length": 1024} | MODES[mode]),
    )
    return trl.SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"text": documents}), processing_class=RWKV7Tokenizer()
    )


def document_spans(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of the documents of a single packed row, from its position_ids ([1, seq_len])."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    return list(zip(starts, starts[1:] + [position_ids.shape[1]]))


def next_token_log_probs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1]: log p(ids[t + 1] | ids[: t + 1]) with the model's own forward on this document alone (the
    softmax over the 65536 logits in float64: in float32 it is off by up to 1e-4)."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    return logits.double().log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].float()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_sft_trainer_trains_each_packed_document_as_if_it_were_alone(mode, tmp_path):
    documents = random_documents(5, seed=len(mode))
    trainer = sft_trainer(mode, documents, tmp_path)
    model = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one flattened row, no padding
    spans = document_spans(batch["position_ids"])
    assert batch["cu_seq_lens_q"].tolist() == [start for start, _ in spans] + [batch["input_ids"].shape[1]]

    # every document is in the row once, whole, as the tokenizer writes it followed by the end-of-document token
    tokenizer = RWKV7Tokenizer()
    expected = sorted(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in documents)
    packed_documents = [batch["input_ids"][0, start:end].tolist() for start, end in spans]
    assert sorted(packed_documents) == expected and min(map(len, expected)) >= 5 and max(map(len, expected)) > 32

    # the per-token log-likelihoods SFTTrainer trains on (its compute_loss calls this) are those of each document alone
    with torch.no_grad():
        outputs = model(**batch, use_cache=False, fused_lm_head=True)
    alone_with_graph = [next_token_log_probs(model, ids) for ids in packed_documents]  # reused for the gradient
    alone = [log_probs.detach() for log_probs in alone_with_graph]
    packed_log_probs = outputs.log_probs[0]
    assert packed_log_probs.shape == (batch["input_ids"].shape[1] - 1,)
    for (start, end), expected_log_probs in zip(spans, alone):
        torch.testing.assert_close(packed_log_probs[start : end - 1], expected_log_probs, rtol=0, atol=1e-5)
        if end < batch["input_ids"].shape[1]:  # the next document's first token is no target
            assert packed_log_probs[end - 1] == 0 and not outputs.label_mask[0, end - 1]
    mean_nll = -torch.cat(alone).mean()
    torch.testing.assert_close(outputs.loss, mean_nll, rtol=1e-6, atol=1e-6)

    # without the boundaries, the documents after the first read the state of the ones before them
    with torch.no_grad():
        leaked = model(input_ids=batch["input_ids"], labels=batch["labels"], fused_lm_head=True).log_probs[0]
    start, end = spans[1]
    assert (leaked[start : end - 1] - alone[1]).abs().max() > 1e-2

    # one SGD step of trainer.train() follows the gradient of the documents' losses computed alone
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad()
    (-torch.cat(alone_with_graph).mean()).backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    trainer.train()
    assert trainer.state.global_step == 1
    for name, parameter in model.named_parameters():
        assert gradients[name].abs().max() > 0, name
        expected_weight = before[name] - LEARNING_RATE * gradients[name]
        torch.testing.assert_close(parameter.detach(), expected_weight, rtol=0, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def padding_free_batch(tmp_path_factory):
    """An SFTTrainer (padding_free=True) on 4 documents, and its first batch."""
    trainer = sft_trainer("padding_free", random_documents(4, seed=7), tmp_path_factory.mktemp("sft"))
    return trainer, next(iter(trainer.get_train_dataloader()))


@pytest.mark.parametrize("markers", [("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"), ("seq_idx",)])
def test_padding_free_boundaries_from_varlen_markers_alone_equal_those_from_position_ids(markers, padding_free_batch):
    """A flattened batch marked only by `cu_seq_lens_q` / `cu_seq_lens_k` (what DataCollatorWithFlattening and the
    varlen kernels use), or only by `seq_idx`, gives each document its own state, exactly as `position_ids` does."""
    trainer, batch = padding_free_batch
    assert {"position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"} <= set(batch)
    plain = {key: batch[key] for key in ("input_ids", "labels")}
    with torch.no_grad():
        by_positions = trainer.model(**plain, position_ids=batch["position_ids"], fused_lm_head=True).log_probs
        by_markers = trainer.model(**plain, **{key: batch[key] for key in markers}, fused_lm_head=True).log_probs
        leaked = trainer.model(**plain, fused_lm_head=True).log_probs
    torch.testing.assert_close(by_markers, by_positions, rtol=0, atol=1e-6)
    assert (leaked - by_positions).abs().max() > 1e-2
