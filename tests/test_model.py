"""The reference (plain PyTorch) model: configuration, HF parity, tying, masking, labels, bad input."""
import json
import math
import warnings

import pytest
import torch

from electra_ds import kernels
from electra_ds.config import ElectraConfig, max_predictions, preset
from electra_ds.convert import main as convert_main
from electra_ds.kernels import reference
from electra_ds.model import ElectraClassifier, ElectraForPretraining, export_hf_pair, load_hf_pair, \
    load_pretrained, save_model
from electra_ds.model.electra import EMB
from model_helpers import CLS, MASK, PAD, SEP, SPECIAL, flat_grads, forward_backward, kernel_backend, make_batch, \
    mask_plan, no_dropout, perturbed, softmax_counts


# -- configuration ---------------------------------------------------------------------------------------------
def test_presets_and_generator_rounding():
    small = preset("small")
    assert (small.hidden_size, small.num_hidden_layers, small.num_attention_heads, small.intermediate_size,
            small.embedding_size, small.vocab_size) == (256, 12, 4, 1024, 128, 30522)
    g = small.generator
    assert (g.hidden_size, g.num_attention_heads, g.intermediate_size, g.num_hidden_layers) == (64, 1, 256, 12)
    assert preset("base").generator.hidden_size == 256 and preset("large").generator.num_hidden_layers == 24
    assert preset("small", generator_layer_size=0.5).generator.num_hidden_layers == 6
    assert max_predictions(128, 0.15) == 19
    assert preset("small", hidden_size=512, num_attention_heads=8).hidden_size == 512


def test_generator_shape_rounds_to_nearest_and_slots_add_half_a_percent():
    """google-research/electra rounds the scaled width and depth (256 x 0.3 = 76.8 -> 77, 12 x 0.3 = 3.6 -> 4), and
    sizes the masked slots as int((p + 0.005) x length)."""
    g = ElectraConfig(hidden_size=256, generator_size=0.3, generator_layer_size=0.3).generator
    assert (g.hidden_size, g.num_hidden_layers, g.intermediate_size) == (77, 4, 308)
    assert max_predictions(512, 0.15) == 79 and max_predictions(512, 0.25) == 130


def test_objective_weights_are_the_recipe_ones():
    """ELECTRA's loss is mlm + 50 x disc (google-research/electra disc_weight=50)."""
    assert ElectraConfig().mlm_weight == 1.0 and ElectraConfig().disc_weight == 50.0
    assert preset("tiny").disc_weight == 50.0 and preset("large").mlm_weight == 1.0
    torch.manual_seed(0)
    model = ElectraForPretraining(no_dropout("tiny", vocab_size=100)).eval()
    ids, mask = make_batch(100, batch=4, length=16, pad_from={1: 9})
    plan = mask_plan(ids, mask, vocab_size=100, max_predictions=3, seed=1)
    out = model(ids, mask, None, plan, torch.tensor(5))
    torch.testing.assert_close(out.loss, out.mlm_loss + 50.0 * out.disc_loss)


