"""GLUE fine-tuning: load a pretrained discriminator, tokenize a task, train through the DeepSpeed engine with
layer-wise lr decay, evaluate deterministically, write predictions and the task's result.

The recipe (DESIGN.md section 2): [CLS] -> dropout -> linear head, layer-wise lr decay 0.8, 10% warmup then
linear decay, 3 epochs (10 for RTE and STS-B), batch 32, max length 128, lr by model size, weight decay 0.01
(not on LayerNorm/biases), Adam eps 1e-6. Every value is a field of `FinetuneArgs`.
"""
from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from electra_ds.config import ElectraConfig
from electra_ds.data.cache import TOKENIZER_DIR
from electra_ds.data.glue import DIAGNOSTIC, GlueExample, GlueTask, MissingData, get_task, load_split
from electra_ds.data.tokenizer import load_tokenizer, special_ids, text_tokenizer, tokenizer_hash
from electra_ds.data.tokenizer import vocab_size as tokenizer_vocab_size
from electra_ds.model.classifier import ElectraClassifier
from electra_ds.model.hf import RUN_CONFIG, discriminator_config_from_hf, load_pretrained, read_hf_dir
from electra_ds.seeding import DROPOUT_STREAM, derive_seed
from electra_ds.train import engine as ds_engine
from electra_ds.train.glue_metrics import compute_metrics
from electra_ds.train.glue_report import (RUN_FILE, build_report, display_name, load_results, model_root, models_of,
                                          primary_score, pretrain_pfs_days, seed_dir, write_json, write_predictions,
                                          write_task_result)
from electra_ds.train.layerwise_lr import RULES, group_fn, with_layer_lrs

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


@dataclass
class FinetuneArgs:
    learning_rate: float | None = None          # None: the paper's lr for the model size
    layerwise_lr_decay: float | None = None     # None: ELECTRA's for the model size (large 0.9, else 0.8)
    layerwise_lr_decay_rule: str = "intended"   # or "original"
    warmup_proportion: float = 0.1
    epochs: float | None = None                 # None: the task's default (3; 10 for RTE and STS-B)
    batch_size: int = 32
    eval_batch_size: int = 128
    max_length: int = 128
    weight_decay: float = 0.01
    adam_eps: float = 1e-6
    gradient_accumulation_steps: int = 1
    max_train_samples: int | None = None        # cap on rows read from the train split (quick runs)
    max_steps: int | None = None                # cap on optimizer steps (quick runs)
    ds_config: str | None = None                # DeepSpeed JSON path or shipped name; None: engine.default_ds_config()
    optimizer: str = "auto"                     # electra_ds.train.engine.OPTIMIZERS; auto: ELECTRA's Adam
    double_unordered: bool = True               # MRPC, STS-B: train on both orders of each pair (ELECTRA)

    def __post_init__(self) -> None:
        if self.optimizer not in ds_engine.OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {ds_engine.OPTIMIZERS}, got {self.optimizer!r}")
        if self.layerwise_lr_decay_rule not in RULES:
            raise ValueError(f"layerwise_lr_decay_rule must be one of {RULES}, got {self.layerwise_lr_decay_rule!r}")
        for name in ("batch_size", "eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_samples", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or unset), got {getattr(self, name)}")
        if self.max_length < 3:
            raise ValueError(f"max_length must be >= 3 ([CLS] a [SEP] b [SEP]), got {self.max_length}")
        if not 0.0 <= self.warmup_proportion <= 1.0:
            raise ValueError(f"warmup_proportion must be in [0, 1], got {self.warmup_proportion}")


def _is_large(config: ElectraConfig) -> bool:
    return config.hidden_size >= 1024


def default_learning_rate(config: ElectraConfig) -> float:
    """The ELECTRA paper's fine-tuning lr by model size: small 3e-4, base 1e-4, large 5e-5."""
    if _is_large(config):
        return 5e-5
    if config.hidden_size >= 768:
        return 1e-4
    return 3e-4


def layerwise_lr_decay(args: FinetuneArgs, config: ElectraConfig) -> float:
    """args.layerwise_lr_decay, or google-research/electra's by model size: large 0.9, the others 0.8."""
    if args.layerwise_lr_decay is not None:
        return args.layerwise_lr_decay
    return 0.9 if _is_large(config) else 0.8


