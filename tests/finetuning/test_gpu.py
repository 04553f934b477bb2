"""Mixed-precision fine-tuning on a CUDA device (skipped where there is none)."""

from __future__ import annotations

import pytest
import torch

from ragkit.finetuning import RagTrainer, TrainingArguments

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_mixed_precision_training_on_gpu(tmp_path, make_model, train_examples, precision):
    model, tokenizer = make_model(seed=0)
    model = model.to("cuda")
    args = TrainingArguments(
        output_dir=str(tmp_path / precision),
        num_train_epochs=20,
        train_batch_size=4,
        learning_rate=1e-2,
        precision=precision,
        show_progress=False,
        do_validation=False,
        save_steps=10,
    )
    trainer = RagTrainer(model, tokenizer, args, train_examples)
    expected = torch.bfloat16 if precision == "auto" and torch.cuda.is_bf16_supported() else torch.float16
    assert trainer.autocast_dtype == expected
    assert trainer.scaler.is_enabled() == (expected == torch.float16)
    result = trainer.train()
    assert sum(result.losses[-3:]) / 3 < 0.5 * sum(result.losses[:3]) / 3
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert (tmp_path / precision / "checkpoint-last" / "trainer_state.pt").is_file()
