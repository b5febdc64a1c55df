# Data: fetch (hub) or read (local folder, scikit-image), check every image, write RGB PNGs;
# then the images each experiment adds: class images for prior preservation.


rule fetch_dataset:
    output:
        directory(f"{RESOURCES}/datasets/hub/{{dataset}}"),
    params:
        spec=dataset_spec,
    log:
        f"{RESULTS}/logs/fetch_dataset/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/fetch_dataset/{{dataset}}.tsv"
    resources:
        mem_mb=4000,
        runtime=240,
    # Downloads need the internet, which compute nodes often lack (config cluster.fetch_on_submit_host).
    localrule: config["cluster"]["fetch_on_submit_host"]
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/fetch_dataset.py"


rule prepare_dataset:
    input:
        unpack(raw_dataset),
    output:
        directory(f"{RESULTS}/data/{{dataset}}"),
    params:
        spec=dataset_spec,
    log:
        f"{RESULTS}/logs/prepare_dataset/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare_dataset/{{dataset}}.tsv"
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/prepare_dataset.py"


rule generate_class_images:
    input:
        base=base_model_of,
    output:
        directory(f"{RESULTS}/class_images/{{experiment}}"),
    params:
        cfg=class_image_params,
    log:
        f"{RESULTS}/logs/generate_class_images/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/generate_class_images/{{experiment}}.tsv"
    threads: host_threads(4)
    resources:
        gpu=1,
        gpu_model=gpu_model,
        mem_mb=host_mem_mb(32000),
        runtime=60,
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/generate_class_images.py"
