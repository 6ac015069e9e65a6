"""The pipeline's human-feedback step (`feedback.labeler = "human"`).

First call: sample K completions per prompt from the policy, create the project, print how to start the
server and invite people, return None (the pipeline stops and says to rerun later). Later calls: once
`items_required` items have all `overlap` answers, export them and return the export directory, which
holds comparisons.jsonl + rankings.jsonl in the trainers' format; until then print progress, return None.
"""

from __future__ import annotations

from pathlib import Path

from rlhfkit.core.errors import ConfigError
from rlhfkit.labelapp import db, project, stats
from rlhfkit.labelapp.cli import DEFAULT_HOST, DEFAULT_PORT, lead_invitation_if_needed
from rlhfkit.labelapp.export import export_project


def human_feedback(project_dir: Path, *, policy_dir: Path, prompts: list[str], k: int, overlap: int,
                   items_required: int, criteria: list[str], seed: int, max_new_tokens: int = 32,
                   temperature: float = 1.0, device: str = "auto", sampling=None) -> Path | None:
    """One step of the human-feedback stage (see the module docstring); `temperature`, `device` and `sampling`
    are the run's (`feedback.temperature`, `device`, the [sampling] section as rlhfkit.models.sampling.SamplingParams),
    so people rank what the simulated path would sample."""
    project_dir = Path(project_dir)
    if not db.db_path(project_dir).is_file() or _settings(project_dir) is None:
        settings = project.ProjectSettings(name=project_dir.resolve().name, criteria=list(criteria), k=k,
                                           overlap=overlap).validate()
        items = project.sample_items(policy_dir, prompts, k, seed=seed, max_new_tokens=max_new_tokens,
                                     temperature=temperature, device=device, sampling=sampling)
        project.create_project(project_dir, settings, items, source=str(policy_dir))
        link = lead_invitation_if_needed(project_dir, f"http://{DEFAULT_HOST}:{DEFAULT_PORT}")
        print(f"human feedback: created labeling project {project_dir} with {len(items)} items "
              f"(K={k}, overlap={overlap}, criteria={', '.join(criteria)}).")
        print(f"  start the app:      rlhfkit label serve {project_dir}")
        if link:
            print(f"  lead's sign-up:     {link}")
        print(f"  invite labelers:    rlhfkit label add-labeler {project_dir} NAME")
        print(f"  then rerun `rlhfkit run`; it continues once {items_required} items are fully labeled.")
        return None
    with db.opened(project_dir) as conn:
        settings = project.get_settings(conn)
        done = stats.items_complete(conn, settings.overlap)
    if settings.mode != "ranking":  # the stage's next step trains a reward model on comparisons
        raise ConfigError(f"{project_dir}: a {settings.mode} project gives no comparisons; the human feedback stage "
                          "needs a ranking project (export a thumbs project with `rlhfkit label export` and train "
                          "KTO on it with kto.data)")
    if done < items_required:
        print(f"human feedback: {done}/{items_required} items fully labeled in {project_dir}; "
              f"labelers keep going at `rlhfkit label serve {project_dir}`, then rerun.")
        return None
    out = project_dir / "export"
    summary = export_project(project_dir, out, complete_only=True)
    print(f"human feedback: {done} items complete; exported {summary['comparisons']} comparisons to {out}")
    return out


def _settings(project_dir: Path):
    with db.opened(project_dir) as conn:
        return project.get_settings(conn)
