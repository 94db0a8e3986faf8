"""Hugging Face interop: import/export `ElectraForPreTraining` + `ElectraForMaskedLM` directories,
and our own model directory format (`electra_config.json` + `model.safetensors` with HF names)."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch

from electra_ds.config import ElectraConfig
from electra_ds.files import replacing_dir
from electra_ds.model.electra import DISC, GEN, ElectraForPretraining

MODEL_CONFIG = "electra_config.json"
MODEL_WEIGHTS = "model.safetensors"
HF_FIELDS = ("vocab_size", "embedding_size", "max_position_embeddings", "type_vocab_size", "layer_norm_eps",
             "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "pad_token_id")


def hf_config(config: ElectraConfig, tower: str):
    """transformers.ElectraConfig for the discriminator or the generator tower."""
    from transformers import ElectraConfig as HFElectraConfig

    shape = config.discriminator if tower == DISC else config.generator
    return HFElectraConfig(hidden_size=shape.hidden_size, num_hidden_layers=shape.num_hidden_layers,
                           num_attention_heads=shape.num_attention_heads, intermediate_size=shape.intermediate_size,
                           hidden_act="gelu", tie_word_embeddings=True,
                           architectures=["ElectraForPreTraining" if tower == DISC else "ElectraForMaskedLM"],
                           **{k: getattr(config, k) for k in HF_FIELDS})


def read_hf_dir(path: str | Path, expect: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, state dict) of a HF ELECTRA directory, checked to be the `expect` architecture."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a Hugging Face {expect} directory")
    cfg = json.loads(config_file.read_text())
    if cfg.get("model_type") != "electra":
        raise ValueError(f"{config_file}: model_type is {cfg.get('model_type')!r}, expected 'electra'")
    archs = cfg.get("architectures") or []
    if archs and expect not in archs:
        raise ValueError(f"{config_file}: architectures {archs}, expected {expect} "
                         f"(did you swap the discriminator and generator directories?)")
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path}: neither model.safetensors nor pytorch_model.bin")
    head = "discriminator_predictions.dense.weight" if expect == "ElectraForPreTraining" else \
        "generator_predictions.dense.weight"
    if head not in state:
        raise ValueError(f"{path}: weight {head} is missing, so this is not an {expect} checkpoint")
    return cfg, state


def _check_activation(cfg: dict, source: str) -> None:
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (ELECTRA uses exact gelu)")


def discriminator_config_from_hf(cfg: dict, source: str = "config.json", **generator: float | int) -> ElectraConfig:
    """Our ElectraConfig from a HF discriminator's config.json; `generator` fields as given (else the preset rule)."""
    _check_activation(cfg, source)
    return ElectraConfig(**{k: cfg[k] for k in HF_FIELDS if k in cfg},
                         **{k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                "intermediate_size")}, **generator)


def config_from_hf(disc_cfg: dict, gen_cfg: dict) -> ElectraConfig:
    for key in ("vocab_size", "embedding_size", "max_position_embeddings", "type_vocab_size"):
        if disc_cfg.get(key) != gen_cfg.get(key):
            raise ValueError(f"discriminator and generator disagree on {key}: {disc_cfg.get(key)} vs "
                             f"{gen_cfg.get(key)}; they cannot share embeddings")
    _check_activation(gen_cfg, "generator config.json")
    return discriminator_config_from_hf(
        disc_cfg, "discriminator config.json",
        generator_size=gen_cfg["hidden_size"] / disc_cfg["hidden_size"],
        generator_layer_size=gen_cfg["num_hidden_layers"] / disc_cfg["num_hidden_layers"],
        generator_hidden_size=gen_cfg["hidden_size"], generator_num_hidden_layers=gen_cfg["num_hidden_layers"],
        generator_num_attention_heads=gen_cfg["num_attention_heads"],
        generator_intermediate_size=gen_cfg["intermediate_size"])


def load_hf_pair(disc_dir: str | Path, gen_dir: str | Path) -> ElectraForPretraining:
    """Our pretraining model from a HF discriminator directory and a HF generator directory.

    The generator's embeddings (and output layer) are the discriminator's in our model (ELECTRA ties them): where
    the generator's copies differ (beyond rounding to another stored dtype), the discriminator's are loaded and a
    warning names the weights."""
    disc_cfg, disc_state = read_hf_dir(disc_dir, "ElectraForPreTraining")
    gen_cfg, gen_state = read_hf_dir(gen_dir, "ElectraForMaskedLM")
    model = ElectraForPretraining(config_from_hf(disc_cfg, gen_cfg))
    weights = {f"{DISC}.{k}": v for k, v in disc_state.items() if not k.endswith("position_ids")}
    untied = []
    for k, v in gen_state.items():
        name = f"{GEN}.{k}"
        if k.endswith("position_ids"):
            continue
        if name in model.tied:  # one tensor in our model: the discriminator's copy is loaded, so they must agree
            target = model.tied[name]
            if target in weights and not _same_weight(v, weights[target]):
                other = target[len(DISC) + 1:]
                untied.append(k if k == other else f"{k} (vs the discriminator's {other})")
            continue
        weights[name] = v
    if untied:
        warnings.warn(f"{gen_dir}: the generator's {', '.join(untied)} differ from the discriminator's in {disc_dir}; "
                      "ELECTRA ties these weights and this model holds them once, so the discriminator's are used",
                      stacklevel=2)
    model.load_named_weights(weights, source=f"{disc_dir} + {gen_dir}")
    return model


