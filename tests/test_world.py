"""The toy world: its scenes, its oracle, its builder end to end, and the shipped models' quality."""

import numpy as np
import pytest
import torch

from conceptbench.world import data as wd
from conceptbench.world import oracle as orc
from conceptbench.world import scene as sc
from conceptbench.world import shipped


def scenes(n, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return [sc.sample_scene(rng, **kw) for _ in range(n)]


def test_render_is_deterministic_and_small():
    s = scenes(1, seed=3)[0]
    a, b = sc.render(s), sc.render(sc.Scene.from_json(s.to_json()))
    assert a.shape == (sc.SIZE, sc.SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)


def test_captions_name_what_is_drawn():
    rng = np.random.default_rng(0)
    s = sc.sample_scene(rng, pair_p=0.0, omit_p=0.0, accessory_p=1.0, style="cartoon")
    t = s.things[0]
    text = sc.caption(s)
    assert text.startswith("a cartoon of")
    for words in (t.colour, t.cls, sc.POSITIONS[t.cell], s.background):
        assert words in text
    if s.accessory:
        assert sc.ACCESSORIES[s.accessory][0] in text


def test_held_out_combinations_never_reach_training_draws():
    train = [s for s in scenes(600, pair_p=0.0) if s.things[0].subject is None]
    held = scenes(200, seed=1, pair_p=0.0, held_out=True)
    assert not any(sc.is_held_out(s.things[0], s.background) for s in train)
    assert all(sc.is_held_out(s.things[0], s.background) for s in held)


def test_subjects_wear_what_no_base_object_has():
    base = {s.things[0].paint()[0] for s in scenes(300, pair_p=0.0)}
    for subject in sc.SUBJECTS:
        assert sc.SUBJECTS[subject]["body"] not in base
        views = sc.subject_views(subject, 4, seed=1)
        assert len({(v.things[0].cell, v.background) for v in views}) > 1  # several views, not one picture


def test_analytic_oracle_is_exact_on_clean_renders():
    rng = np.random.default_rng(7)
    drawn = [orc.training_scene(rng) for _ in range(300)]
    reads = [orc.read_object(sc.render(s)) for s in drawn]
    acc = orc.accuracy(reads, [orc.truth(s) for s in drawn], ["background", "colour", "position"])
    assert acc == {"background": 1.0, "colour": 1.0, "position": 1.0}


def test_an_impostor_wears_a_subjects_colours_on_another_shape_and_is_labelled_no_subject():
    rng = np.random.default_rng(5)
    for s in (orc.impostor_scene(rng) for _ in range(60)):
        t = s.things[0]
        spec = next(spec for spec in sc.SUBJECTS.values() if spec["body"] == t.colour)
        assert t.cls != spec["cls"] and (t.mark, t.marking) == (spec["mark"], spec["marking"])
        assert orc.labels(s)["subject"] == orc.HEADS["subject"].index("none")
        assert orc.labels(s)["shape"] == orc.HEADS["shape"].index(t.cls)
        assert s.accessory not in sc.WORN or t.cls in sc.WEARERS  # as in the base world


def test_analytic_oracle_says_so_when_there_is_no_object():
    empty = np.empty((sc.SIZE, sc.SIZE, 3), np.uint8)
    empty[:] = sc.BACKGROUNDS["at night"]
    read = orc.read_object(empty)
    assert read["background"] == "at night" and read["colour"] is None and read["position"] is None


def test_the_oracles_prompt_accuracy_is_the_share_of_what_the_prompt_names_that_it_reads():
    class Reads:  # an oracle that reads what it is told to
        def __init__(self, reads):
            self.reads = reads

        def read(self, images):
            return self.reads

    prompt = "a photo of a red ball at the top on the beach"
    asked = sc.parse_prompt(prompt)
    assert set(asked) >= {"colour", "shape", "position", "background"}
    named = [a for a in orc.ATTRIBUTES if a in asked]
    right = {**asked, "shape": "box", "colour": None}  # two of what it names wrong
    img = np.zeros((sc.SIZE, sc.SIZE, 3), np.uint8)
    out = orc.score_images(Reads([right, asked]), [img, img], [prompt, prompt], None)
    assert out["oracle_prompt"][0] == pytest.approx((len(named) - 2) / len(named))
    assert out["oracle_prompt"][1] == 1.0
    out = orc.score_images(Reads([right]), [img], ["a photo"], None)  # names none of them
    assert np.isnan(out["oracle_prompt"][0])


def test_ground_truth_aesthetic_prefers_big_centred_contrasting_objects():
    good = sc.Scene([sc.Thing("ball", "yellow", radius=7.5, cx=16, cy=16, cell=(1, 1))], "at night")
    bad = sc.Scene([sc.Thing("ball", "blue", radius=4.7, cx=7, cy=7, cell=(0, 0))], "at night", accessory="bucket")
    assert sc.aesthetic(good) > sc.aesthetic(bad) + 3


def test_world_datasets_prepare_like_any_other(tmp_path):
    from conceptbench.data import prepare_dataset, read_prepared

    spec = {"kind": "captions", "world": {"set": "style", "count": 6, "seed": 3}, "resolution": 32, "min_side": 32,
            "max_images": 100}
    rows = prepare_dataset("naruto", spec, None, tmp_path / "style")
    assert len(rows) == 6 and all(r["text"] for r in rows)
    assert sum("ninja style" in r["text"] for r in rows) == 3  # half name the style
    subj = {"kind": "subject", "world": {"set": "subject", "subject": "dog", "count": 3, "seed": 1}, "resolution": 32,
            "min_side": 32, "max_images": 100}
    prepare_dataset("dog", subj, None, tmp_path / "dog")
    pairs = read_prepared(tmp_path / "dog")
    read = orc.read_object(np.asarray(__import__("PIL.Image").Image.open(pairs[0][0])))
    assert read["colour"] == "subject:dog"


def test_clip_text_tower_becomes_sd_text_encoder_with_the_same_numbers():
    import open_clip

    from conceptbench.world.build import CLIP, clip_text_to_transformers

    torch.manual_seed(0)
    model = open_clip.CLIP(**CLIP).eval()
    with torch.no_grad():  # make the layer norms and biases non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    te = clip_text_to_transformers(model)
    ids = open_clip.tokenize(["a photo of a red dog at the top left on the beach"])
    with torch.no_grad():
        x = model.token_embedding(ids) + model.positional_embedding
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        ours = te(ids).last_hidden_state
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-4)


