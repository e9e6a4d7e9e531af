"""Every popular architecture end to end, from tiny configs with random weights (no hub access).

For each: LoRA with its default targets (the family's own names where Llama's do not exist), identity
at init, gradients on every adapter tensor, save / detach / load exact, and `generate` with the KV
cache giving the logits of a full forward (causal and encoder-decoder models). Then GPT-2's Conv1D
(weights stored [d_in, d_out]) under every variant and through PEFT's format, mixture-of-experts
refusals, layers whose forward is never called, tied weights, and whole-name matching.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import transformers as tf
from torch import nn

import lora_lite as ll
from lora_lite.verify import train_mode

VOCAB = 64
SMALL = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
DECODER = dict(
    SMALL,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    tie_word_embeddings=False,
)


@dataclass
class Arch:
    name: str
    build: Callable[[], nn.Module]
    targets: set[str]  # the last name component of LoRA's default targets
    kind: str = "causal"  # "causal", "seq2seq" or "encoder"


def _moe(**kw: object) -> dict:
    return dict(DECODER, num_local_experts=4, num_experts=4, num_experts_per_tok=2, **kw)


ARCHS = [
    Arch("Llama", lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**DECODER)), {"q_proj", "v_proj"}),
    Arch("Qwen3", lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**DECODER)), {"q_proj", "v_proj"}),
    Arch("Mistral", lambda: tf.MistralForCausalLM(tf.MistralConfig(**DECODER)), {"q_proj", "v_proj"}),
    Arch("Phi-3", lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**dict(DECODER, num_key_value_heads=2))), {"qkv_proj"}),
    Arch(
        "GPT-2",
        lambda: tf.GPT2LMHeadModel(tf.GPT2Config(**SMALL, n_embd=32, n_layer=2, n_head=2, n_positions=64)),
        {"c_attn"},
    ),
    Arch(
        "GPT-NeoX",
        lambda: tf.GPTNeoXForCausalLM(
            tf.GPTNeoXConfig(**SMALL, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        ),
        {"query_key_value"},
    ),
    Arch(
        "Falcon",
        lambda: tf.FalconForCausalLM(
            tf.FalconConfig(**SMALL, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
        ),
        {"query_key_value"},
    ),
    Arch(
        "BERT",
        lambda: tf.BertForMaskedLM(
            tf.BertConfig(**SMALL, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        ),
        {"query", "value"},
        "encoder",
    ),
    Arch(
        "T5",
        lambda: tf.T5ForConditionalGeneration(
            tf.T5Config(**SMALL, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, decoder_start_token_id=0)
        ),
        {"q", "v"},
        "seq2seq",
    ),
    Arch(
        "Qwen3-MoE",
        lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**_moe(moe_intermediate_size=16))),
        {"q_proj", "v_proj"},
    ),
    Arch("Mixtral", lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**_moe())), {"q_proj", "v_proj"}),
]


def _build(arch: Arch) -> nn.Module:
    torch.manual_seed(0)
    return arch.build().eval()


def _ids(n: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module, arch: Arch, ids: torch.Tensor) -> torch.Tensor:
    if arch.kind == "seq2seq":
        return model(input_ids=ids, decoder_input_ids=ids).logits
    return model(input_ids=ids).logits


def _perturb(model: nn.Module) -> None:
    """Move every adapter tensor off its init, so the adapter changes the output."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