# ---------------------------------------------------------------------------------------------- the model

@dataclass
class Discriminator:
    """A pretrained discriminator ready for `ElectraClassifier.load_discriminator_weights`."""

    config: ElectraConfig
    weights: dict[str, torch.Tensor]
    source: str
    tokenizer_path: Path | None
    pfs_days: float | None
    weights_sha256: str  # `weights_id`: tells a model path's weights apart after more pretraining


def load_discriminator(path: str | Path) -> Discriminator:
    """A Hugging Face ELECTRA discriminator directory (config.json + weights), or anything
    `electra_ds.model.hf.load_pretrained` reads (our model dir, HF pair export, pretraining output dir)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist")
    if (path / "config.json").is_file():
        cfg, state = read_hf_dir(path, "ElectraForPreTraining")
        config = discriminator_config_from_hf(cfg, f"{path}/config.json")
        weights = state  # load_discriminator_weights keeps the encoder's weights (no position_ids buffer)
    else:
        model = load_pretrained(path)
        config = model.config
        weights = {k: v.detach().float().clone() for k, v in model.named_weights().items()
                   if k.startswith("discriminator.")}
        del model
    return Discriminator(config, weights, str(path), find_tokenizer(path), pretrain_pfs_days(path),
                         weights_id(weights))


def weights_id(weights: dict[str, torch.Tensor]) -> str:
    """sha256 of the encoder weights as float32 under their HF names (`electra.*`), in name order: the same for a
    run's model/, its HF export and a checkpoint of the same weights."""
    digest = hashlib.sha256()
    encoder = {k.removeprefix("discriminator."): v for k, v in weights.items()}
    for name in sorted(k for k, v in encoder.items() if k.startswith("electra.") and v.is_floating_point()):
        tensor = encoder[name].detach().float().contiguous().cpu()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy())
    return digest.hexdigest()


def find_tokenizer(path: Path) -> Path | None:
    """The tokenizer stored with a model: in the directory, its HF export, its pretraining output dir, or the token
    cache that run_config.json of the pretraining run (OUT, or OUT/checkpoints/stepN) names."""
    candidates = [path, path / "discriminator", path / "hf" / "discriminator", path / "tokenizer"]
    for parent in list(path.resolve().parents)[:2]:
        candidates += [parent, parent / "tokenizer", parent / "hf" / "discriminator"]
    for run_config in (path / RUN_CONFIG, path.parent.parent / RUN_CONFIG):
        if run_config.is_file():
            candidates.append(Path(json.loads(run_config.read_text()).get("data", "")) / TOKENIZER_DIR)
    for folder in candidates:
        if any((folder / f).is_file() for f in TOKENIZER_FILES):
            return folder
    return None


def build_classifier(disc: Discriminator, task: GlueTask, seed: int) -> ElectraClassifier:
    """ElectraClassifier with one flat buffer per (layer, decay/no_decay), encoder weights from `disc`;
    the head's initialisation is a function of `seed`."""
    torch.manual_seed(seed)
    model = ElectraClassifier(disc.config, task.num_labels, group_fn=group_fn)
    model.load_discriminator_weights(disc.weights, source=disc.source)
    return model


# ---------------------------------------------------------------------------------------------- tokenization

@dataclass
class Encoded:
    """Token ids and token types of each example (no padding), and the labels."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    labels: np.ndarray | None
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Rows padded to the longest one in the batch."""
        width = max(len(self.input_ids[i]) for i in indices)
        ids = np.full((len(indices), width), self.pad_id, dtype=np.int64)
        types = np.zeros((len(indices), width), dtype=np.int64)
        mask = np.zeros((len(indices), width), dtype=np.int64)
        for row, i in enumerate(indices):
            n = len(self.input_ids[i])
            ids[row, :n], types[row, :n], mask[row, :n] = self.input_ids[i], self.token_type_ids[i], 1
        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
               "token_type_ids": torch.from_numpy(types)}
        if self.labels is not None:
            out["labels"] = torch.from_numpy(self.labels[list(indices)])
        return out