def test_padding_row_starts_at_zero_and_a_null_pad_id_zeroes_nothing():
    def embeddings(pad_token_id):
        torch.manual_seed(0)
        return ElectraForPretraining(preset("tiny", pad_token_id=pad_token_id)).views()[f"{EMB}.word_embeddings.weight"]

    assert not embeddings(1)[1].any() and embeddings(1)[0].any()
    assert embeddings(None).abs().sum(dim=1).gt(0).all()  # HF configs may say "pad_token_id": null


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="huge"), "unknown model preset"),
    (dict(name="small", hiden_size=3), "unknown ElectraConfig field"),
    (dict(name="small", generator_size=1.5), "wider than the discriminator"),
    (dict(name="small", generator_hidden_size=512), "wider than the discriminator"),
    (dict(name="small", num_attention_heads=3), "not divisible"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        preset(**kwargs)


# -- parity with Hugging Face ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "small"])
@pytest.mark.parametrize("padded", [False, True])
def test_logits_match_transformers(tmp_path, name, padded):
    from transformers import ElectraForMaskedLM, ElectraForPreTraining

    config = no_dropout(name)
    ours = perturbed(config, 0.05)  # non-trivial LayerNorm and bias values so a mix-up of weights shows
    export_hf_pair(ours, tmp_path)
    disc = ElectraForPreTraining.from_pretrained(tmp_path / "discriminator").eval()
    gen = ElectraForMaskedLM.from_pretrained(tmp_path / "generator").eval()
    ids, mask = make_batch(config.vocab_size, pad_from={1: 15} if padded else None)
    positions = torch.tensor([[1, 5, 7], [2, 3, 13], [20, 21, 22]])
    with torch.no_grad():
        ours_disc = ours.discriminator_logits(ids, mask)
        hf_disc = disc(ids, attention_mask=mask).logits
        ours_gen = ours.generator_logits(ids, mask, positions=positions)
        hf_gen = gen(ids, attention_mask=mask).logits
    hf_gen = hf_gen.gather(1, positions[..., None].expand(-1, -1, hf_gen.shape[-1]))
    real = mask.bool()
    torch.testing.assert_close(ours_disc[real], hf_disc[real], rtol=1e-5, atol=1e-5 * hf_disc.abs().max().item())
    torch.testing.assert_close(ours_gen, hf_gen, rtol=1e-5, atol=1e-5 * hf_gen.abs().max().item())


# -- tying -------------------------------------------------------------------------------------------------
def shares_storage(model: ElectraForPretraining) -> bool:
    """Each tied weight exists once: the generator's tied names have no slot of their own in the flat buffers (they
    resolve to the discriminator's views), the model's parameters are exactly its flat buffers, and changing the
    discriminator's embedding of a word that no input holds changes the generator's output (only its output layer
    reads that row)."""
    structural = not set(model.tied) & set(model.slots) and list(model.parameters()) == list(model.flat.values())
    ids, mask = make_batch(model.config.vocab_size)
    unused = next(i for i in range(model.config.vocab_size - 1, 0, -1) if not (ids == i).any())
    was_training = model.training
    model.eval()
    with torch.no_grad():
        before, embeddings = model.generator_logits(ids, mask), model.views()[f"{EMB}.word_embeddings.weight"]
        kept = embeddings[unused].clone()
        embeddings[unused] += 0.5
        changed = not torch.equal(model.generator_logits(ids, mask)[..., unused], before[..., unused])
        embeddings[unused] = kept
    model.train(was_training)
    return structural and changed


def test_tying_is_structural_and_survives_moves_and_reloads(tmp_path):
    config = preset("tiny", vocab_size=300)
    model = ElectraForPretraining(config)
    assert shares_storage(model)
    assert len(list(model.parameters())) == 2  # the engine sees two tensors, not hundreds
    model = model.to(torch.float64)
    assert shares_storage(model)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    fresh = ElectraForPretraining(config).to(torch.float64)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt"))
    assert shares_storage(fresh)
    # Both towers' embedding gradients land in one place.
    model = ElectraForPretraining(config)
    ids, mask = make_batch(300)
    model.generator_logits(ids, mask).sum().backward()
    grad_from_gen = model.flat["decay"].grad.clone()
    model.zero_grad()
    model.discriminator_logits(ids, mask).sum().backward()
    def word_grad(g):
        return model.views(flats={"decay": g})[f"{EMB}.word_embeddings.weight"]
    assert word_grad(grad_from_gen).abs().sum() > 0 and word_grad(model.flat["decay"].grad).abs().sum() > 0


def test_qkv_block_is_a_view_of_the_three_weights():
    model = ElectraForPretraining(preset("tiny", vocab_size=100))
    w = model.views(for_forward=True)
    layer = "discriminator.electra.encoder.layer.1.attention.self"
    block = w[f"{layer}.qkv.weight"]
    assert block.shape == (3 * 64, 64) and f"{layer}.qkv.weight" not in model.views()
    for i, name in enumerate(("query", "key", "value")):
        assert torch.equal(block[i * 64:(i + 1) * 64], w[f"{layer}.{name}.weight"])
        assert w[f"{layer}.{name}.weight"].data_ptr() == block[i * 64].data_ptr()
    assert torch.equal(w[f"{layer}.qkv.bias"], torch.cat([w[f"{layer}.{n}.bias"] for n in ("query", "key", "value")]))


def test_block_weights_must_be_back_to_back():
    from electra_ds.model.params import FlatModule, WeightSpec

    specs = [WeightSpec("a.q", (4, 2), "normal", "a.qkv"), WeightSpec("a.x", (4, 2), "normal"),
             WeightSpec("a.k", (4, 2), "normal", "a.qkv")]
    with pytest.raises(ValueError, match="back to back"):
        FlatModule().init_flat(specs)
    with pytest.raises(ValueError, match="trailing shape"):
        FlatModule().init_flat([WeightSpec("a.q", (4, 2), "normal", "a.qkv"), WeightSpec("a.k", (4, 3), "normal", "a.qkv")])
    with pytest.raises(ValueError, match="differs from its block in `matmul`"):  # one dtype per block under autocast
        FlatModule().init_flat([WeightSpec("a.q", (4, 2), "normal", "a.qkv", matmul=True),
                                WeightSpec("a.k", (4, 2), "normal", "a.qkv")])


def test_flat_layout_puts_matmul_operands_after_the_rest():
    from electra_ds.model.params import ALIGN, FlatModule, WeightSpec

    specs = [WeightSpec("a.weight", (5, 3), "normal", matmul=True), WeightSpec("a.bias", (5,), "zeros", matmul=True),
             WeightSpec("ln.weight", (7,), "ones"), WeightSpec("emb", (4, 3), "normal", matmul_alias="out"),
             WeightSpec("b.q", (2, 3), "normal", "b.qk", matmul=True), WeightSpec("b.k", (2, 3), "normal", "b.qk",
                                                                                 matmul=True)]
    module = FlatModule()
    module.init_flat(specs, group_fn=lambda name: "all")
    layout = module.layout()
    assert [name for _, name, _, _ in layout] == ["ln.weight", "emb", "a.weight", "a.bias", "b.q", "b.k"]
    assert [offset for *_, offset, _ in layout] == [0, ALIGN, 2 * ALIGN, 3 * ALIGN, 4 * ALIGN, 4 * ALIGN + 6]
    flat = module.flat["all"]
    assert flat.numel() == 4 * ALIGN + 12
    views = module.views()
    for _, name, offset, shape in layout:
        assert views[name].shape == shape and views[name].data_ptr() == flat.data_ptr() + 4 * offset, name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = module.forward_views()
    assert w["a.weight"].dtype == w["b.qk"].dtype == w["out"].dtype == torch.bfloat16
    assert w["ln.weight"].dtype == w["emb"].dtype == torch.float32 and torch.equal(w["out"], w["emb"].bfloat16())
    (w["a.weight"].float().sum() + w["b.q"].float().sum() + 2 * w["ln.weight"].sum() + w["out"].float().sum()).backward()
    grad = module.views(flats={"all": flat.grad})
    assert (grad["a.weight"] == 1).all() and (grad["b.q"] == 1).all() and (grad["b.k"] == 0).all()
    assert (grad["ln.weight"] == 2).all() and (grad["emb"] == 1).all() and (grad["a.bias"] == 0).all()
    other = FlatModule()
    other.init_flat(specs[1:] + specs[:1], group_fn=lambda name: "all")
    assert other.layout_fingerprint() != module.layout_fingerprint()


def _compiled_step_graphs(model: ElectraForPretraining, vocab: int) -> tuple[torch.fx.GraphModule,
                                                                             torch.fx.GraphModule]:
    """The forward and backward graphs that torch.compile hands to inductor for one pretraining step of `model`
    under bf16 autocast (AOT autograd with inductor's decompositions and min-cut partition), run uncompiled."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._inductor.decomposition import select_decomp_table

    graphs = []

    def keep_graphs(gm, example_inputs):
        def compiler(graph, _inputs):
            graphs.append(graph)
            return make_boxed_func(graph.forward)

        return aot_module_simplified(gm, example_inputs, fw_compiler=compiler, bw_compiler=compiler,
                                     decompositions=select_decomp_table(),
                                     partition_fn=min_cut_rematerialization_partition)

    torch._dynamo.reset()
    ids, mask = make_batch(vocab, batch=2, length=16)
    plan = mask_plan(ids, None, vocab_size=vocab, max_predictions=3, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.compile(model, backend=keep_graphs)(ids, None, None, plan, torch.tensor(1))
    out.loss.backward()
    torch._dynamo.reset()
    forward, backward = graphs
    return forward, backward


def test_compiled_backward_assembles_the_flat_gradients_without_zero_filled_pieces():
    """Every split output of a forward under autocast is used, so the backward's concatenation into each flat
    gradient has no zero-filled input per unused weight (hundreds of small fill kernels in a compiled GPU step)."""
    model = ElectraForPretraining(preset("tiny", vocab_size=100)).train()
    _, graph = _compiled_step_graphs(model, 100)
    cats = [n for n in graph.graph.nodes if n.target is torch.ops.aten.cat.default]
    pieces = [piece for cat in cats for piece in cat.args[0]]
    assert len(pieces) >= len(model.layout())  # every weight's gradient goes through a concatenation
    zero_filled = [piece for piece in pieces if piece.target is torch.ops.aten.full.default]
    layout = model.layout()
    paddings = 0  # the alignment gaps between weights (and at a buffer's end), whose gradient is zero
    for group, flat in model.flat.items():
        spans = [(offset, math.prod(shape)) for g, _, offset, shape in layout if g == group]
        paddings += sum(b[0] > a[0] + a[1] for a, b in zip(spans, spans[1:])) + (sum(spans[-1]) < flat.numel())
    assert len(zero_filled) <= paddings < len(layout) / 2, (len(zero_filled), paddings)


def test_compiled_step_keeps_only_half_precision_activations_for_the_backward():
    """Under torch.compile the GELUs' and LayerNorms' backward recompute their fp32 values (and dropout masks) from
    half-precision inputs (kernels._recomputed_in_backward): every per-token activation that the forward hands the
    backward, at a tower's hidden or intermediate width, is bf16, none fp32 or a mask. Left alone, the partitioner
    stores each GELU's fp32 derivative and each LayerNorm's fp32 normalised input (and mask) instead."""
    config = preset("tiny", vocab_size=100, intermediate_size=320, generator_hidden_size=48,
                    generator_intermediate_size=96)
    widths = {config.hidden_size, config.generator.hidden_size, config.discriminator.intermediate_size,
              config.generator.intermediate_size}
    assert len(widths) == 4 and config.embedding_size not in widths  # the embeddings' own output is fp32
    forward, _ = _compiled_step_graphs(ElectraForPretraining(config).train(), 100)
    (outputs,) = [n.args[0] for n in forward.graph.nodes if n.op == "output"]
    kept = [n.meta.get("val") for n in outputs if isinstance(n, torch.fx.Node)]
    tokens = 2 * 16  # _compiled_step_graphs' batch: activations have a value per token and column (weights not)
    activations = [t.dtype for t in kept if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] in widths
                   and t.numel() == tokens * t.shape[-1]]
    assert len(activations) > 10 and set(activations) == {torch.bfloat16}, activations


def test_export_import_round_trip_and_cli(tmp_path):
    from transformers import ElectraForMaskedLM

    torch.manual_seed(1)
    model = ElectraForPretraining(preset("tiny", vocab_size=300))
    export_hf_pair(model, tmp_path / "hf")
    gen = ElectraForMaskedLM.from_pretrained(tmp_path / "hf" / "generator")
    assert gen.generator_lm_head.weight.data_ptr() == gen.electra.embeddings.word_embeddings.weight.data_ptr()
    back = load_hf_pair(tmp_path / "hf" / "discriminator", tmp_path / "hf" / "generator")
    assert shares_storage(back)
    for a, b in zip(model.parameters(), back.parameters()):
        assert torch.equal(a, b)
    assert convert_main(["from-hf", str(tmp_path / "hf" / "discriminator"), str(tmp_path / "hf" / "generator"),
                         str(tmp_path / "ours")]) == 0
    assert convert_main(["to-hf", str(tmp_path / "ours"), str(tmp_path / "hf2")]) == 0
    again = load_pretrained(tmp_path / "hf2")
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_hf_google_style_generator_shape_loads(tmp_path):
    """Released generators need not follow the rounding rule (explicit generator_* fields)."""
    config = preset("tiny", vocab_size=300, generator_hidden_size=64, generator_num_attention_heads=2,
                    generator_intermediate_size=96)
    model = ElectraForPretraining(config)
    export_hf_pair(model, tmp_path)
    back = load_hf_pair(tmp_path / "discriminator", tmp_path / "generator")
    assert back.config.generator == config.generator


def test_hf_pair_with_untied_generator_embeddings_warns(tmp_path):
    """Our model holds the embeddings once: a generator whose copies differ from the discriminator's must not load
    silently as the discriminator's. A generator stored in another dtype (a rounding of the same values) loads."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = ElectraForPretraining(preset("tiny", vocab_size=300))
    export_hf_pair(model, tmp_path)
    gen_file = tmp_path / "generator" / "model.safetensors"
    state = load_file(str(gen_file))
    ln = "electra.embeddings.LayerNorm.bias"
    assert ln in state and "electra.embeddings.word_embeddings.weight" in state
    rounded = {k: v.bfloat16() if k.startswith("electra.embeddings.") else v for k, v in state.items()}
    save_file(rounded, str(gen_file), metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rounding of the same values is no difference
        back = load_hf_pair(tmp_path / "discriminator", tmp_path / "generator")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), back.parameters()))
    changed = dict(state)
    changed[ln] = state[ln] + 0.01
    save_file(changed, str(gen_file), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=f"generator's {ln} differ.*discriminator's are used"):
        back = load_hf_pair(tmp_path / "discriminator", tmp_path / "generator")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), back.parameters()))


