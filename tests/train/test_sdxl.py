"""Saved models other tools load: the diffusers folder with every weight under the key names
transformers 4.x and 5.x both read, tokenizer files a slow tokenizer reads, and the
single file's ModelSpec metadata (as sd-scripts writes it)."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from curate.train import sdxl


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = sdxl.tiny_random()
    folder = sdxl.save_diffusers(model, tmp_path_factory.mktemp("m") / "diffusers", torch.float16)
    return model, folder


def test_text_encoders_are_saved_with_the_text_model_prefix_and_every_weight(saved):
    model, folder = saved
    for name, part in (("text_encoder", model.te1), ("text_encoder_2", model.te2)):
        stored = load_file(folder / name / "model.safetensors")
        assert stored and all(k.startswith(("text_model.", "text_projection.")) for k in stored), name
        expected = {sdxl._text_model(k): v for k, v in part.state_dict().items() if not k.endswith("position_ids")}
        assert set(stored) == set(expected), name
        for k, v in expected.items():
            assert stored[k].dtype == torch.float16 and torch.equal(stored[k], v.to(torch.float16)), k
    assert "text_model.encoder.layers.11.mlp.fc1.weight" in load_file(folder / "text_encoder" / "model.safetensors")
    assert "text_projection.weight" in load_file(folder / "text_encoder_2" / "model.safetensors")


def test_transformers_loads_every_weight_back(saved):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model, folder = saved
    for name, cls, part in (("text_encoder", CLIPTextModel, model.te1),
                            ("text_encoder_2", CLIPTextModelWithProjection, model.te2)):
        loaded, info = cls.from_pretrained(folder / name, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], name
        for k, v in part.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v.to(torch.float16).to(loaded.state_dict()[k].dtype)), k


def test_tokenizer_folders_hold_vocab_and_merges(saved):
    from transformers import CLIPTokenizer

    model, folder = saved
    for name, tok in (("tokenizer", model.tok1), ("tokenizer_2", model.tok2)):
        files = {p.name for p in (folder / name).iterdir()}
        assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= files, name
        vocab = json.loads((folder / name / "vocab.json").read_text(encoding="utf-8"))
        assert vocab == tok.get_vocab()
        # what a tokenizer built from those two files alone (transformers 4.x's slow CLIPTokenizer) reads
        rebuilt = CLIPTokenizer(str(folder / name / "vocab.json"), str(folder / name / "merges.txt"))
        text = "1girl, solo, blue archive, halo"
        assert rebuilt(text).input_ids == tok(text).input_ids, name


def test_single_file_carries_modelspec(tmp_path):
    path = sdxl.save_single_file(sdxl.tiny_random(), tmp_path / "baxl.safetensors",
                                 metadata=sdxl.modelspec("baxl v3", (1024, 1024)))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert (meta["modelspec.title"], meta["modelspec.resolution"]) == ("baxl v3", "1024x1024")
    assert meta["modelspec.prediction_type"] == "epsilon" and len(meta["modelspec.date"]) == 19  # ISO seconds
    with safe_open(str(sdxl.save_single_file(sdxl.tiny_random(), tmp_path / "x.safetensors")), "pt") as f:
        assert f.metadata()["modelspec.title"] == "x"  # default title: the file's name
