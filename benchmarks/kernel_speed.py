"""Time each fused op on CUDA at ELECTRA-Small sizes (bf16, batch 128 x 128): Triton kernel vs twin vs the
plain torch ops a model would otherwise call; then one layer's attention, forward and backward, under each SDPA backend
and as our kernels.attention, without a mask (every row full) and with a key-padding mask, per tower.
With --attention_configs, only our attention under each candidate blocking of its kernels; with --row_configs, only
the LayerNorm and GELU ops under each candidate blocking of their backward kernels (launch.Blocking).
Usage: python benchmarks/kernel_speed.py [--attention_configs | --row_configs] [--json PATH]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F

from electra_ds.files import atomic_write
from electra_ds.kernels import (adam_step, add_layer_norm, attention, bias_gelu, cross_entropy_and_sample, launch,
                                set_backend, set_compiled_gelu, set_compiled_layer_norm, sigmoid_bce)
from electra_ds.model.electra import VOCAB_MULTIPLE

if TYPE_CHECKING:
    from electra_ds.kernels.fused_attention import Blocking


def _graphed(fn):
    """fn captured in a CUDA graph (warmed up on a side stream first): launch overhead taken out."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _ms(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def layer_norm_inputs(dev: str, tokens: int, hidden: int) -> tuple[torch.Tensor, ...]:
    """The LayerNorm cases' x and residual (random, drawn from torch's generator), weight (ones) and bias (zeros; also
    the x_bias), bf16."""
    bf = torch.bfloat16
    x, r = torch.randn(tokens, hidden, device=dev, dtype=bf), torch.randn(tokens, hidden, device=dev, dtype=bf)
    return x, r, torch.ones(hidden, device=dev, dtype=bf), torch.zeros(hidden, device=dev, dtype=bf)


def compiled_cases(dev: str = "cuda", tokens: int = 16384, hidden: int = 256) -> dict:
    """name -> the fwd+bwd callable of our op under torch.compile, for the `cases` whose op inductor compiles as it
    does in the model on CUDA (the twin traced, the GELU as kernels._TracedBiasGelu: the defaults; or our kernels as
    an opaque op, with set_compiled_layer_norm("opaque") and set_compiled_gelu("opaque")), on `layer_norm_inputs`,
    then `gelu_inputs`, and seed 0. Compiled here (one call each)."""
    x, r, w, b = layer_norm_inputs(dev, tokens, hidden)
    h, hb = gelu_inputs(dev, tokens, 4 * hidden)
    seed = torch.tensor(0, device=dev)  # drawn per call otherwise: a host-side generator call in the graph
    return {
        "dropout + add_layer_norm fwd+bwd": _fwd_bwd(torch.compile(lambda *a: add_layer_norm(*a, 1e-12, 0.1, seed)),
                                                     x, r, w, b),
        "bias + dropout + add_layer_norm fwd+bwd": _fwd_bwd(
            torch.compile(lambda *a: add_layer_norm(*a[:4], 1e-12, 0.1, seed, a[4])), x, r, w, b, b),
        "bias_gelu fwd+bwd": _fwd_bwd(torch.compile(bias_gelu), h, hb)}