def test_bad_hf_directories(tmp_path):
    model = ElectraForPretraining(preset("tiny", vocab_size=300))
    export_hf_pair(model, tmp_path / "a")
    with pytest.raises(ValueError, match="swap"):
        load_hf_pair(tmp_path / "a" / "generator", tmp_path / "a" / "discriminator")
    export_hf_pair(ElectraForPretraining(preset("tiny", vocab_size=400)), tmp_path / "b")
    with pytest.raises(ValueError, match="vocab_size"):
        load_hf_pair(tmp_path / "a" / "discriminator", tmp_path / "b" / "generator")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type"):
        load_hf_pair(tmp_path / "bert", tmp_path / "a" / "generator")
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "nothing")
    assert convert_main(["to-hf", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2


def test_token_id_outside_vocab_is_a_clear_error():
    model = ElectraForPretraining(preset("tiny", vocab_size=100))
    ids, mask = make_batch(100)
    ids[0, 3] = 100
    with pytest.raises(ValueError, match="outside the model's vocabulary of 100"):
        model.discriminator_logits(ids, mask)
    # in training, also where masking replaces the bad id before either tower sees it
    ids, mask = make_batch(100)
    plan = mask_plan(ids, mask, vocab_size=100, max_predictions=3, mask_replace_prob=1.0, seed=0)
    ids[0, plan.masked_positions[0, 0]] = 100
    with pytest.raises(ValueError, match="outside the model's vocabulary of 100"):
        model(ids, mask, None, plan, torch.tensor(0))



def _compiled_lookup(recorded: list | None = None):
    """kernels.token_type_embedding under torch.compile, run by aot_eager (the traced graph and its backward in eager
    ops; traced at the first call, under the kernels' backend then set: "triton" makes GPU code's choices);
    `recorded` gets each graph's call targets."""
    def record(gm, example_inputs):
        if recorded is not None:
            recorded.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(kernels.token_type_embedding, backend=record, fullgraph=True)


@pytest.mark.parametrize("types", [2, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_type_lookup_is_the_embedding(types, dtype):
    """kernels.token_type_embedding as torch.compile traces it for GPU code gives F.embedding's values exactly and its
    gradient (per type a sum over its tokens) within the dtype's rounding of the exact fp32 one, for ELECTRA's 2 types
    (chosen by `where`) and past that form's limit (F.embedding)."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(types, 16, generator=g).to(dtype).requires_grad_()
    ids = torch.randint(0, types, (4, 24), generator=g)
    lookup = _compiled_lookup()
    with kernel_backend("triton"):
        out = lookup(ids, table)
    expected = torch.nn.functional.embedding(ids, table)
    assert out.dtype == expected.dtype and torch.equal(out, expected)
    dy = torch.randn(4, 24, 16, generator=g).to(dtype)
    exact = torch.zeros(types, 16).index_add_(0, ids.flatten(), dy.flatten(0, 1).float())
    torch.testing.assert_close(torch.autograd.grad(out, table, dy)[0].float(), exact, rtol=0.016,
                               atol=0.05 if dtype == torch.bfloat16 else 1e-5)


def test_token_types_take_no_embedding_in_gpu_code():
    """Traced for GPU code the token-type lookup has no embedding, whose backward would add all of a batch's tokens
    into one or two rows with atomics; traced for CPU code it is F.embedding."""
    ids, table = torch.zeros(2, 8, dtype=torch.long), torch.randn(2, 4)
    for backend, embeds in (("triton", False), ("torch", True)):
        recorded = []
        lookup = _compiled_lookup(recorded)
        with kernel_backend(backend):
            lookup(ids, table)
        assert (torch.nn.functional.embedding in recorded) is embeds, (backend, recorded)


# -- masking ---------------------------------------------------------------------------------------------------
def test_masking_respects_specials_cap_and_split():
    vocab, length = 1000, 128
    ids, mask = make_batch(vocab, batch=512, length=length, pad_from={i: 40 + i % 80 for i in range(0, 512, 2)})
    slots = max_predictions(length, 0.15)
    plan = mask_plan(ids, mask, vocab_size=vocab, max_predictions=slots, seed=0)
    real = plan.masked_weights > 0
    chosen = plan.masked_ids[real]
    assert not torch.isin(chosen, torch.tensor(SPECIAL)).any()
    assert mask.gather(1, plan.masked_positions)[real].all()
    n_maskable = (mask.bool() & ~torch.isin(ids, torch.tensor(SPECIAL))).sum(1)
    expected = (mask.sum(1) * 0.15).round().clamp(1, slots)  # of all real tokens (the original)
    assert torch.equal(real.sum(1), torch.minimum(expected.long(), n_maskable))
    assert real.sum(1).max() <= slots
    # positions within a row are distinct
    assert all(len(set(row.tolist())) == slots for row in plan.masked_positions)
    new = plan.generator_input_ids.gather(1, plan.masked_positions)[real]
    frac_mask = (new == MASK).float().mean().item()
    frac_same = (new == chosen).float().mean().item()
    assert abs(frac_mask - 0.85) < 0.02 and abs(frac_same - 0.15) < 0.02
    untouched = torch.ones_like(ids, dtype=torch.bool).scatter(1, plan.masked_positions, ~real)
    assert torch.equal(plan.generator_input_ids[untouched], ids[untouched])


def test_masking_random_share_and_short_rows():
    ids, mask = make_batch(50, batch=256, length=16)
    plan = mask_plan(ids, mask, vocab_size=50, max_predictions=3,
                     mask_replace_prob=0.5, random_replace_prob=0.3, seed=1)
    real = plan.masked_weights > 0
    new = plan.generator_input_ids.gather(1, plan.masked_positions)[real]
    assert abs((new == MASK).float().mean().item() - 0.5) < 0.05
    short = torch.tensor([[CLS, SEP, PAD, PAD]])
    plan = mask_plan(short, (short != PAD).long(), vocab_size=50, max_predictions=2)
    assert plan.masked_weights.sum() == 0 and torch.equal(plan.generator_input_ids, short)


# -- the pretraining forward ---------------------------------------------------------------------------------
def test_labels_mark_only_changed_tokens_and_losses_are_finite():
    torch.manual_seed(0)
    vocab = 8  # few real tokens, so generator samples often equal the original
    model = ElectraForPretraining(preset("tiny", vocab_size=vocab))
    ids, mask = make_batch(vocab, batch=16, length=32, pad_from={0: 20, 5: 9})
    plan = mask_plan(ids, mask, vocab_size=vocab, max_predictions=6, seed=0)
    out = model(ids, mask, None, plan, torch.tensor(7))
    assert torch.equal(out.labels, out.disc_input != ids)
    in_slots = torch.zeros_like(ids, dtype=torch.bool).scatter(1, plan.masked_positions, plan.masked_weights > 0)
    assert not out.labels[~in_slots].any()
    kept = in_slots & ~out.labels
    assert kept.any() and out.labels.any()  # some samples equal the original and count as real
    stats = dict(zip(("gen_correct", "gen_count", "rc", "replaced", "oc", "original", "tokens"), out.stats.tolist()))
    assert stats["gen_count"] == plan.masked_weights.sum().item()
    assert stats["replaced"] == out.labels.sum().item()
    assert stats["replaced"] + stats["original"] == stats["tokens"] == mask.sum().item()
    assert math.isfinite(out.loss.item())
    expected = model.config.mlm_weight * out.mlm_loss + model.config.disc_weight * out.disc_loss
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_mlm_loss_is_the_mean_over_real_masked_slots():
    """Rows with fewer masked tokens than slots: the padding slots (weight 0) count neither in the sum nor in the
    count. Recomputed from the generator's logits at the plan's positions."""
    vocab = 80
    model = perturbed(no_dropout("tiny", vocab_size=vocab))
    ids, mask = make_batch(vocab, batch=4, length=24, pad_from={1: 8, 2: 14})
    plan = mask_plan(ids, mask, vocab_size=vocab, max_predictions=6, seed=3)
    real = plan.masked_weights > 0
    assert (~real).sum(1).min() > 0 and real.sum() > 4  # every row has unused slots
    out = model(ids, mask, None, plan, torch.tensor(1))
    with torch.no_grad():
        logits = model.generator_logits(plan.generator_input_ids, mask, positions=plan.masked_positions)
    per_slot = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), plan.masked_ids.reshape(-1),
                                                 reduction="none").view(real.shape)
    torch.testing.assert_close(out.mlm_loss, per_slot[real].mean())
    assert abs(per_slot.mean() - per_slot[real].mean()) > 1e-3  # the test can tell the two apart


def test_generator_accuracy_counts_argmax_hits_in_real_slots():
    """stats[0] counts the real slots whose original id is the generator's argmax (not its Gumbel sample). Half the
    targets are set to the argmax, so a count of samples, of padding slots or of nothing would differ."""
    vocab = 80
    model = perturbed(no_dropout("tiny", vocab_size=vocab, temperature=2.0))
    ids, mask = make_batch(vocab, batch=6, length=24, pad_from={1: 8, 2: 14})
    plan = mask_plan(ids, mask, vocab_size=vocab, max_predictions=6, seed=3)
    with torch.no_grad():
        predicted = model.generator_logits(plan.generator_input_ids, mask, positions=plan.masked_positions).argmax(-1)
    half = torch.rand(predicted.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    plan = plan._replace(masked_ids=torch.where(half, predicted, plan.masked_ids))
    out = model(ids, mask, None, plan, torch.tensor(1))
    real = plan.masked_weights > 0
    hits = (predicted == plan.masked_ids) & real
    assert int(out.stats[0]) == int(hits.sum()) >= int((half & real).sum()) > 3
    assert (out.disc_input.gather(1, plan.masked_positions) != predicted)[real].any()  # samples are not the argmax


def test_disc_loss_is_the_mean_bce_over_real_tokens():
    """Padding neither adds to the discriminator's loss nor to its count: ids at padding positions change nothing."""
    vocab = 80
    model = perturbed(no_dropout("tiny", vocab_size=vocab))
    ids, mask = make_batch(vocab, batch=4, length=24, pad_from={1: 8, 2: 14})
    plan = mask_plan(ids, mask, vocab_size=vocab, max_predictions=6, seed=3)
    out = model(ids, mask, None, plan, torch.tensor(1))
    real = mask.bool()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out.disc_logits[real], out.labels[real].float())
    torch.testing.assert_close(out.disc_loss, expected)
    other = ids.masked_fill(~real, 77)  # other ids where the attention mask is 0
    again = model(other, mask, None, plan, torch.tensor(1))
    torch.testing.assert_close(again.disc_loss, out.disc_loss)


def test_mlm_loss_reaches_the_tied_embedding_rows_through_the_output_layer():
    """The generator's output layer is the word embedding matrix itself: the MLM loss's gradient reaches the rows of
    ids that no input holds (only the output softmax reads them)."""
    vocab = 100
    torch.manual_seed(0)
    model = ElectraForPretraining(no_dropout("tiny", vocab_size=vocab))
    ids, mask = make_batch(50, batch=3, length=16)  # ids below 50
    plan = mask_plan(ids, mask, vocab_size=vocab, max_predictions=3, seed=0)
    assert not (plan.generator_input_ids >= 50).any()
    model(ids, mask, None, plan, torch.tensor(0)).mlm_loss.backward()
    word = model.views(flats=flat_grads(model))[f"{EMB}.word_embeddings.weight"]
    assert word[50:].abs().sum(dim=1).gt(0).all()


def test_autocast_casts_each_buffer_once_with_the_same_results(monkeypatch):
    """forward_views: under autocast the matmul operands are views of one bf16 copy per flat buffer; autocast itself
    would cast each at each use. Same loss; gradients equal up to fp32 summation order."""
    torch.manual_seed(0)
    model = ElectraForPretraining(no_dropout("tiny", vocab_size=100))
    ids, mask = make_batch(100, batch=4, length=16, pad_from={1: 9})
    plan = mask_plan(ids, mask, vocab_size=100, max_predictions=3, seed=2)

    def step():
        out = forward_backward(model, ids, mask, plan, 3, autocast=True)
        return out.loss.detach(), [p.grad.clone() for p in model.parameters()]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = model.forward_views()
    qkv = "discriminator.electra.encoder.layer.0.attention.self.qkv"
    assert w[f"{qkv}.weight"].dtype == w[f"{qkv}.bias"].dtype == torch.bfloat16
    assert w[f"{EMB}.word_embeddings.weight"].dtype == torch.float32  # embedding lookups stay fp32, as autocast does
    assert w["discriminator.electra.encoder.layer.0.intermediate.dense.bias"].dtype == torch.float32  # bias_gelu's
    assert w[f"{EMB}.LayerNorm.weight"].dtype == torch.float32
    loss, grads = step()
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *args: False)  # fp32 views; autocast casts per use
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.forward_views()[f"{qkv}.weight"].dtype == torch.float32
    ref_loss, ref_grads = step()
    assert torch.equal(loss, ref_loss)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
def test_padded_vocabulary_columns_change_nothing(monkeypatch, autocast):
    """The training forward pads the generator's logits with -inf columns to a multiple of VOCAB_MULTIPLE (aligned
    rows for cuBLAS): same losses, samples, statistics and gradients as without padding."""
    from electra_ds.model import electra

    vocab = 200  # padded to 256, a width no other layer of tiny has
    model = perturbed(no_dropout("tiny", vocab_size=vocab), training=True)
    ids, mask = make_batch(vocab, batch=4, length=16, pad_from={1: 9})
    plan = mask_plan(ids, mask, vocab_size=vocab, max_predictions=3, seed=2)
    widths = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(electra.F, "linear", lambda *a: widths.append(a[1].shape[0]) or linear(*a))

    def step():
        widths.clear()
        out = forward_backward(model, ids, mask, plan, 3, autocast=autocast)
        return out, {k: g.clone() for k, g in flat_grads(model).items()}, set(widths)

    padded, grads, widths_padded = step()
    assert 256 in widths_padded and vocab not in widths_padded
    monkeypatch.setattr(electra, "VOCAB_MULTIPLE", 1)
    plain, ref_grads, widths_plain = step()
    assert vocab in widths_plain and 256 not in widths_plain
    assert torch.equal(padded.disc_input, plain.disc_input) and torch.equal(padded.stats, plain.stats)
    torch.testing.assert_close(padded.mlm_loss, plain.mlm_loss)
    torch.testing.assert_close(padded.loss, plain.loss)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)

    with torch.no_grad():  # an infinite hidden state: the padding columns turn NaN (0 * inf), the samples stay ids
        model.named_weights()["generator.generator_predictions.LayerNorm.weight"][0] = float("inf")
        plain = model(ids, mask, None, plan, torch.tensor(3))
        monkeypatch.setattr(electra, "VOCAB_MULTIPLE", 64)
        padded = model(ids, mask, None, plan, torch.tensor(3))
    assert torch.equal(padded.disc_input, plain.disc_input) and int(padded.disc_input.max()) < vocab


def test_discriminator_sees_gumbel_samples_of_the_generator_on_the_masked_input():
    """The replaced tokens are the Gumbel-max samples (forward's seed and temperature) of the generator's logits on
    plan.generator_input_ids, recomputed here with the twins: a generator fed the original ids (a label leak), the
    wrong logits, seed or temperature would change many of them."""
    vocab = 60
    # logits far from flat, so the samples depend on them and not only on the noise
    model = perturbed(no_dropout("tiny", vocab_size=vocab, temperature=0.5))
    ids, mask = make_batch(vocab, batch=8, length=32, pad_from={2: 20})
    plan = mask_plan(ids, mask, vocab_size=vocab, max_predictions=5, seed=4)
    seed = torch.tensor(2**33 + 9)
    with kernel_backend("torch"):
        out = model(ids, mask, None, plan, seed)
        with torch.no_grad():
            logits = model.generator_logits(plan.generator_input_ids, mask, positions=plan.masked_positions)
    expected = reference.gumbel_sample(logits.reshape(-1, vocab), seed, 0.5).view(plan.masked_positions.shape)
    real = plan.masked_weights > 0
    got = out.disc_input.gather(1, plan.masked_positions)
    assert real.sum() > 30 and torch.equal(got[real], expected[real])
    assert torch.equal(got[~real], plan.masked_ids[~real])
    in_slots = torch.zeros_like(ids, dtype=torch.bool).scatter(1, plan.masked_positions, real)
    assert torch.equal(out.disc_input[~in_slots], ids[~in_slots])


def test_forward_is_deterministic_given_seeds():
    model = ElectraForPretraining(preset("tiny", vocab_size=200)).eval()
    ids, mask = make_batch(200, batch=4, length=32)
    plan = mask_plan(ids, mask, vocab_size=200, max_predictions=5, seed=3)
    a = model(ids, mask, None, plan, torch.tensor(11))
    b = model(ids, mask, None, plan, torch.tensor(11))
    assert torch.equal(a.disc_input, b.disc_input) and torch.equal(a.loss, b.loss)


def test_gumbel_sampling_follows_softmax():
    """Chi-square goodness of fit of the twin's fp32 Gumbel-max samples to softmax(logits), on fixed seeds, within one
    chunk of columns and across chunks (the Triton kernel's: tests/test_kernels.py)."""
    from scipy.stats import chisquare

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = logits.expand(4000, -1).contiguous()
    samples = torch.cat([reference.gumbel_sample(rows, torch.tensor(seed), 1.0) for seed in range(5)])
    counts, expected = softmax_counts(samples, logits, 1.0)
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3
    hot = reference.gumbel_sample(rows.to(torch.bfloat16), torch.tensor(0), 0.05)  # low temperature: argmax
    assert (hot == 0).float().mean() > 0.99
    # over three chunks of reference.SAMPLE_CHUNK columns, with mass in each (the rest of the row -inf)
    columns = torch.tensor([3, 2047, 2048, 2500, 4096, 4100])
    wide = torch.full((4000, 4101), float("-inf"))
    wide[:, columns] = logits
    samples = torch.cat([reference.gumbel_sample(wide, torch.tensor(seed), 1.0) for seed in range(5)])
    assert bool(torch.isin(samples, columns).all())
    counts, expected = softmax_counts(torch.searchsorted(columns, samples), logits, 1.0)
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


def _dropout_grads(op, p: float, seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of x and of the residual through op(x, residual, w, b, eps, p, seed) = LayerNorm(dropout(x) +
    residual) for one output gradient; seed None: op draws its own after torch.manual_seed(0)."""
    x, r = torch.randn(64, 3, 96).requires_grad_(), torch.randn(64, 3, 96).requires_grad_()
    w, b = torch.randn(96) + 1.0, torch.randn(96)
    torch.manual_seed(0)
    op(x, r, w, b, 1e-12, p, None if seed is None else torch.tensor(seed)).backward(
        torch.randn(64, 3, 96, generator=torch.Generator().manual_seed(1)))
    return x.grad, r.grad


@pytest.mark.parametrize("compiled", [False, True])
def test_layer_norm_dropout_rate_scale_and_seeding(compiled):
    """kernels.add_layer_norm's dropout, eager and compiled (inductor fusing the twin's integer hash into its own
    kernel): x's gradient is the residual's / (1 - p) where kept and 0 where dropped, a share p (within 5 sigma of
    18432 draws) dropped, exactly where reference.dropout_keep drops for the seed (compiled or not); another seed
    drops other positions; without a seed, one drawn from torch's generator (the same after the same manual_seed)."""
    from electra_ds import kernels

    op = torch.compile(kernels.add_layer_norm, fullgraph=True, dynamic=False) if compiled else kernels.add_layer_norm
    p = 0.25
    dx, dres = _dropout_grads(op, p, seed=2**41 + 7)
    kept = dx != 0
    torch.testing.assert_close(dx[kept] * (1 - p), dres[kept])
    assert abs((~kept).float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / dx.numel())
    assert torch.equal(kept, reference.dropout_keep(torch.tensor(2**41 + 7), dx.shape, p))
    assert not torch.equal(_dropout_grads(op, p, seed=5)[0] != 0, kept)
    drawn = _dropout_grads(op, p, seed=None)[0] != 0
    assert torch.equal(_dropout_grads(op, p, seed=None)[0] != 0, drawn) and not torch.equal(drawn, kept)
    assert torch.equal(_dropout_grads(op, 0.0, seed=0)[0] != 0, torch.ones_like(kept))
    with pytest.raises(ValueError, match="outside"):
        kernels.add_layer_norm(dx, None, dres[0, 0], dres[0, 0], 1e-12, 1.5)
    with pytest.raises(ValueError, match="0-d int64"):
        kernels.add_layer_norm(dx, None, dres[0, 0], dres[0, 0], 1e-12, 0.5, torch.tensor([3]))


def test_dropout_op_masks_like_add_layer_norm():
    """kernels.dropout keeps what reference.dropout_keep keeps for its seed, scaled by 1 / (1 - p) (x itself at p 0),
    and passes its gradient through the same mask."""
    from electra_ds import kernels

    x = torch.randn(5, 7, 33).requires_grad_()
    seed = torch.tensor(77)
    y = kernels.dropout(x, 0.4, seed)
    keep = reference.dropout_keep(seed, x.shape, 0.4)
    torch.testing.assert_close(y, torch.where(keep, x / 0.6, 0.0))
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, torch.where(keep, 1 / 0.6, 0.0))
    assert kernels.dropout(x, 0.0, seed) is x


