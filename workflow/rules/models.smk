# Models: built tiny from configs (the embedded default) or fetched from the hub at a pinned revision.
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
