"""The committed JSON Schemas are generated from the pydantic models and must not drift."""
from schemas import generate


def test_committed_json_schemas_match_models():
    want = generate.expected()
    folder = generate.HERE / "json"
    have = {p.name: p.read_text(encoding="utf-8") for p in folder.glob("*.schema.json")}
    assert set(have) == set(want), "run `make schemas`: schema files added or removed"
    drifted = sorted(n for n in want if have[n] != want[n])
    assert not drifted, f"run `make schemas`: {drifted} drifted from the models"


def test_params_models_forbid_unknown_keys():
    import pytest
    from pydantic import ValidationError

    from schemas.params import BuildDatasetParams, ExportParams, RedactParams

    for model in (RedactParams, ExportParams, BuildDatasetParams):
        with pytest.raises(ValidationError):
            model.model_validate({"no_such_setting": 1})


def test_trust_status_cannot_be_switched_on():
    import pytest
    from pydantic import ValidationError

    from schemas.params import RedactParams

    with pytest.raises(ValidationError):
        RedactParams(trust_status=True)


def test_params_yaml_loads_into_every_model():
    from stages.core import load_params
    from schemas.params import BuildDatasetParams, ExportParams, RedactParams

    root = generate.HERE.parent
    for section, model in (("redact", RedactParams), ("export", ExportParams), ("build_dataset", BuildDatasetParams)):
        load_params(root / "params.yaml", section, model)