def gelu_inputs(dev: str, tokens: int, ffn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The GELU cases' input (a matrix product's output) and bias, random, bf16."""
    return (torch.randn(tokens, ffn, device=dev, dtype=torch.bfloat16),
            torch.randn(ffn, device=dev, dtype=torch.bfloat16))


def _fwd_bwd(op, *args):
    """A callable running op(*args) forward and backward with a fixed output gradient."""
    leaves = [a.detach().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    inputs = [a for a in leaves if torch.is_tensor(a) and a.requires_grad]
    grad = torch.ones_like(op(*leaves))
    return lambda: torch.autograd.grad(op(*leaves), inputs, grad)


def _torch_loss_and_draws(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> tuple[torch.Tensor, ...]:
    """What cross_entropy_and_sample gives, from plain torch ops: summed loss, fp32 Gumbel-max sample and argmax of
    the first `vocab` columns."""
    loss = F.cross_entropy(logits, targets, reduction="sum")
    with torch.no_grad():
        real = logits[:, :vocab]
        noise = -torch.log(-torch.log(torch.rand_like(real, dtype=torch.float32)))
        return loss, (real.float() + noise).argmax(-1), real.argmax(-1)


def cases(dev: str = "cuda", tokens: int = 16384, masked: int = 2432, hidden: int = 256, ffn: int = 1024,
          vocab: int = 30522, params: int = 14_000_000) -> dict:
    """name -> (our op's fwd+bwd callable, the plain torch one's), on `dev` at ELECTRA-Small's sizes by default."""
    bf = torch.bfloat16
    x, r, w, b = layer_norm_inputs(dev, tokens, hidden)
    h, hb = gelu_inputs(dev, tokens, ffn)
    # the generator's logits as the model makes them: padded with -inf columns to a multiple of VOCAB_MULTIPLE
    padding = torch.full((masked, -vocab % VOCAB_MULTIPLE), float("-inf"), device=dev, dtype=bf)
    logits = torch.cat([torch.randn(masked, vocab, device=dev, dtype=bf), padding], dim=1)
    targets = torch.randint(0, vocab, (masked,), device=dev)
    d, labels = torch.randn(tokens, device=dev, dtype=bf), torch.rand(tokens, device=dev) > 0.8
    seed = torch.tensor(0, device=dev)
    p, g, m, v = *torch.randn(2, params, device=dev), *torch.zeros(2, params, device=dev)
    adam = dict(lr=5e-4, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01)
    torch_param = torch.nn.Parameter(p.clone())
    torch_param.grad = g
    torch_adamw = torch.optim.AdamW([torch_param], lr=5e-4, eps=1e-6, weight_decay=0.01, fused=dev == "cuda",
                                    capturable=dev == "cuda")  # step count on the device: a CUDA graph can hold it
    return {
        "add_layer_norm fwd+bwd": (_fwd_bwd(add_layer_norm, x, r, w, b, 1e-12),
                                   _fwd_bwd(lambda *a: F.layer_norm(a[0] + a[1], (hidden,), a[2], a[3], 1e-12),
                                            x, r, w, b)),
        "dropout + add_layer_norm fwd+bwd": (
            _fwd_bwd(lambda *a: add_layer_norm(*a, 1e-12, 0.1), x, r, w, b),
            _fwd_bwd(lambda *a: F.layer_norm(F.dropout(a[0], 0.1) + a[1], (hidden,), a[2], a[3], 1e-12), x, r, w, b)),
        "bias + dropout + add_layer_norm fwd+bwd": (
            _fwd_bwd(lambda *a: add_layer_norm(*a[:4], 1e-12, 0.1, x_bias=a[4]), x, r, w, b, b),
            _fwd_bwd(lambda *a: F.layer_norm(F.dropout(a[0] + a[4], 0.1) + a[1], (hidden,), a[2], a[3], 1e-12),
                     x, r, w, b, b)),
        "bias_gelu fwd+bwd": (_fwd_bwd(bias_gelu, h, hb), _fwd_bwd(lambda a, c: F.gelu(a + c), h, hb)),
        "cross_entropy_and_sample fwd+bwd": (
            _fwd_bwd(lambda a, t: cross_entropy_and_sample(a, t, seed, 1.0, vocab)[0].sum(), logits, targets),
            _fwd_bwd(lambda a, t: _torch_loss_and_draws(a, t, vocab)[0], logits, targets)),
        "sigmoid_bce fwd+bwd": (_fwd_bwd(lambda a, c: sigmoid_bce(a, c).sum(), d, labels),
                                _fwd_bwd(lambda a, c: F.binary_cross_entropy_with_logits(a, c.to(a.dtype),
                                                                                         reduction="sum"), d, labels)),
        "adam_step": (lambda: adam_step(p, g, m, v, **adam), torch_adamw.step),  # torch's: with bias correction
    }


SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def attention_cases(dev: str = "cuda", batch: int = 128, length: int = 128, head_dim: int = 64,
                    heads: dict[str, int] | None = None, dropout: float = 0.1) -> dict[str, tuple[Callable, Callable]]:
    """name -> (SDPA's fwd+bwd callable, ours') for one layer's attention from its (B, L, 3 * hidden) QKV product to
    the (B, L, hidden) context, bf16, attention dropout on, for each tower of ELECTRA-Small by default, without a mask
    and with a key-padding mask where every other row ends in 16 padding tokens. SDPA's is the model's attention before
    `kernels.attention`: q/k/v permuted views, the context transposed back (which SDPA backend runs is up to the
    caller, `sdpa_kernel`); ours is `kernels.attention` (the Triton kernels on CUDA)."""
    heads = heads or {"discriminator": 4, "generator": 1}
    padded = torch.ones(batch, length, dtype=torch.long, device=dev)
    padded[::2, length - min(16, length - 1):] = 0
    seed = torch.tensor(0, device=dev)

    def sdpa(qkv: torch.Tensor, n: int, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = qkv.view(batch, length, 3, n, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        keys = None if mask is None else mask.bool()[:, None, None, :]
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, dropout_p=dropout)
        return context.transpose(1, 2).reshape(batch, length, n * head_dim)

    out = {}
    for tower, n in heads.items():
        qkv = torch.randn(batch, length, 3 * n * head_dim, device=dev, dtype=torch.bfloat16)
        for label, mask in (("no mask", None), ("padding mask", padded)):
            out[f"{tower} ({n} heads) {label}"] = (
                _fwd_bwd(lambda x, n=n, mask=mask: sdpa(x, n, mask), qkv),
                _fwd_bwd(lambda x, n=n, mask=mask: attention(x, n, mask, dropout, seed), qkv))
    return out


def _with_backend(fn: Callable[[], tuple], backend: str) -> Callable[[], tuple]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run() -> tuple:
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return fn()
    return run


def time_attention() -> dict[str, dict[str, float | str]]:
    """case -> SDPA backend or "electra_ds" -> ms per call inside a CUDA graph, or why there is no figure. Each
    backend is tried eagerly first (a backend that does not take the case, e.g. flash with a mask, refuses there,
    outside any capture); a capture that still fails ends the section, since the CUDA context may not be usable
    after it."""
    results: dict[str, dict[str, float | str]] = {}
    broken = None
    for name, (sdpa, ours) in attention_cases().items():
        row = results[name] = {}
        for backend, run in [(b, _with_backend(sdpa, b)) for b in SDPA_BACKENDS] + [("electra_ds", ours)]:
            if broken:
                row[backend] = f"skipped: {broken}"
                continue
            try:
                run()
                torch.cuda.synchronize()
            except Exception as err:  # noqa: BLE001 - a backend refusing the case, or our kernels failing to build
                row[backend] = f"unsupported: {str(err).splitlines()[0][:160]}"
                continue
            try:
                row[backend] = _ms(_graphed(run))
            except Exception as err:  # noqa: BLE001 - reported, and the section stops
                broken = f"{backend} failed in a CUDA graph ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
                row[backend] = broken
    return results


def attention_configs() -> dict[str, Blocking]:
    """Candidate blockings of the attention kernels in half precision (`fused_attention.CONFIGS["half"]`: tile size,
    each kernel's warps and pipeline stages, the longest sequence whose backward is one pass), none of which spills
    in an sm_90 build. The one-pass backward's sm_90 build holds one program of 8 warps per multiprocessor (over 200
    registers a thread), walking its query tiles one after another: the staged candidates load the next query tiles
    while one is computed."""
    from electra_ds.kernels.fused_attention import CONFIGS, Blocking

    default = CONFIGS["half"]

    def same(warps: int, stages: int) -> dict:
        return {k: dict(num_warps=warps, num_stages=stages) for k in ("fwd", "bwd_kv", "bwd_q", "bwd_one")}

    return {"64 x 64, one-pass backward (default)": default,
            "64 x 64, two-pass backward": dataclasses.replace(default, one_pass=0),
            "64 x 64, one pass by 16 queries": dataclasses.replace(default, one_pass_block=16),
            **{f"64 x 64, one pass, {n} stages": dataclasses.replace(
                default, options={**default.options, "bwd_one": {**default.options["bwd_one"], "num_stages": n}})
               for n in (2, 3)},
            "64 x 64, 8 warps, two passes": Blocking(64, same(8, 2)),
            "32 x 32, 8 warps, one pass": Blocking(32, same(8, 1), one_pass=128),
            "32 x 32, 2 warps, two passes": Blocking(32, same(2, 2))}


@contextmanager
def attention_blocking(config: Blocking) -> Iterator[None]:
    """The attention kernels in half precision use `config` (an `attention_configs()` value) in the body."""
    from electra_ds.kernels import fused_attention

    default = fused_attention.CONFIGS["half"]
    fused_attention.CONFIGS["half"] = config
    try:
        yield
    finally:
        fused_attention.CONFIGS["half"] = default


def row_configs() -> dict[str, tuple[str, launch.Blocking]]:
    """Candidate blockings of the backward kernels that sum columns: label -> ("layer_norm" or "gelu", the blocking
    for `launch.LAYER_NORM_BACKWARD` or `launch.GELU_BACKWARD`). The H200 run at 9d46b65 had our LayerNorm backward
    at 26 us per call on average in the step (inductor's pair about 38 us for the discriminator's), so the candidates
    trade a program's run of tiles (latency hidden by more programs) against more partial rows, and pipeline that run
    (stages: the next tiles' loads in flight while one is computed; the default's sm_90 build holds 2 programs of 8
    warps per multiprocessor, 108 registers a thread with Triton 3.6: too few loads in flight to cover the memory's
    latency)."""
    blocking = launch.Blocking
    layer_norm = {"2048 values, 4 programs per SM (default)": launch.LAYER_NORM_BACKWARD,
                  "2048 values, 8 programs per SM": blocking(programs_per_sm=8),
                  "2048 values, one tile per program": blocking(programs_per_sm=0),
                  "2048 values, 4 warps, 8 programs per SM": blocking(warps=4, programs_per_sm=8),
                  "1024 values, 8 programs per SM": blocking(tile=1024, programs_per_sm=8),
                  "1024 values, one tile per program": blocking(tile=1024, programs_per_sm=0),
                  "4096 values, 4 programs per SM": blocking(tile=4096),
                  "2048 values, 4 programs per SM, 2 stages": blocking(stages=2),
                  "2048 values, 4 programs per SM, 3 stages": blocking(stages=3),
                  "2048 values, 2 programs per SM, 3 stages": blocking(programs_per_sm=2, stages=3),
                  "1024 values, 4 warps, 8 programs per SM, 3 stages": blocking(tile=1024, warps=4, programs_per_sm=8,
                                                                              stages=3)}
    gelu = {"32 x 128, 4 warps, 4 programs per SM (default)": launch.GELU_BACKWARD,
            "32 x 128, 8 warps": blocking(tile=4096, warps=8, columns=128),
            "16 x 128, 8 warps": blocking(tile=2048, warps=8, columns=128),
            "32 x 64, 8 warps": blocking(tile=2048, warps=8, columns=64),
            "16 x 64, 4 warps, 8 programs per SM": blocking(tile=1024, warps=4, columns=64, programs_per_sm=8),
            "32 x 32, 4 warps": blocking(tile=1024, warps=4, columns=32),
            "32 x 128, 4 warps, 2 stages": blocking(tile=4096, warps=4, columns=128, stages=2),
            "16 x 128, 8 warps, 3 stages": blocking(tile=2048, warps=8, columns=128, stages=3)}
    return {**{f"LayerNorm {k}": ("layer_norm", v) for k, v in layer_norm.items()},
            **{f"GELU {k}": ("gelu", v) for k, v in gelu.items()}}


@contextmanager
def row_blocking(op: str, config: launch.Blocking) -> Iterator[None]:
    """The backward kernel of `op` ("layer_norm" or "gelu") uses `config` in the body."""
    name = {"layer_norm": "LAYER_NORM_BACKWARD", "gelu": "GELU_BACKWARD"}[op]
    default = getattr(launch, name)
    setattr(launch, name, config)
    try:
        yield
    finally:
        setattr(launch, name, default)


def row_cases(dev: str = "cuda", tokens: int = 16384,
              compile_op: bool = False) -> dict[str, dict[str, Callable[[], object]]]:
    """op -> tower -> the fwd+bwd callable of our op at that tower's ELECTRA-Small width: the encoder LayerNorm with
    the dense layer's bias, dropout and the residual; the FFN's bias + GELU. With `compile_op`, each under
    torch.compile in the compiled form set (kernels.set_compiled_layer_norm, set_compiled_gelu), compiled here."""
    wrap = (lambda fn: torch.compile(fn, dynamic=False)) if compile_op else (lambda fn: fn)  # towers: 2 shapes
    seed = torch.tensor(0, device=dev)  # a seed drawn per call would be a host-side generator call in a compiled graph
    cases: dict[str, dict[str, Callable[[], object]]] = {"layer_norm": {}, "gelu": {}}
    for tower, hidden in (("discriminator", 256), ("generator", 64)):
        x, r, w, b = layer_norm_inputs(dev, tokens, hidden)
        cases["layer_norm"][tower] = _fwd_bwd(wrap(lambda *a: add_layer_norm(*a[:4], 1e-12, 0.1, seed, a[4])),
                                              x, r, w, b, b)
        cases["gelu"][tower] = _fwd_bwd(wrap(bias_gelu), *gelu_inputs(dev, tokens, 4 * hidden))
    return cases


def time_row_configs() -> Iterator[tuple[str, dict[str, float] | str]]:
    """(blocking, tower -> ms per forward + backward call of its op inside a CUDA graph, or why the blocking has no
    figures), one blocking at a time; then, to compare against, each op as the model compiles it by default (the
    twin traced into inductor's kernels)."""
    cases = row_cases()
    for label, (op, config) in row_configs().items():
        try:
            with row_blocking(op, config):
                yield label, {tower: _ms(_graphed(fn)) for tower, fn in cases[op].items()}
        except Exception as err:  # noqa: BLE001 - reported; the other blockings still run
            yield label, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
    compiled = row_cases(compile_op=True)  # each op compiles at its first call
    for op, name in (("layer_norm", "LayerNorm"), ("gelu", "GELU")):
        label = f"{name} traced by torch.compile (the model's default)"
        try:
            yield label, {tower: _ms(_graphed(fn)) for tower, fn in compiled[op].items()}
        except Exception as err:  # noqa: BLE001 - reported
            yield label, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"


def time_attention_configs() -> Iterator[tuple[str, dict[str, float] | str]]:
    """(blocking, case -> ms per forward + backward call of our attention inside a CUDA graph (no mask), or why the
    blocking has no figures), one blocking at a time."""
    ours = {name: fn for name, (_, fn) in attention_cases().items() if name.endswith("no mask")}
    for label, config in attention_configs().items():
        try:
            with attention_blocking(config):
                yield label, {name: _ms(_graphed(fn)) for name, fn in ours.items()}
        except Exception as err:  # noqa: BLE001 - reported; the other blockings still run
            yield label, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="also write the timings here")
    configs = parser.add_mutually_exclusive_group()
    configs.add_argument("--attention_configs", action="store_true",
                         help="only time our attention under each candidate blocking (attention_configs)")
    configs.add_argument("--row_configs", action="store_true",
                         help="only time the LayerNorm and GELU ops under each candidate blocking of their backward "
                              "kernels (row_configs)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernel_speed.py times CUDA kernels: no CUDA device here")
    if args.attention_configs:
        report_configs("our attention forward + backward of one layer, bf16, dropout 0.1, no mask",
                       time_attention_configs(), "attention_configs_ms", args.json)
        return
    if args.row_configs:
        report_configs("bias + dropout + residual add + LayerNorm (with H: 256 / 64) and bias + GELU (4 H), forward "
                       "+ backward, bf16, 16384 rows", time_row_configs(), "row_configs_ms", args.json)
        return
    results = {}
    for name, (ours, native) in cases().items():
        row = results[name] = {}
        for label, backend, fn in (("triton", "triton", ours), ("twin", "torch", ours), ("torch", "auto", native)):
            set_backend(backend)
            row[label] = {"eager": _ms(fn), "graph": _ms(_graphed(fn))}
    set_backend("auto")
    print(f"{torch.cuda.get_device_name()}: ms per call, eager / CUDA graph")
    for name, row in results.items():
        print(f"{name:32s} " + "  ".join(f"{k} {v['eager']:.3f} / {v['graph']:.3f}" for k, v in row.items()))
    report = {"device": torch.cuda.get_device_name(), "ms": results}
    if args.json:  # kept even if the attention section below does not finish
        atomic_write(args.json, json.dumps(report, indent=1))
    attention = time_attention()
    print("Attention forward + backward of one layer from its QKV product, bf16, dropout 0.1, ms per call in a CUDA "
          "graph (x 12 layers per tower), per SDPA backend and ours (electra_ds):")
    for name, row in attention.items():
        print(f"{name:40s} " + "  ".join(f"{b.split('_')[0].lower()} " + (f"{v:.3f}" if isinstance(v, float) else "n/a")
                                         for b, v in row.items()))
    if args.json:
        atomic_write(args.json, json.dumps({**report, "attention_ms": attention}, indent=1))
    compiled = time_compiled()
    print("Our LayerNorm and GELU ops under torch.compile, forward + backward, ms per call, eager / CUDA graph:")
    for name, row in compiled.items():
        print(f"{name:40s} " + "  ".join(f"{mode} " + (f"{v['eager']:.3f} / {v['graph']:.3f}" if isinstance(v, dict)
                                                       else v) for mode, v in row.items()))
    if args.json:
        atomic_write(args.json, json.dumps({**report, "attention_ms": attention, "compiled_ms": compiled}, indent=1))