def encode(tokenizer, examples: Sequence[GlueExample], max_length: int, regression: bool = False) -> Encoded:
    """[CLS] a [SEP] (b [SEP], unless b is None or empty) with token types 0/1, truncated to max_length by dropping
    tokens from the end of the longer segment (BERT's rule)."""
    tok = text_tokenizer(tokenizer)
    ids = special_ids(tokenizer)
    cls, sep = ids["cls"], ids["sep"]
    first = tok.encode_batch([e.text_a for e in examples], add_special_tokens=False)
    second = iter(tok.encode_batch([e.text_b for e in examples if e.text_b], add_special_tokens=False))
    input_ids, token_types = [], []
    for example, enc_a in zip(examples, first):
        a = list(enc_a.ids)
        if not example.text_b:  # None, or "" (QQP has empty questions): one segment, as google-research/electra
            a = a[:max_length - 2]
            seq, types = [cls, *a, sep], [0] * (len(a) + 2)
        else:
            b = list(next(second).ids)
            while len(a) + len(b) > max_length - 3:
                (a if len(a) > len(b) else b).pop()
            seq, types = [cls, *a, sep, *b, sep], [0] * (len(a) + 2) + [1] * (len(b) + 1)
        input_ids.append(np.asarray(seq, dtype=np.int64))
        token_types.append(np.asarray(types, dtype=np.int64))
    labels = None
    if examples and examples[0].label is not None:
        labels = np.asarray([e.label for e in examples], dtype=np.float32 if regression else np.int64)
    return Encoded(input_ids, token_types, labels, ids["pad"])


# ---------------------------------------------------------------------------------------------- training