def test_architecture_end_to_end(arch: Arch, tmp_path) -> None:
    model = _build(arch)
    ids = _ids()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = _logits(model, arch, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every target is reached in the first forward: no probe warning
        names = ll.attach(model, ll.LoRAConfig(r=4, alpha=8))
        assert {n.rsplit(".", 1)[-1] for n in names} == arch.targets
        with torch.no_grad():
            assert torch.equal(_logits(model, arch, ids), base)  # identity at init (B = 0)

    _perturb(model)
    _logits(model, arch, ids).float().square().mean().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values()), "an adapter got no grad"
    with torch.no_grad():
        adapted = _logits(model, arch, ids)
    assert (adapted - base).abs().max() > 1e-3

    ll.save(model, tmp_path / "a.safetensors")
    ll.detach(model)
    state = model.state_dict()
    assert state.keys() == base_state.keys() and all(torch.equal(state[k], base_state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(_logits(model, arch, ids), base)
    ll.load(model, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(_logits(model, arch, ids), adapted)

    if arch.kind != "encoder":  # the cached path computes what a full forward of the same tokens does
        prompt = ids[:1, :4]
        with torch.no_grad():
            out = model.generate(
                prompt,
                max_new_tokens=4,
                min_new_tokens=4,
                do_sample=False,
                use_cache=True,
                return_dict_in_generate=True,
                output_logits=True,
            )
            steps = torch.stack(out.logits, dim=1)
            if arch.kind == "seq2seq":
                full = model(input_ids=prompt, decoder_input_ids=out.sequences).logits[:, :-1]
            else:
                full = model(input_ids=out.sequences).logits[:, prompt.shape[1] - 1 : -1]
        torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- GPT-2's Conv1D, every variant


def _gpt2() -> nn.Module:
    return _build(ARCHS[[a.name for a in ARCHS].index("GPT-2")])


def _config(title: str) -> ll.AdapterConfig:
    cls = {v.title: v.config_class for v in ll.Variant.registry.values() if v.spec_hash}[title]
    hypers = {f.name for f in cls.hyper_fields()}
    # r and k fit GPT-2's 32-wide layers; group_size (RoAd) divides every d_out (96, 32, 128); b, a block size,
    # divides 32 and 96 (C3A, OFT, BOFT); vector_length (VB-LoRA) divides every d_in and d_out
    small = {"r": 4, "k": 2, "group_size": 4, "b": 16, "num_vectors": 8, "vector_length": 4}
    return cls(**{name: value for name, value in small.items() if name in hypers})


def _titles() -> list[str]:
    ll.import_variants()
    return sorted(v.title for v in ll.Variant.registry.values() if v.spec_hash)


@pytest.mark.parametrize("title", _titles())
def test_every_variant_on_gpt2_conv1d(title: str, tmp_path) -> None:
    """Conv1D stores [d_in, d_out]: init reads W as [d_out, d_in], residuals are written back transposed."""
    model = _gpt2()
    ids = _ids()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(ids).logits
    cfg = _config(title)
    names = ll.attach(model, cfg, calibration_data=[ids])
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"] or title == "IA3-FF"
    with torch.no_grad():
        if ll.Variant.for_config(cfg).identity_at_init:
            torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=1e-5)
        else:  # VB-LoRA: its docstring says it is not
            assert (model(ids).logits - base).abs().max() > 1e-5
    _perturb(model)
    with train_mode(model):  # as training runs: PVeRA's log-variance gets its gradient from the sample only
        model(ids).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        adapted = model(ids).logits
    assert (adapted - base).abs().max() > 1e-4
    ll.save(model, tmp_path / "a.safetensors")
    ll.detach(model)
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())
    ll.load(model, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, adapted)


@pytest.mark.parametrize("title", ["LoRA", "DoRA", "PiSSA", "IA3", "IA3-FF"])
def test_gpt2_adapters_round_trip_through_peft(title: str, tmp_path) -> None:
    """Export to PEFT (fan_in_fan_out=True, as PEFT sets it for Conv1D) gives PEFT's model our logits;
    a PEFT GPT-2 adapter imports back to the same logits."""
    peft = pytest.importorskip("peft")
    ids = _ids()
    ours = _gpt2()
    ll.attach(ours, _config(title))
    _perturb(ours)
    with torch.no_grad():
        expected = ours(ids).logits
    ll.export_peft(ours, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(_gpt2(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-5, atol=1e-5)
    again = _gpt2()
    ll.import_peft(again, tmp_path / "peft")
    with torch.no_grad():
        # PiSSA comes back as a rank-2r LoRA on the original base: the same function
        torch.testing.assert_close(again(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_peft_trained_gpt2_lora_imports(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(4)
    theirs = peft.get_peft_model(
        _gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)
    )
    ids = _ids()
    with torch.no_grad():
        expected = theirs(ids).logits
    theirs.save_pretrained(tmp_path)
    ours = _gpt2()
    assert ll.import_peft(ours, tmp_path) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- mixture-of-experts


@pytest.mark.parametrize("arch", [a for a in ARCHS if "MoE" in a.name or a.name == "Mixtral"], ids=lambda a: a.name)
@pytest.mark.parametrize(
    "cfg", [lambda: ll.LoRAConfig(target_names="experts"), lambda: ll.IA3FFConfig()], ids=["experts", "IA3-FF"]
)
def test_fused_experts_are_refused_by_name(arch: Arch, cfg) -> None:
    """transformers 5 fuses the experts into 3-D parameters: refused, naming them, the model unchanged."""
    model = _build(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"mlp\.experts: .*fused 3-D weights \(gate_up_proj \[4, ") as info:
        ll.attach(model, cfg())
    assert "mixture-of-experts" in str(info.value) and "attention projections" in str(info.value)
    assert ll.attachment(model) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(p.requires_grad is False for p in model.parameters())


# ---------------------------------------------------------------------------- layers whose forward is not called


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def test_multihead_attention_out_proj_is_never_a_target() -> None:
    model = Encoder().train()
    names = ll.attach(model, ll.LoRAConfig(r=2, target_names=None))
    assert names == ["layer.linear1", "layer.linear2"]  # not layer.self_attn.out_proj
    ll.detach(model)
    with pytest.raises(ValueError, match=r"layer\.self_attn\.out_proj: NonDynamicallyQuantizableLinear owned by "):
        ll.attach(model, ll.LoRAConfig(r=2, target_names="out_proj"))
    assert ll.attachment(model) is None and all(p.requires_grad for p in model.parameters())


class ReadsWeight(nn.Module):
    """Calls `up` but reads `proj.weight` directly: a hook on `proj` never runs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(8, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.up(x), self.proj.weight, self.proj.bias)


def test_first_forward_warns_about_targets_never_called() -> None:
    model = ReadsWeight()
    ll.attach(model, ll.LoRAConfig(r=2, target_names=["up", "proj"]))
    with pytest.warns(RuntimeWarning, match=r"never called 1 adapted layers \(proj\)"):
        model(torch.randn(2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 8))  # once: the probe's hooks removed themselves
    assert len(model._forward_hooks) == 0 and len(model.proj._forward_pre_hooks) == 0
    ll.detach(model)
    ll.attach(model, ll.LoRAConfig(r=2, target_names="up"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 8))
    ll.detach(model)  # before any forward too: the probe goes with the adapter
    assert len(model._forward_hooks) == 0 and len(model.up._forward_pre_hooks) == 0


# ---------------------------------------------------------------------------- tied weights


def _tied_qwen() -> nn.Module:
    torch.manual_seed(0)
    return tf.Qwen3ForCausalLM(tf.Qwen3Config(**dict(DECODER, tie_word_embeddings=True, pad_token_id=None))).eval()


@pytest.mark.parametrize("title", _titles())
def test_residual_variants_refuse_a_tied_weight(title: str) -> None:
    """A residual would rewrite the embedding lm_head shares its weight with: refused, nothing changed."""
    model = _tied_qwen()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _config(title)
    cfg.target_names, cfg.exclude_names = "lm_head", None
    variant = ll.Variant.for_config(cfg)
    if not variant.has_residual:
        ll.attach(model, cfg, calibration_data=[ids])
        if variant.identity_at_init:  # (VB-LoRA's docstring says it is not)
            with torch.no_grad():
                torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=1e-5)
        assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])
        return
    with pytest.raises(ValueError, match=r"lm_head: .* also model\.embed_tokens\.weight \(tied weights\)"):
        ll.attach(model, cfg, calibration_data=[ids])
    assert ll.attachment(model) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------- whole names, family defaults


def test_default_names_match_whole_components() -> None:
    """`q_proj|v_proj` must not select Phi-3's fused `qkv_proj` as a regex search would; IA3's k|v neither."""
    from lora_lite.targets import name_matches

    assert not name_matches("q_proj|v_proj", "model.layers.0.self_attn.qkv_proj")
    assert name_matches("q_proj|v_proj", "model.layers.0.self_attn.q_proj")
    assert name_matches(r"self_attn\..*", "model.layers.0.self_attn.o_proj")
    assert not name_matches("proj", "model.layers.0.self_attn.q_proj")
    phi3 = _build(ARCHS[[a.name for a in ARCHS].index("Phi-3")])
    names = ll.attach(phi3, ll.LoRAConfig(target_names="q_proj|o_proj"))  # user regex: no family mapping
    assert {n.rsplit(".", 1)[-1] for n in names} == {"o_proj"}


LLAMA_KV = {"k_proj", "v_proj"}
DEFAULTS = {  # architecture: (IA3's k|v, IA3-FF's down_proj) translated to the family's names
    "Llama": (LLAMA_KV, {"mlp.down_proj"}),
    "Qwen3": (LLAMA_KV, {"mlp.down_proj"}),
    "Mistral": (LLAMA_KV, {"mlp.down_proj"}),
    "Phi-3": ({"qkv_proj"}, {"mlp.down_proj"}),
    "GPT-2": ({"c_attn"}, {"mlp.c_proj"}),
    "GPT-NeoX": ({"query_key_value"}, {"mlp.dense_4h_to_h"}),
    "Falcon": ({"query_key_value"}, {"mlp.dense_4h_to_h"}),
    "BERT": ({"key", "value"}, {"output.dense"}),  # the layer's output.dense, not attention.output.dense
    "T5": ({"k", "v"}, {"DenseReluDense.wo"}),
    "Qwen3-MoE": (LLAMA_KV, None),  # the experts are refused (test above)
    "Mixtral": (LLAMA_KV, None),
}


@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
def test_every_default_target_line_has_the_family_names(arch: Arch) -> None:
    """IA3 and IA3-FF defaults too: whole names, the family's own, never a partial match."""
    kv, down = DEFAULTS[arch.name]
    model = _build(arch)
    names = ll.attach(model, ll.IA3Config())
    assert {n.rsplit(".", 1)[-1] for n in names} == kv
    ll.detach(model)
    if down is None:
        return
    names = ll.attach(model, ll.IA3FFConfig())
    assert {".".join(n.rsplit(".", 2)[-2:]) for n in names} == down
    assert len(names) == 2 and not any("attention" in n for n in names)  # one per block


def test_no_match_names_the_layers_to_use() -> None:
    model = Encoder()
    with pytest.raises(ValueError, match=r"target_names=\['linear1', 'linear2'\]"):
        ll.attach(model, ll.LoRAConfig())
