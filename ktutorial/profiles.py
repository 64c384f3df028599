"""Profiles: named parameter sets that pick the model, the engine and the sizes of a run.

The same notebooks run for a reader with a GPU (profile `minimax-m2.1`) and in CI (profile
`tiny`); only the profile name differs, never an "am I in CI" branch.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ktutorial.errors import UserError


class BenchDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_lens: list[int]
    output_len: int
    repeats: int = 3
    warmup: int = 1


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    model: str  # "tiny" or a known model name (ktutorial.spec.known_models())
    engine: str  # "llamacpp" or "sglang-kt"
    served_model_name: str
    start_sglang: bool = False
    seed: int = 0
    model_dir: Optional[str] = None
    context_tokens: Optional[int] = None
    described_hardware: Optional[dict[str, Any]] = None
    llamacpp: dict[str, Any] = Field(default_factory=dict)
    # sglang-kt flags on top of the plan (flag -> value), e.g. the backends one host needs:
    # data, not code branches. They pass through the same validation as `--set`.
    sglang: dict[str, Any] = Field(default_factory=dict)
    bench: BenchDefaults
    sweep_spec: Optional[str] = None
    # Written by `ktutorial tune`: what its launches measured (the boundary, the first failing value
    # and why it failed, the records). Its `sglang:` values then launch even where the planner's
    # estimate says they do not fit: they were seen to fit on that machine.
    tuned: Optional[dict[str, Any]] = None

    def data_path(self, relative: str) -> Path:
        """A file shipped beside the profiles (sweep specs)."""
        return Path(str(resources.files("ktutorial") / "data" / relative))


def profile_names() -> list[str]:
    root = resources.files("ktutorial") / "data" / "profiles"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_profile(name_or_path: str) -> Profile:
    """A profile by name (shipped) or by path to a YAML file of the same shape."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text = path.read_text()
    else:
        names = profile_names()
        if name_or_path not in names:
            raise UserError(
                f"unknown profile {name_or_path!r}; known profiles: {', '.join(names)} "
                "(or pass the path of a .yaml profile)"
            )
        text = (resources.files("ktutorial") / "data" / "profiles" / f"{name_or_path}.yaml").read_text()
    try:
        return Profile.model_validate(yaml.safe_load(text))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                model = BenchDefaults if err["loc"][0] == "bench" else Profile
                problems.append(f"unknown key {where!r} (known: {', '.join(model.model_fields)})")
            else:
                problems.append(f"{where}: {err['msg']}")
        raise UserError(f"profile {name_or_path!r} is malformed: " + "; ".join(problems)) from exc
    except yaml.YAMLError as exc:
        raise UserError(f"profile {name_or_path!r} is not valid YAML: {exc}") from exc
