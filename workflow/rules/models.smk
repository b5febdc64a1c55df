# Models: the toy world's (the embedded default), built tiny from configs (random weights, for tests)
# or fetched from the hub at a pinned revision.
# A model given as `path:` is a plain input folder and needs no rule.


rule build_tiny_model:
    output:
        directory(f"{RESOURCES}/models/tiny/{{model}}"),
    params:
        spec=model_spec,
    log:
        f"{RESULTS}/logs/build_tiny_model/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/build_tiny_model/{{model}}.tsv"
    resources:
        mem_mb=4000,
        runtime=10,
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/build_tiny_model.py"


rule install_world_model:
    input:
        shipped_world_files,
    output:
        directory(f"{RESOURCES}/models/world/{{model}}"),
    params:
        spec=model_spec,
    log:
        f"{RESULTS}/logs/install_world_model/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/install_world_model/{{model}}.tsv"
    resources:
        mem_mb=2000,
        runtime=5,
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/install_world_model.py"


rule fetch_model:
    output:
        directory(f"{RESOURCES}/models/hub/{{model}}"),
    params:
        spec=model_spec,
    log:
        f"{RESULTS}/logs/fetch_model/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/fetch_model/{{model}}.tsv"
    resources:
        mem_mb=8000,
        runtime=120,
    # Downloads need the internet, which compute nodes often lack (config cluster.fetch_on_submit_host).
    localrule: config["cluster"]["fetch_on_submit_host"]
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/fetch_model.py"
