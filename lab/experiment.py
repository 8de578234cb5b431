"""One experiment, or the same one over several seeds: prepare, train, summarise."""
from lab.trainer import prepare, train


def run(config, config_path, seeds=None, fresh=False, device=None, **train_kwargs):
    """Train `config` once, or once per seed with run names `<name>-seed<k>` and a shared group tag."""
    if not seeds:
        return [train(prepare(config, config_path, device), fresh=fresh, **train_kwargs)]
    summaries = []
    for seed in seeds:
        seeded = config.model_copy(update={"seed": seed, "run_name": f"{config.run_name}-seed{seed}"})
        tags = {"group": config.run_name, **train_kwargs.pop("extra_tags", {})}
        summaries.append(train(prepare(seeded, config_path, device), fresh=fresh, extra_tags=tags, **train_kwargs))
    return summaries


def print_summaries(summaries):
    for s in summaries:
        if s.get("run_id") is None:  # a data-parallel worker other than the main process
            continue
        scores = ", ".join(f"{k} {v:.3f}" for k, v in s.items() if k.endswith("accuracy"))
        print(f"MLflow run {s['run_id']}: {s['steps']} steps; {scores}; best checkpoint {s['best_checkpoint']}")
