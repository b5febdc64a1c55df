"""The metrics package on tiny CLIP, DINOv2 and aesthetic models built offline."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from pathlib import Path

from conceptbench.io import write_jsonl
from conceptbench.metrics import scores

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    from conceptbench.models.tiny import build_tiny_aesthetic, build_tiny_dinov2, build_tiny_open_clip

    root = tmp_path_factory.mktemp("models")
    return {
        "clip": build_tiny_open_clip(root / "clip", seed=0),
        "dino": build_tiny_dinov2(root / "dino", seed=0),
        "aesthetic": build_tiny_aesthetic(root / "aesthetic", seed=0),
    }


def natural(name: str, size: int = 64) -> Image.Image:
    return Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size))


@pytest.fixture(scope="session")
def subject(tmp_path_factory):
    """A prepared subject folder: three PNGs and a file that is not one."""
    folder = tmp_path_factory.mktemp("subject")
    for name in ("chelsea", "coffee", "astronaut"):
        natural(name).save(folder / f"{name}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


# --- scores on hand-made embeddings ---------------------------------------------------------


def test_identical_embeddings_score_one_and_orthogonal_zero():
    e = np.eye(4)
    scaled = 3.0 * e  # cosines ignore the norm
    np.testing.assert_allclose(scores.clip_t(e, scaled), 1.0)
    np.testing.assert_allclose(scores.clip_t(e, np.roll(e, 1, axis=0)), 0.0, atol=1e-12)
    for metric in (scores.clip_i, scores.dino_i):
        np.testing.assert_allclose(metric(e[:1], scaled[:1]), [1.0])
        np.testing.assert_allclose(metric(e[:1], e[1:]), [0.0], atol=1e-12)
        # the mean over references: identical to one of two, orthogonal to the other
        np.testing.assert_allclose(metric(e[:1], e[:2]), [0.5])
    np.testing.assert_allclose(scores.leave_one_out(e), 0.0, atol=1e-12)
    np.testing.assert_allclose(scores.leave_one_out(np.ones((3, 5))), 1.0)


def test_leave_one_out_excludes_self():
    refs = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(scores.leave_one_out(refs), [0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="at least 2"):
        scores.leave_one_out(refs[:1])


def test_bootstrap_ci_contains_mean_shrinks_and_is_seeded():
    rng = np.random.default_rng(1)
    small, large = rng.normal(0.3, 0.05, 20), rng.normal(0.3, 0.05, 2000)
    lo_s, hi_s = scores.bootstrap_ci(small)
    lo_l, hi_l = scores.bootstrap_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3  # width falls like 1/sqrt(n): 10x here
    assert scores.bootstrap_ci(small, seed=7) == scores.bootstrap_ci(small, seed=7)
    assert scores.bootstrap_ci(small, seed=7) != scores.bootstrap_ci(small, seed=8)
    with pytest.raises(ValueError, match="NaN"):
        scores.bootstrap_ci([0.1, float("nan")])


def test_degenerate_images_are_flagged_natural_is_not():
    assert scores.degenerate_reason(Image.new("RGB", (64, 64))) == "black"
    assert scores.degenerate_reason(Image.new("RGB", (64, 64), (120, 60, 200))) == "constant"
    nan = np.full((8, 8, 3), 0.5)
    nan[0, 0, 0] = np.nan
    assert scores.degenerate_reason(nan) == "non-finite"
    assert not scores.is_degenerate(Image.fromarray(data.chelsea()))
    assert not scores.is_degenerate(natural("chelsea"))


# --- encoders -------------------------------------------------------------------------------


def test_clip_folder_without_weights_is_refused(models, tmp_path):
    from conceptbench.metrics.encoders import ClipEncoder

    empty = tmp_path / "clip_no_weights"
    empty.mkdir()
    shutil.copy(models["clip"] / "open_clip_config.json", empty)
    with pytest.raises(FileNotFoundError, match="no weights") as err:
        ClipEncoder.load(empty, "cpu")
    assert str(empty) in str(err.value)



def _uses_quick_gelu(encoder) -> bool:
    import open_clip

    return any(isinstance(m, open_clip.transformer.QuickGELU) for m in encoder.model.modules())


def test_the_model_entry_sets_clips_activation_over_the_folder(models, samples, tmp_path):
    """OpenAI's weights need QuickGELU, which a 'local-dir:' folder's config need not say: the entry decides."""
    import copy

    import yaml

    from conceptbench import config as cb
    from conceptbench.metrics.encoders import ClipEncoder
    from conceptbench.metrics.evaluate import evaluate_samples

    folder = models["clip"]
    assert "quick_gelu" not in json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    quick, plain, unset = (ClipEncoder.load(folder, "cpu", quick_gelu=q) for q in (True, False, None))
    assert _uses_quick_gelu(quick) and not _uses_quick_gelu(plain) and not _uses_quick_gelu(unset)
    images, texts = [natural("chelsea"), natural("coffee")], ["a cat", "a cup of coffee"]
    assert not torch.allclose(quick.encode_images(images), plain.encode_images(images), atol=1e-4)
    assert not torch.allclose(quick.encode_texts(texts), plain.encode_texts(texts), atol=1e-4)
    torch.testing.assert_close(unset.encode_images(images), plain.encode_images(images))  # left out: the folder's

    # From the config to the scores: the study's entry says true, so evaluation runs QuickGELU.
    study = cb.validate(yaml.safe_load((ROOT / "config/config.yaml").read_text()))
    options = cb.clip_options(study)
    assert options == {"quick_gelu": True}
    by_entry = evaluate_samples(samples, None, folder, None, None, tmp_path / "q.csv", device="cpu", clip_options=options)
    by_folder = evaluate_samples(samples, None, folder, None, None, tmp_path / "f.csv", device="cpu")
    assert not np.allclose(by_entry["clip_t"], by_folder["clip_t"], atol=1e-5)
    expected = (quick.encode_images([Image.open(samples / f).convert("RGB") for f in by_entry["file"]])
                * quick.encode_texts(list(by_entry["eval_prompt"]))).sum(-1).numpy()
    np.testing.assert_allclose(by_entry["clip_t"].to_numpy(), expected, atol=1e-5)

    # The toy world's CLIP loads as it was trained (its entry leaves the key out), and the key is open_clip's alone.
    tiny = cb.validate(yaml.safe_load((ROOT / "config/tiny.yaml").read_text()))
    assert cb.clip_options(tiny) == {"quick_gelu": None}
    wrong = copy.deepcopy(study)
    wrong["models"]["dino"]["quick_gelu"] = True
    with pytest.raises(cb.ConfigError, match="models.dino.quick_gelu: only a model of kind open_clip"):
        cb.validate(wrong)


def test_dino_features_are_the_normalised_cls_token(models):
    from conceptbench.metrics.encoders import DinoEncoder

    enc = DinoEncoder.load(models["dino"], "cpu")
    images = [natural("chelsea"), natural("coffee")]
    feats = enc.encode_images(images)
    with torch.inference_mode():
        pixels = enc.processor(images=images, return_tensors="pt")["pixel_values"]
        hidden = enc.model(pixel_values=pixels).last_hidden_state  # already layer-normed
    torch.testing.assert_close(feats, torch.nn.functional.normalize(hidden[:, 0], dim=-1))


def test_batching_does_not_change_embeddings(models):
    from conceptbench.metrics.encoders import ClipEncoder

    images = [natural(n) for n in ("chelsea", "coffee", "astronaut")]
    texts = ["a cat", "a cup of coffee", "an astronaut"]
    one, many = ClipEncoder.load(models["clip"], "cpu", batch_size=1), ClipEncoder.load(models["clip"], "cpu")
    torch.testing.assert_close(one.encode_images(images), many.encode_images(images))
    torch.testing.assert_close(one.encode_texts(texts), many.encode_texts(texts))
    assert many.encode_texts(texts).shape == (3, 32)


# --- evaluate -------------------------------------------------------------------------------


def test_embed_references_one_unit_row_per_png(models, subject, tmp_path):
    from conceptbench.metrics.evaluate import embed_references, load_references, score_references

    out = embed_references(subject, models["clip"], models["dino"], tmp_path / "refs.safetensors", "cpu")
    clip, dino, files = load_references(out)
    assert files == ["astronaut.png", "chelsea.png", "coffee.png"]
    assert clip.shape == (3, 32) and dino.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(clip, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(dino, axis=1), 1.0, atol=1e-5)
    loo = score_references(out, tmp_path / "upper.csv")
    assert list(loo.columns) == ["file", "clip_i", "dino_i"] and len(loo) == 3
    assert (tmp_path / "upper.csv").is_file()


@pytest.fixture
def samples(tmp_path):
    """A samples folder: two natural images, one of them a reference, and one black image."""
    folder = tmp_path / "samples"
    (folder / "images").mkdir(parents=True)
    natural("chelsea").save(folder / "images" / "0.png")
    natural("rocket").save(folder / "images" / "1.png")
    Image.new("RGB", (64, 64)).save(folder / "images" / "2.png")
    prompts = [("a photo of <sks> cat", "a photo of a cat"), ("a <sks> rocket in space", "a rocket in space")]
    rows = [
        {"file": f"images/{i}.png", "prompt": prompts[i % 2][0], "eval_prompt": prompts[i % 2][1],
         "prompt_index": i % 2, "seed": i}
        for i in range(3)
    ]
    write_jsonl(folder / "samples.jsonl", rows)
    return folder


def test_clip_t_matches_open_clip_directly(models, samples, tmp_path):
    import open_clip

    from conceptbench.io import read_jsonl
    from conceptbench.metrics.evaluate import evaluate_samples

    df = evaluate_samples(samples, None, models["clip"], None, None, tmp_path / "m.csv", device="cpu")

    name = f"local-dir:{models['clip']}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    rows = read_jsonl(samples / "samples.jsonl")
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(samples / r["file"]).convert("RGB")) for r in rows])
        img = model.eval().encode_image(pixels)
        txt = model.encode_text(tokenizer([r["eval_prompt"] for r in rows]))
        raw = model.encode_text(tokenizer([r["prompt"] for r in rows]))
    img, txt, raw = (t / t.norm(dim=-1, keepdim=True) for t in (img, txt, raw))
    expected = (img * txt).sum(-1).numpy()
    np.testing.assert_allclose(df["clip_t"].to_numpy(), expected, atol=1e-5)
    assert not np.allclose(df["clip_t"].to_numpy(), (img * raw).sum(-1).numpy(), atol=1e-5)  # eval_prompt used


def test_evaluate_samples_writes_every_column(models, subject, samples, tmp_path, monkeypatch):
    import pandas as pd

    from conceptbench.metrics import evaluate
    from conceptbench.metrics.aesthetic import load_aesthetic
    from conceptbench.metrics.encoders import ClipEncoder
    from conceptbench.metrics.evaluate import COLUMNS, embed_references, evaluate_samples, load_references

    refs = embed_references(subject, models["clip"], models["dino"], tmp_path / "refs.safetensors", "cpu")
    out = tmp_path / "metrics.csv"
    monkeypatch.setattr(evaluate, "CHUNK", 2)  # 3 samples: two chunks
    df = evaluate_samples(samples, refs, models["clip"], models["dino"], models["aesthetic"], out, device="cpu")

    assert list(df.columns) == COLUMNS and len(df) == 3
    assert df["degenerate"].tolist() == [False, False, True]
    assert df[["clip_t", "clip_i", "dino_i", "aesthetic"]].notna().all().all()  # degenerate rows scored too
    written = pd.read_csv(out)
    assert list(written.columns) == COLUMNS
    np.testing.assert_allclose(written["clip_i"], df["clip_i"])

    # sample 0 is reference chelsea.png: its score is (1 + its leave-one-out score * (N-1)) / N
    clip, dino, files = load_references(refs)
    k, n = files.index("chelsea.png"), len(files)
    for col, embeds in (("clip_i", clip), ("dino_i", dino)):
        expected = (1 + scores.leave_one_out(embeds)[k] * (n - 1)) / n
        assert df[col][0] == pytest.approx(expected, abs=1e-5)

    # aesthetic is the LAION head on the unit-norm CLIP image embedding
    images = [Image.open(samples / f).convert("RGB") for f in df["file"]]
    embeds = ClipEncoder.load(models["clip"], "cpu").encode_images(images)
    with torch.no_grad():
        expected = load_aesthetic(models["aesthetic"])(embeds).numpy()
    np.testing.assert_allclose(df["aesthetic"], expected, atol=1e-5)


def test_aesthetic_scorer_normalises_and_checks_width(models):
    from conceptbench.metrics.aesthetic import load_aesthetic
    from conceptbench.metrics.encoders import AestheticScorer

    scorer = AestheticScorer.load(models["aesthetic"], "cpu")
    unit = torch.nn.functional.normalize(torch.randn(4, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    with torch.no_grad():
        expected = load_aesthetic(models["aesthetic"])(unit)
    torch.testing.assert_close(scorer.score(7.0 * unit), expected)
    with pytest.raises(ValueError, match="expects 32-d"):
        scorer.score(torch.randn(2, 768))


def test_missing_references_leave_columns_empty(models, samples, tmp_path):
    import pandas as pd

    from conceptbench.metrics.evaluate import evaluate_samples

    out = tmp_path / "m.csv"
    evaluate_samples(samples, None, models["clip"], models["dino"], None, out, device="cpu")
    written = pd.read_csv(out)
    assert written[["clip_i", "dino_i", "aesthetic"]].isna().all().all()
    assert written["clip_t"].notna().all()
    assert ",,," in out.read_text().splitlines()[1]  # empty cells, not "nan"


def test_samples_jsonl_missing_key_is_reported(models, samples, tmp_path):
    from conceptbench.metrics.evaluate import evaluate_samples

    rows = [json.loads(line) for line in (samples / "samples.jsonl").read_text().splitlines()]
    del rows[1]["eval_prompt"]
    write_jsonl(samples / "samples.jsonl", rows)
    with pytest.raises(ValueError, match="row 2 lacks eval_prompt"):
        evaluate_samples(samples, None, models["clip"], None, None, tmp_path / "m.csv", device="cpu")


def test_the_prior_probe_is_scored_against_the_class_images(models, subject, samples, tmp_path):
    """class_clip_i and class_dino_i: the class prompt's samples (prompt_set "prior") against the class
    images; empty for the evaluation prompts' samples, which have their own subject scores."""
    from conceptbench.metrics.evaluate import embed_references, evaluate_samples, load_references

    rows = [json.loads(line) for line in (samples / "samples.jsonl").read_text().splitlines()]
    rows[1]["prompt_set"] = "prior"  # the rocket
    write_jsonl(samples / "samples.jsonl", rows)
    classes = tmp_path / "class_images"
    classes.mkdir()
    for name in ("rocket", "coffee", "camera"):
        natural(name).save(classes / f"{name}.png")
    refs = embed_references(subject, models["clip"], models["dino"], tmp_path / "refs.safetensors", "cpu")
    class_refs = embed_references(classes, models["clip"], models["dino"], tmp_path / "class.safetensors", "cpu")
    df = evaluate_samples(samples, refs, models["clip"], models["dino"], None, tmp_path / "m.csv", device="cpu",
                          class_refs_path=class_refs)
    assert df["prompt_set"].tolist() == ["eval", "prior", "eval"]
    assert df["class_clip_i"].isna().tolist() == df["class_dino_i"].isna().tolist() == [True, False, True]
    clip, dino, files = load_references(class_refs)
    k, n = files.index("rocket.png"), len(files)
    for col, embeds in (("class_clip_i", clip), ("class_dino_i", dino)):
        assert df[col][1] == pytest.approx((1 + scores.leave_one_out(embeds)[k] * (n - 1)) / n, abs=1e-5)
    assert df["clip_i"].notna().all()  # the prior probe is scored against the subject too: that is its drift