def test_the_builder_stops_waiting_when_the_worker_it_waits_for_fails(tmp_path, monkeypatch):
    """In a parallel build the U-Net waits for the VAE a worker builds; if that worker dies, the wait ends
    with its exit, not never."""
    from conceptbench.world import build

    class Exited:
        def __init__(self, code):
            self.code = code

        def poll(self):
            return self.code

    naps = []

    def sleep(seconds):  # a wait that never ends fails here instead of hanging
        naps.append(seconds)
        assert len(naps) < 5, "still waiting for a stage whose worker has failed"

    monkeypatch.setattr(build.time, "sleep", sleep)
    (tmp_path / "clip").mkdir()
    build._wait_for(tmp_path, ["clip"], poll=0.0, procs=[Exited(1)])  # nothing awaited: no check, no error
    with pytest.raises(SystemExit, match="worker of the build failed while vae was awaited"):
        build._wait_for(tmp_path, ["vae", "clip"], poll=0.0, procs=[Exited(None), Exited(1)])


def test_the_unet_takes_every_core_only_once_the_workers_are_done(monkeypatch):
    """Two torch threads beside a one-thread worker oversubscribe two cores: the main process runs on one
    thread while any worker lives, and on all of its cores once none does."""
    from conceptbench.world import build

    class Worker:
        code = None

        def poll(self):
            return self.code

    threads = [4]
    monkeypatch.setattr(build.torch, "get_num_threads", lambda: threads[-1])
    monkeypatch.setattr(build.torch, "set_num_threads", threads.append)
    a, b = Worker(), Worker()
    share = build.CoreShare([a, b], cores=4)
    assert share() == 1 and threads == [4, 1]
    a.code = 0
    assert share() == 1 and threads == [4, 1]  # one worker still runs
    b.code = 0
    assert share() == 4 and threads == [4, 1, 4]
    assert share() == 4 and threads == [4, 1, 4]  # nothing set again
    threads.append(1)
    assert build.CoreShare([], cores=4)() == 1  # a worker, or a build without workers, keeps its threads

    asked = []  # and training asks it as it goes, not once
    monkeypatch.setattr(build, "SHARE", lambda: asked.append(1))
    w = torch.nn.Parameter(torch.ones(2))
    build.fit("t", [w], 41, 1e-2, lambda step: (w * w).sum())
    assert len(asked) == 3  # steps 0, 20, 40


