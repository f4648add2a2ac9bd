"""Write schemas/json/<Model>.schema.json for every model; tests/test_schemas.py fails on drift."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from pydantic import BaseModel

HERE = Path(__file__).parent
MODULES = ["schemas.records", "schemas.params", "schemas.training"]


def models() -> dict[str, type[BaseModel]]:
    out = {}
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        for attr, obj in vars(mod).items():
            if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == name and not attr.startswith("_"):
                out[attr] = obj
    return dict(sorted(out.items()))


def render(model: type[BaseModel]) -> str:
    return json.dumps(model.model_json_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def expected() -> dict[str, str]:
    return {f"{name}.schema.json": render(m) for name, m in models().items()}


def main() -> None:
    out = HERE / "json"
    out.mkdir(exist_ok=True)
    want = expected()
    for stale in out.glob("*.schema.json"):
        if stale.name not in want:
            stale.unlink()
    for name, text in want.items():
        (out / name).write_text(text, encoding="utf-8")
    print(f"schemas: wrote {len(want)} JSON Schemas to {out.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