def train_order(num_examples: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """(steps, batch_size) example indices: the epochs' seeded permutations, back to back, cut into batches."""
    needed = steps * batch_size
    epochs = -(-needed // num_examples)
    stream = np.concatenate([np.random.default_rng([seed, e]).permutation(num_examples) for e in range(epochs)])
    return stream[:needed].reshape(steps, batch_size)


def schedule(num_examples: int, args: FinetuneArgs, task: GlueTask) -> tuple[int, int]:
    """(optimizer steps, warmup steps)."""
    epochs = task.epochs if args.epochs is None else args.epochs
    steps = max(1, int(num_examples * epochs / args.batch_size))
    if args.max_steps is not None:
        steps = min(steps, args.max_steps)
    return steps, int(steps * args.warmup_proportion)


def make_engine(model: ElectraClassifier, args: FinetuneArgs, lr: float, steps: int, warmup: int):
    """The DeepSpeed engine over the classifier, one optimizer group per flat buffer, each with its own lr.
    Joins the launcher's process group if needed."""
    _, world_size, _ = ds_engine.setup_distributed()
    micro = args.batch_size // (world_size * args.gradient_accumulation_steps)
    if micro * world_size * args.gradient_accumulation_steps != args.batch_size:
        raise ValueError(f"batch_size {args.batch_size} is not divisible by world size {world_size} x "
                         f"gradient_accumulation_steps {args.gradient_accumulation_steps}")
    flags = {"train_micro_batch_size_per_gpu": f"--batch_size / (world size {world_size} x "
                                               "--gradient_accumulation_steps)",
             "gradient_accumulation_steps": "--gradient_accumulation_steps", "train_batch_size": "--batch_size"}
    ds_config = ds_engine.load_ds_config(args.ds_config, micro_batch_size=micro,
                                         gradient_accumulation_steps=args.gradient_accumulation_steps,
                                         world_size=world_size, flags=flags)
    groups = with_layer_lrs(model.param_groups(args.weight_decay), lr=lr,
                            num_layers=model.config.num_hidden_layers, decay=layerwise_lr_decay(args, model.config),
                            rule=args.layerwise_lr_decay_rule)
    return ds_engine.initialize(model, ds_config, learning_rate=lr, warmup_steps=warmup, max_steps=steps,
                                optimizer=args.optimizer, param_groups=groups, eps=args.adam_eps)


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, task: GlueTask) -> torch.Tensor:
    """Cross-entropy, or the squared error against the score / task.score_max (ELECTRA scales STS-B to 0..1)."""
    if task.is_regression:
        return F.mse_loss(logits[:, 0].float(), labels.float() / task.score_max)
    return F.cross_entropy(logits.float(), labels)


@torch.no_grad()
def predict(engine, data: Encoded, batch_size: int, task: GlueTask) -> np.ndarray:
    """Deterministic predictions in input order (eval mode: no dropout): class index, or score (the model's output
    x task.score_max). Batches hold examples of similar length (less padding); the order is a fixed function of
    the data."""
    out = np.zeros(len(data), dtype=np.float32 if task.is_regression else np.int64)
    if not len(data):
        return out
    was_training = engine.module.training  # DeepSpeedEngine.train/eval set only its module's mode
    engine.eval()
    order = np.argsort([len(ids) for ids in data.input_ids], kind="stable")
    preds = []
    for start in range(0, len(data), batch_size):
        rows = order[start:start + batch_size]
        batch = ds_engine.device_batch(data.batch(rows), engine.device)
        logits = engine(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).float()
        preds.append(logits[:, 0] * task.score_max if task.is_regression else logits.argmax(dim=-1))
    engine.train(was_training)
    out[order] = torch.cat(preds).cpu().numpy()  # one copy to the host, after the last batch
    return out


def train(engine, data: Encoded, args: FinetuneArgs, steps: int, seed: int, task: GlueTask,
          rank: int = 0, world_size: int = 1) -> float:
    """`steps` optimizer steps over seeded batches; each rank takes its slice of every global batch.
    Returns the mean training loss of the last 10% of steps (this rank)."""
    from tqdm.auto import tqdm

    micro = args.batch_size // (world_size * args.gradient_accumulation_steps)
    order = train_order(len(data), args.batch_size, steps, seed)
    engine.train()
    tail = max(1, steps // 10)
    tail_losses = []
    for step in tqdm(range(steps), desc="fine-tune", disable=rank != 0 or None, mininterval=5):
        for acc in range(args.gradient_accumulation_steps):
            start = (acc * world_size + rank) * micro
            batch = ds_engine.device_batch(data.batch(order[step, start:start + micro]), engine.device)
            logits = engine(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            loss = loss_fn(logits, batch["labels"], task)
            engine.backward(loss)
            engine.step()
            if step >= steps - tail:
                tail_losses.append(loss.detach().float())
    return float(torch.stack(tail_losses).mean())


# ---------------------------------------------------------------------------------------------- one task

@dataclass
class TaskData:
    train: list[GlueExample]
    dev: dict[str, list[GlueExample]]
    test: dict[str, tuple[GlueTask, list[GlueExample]]]  # submission file stem -> (task it is scored as, rows)


def load_task_data(task: GlueTask, glue_dir: str | Path | None, max_train_samples: int | None = None,
                   with_test: bool = True, double_unordered: bool = False) -> TaskData:
    """Train and dev splits (raises MissingData when either is absent) and, with `with_test`, whatever test
    splits exist (MNLI also predicts the diagnostic set, AX). `double_unordered`: a task whose pairs have no
    order (MRPC, STS-B) trains on each pair twice, once swapped, as google-research/electra does (after the
    `max_train_samples` cap on the rows read)."""
    train_rows = load_split(task, "train", glue_dir)
    if max_train_samples is not None and max_train_samples < len(train_rows):
        keep = np.sort(np.random.default_rng(0).permutation(len(train_rows))[:max_train_samples])
        train_rows = [train_rows[i] for i in keep]
    if double_unordered and task.unordered:
        train_rows += [row._replace(text_a=row.text_b, text_b=row.text_a) for row in train_rows]
    dev = {split: load_split(task, split, glue_dir) for split in task.dev_splits}
    test: dict[str, tuple[GlueTask, list[GlueExample]]] = {}
    sources = [(task, s, stem) for s, stem in task.test_splits.items()] if with_test else []
    if task.name == "MNLI" and with_test:
        sources += [(DIAGNOSTIC, s, stem) for s, stem in DIAGNOSTIC.test_splits.items()]
    for source_task, split, stem in sources:
        try:
            test[stem] = (source_task, load_split(source_task, split, glue_dir))
        except MissingData:
            continue  # no test split: no submission file for it
    for name, rows in [("train", train_rows), *dev.items()]:
        if not rows:
            raise MissingData(f"{task.name} {name} has no examples")
    return TaskData(train_rows, dev, test)


def finetune_seed(disc: Discriminator, task: GlueTask, data: TaskData, encoded: dict[str, Encoded],
                  seed: int, args: FinetuneArgs, out_dir: str | Path, rank: int = 0,
                  world_size: int = 1, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune one seed, evaluate every dev split, write its predictions; returns the run record. Its run.json
    also keeps `settings` (see `finished_run`)."""
    started = time.time()
    lr = default_learning_rate(disc.config) if args.learning_rate is None else args.learning_rate
    steps, warmup = schedule(len(data.train), args, task)
    model = build_classifier(disc, task, seed)
    engine = make_engine(model, args, lr, steps, warmup)
    torch.manual_seed(derive_seed(seed, 0, rank, DROPOUT_STREAM))  # same head on every rank, own dropout noise
    train_loss = train(engine, encoded["train"], args, steps, seed, task, rank, world_size)
    run: dict[str, Any] = {"seed": seed, "steps": steps, "warmup_steps": warmup, "learning_rate": lr,
                           "layerwise_lr_decay": layerwise_lr_decay(args, disc.config),
                           "train_examples": len(data.train), "train_loss": train_loss,
                           "train_seconds": time.time() - started, "dev": {}}
    folder = seed_dir(out_dir, task, seed)
    for split, rows in data.dev.items():
        preds = predict(engine, encoded[split], args.eval_batch_size, task)
        run["dev"][split] = compute_metrics(task.metric, preds, encoded[split].labels)
        if rank == 0:
            write_predictions(folder / f"{split}.tsv", task, [r.guid for r in rows], preds)
    for stem, (source_task, rows) in data.test.items():
        preds = predict(engine, encoded[stem], args.eval_batch_size, source_task)
        if rank == 0:
            write_predictions(folder / f"{stem}.tsv", source_task, [r.guid for r in rows], preds)
    run["seconds"] = time.time() - started
    if rank == 0:
        write_json(folder / RUN_FILE, {**run, "settings": settings})
    engine.destroy()
    del engine, model
    gc.collect()
    return run


def finished_run(out_dir: str | Path, task: GlueTask, seed: int, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The run record of `seed` that an earlier call (one interrupted before its result.json, say) finished with
    exactly these `settings`, or None: it must be trained."""
    path = seed_dir(out_dir, task, seed) / RUN_FILE
    if not path.is_file():
        return None
    run = json.loads(path.read_text())
    return run if run.pop("settings", None) == settings else None


def check_same_model(out_dir: str | Path, results: dict[str, dict], model_path: str | Path) -> None:
    """Refuse an output directory whose `results` (`load_results`) come from another model: its report would mix
    the two."""
    mine = model_root(model_path)
    others = {model: tasks for model, tasks in models_of(results).items() if model != mine}
    if others:
        held = "; ".join(f"{path} ({', '.join(tasks)})" for path, tasks in others.items())
        raise ValueError(f"{out_dir} holds GLUE results of another model: {held}. Use another --output_dir, or "
                         "remove those task folders first")


def check_same_weights(out_dir: str | Path, results: dict[str, dict], disc: Discriminator) -> None:
    """Refuse an output directory whose `results` (`load_results`) come from other weights under the same model
    path (a run pretrained further since): its report would mix two checkpoints. Results from before weights were
    recorded pass."""
    stale = [name for name, result in results.items()
             if result.get("weights_sha256", disc.weights_sha256) != disc.weights_sha256]
    if stale:
        raise ValueError(f"{out_dir} holds GLUE results ({', '.join(stale)}) of other weights than {disc.source} "
                         "holds now (pretrained further since?). Use another --output_dir, or remove those task "
                         "folders first")


def run_task(model_path: str | Path, task_name: str, out_dir: str | Path, *, seeds: Sequence[int],
             args: FinetuneArgs, glue_dir: str | Path | None = None, tokenizer_path: str | Path | None = None,
             pfs_days: float | None = None, model_name: str | None = None,
             predict_test: bool = True) -> dict[str, Any]:
    """Fine-tune `task_name` once per seed, write OUT_DIR/<TASK>/result.json and refresh the combined report.
    A task whose train or dev data is absent is recorded as absent (not as a zero), unless the task has a result
    already (`write_task_result` keeps it). Seeds finished with the same settings before are not trained again."""
    task = get_task(task_name)
    if not task.trainable:
        raise ValueError(f"{task.name} is test-only; it is predicted by the MNLI model")
    rank, world_size, _ = ds_engine.setup_distributed()
    name = model_name or display_name(model_path)
    existing = load_results(out_dir)
    check_same_model(out_dir, existing, model_path)
    try:
        data = load_task_data(task, glue_dir, args.max_train_samples, with_test=predict_test,
                              double_unordered=args.double_unordered)
    except MissingData as exc:
        result = {"task": task.name, "status": "absent", "reason": str(exc), "model": name}
        if rank == 0:
            write_task_result(out_dir, result)
            build_report(out_dir, pfs_days=pfs_days)
        return result

    disc = load_discriminator(model_path)
    check_same_weights(out_dir, existing, disc)
    tok_path = tokenizer_path or disc.tokenizer_path
    if tok_path is None:
        raise FileNotFoundError(f"{model_path}: no tokenizer (tokenizer.json or vocab.txt) next to the model, in "
                                "its pretraining output directory or in the token cache its run_config.json names; "
                                "pass --tokenizer")
    tokenizer = load_tokenizer(tok_path)
    if tokenizer_vocab_size(tokenizer) != disc.config.vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {tokenizer_vocab_size(tokenizer)} token ids but model {model_path} "
                         f"has a vocabulary of {disc.config.vocab_size}: use the tokenizer the model was pretrained "
                         "with")
    if args.max_length > disc.config.max_position_embeddings:
        raise ValueError(f"max_length {args.max_length} exceeds the model's max_position_embeddings "
                         f"{disc.config.max_position_embeddings}")
    encoded = {"train": encode(tokenizer, data.train, args.max_length, task.is_regression)}
    encoded.update({s: encode(tokenizer, rows, args.max_length, task.is_regression) for s, rows in data.dev.items()})
    encoded.update({stem: encode(tokenizer, rows, args.max_length) for stem, (_, rows) in data.test.items()})

    ds_config_file = ds_engine.resolve_ds_config(args.ds_config)
    settings = {"weights_sha256": disc.weights_sha256, "tokenizer": tokenizer_hash(tokenizer),
                "glue_dir": None if glue_dir is None else str(Path(glue_dir).resolve()), "args": asdict(args),
                "ds_config": ds_config_file.read_text(), "world_size": world_size, "test_files": sorted(data.test)}
    earlier = {seed: finished_run(out_dir, task, seed, settings) for seed in seeds}  # before any rank writes one
    runs = []
    for seed in seeds:
        run = earlier[seed] or finetune_seed(disc, task, data, encoded, seed, args, out_dir, rank, world_size,
                                             settings)
        runs.append(run)
        if rank == 0:
            done = "finished earlier" if earlier[seed] else f"{run['seconds']:.0f} s"
            print(f"{task.name} seed {seed}: {json.dumps(run['dev'])} ({done})", flush=True)
    if pfs_days is None:
        pfs_days = disc.pfs_days
    result = {"task": task.name, "status": "ok", "model": name, "model_path": str(Path(model_path).resolve()),
              "weights_sha256": disc.weights_sha256, "tokenizer": str(tok_path),
              "metric": task.metric, "primary": task.primary, "args": asdict(args),
              "ds_config_file": str(ds_config_file), "pretrain_pfs_days": pfs_days,
              "runs": runs, "test_files": sorted(data.test)}
    if rank == 0:
        write_task_result(out_dir, result)
        report = build_report(out_dir, pfs_days=pfs_days)
        median = primary_score(task, report["tasks"][task.name]["summary"], "median")
        print(f"{task.name}: median {task.primary} {100 * median:.1f} over {len(runs)} seed(s)", flush=True)
    return result


__all__ = ["FinetuneArgs", "Discriminator", "Encoded", "TaskData", "default_learning_rate", "layerwise_lr_decay",
           "load_discriminator", "weights_id", "finished_run", "check_same_model", "check_same_weights",
           "find_tokenizer", "build_classifier", "encode", "train_order", "schedule", "make_engine",
           "predict", "train", "load_task_data", "finetune_seed", "run_task"]
