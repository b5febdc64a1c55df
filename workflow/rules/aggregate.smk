# Aggregation, plots and report items. These jobs import no torch: they start in a second.


rule aggregate:
    input:
        metrics=variant_files(f"{RESULTS}/metrics/{{experiment}}/{{variant}}.csv"),
        train=variant_files(f"{RESULTS}/train/{{experiment}}/{{variant}}/train.json"),
        samples=variant_files(f"{RESULTS}/samples/{{experiment}}/{{variant}}"),
    output:
        csv=report(
            f"{RESULTS}/tables/summary.csv",
            caption="../report/summary.rst",
            category="Summary",
            labels={"table": "summary (CSV)"},
        ),
        md=f"{RESULTS}/tables/summary.md",
    params:
        experiments=experiment_table,
    log:
        f"{RESULTS}/logs/aggregate/aggregate.log",
    benchmark:
        f"{RESULTS}/benchmarks/aggregate/aggregate.tsv"
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/aggregate.py"


rule plot_sweep:
    input:
        summary=f"{RESULTS}/tables/summary.csv",
        metrics=experiment_metric_files,
    output:
        report(
            f"{RESULTS}/plots/{{experiment}}.png",
            caption="../report/sweep.rst",
            category="{experiment}",
            subcategory="Sweep",
            labels={"figure": "metrics vs swept value"},
        ),
    params:
        experiment=experiment_info,
    log:
        f"{RESULTS}/logs/plot_sweep/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/plot_sweep/{{experiment}}.tsv"
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/plot_sweep.py"