def test_training_forward_draws_its_dropout_from_its_seed(monkeypatch):
    """In training, every dropout (hidden states and attention probabilities) derives from the forward's seed: the
    same seed gives the same loss whatever torch's generator holds, another seed another loss; each dropout site
    (embeddings and three per layer, per tower) gets a seed of its own, none of them the Gumbel draws' seed."""
    from electra_ds import kernels

    config = preset("tiny", vocab_size=200)
    assert config.attention_probs_dropout_prob > 0 and config.hidden_dropout_prob > 0
    model = ElectraForPretraining(config).train()
    ids, mask = make_batch(200, batch=4, length=32)
    plan = mask_plan(ids, mask, vocab_size=200, max_predictions=5, seed=3)
    seeds = []
    for name in ("add_layer_norm", "dropout", "attention"):
        def record(*args, _op=getattr(kernels, name), **kwargs):
            if isinstance(args[-1], torch.Tensor):  # a dropout's seed (the embeddings' LayerNorm has none)
                seeds.append(int(args[-1]) & 0xFFFFFFFF)  # the hash key: its low 32 bits
            return _op(*args, **kwargs)
        monkeypatch.setattr(kernels, name, record)
    torch.manual_seed(0)
    a = model(ids, mask, None, plan, torch.tensor(11))
    sites = list(seeds)
    torch.manual_seed(1)
    b = model(ids, mask, None, plan, torch.tensor(11))
    assert torch.equal(a.loss, b.loss) and seeds[len(sites):] == sites
    assert not torch.equal(model(ids, mask, None, plan, torch.tensor(12)).loss, a.loss)
    layers = config.discriminator.num_hidden_layers + config.generator.num_hidden_layers
    assert len(sites) == len(set(sites)) == 2 + 3 * layers and 11 not in sites


