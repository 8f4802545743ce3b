"""dvc.yaml matches the code: every module a stage runs is among its deps, so `dvc repro` reruns what changed."""

import re
from pathlib import Path

import pytest
import yaml

from aesr1.cli import STAGES
from aesr1.lineage import import_closure
from aesr1.stage import stage_modules

REPO = Path(__file__).resolve().parents[1]


def resolved_deps(stage: dict, params: dict) -> list[str]:
    def lookup(match):
        value = params
        for key in match.group(1).split("."):
            value = value[key]
        return str(value)

    return [re.sub(r"\$\{([^}]+)\}", lookup, dep) for dep in stage.get("deps", [])]


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.fixture(scope="module")
def pipeline():
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"], yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_depends_on_every_module_it_runs(stage, pipeline):
    stages, params = pipeline
    assert stages[stage]["cmd"].split()[-1] == stage
    deps = resolved_deps(stages[stage], params)
    closure = import_closure(stage_modules(STAGES[stage][0]))
    missing = sorted(p for p in closure if not covered(p, deps))
    assert not missing, f"dvc.yaml stage '{stage}' runs {missing} but does not depend on them"
    code_deps = [d for d in deps if d.startswith("aesr1")]
    assert all((REPO / d).exists() for d in code_deps), [d for d in code_deps if not (REPO / d).exists()]
    unused = sorted(d for d in code_deps if not d.startswith("aesr1/templates/") and d not in closure)
    assert not unused, f"dvc.yaml stage '{stage}' depends on {unused}, which it does not run (a folder: name its files)"


def test_the_closure_sees_function_level_imports_and_a_missing_dep_fails():
    closure = import_closure(["aesr1.inference"])  # it imports the policy inside functions
    assert "aesr1/policy/generation.py" in closure
    assert not covered("aesr1/rl/rewards.py", ["aesr1/rl/rl.py"]) and covered("aesr1/rl/rewards.py", ["aesr1/rl"])


def test_comments_name_files_that_exist():
    named = re.findall(r"#.*?\(((?:flows|aesr1|tasks|tests)/[\w/]+\.py)\)", (REPO / "dvc.yaml").read_text())
    assert all((REPO / path).is_file() for path in named), named


def test_every_params_dep_is_a_key_params_yaml_has(pipeline):
    """DVC refuses to run a stage whose params dep is missing from params.yaml; a recipe's keys are not there, so
    a stage reading one depends on the nearest mapping params.yaml has (and on configs/recipes)."""
    from aesr1.config import lookup

    stages, params = pipeline
    for name, stage in stages.items():
        for key in stage.get("params", []):
            assert isinstance(key, str), (name, key)  # params from params.yaml only
            lookup(params, key)  # KeyError: DVC would stop with "Parameters ... are missing"


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "configs/recipes").glob("*.yaml")))
def test_a_deepspeed_config_a_recipe_names_is_a_dep_of_the_stage_that_trains_with_it(recipe, pipeline):
    """Editing the JSON reruns the stage and changes its run-cache key (a GPU worker's run is found by it)."""
    from aesr1.config import lookup

    stages, params = pipeline
    data = yaml.safe_load((REPO / "configs/recipes" / recipe).read_text())
    for stage, key in (("sft", "sft.train.trl.deepspeed"), ("rl", "rl.grpo.trl.deepspeed")):
        try:
            named = lookup(data, key)
        except KeyError:
            continue
        if isinstance(named, str):
            assert covered(named, resolved_deps(stages[stage], params)), f"{stage} does not depend on {named}"