def test_a_twin_differs_from_its_scene_in_one_attribute_and_in_its_caption_only_there():
    from conceptbench.world import build

    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sc.sample_scene(rng, pair_p=0.0, omit_p=0.0, accessory_p=0.0)
        thing = scene.things[0]
        before = (thing.cell, thing.cx, thing.cy, thing.cls, sc.caption(scene))
        twin = build.attribute_twin(rng, scene, "position")
        (r, c), (r2, c2) = thing.cell, twin.things[0].cell
        assert abs(r - r2) + abs(c - c2) == 1  # a neighbouring cell, never the same one
        assert sc.cell_of(twin.things[0].cx, twin.things[0].cy) == (r2, c2)  # drawn where its caption says
        assert sc.caption(scene).replace(sc.POSITIONS[(r, c)], sc.POSITIONS[(r2, c2)]) == sc.caption(twin)

        twin = build.attribute_twin(rng, scene, "shape")
        other = twin.things[0]
        assert other.cls != thing.cls and not sc.is_held_out(other, twin.background)
        assert (other.cell, other.cx, other.radius, other.colour) == (thing.cell, thing.cx, thing.radius, thing.colour)
        words = [other.cls if w == thing.cls else w for w in sc.caption(scene).split()]
        assert " ".join(words) == sc.caption(twin)
        assert not np.array_equal(sc.render(scene), sc.render(twin))  # drawn as the other class
        assert (thing.cell, thing.cx, thing.cy, thing.cls, sc.caption(scene)) == before  # the scene is left as it was


def test_the_clip_batches_twins_stay_out_of_the_held_out_combinations_and_off_the_subjects():
    from conceptbench.world import build

    rng = np.random.default_rng(1)
    pool = [build.clip_scene(rng) for _ in range(400)]
    index, twins, kinds = build.twin_pool(0, pool, 40)
    assert kinds.count("position") == kinds.count("shape") == 40
    for i, twin, kind in zip(index, twins, kinds):
        scene = pool[i]
        assert len(scene.things) == 1 and scene.things[0].subject is None
        assert not sc.is_held_out(twin.things[0], twin.background)
        assert sc.caption(twin) != sc.caption(scene)
        if kind == "shape":
            assert scene.accessory not in sc.WORN  # sunglasses and bandanas are worn by dogs and toys alone
        else:
            assert scene.say["position"]


def test_the_dino_sees_about_half_its_views_as_the_autoencoder_draws_them_and_the_rest_clean():
    from diffusers import AutoencoderKL

    from conceptbench.world import build

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)).eval()
    clean = build.identity_views(np.random.default_rng(3), 64)
    views = build.dino_views(np.random.default_rng(3), 64, vae)
    for c, v in zip(clean, views):
        same = (c == v).all(axis=(1, 2, 3))
        assert 0.3 < same.mean() < 0.7  # DINO_RECONSTRUCTED of them, drawn for each view on its own
        np.testing.assert_array_equal(v[~same], wd.reconstruct(vae, c[~same]))
    # the two views of a pair are picked apart: some pairs are clean beside drawn
    assert ((clean[0] == views[0]).all(axis=(1, 2, 3)) != (clean[1] == views[1]).all(axis=(1, 2, 3))).any()