def report_configs(what: str, rows: Iterator[tuple[str, dict[str, float] | str]], key: str,
                   json_path: str | None) -> None:
    """Print each blocking's row of timings as it comes, and rewrite the JSON (under `key`) after each: a run cut
    short keeps the finished ones."""
    print(f"{torch.cuda.get_device_name()}: {what}, ms per call in a CUDA graph, per blocking:", flush=True)
    timings = {}
    for label, row in rows:
        timings[label] = row
        print(f"{label:48s} " + (row if isinstance(row, str) else
                                 "  ".join(f"{name} {ms:.3f}" for name, ms in row.items())), flush=True)
        if json_path:
            atomic_write(json_path, json.dumps({"device": torch.cuda.get_device_name(), key: timings}, indent=1))


def time_compiled() -> dict[str, dict[str, dict[str, float] | str]]:
    """case -> "traced" or "opaque" (kernels.set_compiled_layer_norm and set_compiled_gelu) -> ms per call, eagerly
    and in a CUDA graph, of `compiled_cases` (or why there is no figure): whether inductor's code for the twin or our
    kernels as an opaque op is faster for the encoder layers' LayerNorms and GELUs. Last in the run: a failed capture
    may leave the context unusable."""
    results: dict[str, dict[str, dict[str, float] | str]] = {}
    for mode in ("traced", "opaque"):
        set_compiled_layer_norm(mode)
        set_compiled_gelu(mode)
        torch._dynamo.reset()
        for name, fn in compiled_cases().items():
            try:
                results.setdefault(name, {})[mode] = {"eager": _ms(fn), "graph": _ms(_graphed(fn))}
            except Exception as err:  # noqa: BLE001 - reported in the table
                results[name][mode] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    set_compiled_layer_norm("traced")
    set_compiled_gelu("traced")
    return results


if __name__ == "__main__":
    main()
