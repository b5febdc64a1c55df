# Evaluation: reference embeddings once per subject (and once per experiment for its class images, which
# the prior probe's samples are compared with), then per-image CLIP-T, CLIP-I, DINO-I and aesthetic
# scores for each variant and baseline, with degenerate images flagged.


rule embed_references:
    input:
        unpack(reference_models),
        images=f"{RESULTS}/data/{{dataset}}",
    output:
        f"{RESULTS}/references/{{dataset}}.safetensors",
    params:
        clip=clip_options,
    log:
        f"{RESULTS}/logs/embed_references/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed_references/{{dataset}}.tsv"
    threads: host_threads(4)
    resources:
        gpu=1,
        gpu_model=gpu_model,
        mem_mb=host_mem_mb(16000),
        runtime=20,
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/embed_references.py"


rule embed_class_images:
    input:
        unpack(class_reference_inputs),
    output:
        f"{RESULTS}/references/class_images/{{experiment}}.safetensors",
    params:
        clip=clip_options,
    log:
        f"{RESULTS}/logs/embed_class_images/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed_class_images/{{experiment}}.tsv"
    threads: host_threads(4)
    resources:
        gpu=1,
        gpu_model=gpu_model,
        mem_mb=host_mem_mb(16000),
        runtime=20,
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/embed_references.py"


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        f"{RESULTS}/metrics/{{experiment}}/{{variant}}.csv",
    params:
        subject=world_subject,
        clip=clip_options,
    log:
        f"{RESULTS}/logs/evaluate/{{experiment}}/{{variant}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{experiment}}/{{variant}}.tsv"
    threads: host_threads(4)
    resources:
        gpu=1,
        gpu_model=gpu_model,
        mem_mb=host_mem_mb(16000),
        runtime=30,
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/evaluate.py"
