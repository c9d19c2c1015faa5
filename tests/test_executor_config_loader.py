"""config.json parsing for the supported families, and the safetensors loader's edge cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from faser_sgl.executor.config import ModelConfig
from faser_sgl.executor.forward_batch import ForwardBatch
from faser_sgl.executor.loader import load_model
from faser_sgl.executor.model_runner import ModelRunner

BASE = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def cfg(arch: str, **kw) -> ModelConfig:
    return ModelConfig.from_dict({"architectures": [arch], **BASE, **kw})


def test_families():
    llama = cfg("LlamaForCausalLM", attention_bias=True, mlp_bias=True)
    assert (llama.family, llama.qkv_bias, llama.o_bias, llama.mlp_bias, llama.qk_norm) == ("llama", True, True, True, False)
    assert llama.head_dim == 16 and llama.num_kv_heads == 2
    qwen2 = cfg("Qwen2ForCausalLM")  # q/k/v bias always, o_proj never
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.qk_norm) == (True, False, False)
    qwen3 = cfg("Qwen3ForCausalLM", head_dim=32)
    assert (qwen3.qkv_bias, qwen3.qk_norm, qwen3.head_dim) == (False, True, 32)
    assert cfg("LlamaForCausalLM", num_key_value_heads=None).num_kv_heads == 4


def test_rope_both_layouts():
    # transformers >= 5
    new = cfg("LlamaForCausalLM", rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                   "original_max_position_embeddings": 8192})
    assert new.rope_theta == 500000.0 and new.rope_scaling["rope_type"] == "llama3"
    assert new.rope_scaling["factor"] == 8.0
    # transformers 4: top-level rope_theta, rope_scaling with the old "type" key
    old = cfg("LlamaForCausalLM", rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0})
    assert old.rope_theta == 1e6 and old.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    plain = cfg("Qwen2ForCausalLM", rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert plain.rope_theta == 1e6 and plain.rope_scaling is None
    assert cfg("Qwen2ForCausalLM", rope_scaling=None).rope_theta == 10000.0


def test_unsupported_things_are_refused_clearly():
    with pytest.raises(ValueError, match="MistralForCausalLM"):
        cfg("MistralForCausalLM")
    with pytest.raises(ValueError, match="gpt2"):
        ModelConfig.from_dict({"model_type": "gpt2", **BASE})
    with pytest.raises(NotImplementedError, match="yarn"):
        cfg("Qwen2ForCausalLM", rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(NotImplementedError, match="dynamic"):
        cfg("LlamaForCausalLM", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(NotImplementedError, match="gelu"):
        cfg("LlamaForCausalLM", hidden_act="gelu")


def test_eos_ids_from_config_and_generation_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], **BASE,
                                                      "eos_token_id": 7}))
    assert ModelConfig.from_pretrained(tmp_path).eos_token_ids == [7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [8, 7]}))
    assert ModelConfig.from_pretrained(tmp_path).eos_token_ids == [7, 8]
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_pretrained(tmp_path / "nowhere")


def test_tiny_model_config(tiny_model_factory):
    c = ModelConfig.from_pretrained(tiny_model_factory("qwen2"))
    assert c.architecture == "Qwen2ForCausalLM" and c.tie_word_embeddings
    assert c.eos_token_ids == [2, 0] and c.vocab_size == 512
    assert c.rope_scaling is None and c.qkv_bias and not c.o_bias


# ----- loader ------------------------------------------------------------------------------

def copy_model(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def logits_of(path, dtype=torch.float32) -> torch.Tensor:
    runner = ModelRunner(str(path), dtype=dtype, max_total_tokens=16)
    return runner.forward(ForwardBatch.build([[5, 6, 7, 8]], [[0, 1, 2, 3]], [[0, 1, 2, 3]]))


def test_sharded_checkpoint_loads_the_same(tiny_model_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model_factory("qwen3")
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = list((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert torch.equal(logits_of(tmp_path / "sharded"), logits_of(src))


def test_untied_checkpoint_and_tied_checkpoint_with_redundant_lm_head(tiny_model_factory, tmp_path):
    src = tiny_model_factory("qwen2")  # tied
    path = copy_model(src, tmp_path / "m")
    weights = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in weights
    ref = logits_of(path)
    # A tied checkpoint that also stores lm_head: the embedding still serves (as in HF).
    weights["lm_head.weight"] = torch.randn_like(weights["model.embed_tokens.weight"])
    save_file(weights, path / "model.safetensors")
    assert torch.equal(logits_of(path), ref)
    # Untie it in the config: now lm_head.weight is used and changes the logits.
    cfg_file = path / "config.json"
    cfg_json = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg_json, "tie_word_embeddings": False}))
    model, config = load_model(path)
    assert not config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, weights["lm_head.weight"])
    assert not torch.allclose(logits_of(path), ref)


def test_missing_and_mismatched_weights_fail_clearly(tiny_model_factory, tmp_path):
    path = copy_model(tiny_model_factory("llama"), tmp_path / "m")
    weights = load_file(path / "model.safetensors")
    good = dict(weights)
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks 1 weight.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(path)
    weights = dict(good)
    del weights["lm_head.weight"]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        load_model(path)
    weights = dict(good)
    weights["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ValueError, match="q_proj.weight has shape"):
        load_model(path)
    weights = dict(good)
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ValueError, match="does not use.*q_proj.bias"):
        load_model(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_casts_to_dtype(tiny_model_factory, dtype):
    model, _ = load_model(tiny_model_factory("llama"), dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert not any(p.requires_grad for p in model.parameters())


def file_mappings(file: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's maps of ``file`` (/proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(file.resolve()):
            begin, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((begin, end))
    return ranges


def mapped_weights(model, file: Path) -> list[str]:
    """Names of the parameters whose memory lies in a map of ``file``."""
    ranges = file_mappings(file)
    return [name for name, p in model.named_parameters()
            if any(b <= p.data_ptr() < e for b, e in ranges)]


def test_cpu_weights_are_this_process_memory_by_default(tiny_model_factory, tmp_path):
    """By default no weight is a view of the checkpoint file: page cache can be evicted under
    memory pressure, and a pass would then wait for the disk (a 1-token pass of the 1.5B took
    2.8 s instead of 0.3 s that way).  The file is not even left mapped."""
    path = copy_model(tiny_model_factory("llama"), tmp_path / "m")
    file = path / "model.safetensors"
    # copies: safetensors' own load_file keeps the file mapped while its tensors live
    on_disk = {name: t.clone() for name, t in load_file(str(file)).items()}
    model, _ = load_model(path, dtype=torch.float32)
    assert not file_mappings(file)
    assert mapped_weights(model, file) == []
    for name, p in model.named_parameters():
        assert torch.equal(p, on_disk[name]), name
    # the runner of a server: fused (private) projections, nothing mapped either
    runner = ModelRunner(str(path), max_total_tokens=16)
    assert not runner.shares_weights and runner.model.model.layers[0].self_attn.qkv_proj is not None
    assert not file_mappings(file) and mapped_weights(runner.model, file) == []


def test_shared_runner_keeps_every_weight_a_view_of_the_file(tiny_model_factory, tmp_path):
    """--faser-share-weights-mmap: every weight is a view of the map (so replicas share the
    page cache), hence neither fused nor packed, and the logits are the same."""
    path = copy_model(tiny_model_factory("llama"), tmp_path / "m")
    file = path / "model.safetensors"
    runner = ModelRunner(str(path), max_total_tokens=16, share_weights_mmap=True)
    assert runner.shares_weights and runner.linear_plan is None
    attn = runner.model.model.layers[0].self_attn
    assert attn.qkv_proj is None and attn.q_proj is not None
    assert sorted(mapped_weights(runner.model, file)) == sorted(n for n, _ in runner.model.named_parameters())
    batch = ForwardBatch.build([[5, 6, 7, 8]], [[0, 1, 2, 3]], [[0, 1, 2, 3]])
    torch.testing.assert_close(runner.forward(batch), logits_of(path), rtol=1e-4, atol=1e-4)


def test_cpu_weights_map_the_file_copy_on_write_when_shared(tiny_model_factory, tmp_path):
    """With share_mapped, a float32 checkpoint loaded as float32 is not copied: the weights are
    views of a private map of the file (so replicas on one machine share its pages), and a write
    to a weight stays in this process, leaving the file as it was."""
    path = copy_model(tiny_model_factory("llama"), tmp_path / "m")
    file = path / "model.safetensors"
    on_disk = load_file(str(file))
    model, _ = load_model(path, dtype=torch.float32, share_mapped=True)
    weight = model.model.layers[0].mlp.down_proj.weight
    maps = Path("/proc/self/maps").read_text()
    assert str(file.resolve()) in maps
    torch.testing.assert_close(weight, on_disk["model.layers.0.mlp.down_proj.weight"], rtol=0, atol=0)
    weight.add_(1.0)
    assert torch.equal(load_file(str(file))["model.layers.0.mlp.down_proj.weight"],
                       on_disk["model.layers.0.mlp.down_proj.weight"])
    again, _ = load_model(path, dtype=torch.float32, share_mapped=True)
    assert torch.equal(again.model.layers[0].mlp.down_proj.weight,
                       on_disk["model.layers.0.mlp.down_proj.weight"])
    # Cast to another dtype, a weight is a copy of its own: the loaded model keeps working.
    half, _ = load_model(path, dtype=torch.bfloat16, share_mapped=True)
    assert half.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert mapped_weights(half, file) == []
