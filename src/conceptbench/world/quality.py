"""How good the toy world's models are, measured on what none of them was trained on.

`python -m conceptbench.world.quality [MODELS] [--out DIR]` prints one table (of the shipped models
when MODELS is not given):
- the oracle on clean held-out renders (every head);
- the autoencoder: PSNR and the oracle on its reconstructions (of held-out scenes, of the subjects, and
  of impostors: other classes in a subject's colours);
- the base model: the oracle on its samples of held-out captions (combinations no model saw);
- the toy CLIP: caption -> image retrieval top-1 among 100 held-out candidates;
- the toy DINO: is a subject view's nearest neighbour another view of that subject; does the decoder's
  drawing of a subject score nearer the subject's photographs than its drawing of a classmate or an impostor
  (the ranking DINO-I relies on);
- the aesthetic head: Spearman correlation with the ground truth on held-out renders.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from . import data as wd
from . import oracle as orc
from . import scene as sc

BARS = {  # (measure, minimum)
    "base background": 0.95,
    "base colour": 0.90,
    "base position": 0.85,
    "vae subject": 0.90,  # a subject drawn as well as the autoencoder can draw it reads as the subject,
    "vae impostor rejected": 0.90,  # and another class in its colours does not
    "clip retrieval top-1 of 100": 0.80,
    "dino subject nearest neighbour": 0.90,
    "dino drawn subject over drawn others": 0.90,  # DINO-I ranks the decoder's subject above its classmates, impostors
    "aesthetic spearman": 0.80,
}


def held_out_scenes(n: int, seed: int = 12345) -> list[sc.Scene]:
    """Single objects in (class, colour, background) combinations every model was kept from; full captions."""
    rng = wd.rng_for(seed, "held-out", 0)
    return [sc.sample_scene(rng, held_out=True, pair_p=0.0, omit_p=0.0) for _ in range(n)]


def sample(pipe, prompts: list[str], seed: int, steps: int = 30, guidance: float = 5.0, batch: int = 50) -> np.ndarray:
    out = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator().manual_seed(seed + i)
        imgs = pipe(prompts[i : i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=g,
                    output_type="np").images
        out.append(np.clip(np.rint(imgs * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def measure(root: Path, n: int = 200) -> dict:
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from ..metrics.encoders import AestheticScorer, ClipEncoder, DinoEncoder
    from PIL import Image

    root = Path(root)
    oracle = orc.Oracle.load(root / "oracle")
    res: dict[str, float] = {}

    scenes = held_out_scenes(n)
    truths = [orc.truth(s) for s in scenes]
    clean = wd.images(scenes)
    for k, v in orc.accuracy(oracle.read(list(clean)), truths).items():
        res[f"oracle clean {k}"] = v

    vae = AutoencoderKL.from_pretrained(str(root / "sd" / "vae")).eval()
    rec = wd.reconstruct(vae, clean)
    res["vae psnr"] = float(10 * np.log10(255.0**2 / np.mean((rec.astype(float) - clean.astype(float)) ** 2)))
    for k, v in orc.accuracy(oracle.read(list(rec)), truths, ["background", "colour", "position", "shape"]).items():
        res[f"vae {k}"] = v
    # The best any generator can draw a subject is the decoder's rendering of it: does the oracle read that?
    hits = []
    for k, subject in enumerate(sc.SUBJECTS):
        views = wd.reconstruct(vae, wd.images(sc.subject_views(subject, n // 4, seed=300 + k)))
        hits += [r["subject"] == subject for r in oracle.read(list(views))]
    res["vae subject"] = float(np.mean(hits))
    # and not another class in a subject's colours (oracle.impostor_scene)
    rng = wd.rng_for(0, "impostors", 0)
    fakes = wd.reconstruct(vae, wd.images([orc.impostor_scene(rng) for _ in range(n // 2)]))
    res["vae impostor rejected"] = float(np.mean([r["subject"] == "none" for r in oracle.read(list(fakes))]))

    pipe = StableDiffusionPipeline.from_pretrained(str(root / "sd"), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    gen = sample(pipe, [sc.caption(s) for s in scenes], seed=0)
    for k, v in orc.accuracy(oracle.read(list(gen)), truths).items():
        res[f"base {k}"] = v

    clip = ClipEncoder.load(root / "clip", device="cpu")
    rscenes = held_out_scenes(1000, seed=777)
    img_emb = clip.encode_images([Image.fromarray(im) for im in wd.images(rscenes)])
    txt_emb = clip.encode_texts([sc.caption(s) for s in rscenes])
    hits = []
    for g in range(0, len(rscenes), 100):
        sim = txt_emb[g : g + 100] @ img_emb[g : g + 100].T
        hits.append((sim.argmax(1) == torch.arange(len(sim))).float())
    res["clip retrieval top-1 of 100"] = float(torch.cat(hits).mean())

    dino = DinoEncoder.load(root / "dino", device="cpu")
    nn_hits, ranked = [], []
    for k, subject in enumerate(sc.SUBJECTS):
        views = sc.subject_views(subject, 8, seed=100 + k)
        rng = wd.rng_for(0, f"classmates-{subject}", 0)
        mates = [sc.sample_scene(rng, pair_p=0.0, accessory_p=0.0, style="photo") for _ in range(400)]
        mates = [m for m in mates if m.things[0].cls == sc.SUBJECTS[subject]["cls"]][:24]
        emb = dino.encode_images([Image.fromarray(im) for im in wd.images(views + mates)])
        sim = emb @ emb.T
        sim.fill_diagonal_(-2)
        nn_hits += (sim[: len(views)].argmax(1) < len(views)).tolist()
        # DINO-I's question about generated images, which are the decoder's: is its drawing of the subject
        # nearer the subject's photographs than its drawing of a classmate or of an impostor?
        drawn = wd.reconstruct(vae, wd.images(sc.subject_views(subject, 16, seed=500 + k)))
        impostors = []
        while len(impostors) < 16:
            fake = orc.impostor_scene(rng)
            if fake.style == "photo" and fake.accessory is None:
                impostors.append(fake)
        others = wd.reconstruct(vae, wd.images(mates + impostors))
        refs = emb[: len(views)]
        pos, neg = ((dino.encode_images([Image.fromarray(im) for im in x]) @ refs.T).mean(1) for x in (drawn, others))
        ranked.append((pos[:, None] > neg[None, :]).float().mean().item())
    res["dino subject nearest neighbour"] = float(np.mean(nn_hits))
    res["dino drawn subject over drawn others"] = float(np.mean(ranked))

    from .build import aesthetic_data, load_clip

    emb, target = aesthetic_data(load_clip(root / "clip"), 0, "aesthetic-test", 1000)
    head = AestheticScorer.load(root / "aesthetic", device="cpu")
    res["aesthetic spearman"] = spearman(head.score(emb).numpy(), target.numpy())
    return res


def table(res: dict) -> str:
    lines = ["| measure | value | bar |", "|---|---|---|"]
    for k, v in res.items():
        bar = BARS.get(k)
        mark = "" if bar is None else (f"≥ {bar:.2f} {'met' if v >= bar else 'NOT MET'}")
        lines.append(f"| {k} | {v:.3f} | {mark} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", type=Path, nargs="?", default=None,
                    help="a build folder (default: the models the repository ships)")
    ap.add_argument("--n", type=int, default=200, help="held-out captions sampled from the base model")
    ap.add_argument("--out", type=Path, default=None, help="write quality.json and quality.md here")
    args = ap.parse_args(argv)
    if args.models is None:
        import tempfile

        from .shipped import MODELS, install

        with tempfile.TemporaryDirectory() as tmp:
            for name in MODELS:
                install(name, Path(tmp) / name)
            res = measure(Path(tmp), args.n)
    else:
        res = measure(args.models, args.n)
    print(table(res))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quality.json").write_text(json.dumps(res, indent=2))
        (args.out / "quality.md").write_text(table(res) + "\n")


if __name__ == "__main__":
    main()