def test_dropout_sites_are_mixed_keys_made_in_one_op():
    """`dropout_sites` gives site k the key of seed ^ (k << 40) (reference.seed_key), sign-extended to int64, one
    tensor for a run of sites, and `dropout_keep` hashes with a seed's low 32 bits as they are: so sites that differ
    only above bit 31 (all of them) still get other masks, and seeds equal in their low 32 bits get the same one."""
    from electra_ds.model.layers import dropout_sites

    seed = torch.tensor(2**45 + 12345)
    sites = dropout_sites(seed, 1024, 37)
    assert sites.shape == (37,) and sites.dtype == torch.int64
    for k in (0, 5, 36):
        key = reference.seed_key(seed ^ ((1024 + k) << 40))
        assert sites[k] == key.to(torch.int64) and torch.equal(dropout_sites(seed, 1024 + k)[0], sites[k])
    assert len({int(s) & 0xFFFFFFFF for s in dropout_sites(seed, 0, 4096)}) == 4096
    shape = torch.Size((64, 96))
    assert not torch.equal(reference.dropout_keep(sites[0], shape, 0.5), reference.dropout_keep(sites[1], shape, 0.5))
    assert torch.equal(reference.dropout_keep(torch.tensor(7), shape, 0.5),
                       reference.dropout_keep(torch.tensor(2**40 + 7), shape, 0.5))
    assert dropout_sites(None, 3, 2) is None


