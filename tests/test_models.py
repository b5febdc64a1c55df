"""Tiny components: a real CLIP tokenizer built offline, and models deterministic under their seed."""

import json

import open_clip
import pytest
import torch

from conceptbench.models.tiny import build_tiny_dinov2, build_tiny_open_clip, build_tiny_pipeline
from conceptbench.models.tokenizer import VOCAB_SIZE, build_clip_tokenizer, load_clip_tokenizer

PROMPTS = [
    "sks dog in a bucket",
    "sks dog on grassy field",
    "sks dog wearing bandana",
    "<sks-cat> in a basket",
    "<new1> dog sitting on <new2> sofa",
    "Bill Gates with a hoodie",
    "John Oliver Naruto style",
    "Hello Kitty Naruto style",
    "Mickael Jackson as ninja",
    "a cat sitting on a sofa",
    "A Bowl of FRUIT on a table!!",
    "a futuristic city, neon lights",
    "a portrait,   soft lighting",
    "naïve café résumé",
    "",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tok"))


def test_tokenizer_is_the_full_clip_vocabulary(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
    assert tokenizer.model_max_length == 77


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_ids_match_open_clip(tokenizer, prompt):
    ours = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    theirs = open_clip.tokenize([prompt])[0].tolist()
    end = theirs.index(49407) + 1  # open_clip pads with 0, SD v1.5 with <|endoftext|>
    assert ours[:end] == theirs[:end]
    assert set(ours[end:]) <= {49407}


def test_exclamation_marks_are_not_padding(tokenizer):
    ids = tokenizer("wow!").input_ids
    assert ids.count(tokenizer.pad_token_id) == 1  # only the closing <|endoftext|>


def test_a_tokenizer_that_failed_to_load_is_refused(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
    # transformers returns a 2-token tokenizer here instead of failing
    with pytest.raises(ValueError, match="CLIP tokenizer has 2 tokens, expected at least 49408"):
        load_clip_tokenizer(tmp_path)


def test_tiny_pipeline_is_deterministic_under_its_seed(tmp_path):
    a = build_tiny_pipeline(tmp_path / "a", seed=0)
    b = build_tiny_pipeline(tmp_path / "b", seed=0)
    c = build_tiny_pipeline(None, seed=1)
    sa, sb, sc = a.unet.state_dict(), b.unet.state_dict(), c.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert (tmp_path / "a/unet/diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "a/tokenizer/vocab.json").exists()


def test_tiny_encoders_load_through_the_real_loaders(tmp_path):
    from transformers import AutoImageProcessor, AutoModel

    build_tiny_open_clip(tmp_path / "clip")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'clip'}")
    assert model.visual.image_size == (32, 32)
    build_tiny_dinov2(tmp_path / "dino")
    dino = AutoModel.from_pretrained(tmp_path / "dino")
    assert AutoImageProcessor.from_pretrained(tmp_path / "dino").crop_size["height"] == 28
    assert dino.config.patch_size == 14