def _same_weight(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, or equal up to rounding to the narrower dtype when the two files store different float dtypes (every
    tied weight is a float)."""
    if a.shape != b.shape:
        return False
    if a.dtype == b.dtype:
        return torch.equal(a, b)
    eps = max(torch.finfo(a.dtype).eps, torch.finfo(b.dtype).eps)
    tiny = max(torch.finfo(a.dtype).smallest_normal, torch.finfo(b.dtype).smallest_normal)
    return torch.allclose(a.double(), b.double(), rtol=eps, atol=tiny)


def export_hf_pair(model: ElectraForPretraining, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write out_dir/discriminator (ElectraForPreTraining) and out_dir/generator (ElectraForMaskedLM)."""
    from transformers import ElectraForMaskedLM, ElectraForPreTraining

    weights = {k: v.detach().float().cpu() for k, v in model.named_weights().items()}
    for tower, cls in ((DISC, ElectraForPreTraining), (GEN, ElectraForMaskedLM)):
        hf_model = cls(hf_config(model.config, tower))
        prefix = f"{tower}."
        state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        missing, unexpected = hf_model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise RuntimeError(f"export to {cls.__name__}: missing {missing}, unexpected {unexpected}")
        with replacing_dir(Path(out_dir) / tower) as tmp:
            hf_model.save_pretrained(tmp)
            if tokenizer_dir is not None:
                for f in Path(tokenizer_dir).iterdir():
                    if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("vocab.txt",
                                                                                      "special_tokens_map.json")):
                        shutil.copy2(f, tmp / f.name)
    return Path(out_dir)


def save_model(model: ElectraForPretraining, out_dir: str | Path) -> Path:
    """Our format: the config and every canonical weight under its HF-style name (layout independent)."""
    from safetensors.torch import save_file

    weights = {k: v.detach().cpu().contiguous() for k, v in model.views().items()}
    with replacing_dir(out_dir) as tmp:
        (tmp / MODEL_CONFIG).write_text(json.dumps(model.config.to_dict(), indent=2))
        save_file(weights, str(tmp / MODEL_WEIGHTS))
    return Path(out_dir)


DS_MODEL_STATES = "mp_rank_00_model_states.pt"
RUN_CONFIG = "run_config.json"


def load_deepspeed_checkpoint(path: str | Path) -> ElectraForPretraining:
    """A pretraining checkpoint directory (OUT/checkpoints/stepNNNNNNNN) of any ZeRO stage.

    The model config comes from OUT/run_config.json; ZeRO-partitioned fp32 weights are merged with
    DeepSpeed's zero_to_fp32, unpartitioned ones read from the module states."""
    path = Path(path)
    run_config = path.parent.parent / RUN_CONFIG
    if not run_config.is_file():
        raise FileNotFoundError(f"{path}: a DeepSpeed checkpoint, but {run_config} (the model config) is missing")
    config = ElectraConfig.from_dict(json.loads(run_config.read_text())["model"])
    model = ElectraForPretraining(config)
    from electra_ds.train.checkpoint import check_layout

    check_layout(path, model.layout_fingerprint())
    if any(path.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:
        state = torch.load(path / DS_MODEL_STATES, map_location="cpu", weights_only=False)["module"]
    expected = model.state_dict()
    problems = [f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(expected[k].shape)} in the model"
                for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    problems += [f"{k} missing" for k in expected if k not in state]
    problems += [f"{k} unexpected" for k in state if k not in expected]
    if problems:
        raise ValueError(f"{path}: checkpoint does not fit the model described by {run_config} ("
                         + "; ".join(problems) + ")")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model


def load_pretrained(path: str | Path) -> ElectraForPretraining:
    """Our model directory, a HF pair directory (discriminator/ + generator/), a DeepSpeed checkpoint directory
    of a pretraining run, or a pretraining output directory (its `hf/` export or `model/` directory, else its newest
    complete checkpoint)."""
    path = Path(path)
    if (path / DS_MODEL_STATES).is_file():
        return load_deepspeed_checkpoint(path)
    if (path / MODEL_CONFIG).is_file():
        from safetensors.torch import load_file

        config = ElectraConfig.from_dict(json.loads((path / MODEL_CONFIG).read_text()))
        model = ElectraForPretraining(config)
        model.load_named_weights(load_file(str(path / MODEL_WEIGHTS)), source=str(path))
        return model
    if (path / DISC).is_dir() and (path / GEN).is_dir():
        return load_hf_pair(path / DISC, path / GEN)
    for sub in ("hf", "model"):
        if (path / sub).is_dir():
            return load_pretrained(path / sub)
    from electra_ds.train.checkpoint import CheckpointError, CheckpointManager

    checkpoints = CheckpointManager(path / "checkpoints", keep=1, rank=0, world_size=1)
    try:  # newest first, past damaged ones, as a resumed run chooses
        found = checkpoints.first_usable(lambda tag: load_deepspeed_checkpoint(checkpoints.root / tag))
    except CheckpointError as e:
        raise ValueError(f"{path}: {e}") from None
    if found is not None:
        return found[2]
    raise FileNotFoundError(f"{path}: not an electra_ds model directory ({MODEL_CONFIG}), a Hugging Face pair "
                            f"({DISC}/ and {GEN}/), a DeepSpeed checkpoint ({DS_MODEL_STATES}) or a pretraining "
                            f"output directory (hf/, model/ or a complete checkpoint in checkpoints/)")