def test_dropout_keep_mask_is_a_hash_of_seed_and_position():
    """The twin's mask: rows and columns drop independently (no two rows share a mask), its share follows p, and a
    seed gives the same mask on every call."""
    seed = torch.tensor(2**35 + 1)
    keep = reference.dropout_keep(seed, torch.Size((40, 10, 50)), 0.3)
    assert keep.shape == (40, 10, 50)
    rows = keep.view(400, 50)
    assert len({tuple(r.tolist()) for r in rows}) == 400
    assert abs(keep.float().mean().item() - 0.7) < 5 * math.sqrt(0.21 / keep.numel())
    assert torch.equal(keep, reference.dropout_keep(seed, torch.Size((40, 10, 50)), 0.3))
    assert not torch.equal(keep, reference.dropout_keep(seed + 1, torch.Size((40, 10, 50)), 0.3))
    with pytest.raises(ValueError, match="seed"):
        reference.dropout_keep(None, torch.Size((2, 3)), 0.1)


# -- classifier --------------------------------------------------------------------------------------------
def test_classifier_takes_discriminator_weights(tmp_path):
    from transformers import ElectraForPreTraining

    torch.manual_seed(0)
    config = no_dropout("tiny", vocab_size=300)
    pre = ElectraForPretraining(config).eval()
    clf = ElectraClassifier(config, num_labels=3).eval()
    clf.load_discriminator_weights(pre.named_weights())
    ids, mask = make_batch(300, pad_from={2: 10})
    hidden = pre.encode(ids, mask)
    torch.testing.assert_close(clf(ids, mask), hidden[:, 0] @ clf.named_weights()["classifier.weight"].T
                               + clf.named_weights()["classifier.bias"])
    export_hf_pair(pre, tmp_path)
    hf_state = ElectraForPreTraining.from_pretrained(tmp_path / "discriminator").state_dict()
    clf2 = ElectraClassifier(config, num_labels=3)
    clf2.load_discriminator_weights(hf_state)
    w1, w2 = clf.named_weights(), clf2.named_weights()
    assert all(torch.equal(w1[k], w2[k]) for k in w1 if k.startswith("electra."))
    with pytest.raises(KeyError, match="not a discriminator"):
        clf2.load_discriminator_weights({k: v for k, v in hf_state.items() if "layer.1." not in k})


def test_save_model_round_trip(tmp_path):
    model = ElectraForPretraining(preset("tiny", vocab_size=300))
    save_model(model, tmp_path / "m")
    back = load_pretrained(tmp_path / "m")
    assert back.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), back.parameters()))
    assert shares_storage(back)
