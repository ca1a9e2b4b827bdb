"""The streamed merge: a loadable checkpoint equal to the original with the map inserted."""

from __future__ import annotations

import json

import fsspec
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILY_CONFIGS, build_tiny_model
from replaceme import families
from replaceme.checkpoint import Checkpoint
from replaceme.families import family_for
from replaceme.merge import merge_checkpoint


def reference_with_map(folder, blocks, transforms, family):
    """The original HF model, blocks deleted, X·T applied where each map is folded."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    layers = model.model.layers
    for (start, _), t in transforms.items():
        module = layers[start - 1].get_submodule(family.residual_mlp_module)
        module.register_forward_hook(lambda _m, _i, out, t=t: out @ t.to(out.dtype))
    removed = {i for s, e in blocks for i in range(s, e)}
    model.model.layers = torch.nn.ModuleList(layer for i, layer in enumerate(layers) if i not in removed)
    model.config.num_hidden_layers = len(model.model.layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in removed]
    return model


@pytest.mark.parametrize("family_name", sorted(FAMILY_CONFIGS))
def test_merged_model_matches_original_with_map(family_name, tmp_path, tokenizer_dir):
    model_type = FAMILY_CONFIGS[family_name]["model_type"]
    source = build_tiny_model(tmp_path / "src", tokenizer_dir, model_type, num_hidden_layers=8)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    blocks = [(2, 4), (5, 7)]
    generator = torch.Generator().manual_seed(1)
    with Checkpoint(str(source)) as checkpoint:
        family = family_for(checkpoint.config)
        hidden = checkpoint.config["hidden_size"]
        transforms = {}
        for block in blocks:
            noise = 0.2 * torch.randn(hidden, hidden, generator=generator, dtype=torch.float64)
            t = torch.eye(hidden, dtype=torch.float64) + noise
            transforms[block] = t if family.full_map_foldable else torch.diag(torch.diagonal(t))
        out = tmp_path / "out"
        out.mkdir()
        merge_checkpoint(checkpoint, transforms, fsspec.filesystem("file"), str(out), progress=False)

    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    for key, value in config.items():  # every per-layer list shortened with the layers
        if isinstance(value, list) and key.endswith("types"):
            assert len(value) == 4, key
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = reference_with_map(source, blocks, transforms, family)
    ids = torch.randint(2, 300, (2, 24), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids, use_cache=False).logits, reference(ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before  # source untouched


def test_qwen2_window_layers_follow_the_kept_layers(tmp_path, tokenizer_dir):
    source = build_tiny_model(tmp_path / "src", tokenizer_dir, "qwen2", num_hidden_layers=8, max_window_layers=4)
    with Checkpoint(str(source)) as checkpoint:
        out = tmp_path / "out"
        out.mkdir()
        merge_checkpoint(checkpoint, {(1, 3): torch.eye(64)}, fsspec.filesystem("file"), str(out), progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["max_window_layers"] == 2  # layers 0 and 3 remain of the first four
    assert config["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 4


def test_untouched_tensors_are_copied_byte_for_byte(tmp_path, tiny_llama):
    out = tmp_path / "out"
    out.mkdir()
    with Checkpoint(str(tiny_llama)) as checkpoint:
        merge_checkpoint(checkpoint, {(3, 5): torch.eye(64) * 2}, fsspec.filesystem("file"), str(out), progress=False)
        with Checkpoint(str(out)) as merged:
            assert merged.load("model.layers.3.self_attn.q_proj.weight").equal(checkpoint.load("model.layers.5.self_attn.q_proj.weight"))
            assert merged.read_bytes(merged.entries["model.embed_tokens.weight"]) == checkpoint.read_bytes(checkpoint.entries["model.embed_tokens.weight"])
            folded = merged.load("model.layers.2.mlp.down_proj.weight")
            assert folded.equal(2 * checkpoint.load("model.layers.2.mlp.down_proj.weight"))
            assert "model.layers.4.mlp.down_proj.weight" not in merged.weight_map
            assert len(merged.shards()) > 1


def test_fold_in_slabs_equals_the_whole_product(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 40, generator=generator).to(torch.bfloat16)
    transform = torch.randn(16, 16, generator=generator, dtype=torch.float64)
    expected = (transform.T @ weight.double()).to(torch.bfloat16)
    monkeypatch.setattr(families, "FOLD_SLAB_ELEMENTS", 16 * 7)  # slabs of 7 columns, the last one short
    folded = family_for({"model_type": "llama"}).fold(weight, transform)
    assert folded.dtype == torch.bfloat16 and torch.equal(folded, expected)


def _merge(source, out, transforms, **options):
    out.mkdir()
    with Checkpoint(str(source)) as checkpoint:
        merge_checkpoint(checkpoint, transforms, fsspec.filesystem("file"), str(out), progress=False, **options)
    return out


def _logits(folder, ids, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


def test_shard_size_packs_the_output_and_the_model_is_the_same(tmp_path, tiny_llama):
    transforms = {(3, 5): torch.eye(64) + 0.1 * torch.randn(64, 64, generator=torch.Generator().manual_seed(0))}
    mirrored = _merge(tiny_llama, tmp_path / "mirrored", transforms)
    packed = _merge(tiny_llama, tmp_path / "packed", transforms, shard_size=100_000)
    single = _merge(tiny_llama, tmp_path / "single", transforms, shard_size=5 * 10**9)
    with Checkpoint(str(packed)) as merged:
        sizes = {shard: sum(e.nbytes for e in merged.entries.values() if e.shard == shard) for shard in merged.shards()}
        largest = max(e.nbytes for e in merged.entries.values())
        assert len(sizes) > 1 and all(size <= max(100_000, largest) for size in sizes.values())
        assert sum(sizes.values()) == json.loads((packed / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    with Checkpoint(str(single)) as merged:
        assert merged.shards() == ["model-00001-of-00001.safetensors"]
    with Checkpoint(str(mirrored)) as merged:
        assert len(merged.shards()) > 1  # no shard_size: the source's shards (those left non-empty)
    ids = torch.randint(2, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    expected = _logits(mirrored, ids)
    assert torch.equal(_logits(packed, ids), expected) and torch.equal(_logits(single, ids), expected)


def test_output_dtype_casts_floating_weights_and_names_the_dtype_in_the_config(tmp_path, tiny_llama):
    transforms = {(3, 5): torch.eye(64) + 0.1 * torch.randn(64, 64, generator=torch.Generator().manual_seed(0))}
    default = _merge(tiny_llama, tmp_path / "default", transforms)
    half = _merge(tiny_llama, tmp_path / "bf16", transforms, dtype="bfloat16", shard_size=10**9)
    same = _merge(tiny_llama, tmp_path / "fp32", transforms, dtype="float32")
    with Checkpoint(str(half)) as merged:
        assert {e.dtype for e in merged.entries.values()} == {"BF16"}
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    for name in (p.name for p in default.iterdir() if p.suffix == ".safetensors"):  # float32 source: nothing cast
        assert (same / name).read_bytes() == (default / name).read_bytes()
    ids = torch.randint(2, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    expected = _logits(default, ids)
    got = _logits(half, ids, dtype="auto")  # loads in the dtype the config names
    assert AutoModelForCausalLM.from_pretrained(half, dtype="auto").dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)  # bfloat16 rounding, same model
    assert not torch.equal(got, expected)


SOURCE_EXTRAS = {
    "README.md": "---\nlicense: llama3\n---\n# The source model\n",
    "LICENSE": "licence text", "USE_POLICY.md": "policy", "TRAINING.json": "{}", "model.gguf": "gguf weights",
    "consolidated.00.pth": "original weights", "pytorch_model.bin": "pickled weights", "tf_model.h5": "keras",
    "chat_template.jinja": "{{ messages }}", ".cache/huggingface/download/x.metadata": "cache",
    "original/params.json": "{}", "original/consolidated.00.pth": "original weights",
}


def _with_extras(folder, fs, root):
    for name, text in SOURCE_EXTRAS.items():
        fs.makedirs(f"{root}/{name}".rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(f"{root}/{name}", text.encode())
    for path in folder.iterdir():
        fs.put_file(str(path), f"{root}/{path.name}")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_only_the_files_a_checkpoint_needs_are_copied(where, tmp_path, tiny_llama, request):
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        server.create_bucket("merge-files")
        fs = fsspec.filesystem("s3", endpoint_url=server.endpoint_url, skip_instance_cache=True)
        root, options = "merge-files/source", {"endpoint_url": server.endpoint_url}
    else:
        fs, root, options = fsspec.filesystem("file"), str(tmp_path / "source"), {}
    _with_extras(tiny_llama, fs, root)
    out = tmp_path / "out"
    out.mkdir()
    uri = f"s3://{root}" if where == "s3" else root
    with Checkpoint(uri, storage_options=options) as checkpoint:
        merge_checkpoint(checkpoint, {(3, 5): torch.eye(64)}, fsspec.filesystem("file"), str(out), progress=False)
    small = {p.name for p in out.iterdir() if not p.name.endswith(".safetensors")}
    tokenizer = {p.name for p in tiny_llama.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))}
    assert "tokenizer.json" in tokenizer
    assert small == {"config.json", "model.safetensors.index.json", "generation_config.json", "LICENSE",
                     "USE_POLICY.md", "chat_template.jinja", *tokenizer}
    assert all(p.is_file() for p in out.iterdir())  # no sub-folder of the source
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
