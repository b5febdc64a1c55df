"""CLIP retrieval: the faiss index returns the planted nearest images; the knn client fails clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conceptbench.images import DataError
from conceptbench.io import read_jsonl
from conceptbench.retrieval import index_pool, knn_query, retrieve_from_index

COLORS = {"gray": (128, 128, 128), "red": (250, 5, 5), "green": (5, 250, 5), "dark_red": (200, 40, 30),
          "blue": (5, 5, 250), "orange": (250, 120, 5)}


class ColorEncoder:
    """Stands in for CLIP: an image's embedding is its mean colour, a text's the colour it names."""

    def encode_images(self, images):
        rows = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32).mean((0, 1)) for im in images]))
        return torch.nn.functional.normalize(rows, dim=-1)

    def encode_texts(self, texts):
        rows = torch.tensor([COLORS[t] for t in texts], dtype=torch.float32)
        return torch.nn.functional.normalize(rows, dim=-1)


@pytest.fixture
def pool(tmp_path):
    folder = tmp_path / "pool"
    folder.mkdir()
    for i, rgb in enumerate(COLORS.values()):
        Image.new("RGB", (16, 16), rgb).save(folder / f"{i:06d}.png")
    return folder


def test_returns_the_planted_nearest_images_best_first(pool, tmp_path):
    assert index_pool(pool, ColorEncoder(), tmp_path / "index", chunk=4) == len(COLORS)
    rows = retrieve_from_index("red", 3, tmp_path / "index", pool, ColorEncoder(), tmp_path / "out")
    names = list(COLORS)
    assert [names[int(r["source"][:6])] for r in rows] == ["red", "dark_red", "orange"]
    assert rows[0]["score"] > rows[1]["score"] > rows[2]["score"]
    out = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert out == ["000000.png", "000001.png", "000002.png"]
    assert Image.open(tmp_path / "out/000001.png").getpixel((0, 0)) == COLORS["dark_red"]
    assert read_jsonl(tmp_path / "out/metadata.jsonl")[0]["text"] == "red"


def test_retrieved_images_keep_their_pool_captions(pool, tmp_path):
    # Custom Diffusion trains each retrieved image with its own caption, as the reference's --real_prior
    # reads caption.txt: the rows carry the pool's caption, the query apart; an uncaptioned image gets the query.
    from conceptbench.io import write_jsonl

    captions = [{"file_name": f"{i:06d}.png", "text": "" if name == "dark_red" else f"a {name} square"}
                for i, name in enumerate(COLORS)]
    write_jsonl(pool / "metadata.jsonl", captions)
    index_pool(pool, ColorEncoder(), tmp_path / "index")
    rows = retrieve_from_index("red", 3, tmp_path / "index", pool, ColorEncoder(), tmp_path / "out")
    written = read_jsonl(tmp_path / "out/metadata.jsonl")
    assert [r["text"] for r in written] == ["a red square", "red", "a orange square"]
    assert {r["query"] for r in rows} == {"red"}


def test_asking_for_more_than_the_pool_holds_is_an_error(pool, tmp_path):
    index_pool(pool, ColorEncoder(), tmp_path / "index")
    with pytest.raises(DataError, match="class_images.count 7 exceeds the 6 images"):
        retrieve_from_index("red", 7, tmp_path / "index", pool, ColorEncoder(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_knn_service_that_does_not_answer_gives_a_clear_error():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match="did not answer.*offline since 2024.*faiss"):
        knn_query(f"http://127.0.0.1:{port}/knn-service", "laion5B-L-14", "dog", 4, timeout=2)


def _tiny():
    import copy
    from pathlib import Path

    import yaml

    return copy.deepcopy(yaml.safe_load((Path(__file__).resolve().parents[1] / "config/tiny.yaml").read_text()))


def test_config_refuses_a_missing_pool_and_extra_concepts_without_retrieval():
    from conceptbench import config as cb

    cfg = _tiny()
    cfg["experiments"]["custom_diffusion"]["class_images"]["pool"] = "laion"
    with pytest.raises(cb.ConfigError, match="custom_diffusion.class_images.pool: 'laion' is not in datasets"):
        cb.validate(cfg)
    cfg = _tiny()
    cfg["experiments"]["custom_diffusion_multi"]["class_images"]["source"] = "generated"
    with pytest.raises(cb.ConfigError, match="extra_concepts.0: class images for extra concepts are retrieved"):
        cb.validate(cfg)
    cfg = _tiny()
    cfg["experiments"]["custom_diffusion_multi"]["args"]["extra_concepts"][0]["data"] = "sofa"
    with pytest.raises(cb.ConfigError, match="extra_concepts.0.data: 'sofa' is not in datasets"):
        cb.validate(cfg)


def test_multi_concept_clip_t_prompt_replaces_every_placeholder():
    from conceptbench import config as cb

    exp = cb.validate(_tiny())["experiments"]["custom_diffusion_multi"]
    rows = cb.eval_prompts(exp)
    assert rows[0] == {"prompt": "<new1> dog next to <new2> toy", "eval_prompt": "a dog next to a toy"}
    assert not any("<" in r["eval_prompt"] for r in rows)
