"""ddpm-lab: ablation experiments for conditional DDPMs on i-CLEVR."""