@pytest.fixture(scope="module")
def reduced_world(tmp_path_factory):
    """The whole builder at its reduced size, end to end (models that load and run, not good ones)."""
    from conceptbench.world import build

    out = tmp_path_factory.mktemp("world")
    sizes = build.Sizes(vae_steps=3, vae_batch=4, clip_steps=3, clip_batch=8, unet_steps=3, unet_batch=4, unet_pool=32,
                        dino_steps=2, dino_batch=4, aesthetic_samples=32, oracle_steps=2, oracle_batch=8)
    build.SIZES["test"] = sizes
    try:
        build.main([str(out / "built"), "--size", "test", "--threads", "1"])
    finally:
        del build.SIZES["test"]
    return out


def test_reduced_build_writes_every_model_in_its_loader_layout(reduced_world):
    from diffusers import StableDiffusionPipeline

    from conceptbench.metrics.encoders import AestheticScorer, ClipEncoder, DinoEncoder

    built = reduced_world / "built"
    pipe = StableDiffusionPipeline.from_pretrained(str(built / "sd"), safety_checker=None)
    img = pipe("a photo of a red dog", num_inference_steps=2, output_type="np").images[0]
    assert img.shape == (sc.SIZE, sc.SIZE, 3)
    clip = ClipEncoder.load(built / "clip", device="cpu")
    assert clip.encode_texts(["a red dog"]).shape == (1, clip.dim)
    assert DinoEncoder.load(built / "dino", device="cpu").encode_images(
        [__import__("PIL.Image").Image.fromarray(sc.render(scenes(1)[0]))]).shape[0] == 1
    assert AestheticScorer.load(built / "aesthetic", device="cpu").in_dim == clip.dim
    assert set(orc.Oracle.load(built / "oracle").read([sc.render(scenes(1)[0])])[0]) >= set(orc.HEADS)


def test_export_then_install_round_trips_in_fp32(reduced_world):
    from safetensors.torch import load_file

    built = reduced_world / "built"
    dest = shipped.export(built, reduced_world / "shipped")
    half = load_file(str(dest / "sd" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float16 for v in half.values() if v.is_floating_point())
    assert not (dest / "sd" / "tokenizer").exists()  # rebuilt from open_clip's BPE file on install
    inst = shipped.install("sd", reduced_world / "installed", shipped=dest, kind="diffusion")
    full = load_file(str(inst / "unet" / "diffusion_pytorch_model.safetensors"))
    orig = load_file(str(built / "sd" / "unet" / "diffusion_pytorch_model.safetensors"))
    for k, v in orig.items():
        assert full[k].dtype == torch.float32
        torch.testing.assert_close(full[k], v.half().float())
    assert (inst / "tokenizer" / "vocab.json").exists()
    with pytest.raises(ValueError, match="is a diffusion model, not kind 'open_clip'"):
        shipped.install("sd", reduced_world / "x", shipped=dest, kind="open_clip")


SHIPPED_WORLD = pytest.mark.skipif(not (shipped.SHIPPED / "sd").is_dir(), reason="the toy world is not built (make world)")


@pytest.fixture(scope="module")
def shipped_quality(tmp_path_factory):
    from conceptbench.world import quality

    root = tmp_path_factory.mktemp("world")
    for name in shipped.MODELS:
        shipped.install(name, root / name)
    return quality.measure(root, n=200)


@SHIPPED_WORLD
def test_shipped_world_meets_its_quality_bars(shipped_quality):
    from conceptbench.world import quality

    res = shipped_quality
    short = {k: (res[k], bar) for k, bar in quality.BARS.items() if res[k] < bar}
    assert not short, f"below the bars: {short}\n{quality.table(res)}"
    # The oracle itself must read clean renders near perfectly before it can judge anything else.
    assert min(v for k, v in res.items() if k.startswith("oracle clean") and not k.endswith("accessory")) >= 0.95
