"""Hugging Face Trainer on the CPU, offline: a tiny BertForSequenceClassification
built from a config (random init, nothing downloaded) learns a synthetic task
(are the tokens from the low or the high half of the vocabulary?). The Trainer
saves checkpoint-N every SAVE_STEPS steps into the checkpoint directory;
ckpt.hf.CkptCallback commits each save (and asks for one at the next step after
a preemption warning); ckpt.hf.resume_from_checkpoint() picks the newest
complete checkpoint-N. On its first attempt the run fails at step FAIL_AT_STEP
with ckpt.RecoverableError (exit 75); the retry resumes from the last save and
ends with the same loss.
"""

import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging as hf_logging

import ckpt
import ckpt.hf

MAX_STEPS = int(os.environ.get("MAX_STEPS", "24"))
SAVE_STEPS = int(os.environ.get("SAVE_STEPS", "4"))
FAIL_AT_STEP = int(os.environ.get("FAIL_AT_STEP", str(MAX_STEPS // 2 + 2)))
SEED, SAMPLES, LENGTH = 0, 256, 12

warnings.filterwarnings("ignore", ".*pin_memory.*")
hf_logging.disable_progress_bar()


class Synthetic(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(SEED)
        self.labels = (torch.rand(SAMPLES, generator=g) < 0.5).long()
        low = torch.randint(4, 34, (SAMPLES, LENGTH), generator=g)  # label 0: tokens 4..33
        self.ids = low + 30 * self.labels[:, None]  # label 1: tokens 34..63

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class FailOnce(TrainerCallback):
    """The simulated fault: attempt 1 dies at FAIL_AT_STEP."""

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if ckpt.checkpoint().attempt == 1 and state.global_step == FAIL_AT_STEP:
            print(f"step {state.global_step}: simulated failure", flush=True)
            raise ckpt.RecoverableError(f"simulated failure at step {state.global_step}")


set_seed(SEED)
config = BertConfig(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=LENGTH,
    num_labels=2,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
model = BertForSequenceClassification(config)
data = Synthetic()

cp = ckpt.checkpoint()
resume = ckpt.hf.resume_from_checkpoint(cp.path)
start_step = 0
if resume:
    with open(os.path.join(resume, "trainer_state.json")) as f:
        start_step = json.load(f)["global_step"]
print(
    f"attempt {cp.attempt}: starting from step {start_step} "
    f"({os.path.basename(resume) if resume else 'no checkpoint'})",
    flush=True,
)
args = TrainingArguments(
    output_dir=str(cp.path),
    max_steps=MAX_STEPS,
    per_device_train_batch_size=16,
    learning_rate=3e-3,
    save_strategy="steps",
    save_steps=SAVE_STEPS,
    save_total_limit=2,
    logging_steps=SAVE_STEPS,
    report_to="none",
    use_cpu=True,
    seed=SEED,
    disable_tqdm=True,
    dataloader_num_workers=0,
)
commits = ckpt.hf.CkptCallback()  # commits each checkpoint-N once saved
trainer = Trainer(
    model=model,
    args=args,
    train_dataset=data,
    callbacks=[commits, FailOnce()],
)
trainer.train(resume_from_checkpoint=resume)

model.eval()
with torch.no_grad():
    final = model(input_ids=data.ids, labels=data.labels).loss.item()
result = {
    "loss": final,
    "steps": trainer.state.global_step,
    "attempt": cp.attempt,
    "start_step": start_step,
    "snapshot": commits.last_snapshot,  # the last commit: holds the final checkpoint
}
print(f"done: {result['steps']} steps, final loss {final:.6f}")
if os.environ.get("RESULT_FILE"):
    with open(os.environ["RESULT_FILE"], "w") as f:
        json.dump(result, f)
